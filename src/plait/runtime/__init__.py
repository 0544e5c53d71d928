"""What every plane shares below the driver: checkpoint files, the metrics log format, the canonical metric names,
and the run context a plane is handed by the experiment driver."""
