"""Pipeline stages cut from your own nn.Sequential, stepped from your own training loop (CPU, gloo):

    torchrun --nproc-per-node 2 examples/cluster/pipeline_own_model.py
    torchrun --nproc-per-node 2 examples/cluster/pipeline_own_model.py --schedule gpipe --split 4

Rank r holds stage r: by default the layers are balanced by parameter count, `--split K` starts stage 1 at layer K.
Each step cuts the batch into micro-batches that flow through the stages along the schedule (1F1B or GPipe); the
last stage computes the loss, and every rank steps its own optimizer on its own stage's parameters.
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
    parser.add_argument("--schedule", default="1f1b", help="1f1b | gpipe")
    parser.add_argument("--split", type=int, default=0, help="first layer of stage 1 (0: balance by parameters)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun's environment; one rank per stage
    x, y = two_spirals(4096)
    torch.manual_seed(0)  # every rank builds the same model and keeps its own stage of it
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))
    pipe = plait.parallel.split_pipeline(model, loss_fn=F.cross_entropy, schedule=args.schedule, micro_batches=4,
                                         boundaries=[args.split] if args.split else None)
    opt = torch.optim.Adam(pipe.parameters(), lr=0.01)  # this rank's stage only
    batches = torch.Generator().manual_seed(1)  # the same batches on every rank
    for step in range(1, args.steps + 1):
        batch = torch.randint(len(x), (128,), generator=batches)
        opt.zero_grad()
        loss = pipe.step(x[batch], y[batch])  # the loss on the last stage, None on the others
        opt.step()
        if loss is not None and step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f} (stages split at {pipe.boundaries})", flush=True)
    logits = pipe.predict(x)
    if logits is not None:
        print(f"accuracy {(logits.argmax(1) == y).float().mean().item():.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
