"""Run directories, typed configs from TOML, metrics, checkpoints, plots and progress."""
