"""Data parallel when torchrun put rank 0 on another node than the one that wrote the run directory: the latest
checkpoint and its records reach rank 0 over the process group (real gloo ranks, one directory per "node"), and a
restart with no checkpoint on any node still starts over."""

from __future__ import annotations

from pathlib import Path

from plait.experiment.rundir import RunDir
from plait.experiment.runs.rank0_files import bring_latest_checkpoint_to_rank0
from plait.parallel.launch import spawn_ranks
from plait.runtime.checkpoint import load_checkpoint, save_checkpoint


def _on_node(rank: int, world_size: int, root: str) -> tuple[int | None, list[str]]:
    run = RunDir(Path(root) / f"node{rank}" / "dp")
    moved = bring_latest_checkpoint_to_rank0(run)
    return moved, sorted(p.name for p in run.path.iterdir()) if run.path.exists() else []


def _write_run(path: Path, step: int, records: int) -> None:
    save_checkpoint(path / "checkpoint.pt", {"step": step, "params": [float(step)]})
    (path / "config.toml").write_text(f"# written at step {step}\n")
    (path / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, records + 1)))


def test_rank0_without_the_checkpoint_receives_the_latest_with_its_records(tmp_path):
    _write_run(tmp_path / "node0" / "dp", step=4, records=4)    # where rank 0 ran before an earlier restart
    _write_run(tmp_path / "node2" / "dp", step=12, records=12)  # where rank 0 ran last: the latest
    _write_run(tmp_path / "node1" / "dp", step=8, records=8)
    results = spawn_ranks(_on_node, 3, str(tmp_path), timeout_s=120)
    assert [moved for moved, _ in results] == [2, 2, 2]
    node0 = tmp_path / "node0" / "dp"
    assert int(load_checkpoint(node0 / "checkpoint.pt")["step"]) == 12
    assert (node0 / "metrics.jsonl").read_text() == (tmp_path / "node2" / "dp" / "metrics.jsonl").read_text()
    assert (node0 / "config.toml").read_text() == "# written at step 12\n"
    assert "metrics.csv" not in results[0][1]  # the sender had none: none is invented
    assert int(load_checkpoint(tmp_path / "node1" / "dp" / "checkpoint.pt")["step"]) == 8  # others untouched


def test_nothing_moves_when_rank0_holds_the_latest_or_no_node_holds_one(tmp_path):
    _write_run(tmp_path / "node0" / "dp", step=8, records=8)
    _write_run(tmp_path / "node1" / "dp", step=8, records=3)
    assert [moved for moved, _ in spawn_ranks(_on_node, 2, str(tmp_path), timeout_s=120)] == [None, None]
    assert len((tmp_path / "node0" / "dp" / "metrics.jsonl").read_text().splitlines()) == 8
    empty = tmp_path / "empty"
    assert spawn_ranks(_on_node, 2, str(empty), timeout_s=120) == [(None, []), (None, [])]
