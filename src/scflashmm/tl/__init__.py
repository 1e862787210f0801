"""scflashmm.tl."""
