# R side of benchmarks/scaling.py: time FLASHMM::flashmm() on the same simulated data.
#
#   Rscript benchmarks/flashmm_bench.R counts.mtx obs.csv
#
# counts.mtx: genes x cells raw counts (MatrixMarket, written by scaling.py from the h5ad);
# obs.csv: the cells' metadata (sam, cls, trt, libsize). Fits FLASHMM's model
# ~0 + log(libsize) + cls + cls:trt with a random intercept per sample on log2(1 + counts),
# as scflashmm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True).
# Prints one JSON line: wall times in seconds (scaling.py adds the peak RSS from /usr/bin/time -v).
suppressPackageStartupMessages({
  library(Matrix)
  library(FLASHMM)
})
args <- commandArgs(trailingOnly = TRUE)
Y <- as(Matrix::readMM(args[[1]]), "CsparseMatrix")
obs <- read.csv(args[[2]], row.names = 1,
                colClasses = c(sam = "character", cls = "character", trt = "character"))
colnames(Y) <- rownames(obs)
rownames(Y) <- paste0("gene", seq_len(nrow(Y)))

t_total <- system.time(
  fit <- flashmm(Y, fixed = ~ 0 + log(libsize) + cls + cls:trt, random = ~ 0 + sam,
                 metadata = obs, is.counts = TRUE, verbose = FALSE)
)[["elapsed"]]

# the summary statistics alone (sslmm), on log2(1 + Y) as flashmm uses them
X <- model.matrix(~ 0 + log(libsize) + cls + cls:trt, data = obs)
Z <- model.matrix(~ 0 + sam, data = obs)
Yt <- Y
Yt@x <- log2(1 + Yt@x)
t_ss <- system.time(ss <- sslmm(X, Yt, Z))[["elapsed"]]

cat(sprintf('{"total_s": %.3f, "sslmm_s": %.3f, "n": %d, "m": %d}\n',
            t_total, t_ss, ncol(Y), nrow(Y)))
