#!/usr/bin/env Rscript
# Rebuild the lmerTest Satterthwaite reference of case b (see ../README.md).
#
#   Rscript tests/data/reference_satterthwaite/b_simu_reml_counts/lmertest.R [OUT_DIR] [N_GENES]
#
# Reads the data and design of ../../reference/b_simu_reml_counts (Y.mtx, obs.csv, X.csv) and
# the contrast in contrast_vector.csv (both relative to this script's folder); fits the first
# N_GENES genes (default 12) with lmer(y ~ 0 + X + (1 | sam), REML = TRUE), y = log2(1 + counts),
# skips singular fits, and writes satterthwaite_coef.csv, satterthwaite_contrast.csv and
# varcorr_<gene>.csv to OUT_DIR (default: this folder).
# Versions used: R 4.2.2 Patched (2022-11-10 r83330), lme4 1.1.31, lmerTest 3.1.3, Matrix 1.5.3.
suppressPackageStartupMessages({
  library(Matrix)
  library(lmerTest)
})
here <- dirname(normalizePath(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))))
args <- commandArgs(trailingOnly = TRUE)
out_dir <- if (length(args) >= 1) args[1] else here
n_genes <- if (length(args) >= 2) as.integer(args[2]) else 12L
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)
case_dir <- file.path(here, "..", "..", "reference", "b_simu_reml_counts")

Y <- as.matrix(readMM(file.path(case_dir, "Y.mtx")))
rownames(Y) <- readLines(file.path(case_dir, "genes.txt"))
obs <- read.csv(file.path(case_dir, "obs.csv"), row.names = 1, colClasses = "character")
X <- as.matrix(read.csv(file.path(case_dir, "X.csv"), row.names = 1, check.names = FALSE))
L <- read.csv(file.path(here, "contrast_vector.csv"), check.names = FALSE)
stopifnot(identical(L$term, colnames(X)))
sam <- obs$sam

num <- function(x) format(x, digits = 17)
coef_rows <- list()
contrast_rows <- list()
for (gene in rownames(Y)[seq_len(n_genes)]) {
  y <- log2(1 + Y[gene, ])
  m <- lmer(y ~ 0 + X + (1 | sam), REML = TRUE)
  if (isSingular(m)) next
  cf <- summary(m, ddf = "Satterthwaite")$coefficients
  coef_rows[[gene]] <- data.frame(gene = gene, term = sub("^X", "", rownames(cf)),
    estimate = num(cf[, "Estimate"]), se = num(cf[, "Std. Error"]), df = num(cf[, "df"]),
    t = num(cf[, "t value"]), p = num(cf[, "Pr(>|t|)"]))
  ct <- contest1D(m, L$L, ddf = "Satterthwaite")
  contrast_rows[[gene]] <- data.frame(gene = gene, contrast = "BvsA",
    estimate = num(ct$Estimate), se = num(ct$`Std. Error`), df = num(ct$df),
    t = num(ct$`t value`), p = num(ct$`Pr(>|t|)`))
  write.csv(as.data.frame(VarCorr(m)), file.path(out_dir, paste0("varcorr_", gene, ".csv")),
    row.names = FALSE)
}
write.csv(do.call(rbind, coef_rows), file.path(out_dir, "satterthwaite_coef.csv"),
  row.names = FALSE)
write.csv(do.call(rbind, contrast_rows), file.path(out_dir, "satterthwaite_contrast.csv"),
  row.names = FALSE)
cat("wrote", out_dir, "\n")
