"""Run directories, typed configs from TOML, metrics, checkpoints, plots, comparison of runs and progress."""
