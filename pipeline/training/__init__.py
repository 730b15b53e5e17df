"""Training: `config` (TrainConfig, recipes), `loop` (run: accelerate, loaders, epochs, outputs),
`epoch` (one train epoch, one validation pass), `optim` (optimizer, LR schedule), `rundir` (run
folder checks, resumable state, metrics.csv)."""
