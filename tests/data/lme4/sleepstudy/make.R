# lme4's sleepstudy: correlated (Days|Subject) and uncorrelated (Days||Subject) random slopes.
# Run from this folder: Rscript make.R
source("../common.R")
data("sleepstudy", package = "lme4")
write.csv(sleepstudy, "data.csv", row.names = FALSE)
write_results(list(
  versions = versions(),
  correlated = fit_summary(Reaction ~ Days + (Days | Subject), sleepstudy,
                           satterthwaite = TRUE, z = TRUE),
  uncorrelated = fit_summary(Reaction ~ Days + (Days || Subject), sleepstudy, z = TRUE),
  correlated_ml = fit_summary(Reaction ~ Days + (Days | Subject), sleepstudy, reml = FALSE)
), "results.json")
