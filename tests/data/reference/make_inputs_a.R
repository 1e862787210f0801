#!/usr/bin/env Rscript
# Inputs of case a_lmm_example_gaussian: the data of FLASHMM's lmm() documentation example
# (set.seed(2024); 1000 cells x 10 N(0, 1) genes; 20 samples nested in trt A/B).
#
#   Rscript tests/data/reference/make_inputs_a.R OUT_DIR
#   Rscript tests/data/reference/flashmm_case.R OUT_DIR     # then the FLASHMM outputs
#
# Writes Y.mtx, genes.txt, cells.txt and obs.csv; copy spec.json from the case folder first.
# Versions: see flashmm_case.R.
suppressPackageStartupMessages(library(Matrix))
out_dir <- commandArgs(trailingOnly = TRUE)[1]
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

set.seed(2024)
n <- 1e3
m <- 10
Y <- matrix(rnorm(m * n), m, n)
rownames(Y) <- paste0("Gene", 1:nrow(Y))
colnames(Y) <- paste0("Cell", 1:n)
trt <- sample(c("A", "B"), n, replace = TRUE)
q <- 20
sam <- rep(NA, n)
sam[trt == "A"] <- paste0("A", sample.int(q / 2, sum(trt == "A"), replace = TRUE))
sam[trt == "B"] <- paste0("B", sample.int(q / 2, sum(trt == "B"), replace = TRUE))
obs <- data.frame(trt = trt, sam = sam, row.names = colnames(Y))

source_dir <- dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE)))
source(file.path(source_dir, "write_inputs.R"))
write_inputs(Y, obs, out_dir, integer = FALSE)
