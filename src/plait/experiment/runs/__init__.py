"""The run entry points of the planes: each reads its config, prepares the run directory, drives the plane through a
`plait.experiment.run.Run` and draws the plots."""
