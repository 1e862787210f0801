# lme4 per-response timings beside benchmarks/bench_solver.py (the lme4 reference lines).
#
#   Rscript benchmarks/lme4_timing.R [n_genes]      # from the repository root
#
# Simulates the two designs of bench_solver.py's lme4 section (25 donors x 200 cells, x
# uniform on (-1, 1), 10 cell types; genes with a donor intercept, a donor slope in x and a
# donor:celltype effect), fits `n_genes` (default 20) responses one by one with lme4's default
# settings (REML), and prints seconds per gene; then fits Chem97 (tests/data/lme4/chem97,
# q = 2,541) once. Prints one line per case, "case seconds_per_gene".
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
n_genes <- if (length(args)) as.integer(args[1]) else 20L
set.seed(0)
donors <- 25; per <- 200
cells <- data.frame(
  donor = factor(rep(sprintf("d%02d", seq_len(donors) - 1), each = per)),
  celltype = factor(sample(sprintf("c%d", 0:9), donors * per, replace = TRUE)),
  x = runif(donors * per, -1, 1)
)
d <- as.integer(cells$donor)
ct <- as.integer(interaction(cells$donor, cells$celltype, drop = TRUE))
ctrl <- lmerControl(check.conv.singular = "ignore")
time_design <- function(formula) {
  total <- 0
  for (g in seq_len(n_genes)) {
    cells$y <- rnorm(donors, 0, 0.5)[d] + rnorm(donors, 0, 0.3)[d] * cells$x +
      rnorm(max(ct), 0, 0.3)[ct] + rnorm(nrow(cells))
    t0 <- proc.time()[["elapsed"]]
    lmer(formula, data = cells, REML = TRUE, control = ctrl)
    total <- total + proc.time()[["elapsed"]] - t0
  }
  total / n_genes
}
if (n_genes > 0) {  # 0: Chem97 only
  cat(sprintf("slope %.4f\n", time_design(y ~ x + (1 + x | donor))))
  cat(sprintf("nested %.4f\n", time_design(y ~ x + (1 | donor) + (1 | donor:celltype))))
}
chem <- read.csv(gzfile("tests/data/lme4/chem97/data.csv.gz"))
chem$school <- factor(chem$school); chem$lea <- factor(chem$lea)
t0 <- proc.time()[["elapsed"]]
invisible(lmer(score ~ 1 + gcsecnt + (1 | school) + (1 | lea), data = chem, REML = TRUE,
               control = ctrl))
cat(sprintf("chem97 %.4f\n", proc.time()[["elapsed"]] - t0))
cat(sprintf("# R %s, lme4 %s\n", getRversion(), packageVersion("lme4")))
