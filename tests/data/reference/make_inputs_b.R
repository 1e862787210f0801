#!/usr/bin/env Rscript
# Inputs of cases b_simu_reml_counts and c_simu_ml_re_fim (the same data): FLASHMM's
# simuRNAseq documentation example, set.seed(2412),
# simuRNAseq(nGenes = 50, nCells = 1000, nsam = 25, ncls = 4, ntrt = 2, nDEgenes = 6).
#
#   Rscript tests/data/reference/make_inputs_b.R OUT_DIR
#   Rscript tests/data/reference/flashmm_case.R OUT_DIR [OUT_DIR] Gene1,Gene45,Gene25   # case b
#
# Writes Y.mtx (raw counts), genes.txt, cells.txt and obs.csv (sam, cls, trt, libsize); copy
# spec.json from the case folder first. Versions: see flashmm_case.R.
suppressPackageStartupMessages({
  library(FLASHMM)
  library(Matrix)
})
out_dir <- commandArgs(trailingOnly = TRUE)[1]
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

set.seed(2412)
dat <- simuRNAseq(nGenes = 50, nCells = 1000, nsam = 25, ncls = 4, ntrt = 2, nDEgenes = 6)
obs <- dat$metadata[, c("sam", "cls", "trt", "libsize")]

source_dir <- dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE)))
source(file.path(source_dir, "write_inputs.R"))
write_inputs(dat$counts, obs, out_dir, integer = TRUE)
