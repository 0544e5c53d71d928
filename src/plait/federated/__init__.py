"""Federated learning with your own model, data and task.

    import plait.federated as fl

    config = fl.FederatedRunConfig(fl=fl.FLConfig(rounds=20, fraction=0.2))
    summary = fl.run_federated(config, model=make_net, data=(x, y), task=fl.Task())
    # summary.run_dir / "model.safetensors" holds the trained weights

The same run from a config file names the code instead: `[model] factory = "my_pkg.models:make_net"`,
`[data] source = "my_pkg.data:load"`, `[fl] task = "my_pkg.task:MyTask"` (docs/api.md). One round loop
(`round_loop.py`) runs it in the simulator, in worker processes, and over gRPC with `plait fl server|client`.
"""

from plait.data.user import Labelled, UserData
from plait.federated.config import FederatedRunConfig, FLConfig, ModelConfig
from plait.federated.plan import TrainingPlan
from plait.federated.simulation import RunSummary, build_server, run_federated
from plait.federated.task import Regression, Task

__all__ = ["FLConfig", "FederatedRunConfig", "Labelled", "ModelConfig", "Regression", "RunSummary", "Task",
           "TrainingPlan", "UserData", "build_server", "run_federated"]
