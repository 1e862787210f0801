#!/usr/bin/env Rscript
# Rebuild the FLASHMM outputs of one reference case from its inputs.
#
#   Rscript tests/data/reference/flashmm_case.R CASE_DIR [OUT_DIR] [LME4_GENES]
#
# Reads the inputs of CASE_DIR (Y.mtx, genes.txt, cells.txt, obs.csv and the model in
# spec.json: fixed, random, method, is_counts, theta0, max_iter, epsilon, output_RE,
# output_FIM, contrasts) and writes to OUT_DIR (default: CASE_DIR) the files described in
# README.md: X.csv, Z.csv, coef/se/t/p.csv, theta/se_theta/dlogL.csv, logLik.csv, niter.csv,
# df.txt, cov.csv, RE.csv and FIM_*.csv when asked, ss_*.csv, test_default.csv, contrast.csv,
# test_contrast_<alternative>.csv, and conditions.json (the R warnings and messages, recorded in
# spec.json as "warnings" and "messages"). LME4_GENES (comma-separated, e.g. Gene1,Gene45,Gene25)
# adds lme4_check.csv: the same model fitted per gene with lme4::lmer(REML = TRUE).
#
# The inputs of cases a-c are made by make_inputs_<case>.R from the seed in spec.json; those of
# d-h are stored data (see README.md). Versions used: R 4.2.2 Patched (2022-11-10 r83330),
# FLASHMM 1.3.0 (BaderLab/FLASHMM commit 3fe4db9cbfc2dc232d657c95aefddf4a0ca31fc0), Matrix 1.5.3,
# MASS 7.3.58.2, lme4 1.1.31, jsonlite 1.8.4, reference BLAS/LAPACK 3.11.0, LC_COLLATE=C.UTF-8.

suppressPackageStartupMessages({
  library(FLASHMM)
  library(Matrix)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C.UTF-8")) # R's factor level order (see README.md)

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 1) stop("usage: Rscript flashmm_case.R CASE_DIR [OUT_DIR] [LME4_GENES]")
case_dir <- args[1]
out_dir <- if (length(args) >= 2) args[2] else case_dir
lme4_genes <- if (length(args) >= 3) strsplit(args[3], ",")[[1]] else character(0)
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)
spec <- fromJSON(file.path(case_dir, "spec.json"), simplifyVector = TRUE)

# ---------------------------------------------------------------- writing (17 digits, NA, NaN)
fmt <- function(x) ifelse(is.nan(x), "NaN", ifelse(is.na(x), "NA", sprintf("%.17g", x)))
quote_names <- function(x) paste0("\"", x, "\"")
write_table <- function(D, file) { # character columns quoted, numbers with 17 digits
  for (j in seq_along(D)) D[[j]] <- if (is.numeric(D[[j]])) fmt(D[[j]]) else quote_names(D[[j]])
  names(D) <- quote_names(names(D))
  write.table(D, file.path(out_dir, file), sep = ",", quote = FALSE, row.names = FALSE)
}
write_matrix_q <- function(M, file) { # as write_matrix, with quoted row and column names
  D <- data.frame(quote_names(rownames(M)), check.names = FALSE, stringsAsFactors = FALSE)
  for (j in seq_len(ncol(M))) D[[j + 1]] <- fmt(M[, j])
  names(D) <- quote_names(c("", colnames(M)))
  write.table(D, file.path(out_dir, file), sep = ",", quote = FALSE, row.names = FALSE)
}
write_long <- function(A, file) { # (row, col, gene) array in long form, row fastest
  dn <- dimnames(A)
  D <- expand.grid(row = dn[[1]], col = dn[[2]], gene = dn[[3]], stringsAsFactors = FALSE)
  write_table(data.frame(gene = D$gene, row = D$row, col = D$col, value = as.vector(A)), file)
}
write_per_gene <- function(x, name, file) {
  D <- data.frame(gene = names(x), value = as.numeric(x))
  names(D)[2] <- name
  write_table(D, file)
}

# ---------------------------------------------------------------- inputs
Y <- readMM(file.path(case_dir, "Y.mtx"))
Y <- as.matrix(Y)
rownames(Y) <- readLines(file.path(case_dir, "genes.txt"))
colnames(Y) <- readLines(file.path(case_dir, "cells.txt"))
classes <- unlist(spec$obs_columns)
obs <- read.csv(file.path(case_dir, "obs.csv"), row.names = 1, check.names = FALSE,
  colClasses = c("character", unname(classes)))
stopifnot(identical(rownames(obs), colnames(Y)))

fixed <- as.formula(spec$fixed)
random_list <- lapply(spec$random, as.formula)
random <- if (length(random_list) == 1) random_list[[1]] else random_list
X <- model.matrix(fixed, data = obs)
Z <- do.call(cbind, lapply(random_list, function(f) model.matrix(f, data = obs)))
write_matrix_q(X, "X.csv")
write_matrix_q(Z, "Z.csv")

# ---------------------------------------------------------------- the fit
conditions <- list(warnings = character(0), messages = character(0))
fit <- withCallingHandlers(
  flashmm(Y, fixed = fixed, random = random, metadata = obs, is.counts = spec$is_counts,
    method = spec$method, theta0 = spec$theta0, max.iter = spec$max_iter,
    epsilon = spec$epsilon, output.cov = TRUE, output.FIM = isTRUE(spec$output_FIM),
    output.RE = isTRUE(spec$output_RE), output.SS = TRUE, verbose = TRUE),
  warning = function(w) {
    conditions$warnings <<- c(conditions$warnings, conditionMessage(w))
    invokeRestart("muffleWarning")
  },
  message = function(m) {
    conditions$messages <<- c(conditions$messages, sub("\n$", "", conditionMessage(m)))
    invokeRestart("muffleMessage")
  }
)
writeLines(toJSON(conditions, pretty = TRUE), file.path(out_dir, "conditions.json"))

