"""Your own model, data and training loop on Plait's parameter servers, through the KVStore (MXNet's API):

    python examples/cluster/kvstore_own_loop.py --servers 2 --workers 2 --steps 300

`local_servers` starts the servers on this machine (on several hosts: `plait ps server` on each, see
docs/parameter_server.md). Each worker is yours: it pulls the weights into its model, computes gradients with
autograd on its own data and pushes them; the servers apply SGD under BSP (each step: the workers' mean gradient).
"""

import argparse

import torch
from torch import nn

from plait.ps.kvstore import KVStore
from plait.ps.local_servers import local_servers
from plait.ps.optim import OptimizerConfig


def train(rank: int, endpoints: list[str], steps: int) -> None:
    torch.manual_seed(rank)  # each worker its own data: y = sin(x0) + x1·x2
    x = torch.randn(1024, 8)
    y = torch.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    weights = [p.detach() for p in model.parameters()]  # views: a pull writes straight into the model
    with KVStore(endpoints, worker=rank) as kv:
        kv.init(dict(enumerate(weights)))  # the first worker's values win; pull them
        for ts in [kv.pull(key, w) for key, w in enumerate(weights)]:
            ts.wait()
        first = nn.functional.mse_loss(model(x), y).item()
        for _ in range(steps):
            batch = torch.randint(0, len(x), (32,))
            model.zero_grad()  # fresh gradient tensors: a pushed one stays untouched until its push is answered
            nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
            for ts in [kv.pushpull(key, p.grad, w) for key, (p, w) in enumerate(zip(model.parameters(), weights))]:
                ts.wait()  # each key's new weights, in place
        print(f"worker {rank}: loss {first:.4f} -> {nn.functional.mse_loss(model(x), y).item():.4f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with local_servers(args.servers, args.workers, optimizer=OptimizerConfig(name="sgd", lr=0.1)) as endpoints:
        torch.multiprocessing.spawn(train, args=(endpoints, args.steps), nprocs=args.workers)
