"""The cluster planes' run entries (`plait train CONFIG.toml`): each reads its config, prepares the run directory,
hands every rank a `plait.experiment.run.Run` and calls the plane's training code, then draws the plots."""
