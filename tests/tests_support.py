"""Shared pieces of the tests that use the user-code example (examples/custom_model)."""

from __future__ import annotations

from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_model"
SHAPES = f"{EXAMPLE / 'shapes.py'}"


def shapes_config(tmp_path, name="shapes", **fl) -> dict:
    return {"run": {"name": name, "root": str(tmp_path / "runs"), "seed": 1, "threads": 1},
            "model": {"factory": f"{SHAPES}:make_net"},
            "data": {"source": f"{SHAPES}:load", "num_clients": 6, "partition": "iid", "eval_fraction": 0.1},
            "fl": {"rounds": 2, "fraction": 0.5, "min_clients": 2, "plan": {"batch_size": 16, "lr": 0.05}, **fl}}
