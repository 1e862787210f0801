# Shared helpers for the lme4 oracle cases (sourced by each case's make.R).
# Writes, per fitted model: fixed effects (coef, se), VarCorr (variances, covariances,
# correlations), REML logLik, theta (lme4's relative Cholesky factors), time of lmer,
# and the column names of Z in lme4's order.
suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

versions <- function() {
  list(
    R = R.version.string,
    lme4 = as.character(packageVersion("lme4")),
    Matrix = as.character(packageVersion("Matrix")),
    lmerTest = as.character(packageVersion("lmerTest")),
    jsonlite = as.character(packageVersion("jsonlite"))
  )
}

fit_summary <- function(formula, data, satterthwaite = FALSE, z = FALSE, reml = TRUE) {
  # Timing with lme4's default optimiser settings; the stored estimates come from a refit with
  # much tighter tolerances, so that they are the optimum to ~1e-9 rather than ~1e-5.
  t0 <- proc.time()[["elapsed"]]
  lmer(formula, data = data, REML = reml,
       control = lmerControl(check.conv.singular = "ignore"))
  elapsed <- proc.time()[["elapsed"]] - t0
  ctrl <- lmerControl(
    check.conv.singular = "ignore", check.conv.grad = "ignore",
    optimizer = "nloptwrap",
    optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-15, xtol_rel = 1e-12, ftol_rel = 1e-15,
                   maxeval = 100000)
  )
  m <- lmer(formula, data = data, REML = reml, control = ctrl)
  vc <- as.data.frame(VarCorr(m))
  vc$var1[is.na(vc$var1)] <- ""
  vc$var2[is.na(vc$var2)] <- ""
  out <- list(
    formula = deparse(formula, width.cutoff = 500L),
    coef = as.list(fixef(m)),
    se = as.list(sqrt(diag(as.matrix(vcov(m))))),
    varcorr = list(grp = vc$grp, var1 = vc$var1, var2 = vc$var2,
                   vcov = vc$vcov, sdcor = vc$sdcor),
    sigma2 = sigma(m)^2,
    REML = reml,
    logLik = as.numeric(logLik(m)),
    theta = as.numeric(getME(m, "theta")),
    theta_names = names(getME(m, "theta")),
    singular = isSingular(m),
    lmer_seconds = elapsed,
    optimizer = "nloptwrap (BOBYQA), xtol_abs = xtol_rel = 1e-12, ftol_abs = ftol_rel = 1e-15",
    n = nrow(model.frame(m)),
    q = ncol(getME(m, "Z"))
  )
  if (z) {
    Z <- as(getME(m, "Z"), "TsparseMatrix")
    out$z_colnames <- colnames(getME(m, "Z"))
    out$z_term_names <- names(getME(m, "Ztlist"))
    out$z_triplets <- list(i = Z@i, j = Z@j, x = Z@x)
  }
  if (satterthwaite) {
    suppressPackageStartupMessages(library(lmerTest))
    mt <- lmerTest::lmer(formula, data = data, REML = TRUE, control = ctrl)
    ct <- summary(mt)$coefficients
    out$satterthwaite_df <- as.list(ct[, "df"])
  }
  out
}

write_results <- function(x, path) {
  writeLines(toJSON(x, auto_unbox = TRUE, digits = NA, pretty = TRUE), path)
}
