# mlmRev's Chem97: two crossed-ish factors with thousands of levels, (1|school) + (1|lea),
# q = 2,541. Data stored gzipped (score, school, lea, gcsecnt).
source("../common.R")
suppressPackageStartupMessages(library(mlmRev))
data("Chem97", package = "mlmRev")
d <- Chem97[, c("score", "gcsecnt", "school", "lea")]
con <- gzfile("data.csv.gz", "w")
write.csv(d, con, row.names = FALSE)
close(con)
v <- versions()
v$mlmRev <- as.character(packageVersion("mlmRev"))
write_results(list(
  versions = v,
  crossed = fit_summary(score ~ 1 + gcsecnt + (1 | school) + (1 | lea), d)
), "results.json")
