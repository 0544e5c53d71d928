"""Federated learning with your own model, data and task.

    import plait.federated as fl
    from plait.experiment import run_federated

    config = fl.FederatedRunConfig(fl=fl.FLConfig(rounds=20, fraction=0.2))
    summary = run_federated(config, model=make_net, data=(x, y), task=fl.Task())
    # summary.run_dir / "model.safetensors" holds the trained weights; without a run directory:
    server = fl.build_server(config, model=make_net, data=(x, y))   # server.run_round(state) -> (state, record)

The same run from a config file names the code instead: `[model] factory = "my_pkg.models:make_net"`,
`[data] source = "my_pkg.data:load"`, `[fl] task = "my_pkg.task:MyTask"` (docs/api.md). One round loop
(`round_loop.py`) runs it in the simulator, in worker processes, and over gRPC with `plait fl server|client`.
"""

from plait.data.user import Labelled, UserData
from plait.federated.config import FederatedRunConfig, FLConfig, ModelConfig
from plait.federated.plan import TrainingPlan
from plait.federated.simulation import build_server
from plait.federated.task import Regression, Task

__all__ = ["FLConfig", "FederatedRunConfig", "Labelled", "ModelConfig", "Regression", "Task", "TrainingPlan",
           "UserData", "build_server"]
