# Kenward-Roger (pbkrtest) and Satterthwaite (lmerTest) df for random-slope models, the oracle of
# Kenward-Roger for lme4-style terms. Run from this folder: Rscript make.R
# Data: ../sleepstudy/data.csv (lme4's sleepstudy) and ../simulated_sc/data.csv (12 donors,
# 6 simulated genes, see ../simulated_sc/make.R; with a crossed factor for three of them).
# Per fit (REML, tight optimiser tolerances as in ../common.R): lme4's fixef, vcov and VarCorr
# (vcov entries in the structure's order), pbkrtest's adjusted covariance (vcovAdj) and the
# Kenward-Roger df of every coefficient and of one contrast (Lb_ddf), and lmerTest's
# Satterthwaite df of the same (contest1D).
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(jsonlite)
})
source("../common.R")

ctrl <- lmerControl(
  check.conv.singular = "ignore", check.conv.grad = "ignore",
  optimizer = "nloptwrap",
  optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-15, xtol_rel = 1e-12, ftol_rel = 1e-15,
                 maxeval = 100000)
)

kr_summary <- function(formula, data, contrast) {
  m <- lmerTest::lmer(formula, data = data, REML = TRUE, control = ctrl)
  beta <- fixef(m)
  V0 <- as.matrix(vcov(m))
  VA <- vcovAdj(as(m, "lmerMod"))  # keeps the attributes Lb_ddf needs
  Va <- as.matrix(VA)
  p <- length(beta)
  kr_df <- sapply(seq_len(p), function(j) {
    L <- matrix(0, 1, p); L[j] <- 1
    Lb_ddf(L, V0, VA)
  })
  satt_df <- sapply(seq_len(p), function(j) {
    L <- numeric(p); L[j] <- 1
    contest1D(m, L, ddf = "Satterthwaite")$df
  })
  L <- matrix(contrast, 1, p)
  vc <- as.data.frame(VarCorr(m))
  vc$var1[is.na(vc$var1)] <- ""
  vc$var2[is.na(vc$var2)] <- ""
  list(
    formula = deparse(formula, width.cutoff = 500L),
    coef = as.list(beta),
    se = as.list(sqrt(diag(V0))),
    se_kr = as.list(sqrt(diag(Va))),
    df_kr = as.list(setNames(kr_df, names(beta))),
    df_kr_lmerTest = as.list(setNames(
      summary(m, ddf = "Kenward-Roger")$coefficients[, "df"], names(beta))),
    df_satterthwaite = as.list(setNames(satt_df, names(beta))),
    contrast = contrast,
    contrast_estimate = sum(contrast * beta),
    contrast_se_kr = sqrt(as.numeric(L %*% Va %*% t(L))),
    contrast_df_kr = Lb_ddf(L, V0, VA),
    contrast_df_satterthwaite = contest1D(m, contrast, ddf = "Satterthwaite")$df,
    varcorr = list(grp = vc$grp, var1 = vc$var1, var2 = vc$var2,
                   vcov = vc$vcov, sdcor = vc$sdcor),
    sigma2 = sigma(m)^2,
    logLik = as.numeric(logLik(m)),
    singular = isSingular(m)
  )
}

v <- versions()
v$pbkrtest <- as.character(packageVersion("pbkrtest"))
sleep <- read.csv("../sleepstudy/data.csv")
sleep$Subject <- factor(sleep$Subject)
cells <- read.csv("../simulated_sc/data.csv")
cells$donor <- factor(cells$donor)
cells$group <- factor(cells$group)
# crossed: a cell-level factor `ct` (every third cell) crossing the donors, so that Z'Z is one
# block (the dense path): (1 + x | donor) + (1 | ct) for g1 to g3
cells$ct <- factor(c("a", "b", "c")[(seq_len(nrow(cells)) - 1) %% 3 + 1])
crossed <- list()
for (g in sprintf("g%d", 1:3)) {
  f <- as.formula(sprintf("%s ~ x + group + (1 + x | donor) + (1 | ct)", g))
  crossed[[g]] <- kr_summary(f, cells, c(0, 1, -1))
}
genes <- list()
for (g in sprintf("g%d", 1:6)) {
  f <- as.formula(sprintf("%s ~ x + group + (1 + x | donor)", g))
  genes[[g]] <- kr_summary(f, cells, c(0, 1, -1))
}
write_results(list(
  versions = v,
  sleepstudy = list(
    correlated = kr_summary(Reaction ~ Days + (Days | Subject), sleep, c(1, 1)),
    uncorrelated = kr_summary(Reaction ~ Days + (Days || Subject), sleep, c(1, 1))
  ),
  simulated_sc = genes,
  crossed = crossed
), "results.json")
