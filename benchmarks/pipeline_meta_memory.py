"""Peak memory per pipeline rank of building its stage: the whole model then its stage (`build = "full"`) against
meta-device construction then only the stage materialised (`build = "meta"`), on spawned gloo ranks.

    .venv/bin/python benchmarks/pipeline_meta_memory.py [--quick] [--ranks 2 4]

The model is a wide MLP: 8 Linear layers of 4096 × 4096 with a ReLU between two (134M parameters, 512 MiB in fp32;
`--quick`: width 1024), cut by `split_pipeline` balanced by parameter count. Per rank:
- `peak_rss_mib`: the process's peak resident memory growth while building its stage (Linux's VmHWM, reset through
  /proc/self/clear_refs just before; measured after the process group is up, each build in its own spawn);
- `stage_mib`: bytes of the parameters the rank keeps (exact).
Memory figures do not depend on the machine's load. The last line is the headline JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel import split_pipeline
from plait.parallel.launch import spawn_ranks

DEPTH = 8
MIB = 2 ** 20


def wide_mlp(width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, width))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rank(rank: int, world_size: int, build: str, width: int) -> dict:
    # The peak RSS of this process from here on. Not getrusage's ru_maxrss: Linux carries it over from the parent
    # across fork and exec, so a spawned rank would start at its parent's peak. VmHWM is this address space's own,
    # and writing 5 to clear_refs resets it to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    if build == "full":
        torch.manual_seed(0)  # every rank builds the same whole model
        pipe = split_pipeline(wide_mlp(width), loss_fn=F.cross_entropy)
    else:
        pipe = split_pipeline(lambda: wide_mlp(width), loss_fn=F.cross_entropy, build="meta", seed=0)
    peak = _status_kib("VmHWM")
    stage = sum(p.numel() * p.element_size() for p in pipe.parameters())
    return {"rank": rank, "peak_rss_mib": round((peak - before) / 1024, 1), "stage_mib": round(stage / MIB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="width 1024 instead of 4096")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    width = 1024 if args.quick else 4096
    model_mib = DEPTH * (width * width + width) * 4 / MIB  # counted, not built: the ranks' parent stays small
    print(f"wide MLP: {DEPTH} × Linear({width}, {width}), {model_mib:.0f} MiB of fp32 parameters")
    rows = []
    for world_size in args.ranks:
        for build in ("full", "meta"):
            for result in spawn_ranks(_rank, world_size, build, width, timeout_s=600):
                rows.append({"ranks": world_size, "build": build, **result})
                print(f"ranks {world_size}  build {build:4}  rank {result['rank']}  peak growth "
                      f"{result['peak_rss_mib']:7.1f} MiB  stage {result['stage_mib']:6.1f} MiB")
    worst = {f"{r}_{b}": max(row["peak_rss_mib"] for row in rows if row["ranks"] == r and row["build"] == b)
             for r in args.ranks for b in ("full", "meta")}
    print(json.dumps({"model_mib": round(model_mib, 1), "max_peak_rss_growth_mib_per_rank": worst}))


if __name__ == "__main__":
    main()
