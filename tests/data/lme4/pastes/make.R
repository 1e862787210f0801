# lme4's Pastes: nested factors (1|batch/cask) = (1|batch) + (1|batch:cask).
source("../common.R")
data("Pastes", package = "lme4")
write.csv(Pastes[, c("strength", "batch", "cask")], "data.csv", row.names = FALSE)
write_results(list(
  versions = versions(),
  nested = fit_summary(strength ~ 1 + (1 | batch / cask), Pastes, z = TRUE)
), "results.json")
