# lme4's Penicillin: two crossed factors (1|plate) + (1|sample).
source("../common.R")
data("Penicillin", package = "lme4")
write.csv(Penicillin, "data.csv", row.names = FALSE)
write_results(list(
  versions = versions(),
  crossed = fit_summary(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin, z = TRUE)
), "results.json")
