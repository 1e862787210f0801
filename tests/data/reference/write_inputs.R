# write_inputs(Y, obs, out_dir, integer): the input files of a reference case (see README.md):
# Y.mtx (genes x cells, MatrixMarket coordinate, 1-based, only non-zeros), genes.txt, cells.txt,
# obs.csv (numbers with 17 significant digits). Sourced by make_inputs_*.R.
write_inputs <- function(Y, obs, out_dir, integer) {
  nz <- which(Y != 0, arr.ind = TRUE)
  nz <- nz[order(nz[, 2], nz[, 1]), , drop = FALSE]
  values <- Y[nz]
  field <- if (integer) "integer" else "real"
  lines <- c(
    paste("%%MatrixMarket matrix coordinate", field, "general"),
    "% genes x cells (rows: genes.txt, columns: cells.txt)",
    paste(nrow(Y), ncol(Y), nrow(nz)),
    paste(nz[, 1], nz[, 2], if (integer) as.character(values) else sprintf("%.17g", values))
  )
  writeLines(lines, file.path(out_dir, "Y.mtx"))
  writeLines(rownames(Y), file.path(out_dir, "genes.txt"))
  writeLines(colnames(Y), file.path(out_dir, "cells.txt"))
  numeric <- vapply(obs, is.numeric, logical(1))
  for (j in which(numeric)) obs[[j]] <- sprintf("%.17g", obs[[j]])
  write.csv(obs, file.path(out_dir, "obs.csv"), quote = which(!numeric))
}
