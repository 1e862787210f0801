# lme4 / lmerTest / pbkrtest oracle for nonnegative variance components and Kenward-Roger df with
# two crossed random components (k = 2): samples nested in treatment (3 vs 3) and a batch factor
# crossed with the samples. Small sample and batch variances, so that many genes are singular fits.
# Run from this folder: Rscript make_lme4_boundary.R   (writes the csv/json files next to it)
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(jsonlite)
})
set.seed(20261127)
n_per_sample <- c(14, 9, 18, 11, 16, 12)
sam <- factor(rep(sprintf("S%d", 1:6), n_per_sample))
trt <- factor(ifelse(as.integer(sam) <= 3, "A", "B"))
n <- length(sam)
batch <- factor(sample(c("b1", "b2", "b3"), n, replace = TRUE))
x <- round(rnorm(n), 4)
obs <- data.frame(sam = sam, batch = batch, trt = trt, x = x)
rownames(obs) <- sprintf("Cell%d", seq_len(n))

X <- model.matrix(~ 0 + trt + x, obs)
Zs <- model.matrix(~ 0 + sam, obs)
Zb <- model.matrix(~ 0 + batch, obs)
Z <- cbind(Zs, Zb)
colnames(X) <- c("trtA", "trtB", "x")

m <- 24
sd_sam <- rep(c(0, 0.05, 0.15, 0.4), length.out = m)
sd_batch <- rep(c(0, 0.1, 0.3), each = 1, length.out = m)[c(seq(1, m, 2), seq(2, m, 2))]
Y <- matrix(NA_real_, n, m, dimnames = list(rownames(obs), sprintf("Gene%d", 1:m)))
for (g in 1:m) {
  beta <- c(1, 1 + 0.3 * (g %% 2), 0.2)
  y <- X %*% beta + Zs %*% rnorm(6, sd = sd_sam[g]) + Zb %*% rnorm(3, sd = sd_batch[g]) +
    rnorm(n, sd = 0.5)
  Y[, g] <- round(y, 4)  # the csv then holds the exact values that were fit
}
L <- c(-1, 1, 0)  # trtB - trtA

versions <- list(
  R = R.version.string,
  lme4 = as.character(packageVersion("lme4")),
  lmerTest = as.character(packageVersion("lmerTest")),
  pbkrtest = as.character(packageVersion("pbkrtest")),
  model = "lmer(y ~ 0 + trtA + trtB + x + (1|sam) + (1|batch), REML = TRUE)",
  contrast = "trtB - trtA",
  seed = 20261127
)

fmt <- function(v) trimws(formatC(v, digits = 17, format = "g"))
vars <- list(); coefs <- list(); cons <- list()
for (g in colnames(Y)) {
  d <- cbind(obs, y = Y[, g])
  fit <- lmerTest::lmer(y ~ 0 + trt + x + (1 | sam) + (1 | batch), data = d, REML = TRUE,
                        control = lmerControl(check.conv.singular = "ignore"))
  vc <- as.data.frame(VarCorr(fit))
  vs <- setNames(vc$vcov, vc$grp)
  vars[[g]] <- data.frame(gene = g, var_sam = fmt(vs[["sam"]]), var_batch = fmt(vs[["batch"]]),
                          var_res = fmt(vs[["Residual"]]), singular = isSingular(fit),
                          reml = fmt(REMLcrit(fit)), logLik = fmt(as.numeric(logLik(fit))))
  se0 <- sqrt(diag(as.matrix(vcov(fit))))
  for (ddf in c("Satterthwaite", "Kenward-Roger")) {
    cf <- summary(fit, ddf = ddf)$coefficients
    coefs[[paste(g, ddf)]] <- data.frame(
      gene = g, ddf = ddf, term = colnames(X), estimate = fmt(cf[, "Estimate"]),
      se = fmt(cf[, "Std. Error"]), df = fmt(cf[, "df"]), t = fmt(cf[, "t value"]),
      p = fmt(cf[, "Pr(>|t|)"]), se_unadjusted = fmt(se0))
    ct <- contest1D(fit, L, ddf = ddf)
    cons[[paste(g, ddf)]] <- data.frame(
      gene = g, ddf = ddf, estimate = fmt(ct$Estimate), se = fmt(ct$"Std. Error"),
      df = fmt(ct$df), t = fmt(ct$"t value"), p = fmt(ct$"Pr(>|t|)"))
  }
}
write.csv(do.call(rbind, vars), "lme4_variances.csv", row.names = FALSE)
write.csv(do.call(rbind, coefs), "lme4_coef.csv", row.names = FALSE)
write.csv(do.call(rbind, cons), "lme4_contrast.csv", row.names = FALSE)
write.csv(obs, "obs.csv")
write.csv(X, "X.csv")
write.csv(Z, "Z.csv")
write.csv(Y, "Y.csv")
write.csv(data.frame(term = colnames(X), weight = L), "contrast_vector.csv", row.names = FALSE)
write_json(versions, "info.json", auto_unbox = TRUE, pretty = TRUE)
