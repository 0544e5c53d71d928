"""Which plane a config runs on: a federated simulation (`plait run`) or, for `plait train`, the cluster plane its
`[parallel]` and `[sync]` tables choose. One answer for the commands that run a config and for `plait sweep`, which
checks each of its runs' configs before it starts any."""

from __future__ import annotations

from typing import Any, Literal

from plait.settings.config import ConfigError

TrainPlane = Literal["pipeline", "parameter_server", "data_parallel"]
PLANE_KEYS = ("parallel", "sync")  # the tables whose keys choose `plait train`'s plane


def train_plane(raw: dict[str, Any]) -> TrainPlane:
    """`plait train`'s plane for the config tables `raw` (overrides applied): pipeline for parallel.mode = "model"
    or "pipeline", the parameter server for sync.kind = "ps", else data parallel."""
    tables = {name: raw.get(name, {}) for name in PLANE_KEYS}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config key '{name}' must be a table, got {table!r}")
    if tables["parallel"].get("mode", "data") in ("model", "pipeline"):
        return "pipeline"
    return "parameter_server" if tables["sync"].get("kind", "allreduce") == "ps" else "data_parallel"


def config_class(command: Literal["run", "train"], raw: dict[str, Any]) -> type:
    """The config class the command reads `raw` into (each plane's own checks)."""
    if command == "run":
        from plait.federated.config import FederatedRunConfig

        return FederatedRunConfig
    plane = train_plane(raw)
    if plane == "pipeline":
        from plait.parallel.pipeline.config import PipelineRunConfig

        return PipelineRunConfig
    if plane == "parameter_server":
        from plait.ps.config import PSRunConfig

        return PSRunConfig
    from plait.parallel.config import DataParallelRunConfig

    return DataParallelRunConfig


def check_ranks(config: Any, nproc: int) -> None:
    """`plait train --nproc N`'s check of the ranks against a cluster config (each plane's own), before anything
    starts."""
    from plait.parallel.config import DataParallelRunConfig
    from plait.ps.config import PSRunConfig

    if isinstance(config, DataParallelRunConfig):
        config.check_world(nproc)
    elif isinstance(config, PSRunConfig):
        config.check_workers(nproc)
    else:
        from plait.parallel.pipeline.groups import PipelineLayout

        PipelineLayout(replicas=config.parallel.replicas, stages=config.parallel.stages).check_world(nproc)