for (what in c("coef", "se", "t", "p")) write_matrix_q(fit[[what]], paste0(what, ".csv"))
write_matrix_q(fit$theta, "theta.csv")
write_matrix_q(fit$se.theta, "se_theta.csv")
write_matrix_q(fit$dlogL, "dlogL.csv")
write_per_gene(fit$logLik, "logLik", "logLik.csv")
write_per_gene(fit$niter, "niter", "niter.csv")
writeLines(as.character(fit$df), file.path(out_dir, "df.txt"))
write_long(fit$cov, "cov.csv")
if (isTRUE(spec$output_RE)) write_matrix_q(fit$RE, "RE.csv")
if (isTRUE(spec$output_FIM)) {
  write_long(fit$FIM.beta, "FIM_beta.csv")
  write_long(fit$FIM.theta, "FIM_theta.csv")
}
ss <- fit$summary_data
for (what in c("XX", "XY", "ZX", "ZY", "ZZ")) write_matrix_q(ss[[what]], paste0("ss_", what, ".csv"))
write_per_gene(ss$Ynorm, "Ynorm", "ss_Ynorm.csv")
writeLines(as.character(ss$n), file.path(out_dir, "ss_n.txt"))

# ---------------------------------------------------------------- tests
tests_table <- function(tab) { # lmmtest's matrix: genes x <name>_coef, <name>_t, <name>_p
  D <- data.frame(gene = rownames(tab), check.names = FALSE, stringsAsFactors = FALSE)
  for (j in seq_len(ncol(tab))) D[[colnames(tab)[j]]] <- tab[, j]
  D
}
write_table(tests_table(lmmtest(fit)), "test_default.csv")
if (!is.null(spec$contrasts)) {
  contrast <- unlist(spec$contrasts)
  # an element written without a name in R was stored under its position ("2")
  unnamed <- names(contrast) == as.character(seq_along(contrast))
  names(contrast)[unnamed] <- ""
  C <- contrast.matrix(contrast, colnames(X))
  write_matrix_q(C, "contrast.csv")
  for (alt in c("two.sided", "less", "greater")) {
    tab <- lmmtest(fit, contrast = C, alternative = alt)
    write_table(tests_table(tab), paste0("test_contrast_", alt, ".csv"))
  }
}

# ---------------------------------------------------------------- lme4 on a few genes
if (length(lme4_genes)) {
  suppressPackageStartupMessages(library(lme4))
  reml <- spec$method == "REML"
  yt <- function(g) if (spec$is_counts) log2(1 + Y[g, ]) else Y[g, ]
  bars <- paste0("(1 | ", sub("^~ *0 *\\+ *", "", spec$random), ")")
  # terms() orders the bars with the main effects: "y ~ a + b + (1 | sam) + a:c - 1"
  fixed_rhs <- sub("^~", "", spec$fixed)
  labels <- attr(terms(as.formula(paste("y ~", fixed_rhs, "+", paste(bars, collapse = "+")))),
    "term.labels")
  labels <- ifelse(grepl("|", labels, fixed = TRUE), paste0("(", labels, ")"), labels)
  lme4_formula <- paste0("y ~ ", paste(labels, collapse = " + "),
    if (attr(terms(fixed), "intercept") == 0) " - 1" else "")
  rows <- list()
  for (g in lme4_genes) {
    data <- cbind(obs, y = yt(g))
    m <- lmer(as.formula(lme4_formula), data = data, REML = reml)
    cf <- summary(m)$coefficients
    rows[[length(rows) + 1]] <- data.frame(gene = g, kind = "coef", term = colnames(X),
      flashmm_coef = fit$coef[, g], lme4_coef = cf[colnames(X), 1], flashmm_se = fit$se[, g],
      lme4_se = cf[colnames(X), 2], flashmm_theta = NA, lme4_variance = NA, lme4_formula = NA)
    vc <- as.data.frame(VarCorr(m))
    comps <- sub("^~ *0 *\\+ *", "", spec$random)
    lme4_var <- c(vc$vcov[match(comps, vc$grp)], vc$vcov[vc$grp == "Residual"])
    rows[[length(rows) + 1]] <- data.frame(gene = g, kind = "theta", term = rownames(fit$theta),
      flashmm_coef = NA, lme4_coef = NA, flashmm_se = NA, lme4_se = NA,
      flashmm_theta = fmt(fit$theta[, g]), lme4_variance = fmt(lme4_var), lme4_formula = NA)
    rows[[length(rows) + 1]] <- data.frame(gene = g, kind = "logLik",
      term = paste(spec$method, "logLik"), flashmm_coef = NA, lme4_coef = NA, flashmm_se = NA,
      lme4_se = NA, flashmm_theta = fmt(fit$logLik[g]), lme4_variance = fmt(as.numeric(logLik(m))),
      lme4_formula = lme4_formula)
  }
  D <- do.call(rbind, rows)
  write.csv(D, file.path(out_dir, "lme4_check.csv"), row.names = FALSE)
}
cat("wrote", out_dir, "\n")
