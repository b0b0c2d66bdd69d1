"""Training and its evaluation: the named recipes, fitting a model, (nested)
cross-validation with its folds and reports, localisation scores against the SIIM masks, the
`train` workflow, and the tiny untrained artifact that tests analyse with."""
