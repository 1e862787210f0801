# Simulated crossed design with a few hundred levels: 2,400 cells in 400 wells crossed with
# 20 batches (each well's 6 cells spread over batches), treatment constant within a batch,
# a numeric cell covariate x. Three responses fit by y ~ x + treat + (1 | well) + (1 | batch),
# with lmerTest's Satterthwaite df (the Schur path of scflashmm: q = 420).
source("../common.R")
set.seed(11)
n_well <- 400; per <- 6; n_batch <- 20
d <- data.frame(
  well = factor(sprintf("w%03d", rep(seq_len(n_well) - 1, each = per))),
  batch = factor(sprintf("b%02d", sample(seq_len(n_batch) - 1, n_well * per, replace = TRUE)))
)
d$treat <- as.numeric(as.integer(d$batch) %% 2 == 0)
d$x <- round(runif(nrow(d), -1, 1), 4)
w <- as.integer(d$well); b <- as.integer(d$batch)
sim <- function(s_well, s_batch) {
  round(1 + 0.3 * d$x + 0.5 * d$treat + rnorm(n_well, 0, s_well)[w] +
          rnorm(n_batch, 0, s_batch)[b] + rnorm(nrow(d)), 6)
}
d$g1 <- sim(0.8, 0.5)
d$g2 <- sim(0.3, 0.2)
d$g3 <- sim(1.5, 0.05)
con <- gzfile("data.csv.gz", "w")
write.csv(d, con, row.names = FALSE)
close(con)
res <- list(versions = versions())
for (g in c("g1", "g2", "g3")) {
  f <- as.formula(paste(g, "~ x + treat + (1 | well) + (1 | batch)"))
  res[[g]] <- fit_summary(f, d, satterthwaite = TRUE)
}
write_results(res, "results.json")
