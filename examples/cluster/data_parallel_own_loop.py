"""Data parallelism around your own model, in your own training loop (CPU, gloo):

    torchrun --nproc-per-node 2 examples/cluster/data_parallel_own_loop.py
    torchrun --nproc-per-node 2 examples/cluster/data_parallel_own_loop.py --allreduce tree --compression fp16

Every rank draws the same batches and trains on its half of each; `plait.parallel.wrap` averages the gradients over
the ranks while backward runs (all-reduce algorithm, bucket size and compression are its settings), so every
replica takes the same step, as one process would on the whole batch.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import plait.parallel


def two_spirals(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Your own data: two interleaved spirals in the plane, labelled 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(n, generator=gen) * 12
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.stack([t * torch.cos(t + torch.pi * y), t * torch.sin(t + torch.pi * y)], dim=1) / 12
    return x + 0.02 * torch.randn(n, 2, generator=gen), y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--allreduce", default="ring", help="native | ring | tree | naive")
    parser.add_argument("--compression", default="none", help="none | fp16 | topk")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun's environment; on GPUs: "nccl", and the model on cuda:LOCAL_RANK
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = two_spirals(4096)
    net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    model = plait.parallel.wrap(net, allreduce=args.allreduce, bucket_mb=25, compression=args.compression)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    batches = torch.Generator().manual_seed(1)  # the same batches on every rank
    for step in range(1, args.steps + 1):
        mine = torch.randint(len(x), (128,), generator=batches)[rank::world]  # this rank's half of the batch
        opt.zero_grad()
        loss = F.cross_entropy(model(x[mine]), y[mine])
        loss.backward()  # returns with the gradients averaged over the ranks
        opt.step()
        if rank == 0 and step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if rank == 0:
        print(f"accuracy {accuracy:.3f}; rank 0 sent {model.bytes_moved()[0] / 1e6:.1f} MB of gradients")
    model.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
