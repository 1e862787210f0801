"""Atomic file writing: a temporary file in the target's folder, renamed over it on success.

A full disk, an error or an interrupt (Ctrl-C) while writing leaves the target as it was
(absent, or the previous version) and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    Parameters
    ----------
    path
        The file to write.
    suffix
        Ending of the temporary file's name (some writers check it, e.g. ``".h5ad"``).

    Notes
    -----
    On any exception, including :class:`KeyboardInterrupt`, the temporary file is removed
    and ``path`` is left untouched. A SIGINT received while writing is never lost: it
    interrupts the write, or, if a library swallowed it, is raised when the write returns.
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        with _noted_interrupts() as interrupted:
            yield tmp
        if interrupted():
            raise KeyboardInterrupt
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _noted_interrupts() -> Iterator[Callable[[], bool]]:
    """Record SIGINTs (still raising KeyboardInterrupt) so that a swallowed one is not lost."""
    seen = [False]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: seen[0]
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIGINT ignored (SIG_IGN) or not set from Python
        yield lambda: seen[0]
        return

    def handler(signum, frame):
        seen[0] = True
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: seen[0]
    finally:
        signal.signal(signal.SIGINT, previous)
