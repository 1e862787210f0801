# Simulated single-cell data: 12 donors in two groups, ~40 cells each, a numeric cell
# covariate `x` (e.g. pseudotime, centred), log counts log1p(Poisson) of 6 genes with a
# donor random intercept and a donor random slope on x. Fit per gene:
#   logc ~ x + group + (1 + x | donor)
# Gene g6 has no donor effect at all: a singular fit (boundary) in lme4.
source("../common.R")
set.seed(20261127)
n_donor <- 12
donor <- factor(rep(sprintf("D%02d", seq_len(n_donor)), times = rpois(n_donor, 40) + 10))
n <- length(donor)
group <- factor(ifelse(as.integer(donor) %% 2 == 0, "B", "A"))
x <- round(runif(n, -1, 1), 4)
cells <- data.frame(donor = donor, group = group, x = x)
sd_int <- c(0.5, 0.3, 0.2, 0.6, 0.1, 0)
sd_slope <- c(0.3, 0.2, 0.4, 0.05, 0.3, 0)
rho <- c(0.5, -0.3, 0, 0.8, -0.6, 0)
for (g in seq_along(sd_int)) {
  z1 <- rnorm(n_donor); z2 <- rnorm(n_donor)
  b0 <- sd_int[g] * z1
  b1 <- sd_slope[g] * (rho[g] * z1 + sqrt(1 - rho[g]^2) * z2)
  di <- as.integer(donor)
  eta <- 1 + 0.3 * x + 0.4 * (group == "B") + b0[di] + b1[di] * x
  cells[[sprintf("g%d", g)]] <- log1p(rpois(n, exp(eta)))
}
write.csv(cells, "data.csv", row.names = FALSE)
fits <- list()
for (g in seq_along(sd_int)) {
  gene <- sprintf("g%d", g)
  f <- as.formula(sprintf("%s ~ x + group + (1 + x | donor)", gene))
  fits[[gene]] <- fit_summary(f, cells, satterthwaite = TRUE, z = (g == 1))
}
write_results(list(versions = versions(), genes = fits), "results.json")
