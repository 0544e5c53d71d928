"""The planes' runs, driven in a run directory: one module per entry point (`plait run`, `plait fl server`,
`plait train` for data parallel, pipeline and parameter server). Each reads its config, prepares the run directory,
hands the plane a `plait.experiment.run.Run` and draws the plots."""
