"""Interleaved 1F1B and zero bubble as data: action lists, dry run against the bubble formulas, the schedules the dry
run must refuse, the B/W split of a backward (single process), and the config's schedule choices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel.pipeline.config import PipelineRunConfig, layer_count
from plait.parallel.pipeline.model import build_sequential, deep_mlp
from plait.parallel.pipeline.schedule import (
    Action,
    DeadlockError,
    Schedule,
    ScheduleError,
    bubble_theory,
    build_schedule,
    dry_run,
    forward_only,
    interleaved_one_f_one_b,
    one_f_one_b,
    zero_bubble,
)
from plait.parallel.pipeline.split_backward import SplitBackward
from plait.settings.config import ConfigError, from_dict
from tests_support import run_plait


def _row(text: str, stage: int | None = None) -> tuple[Action, ...]:
    """'F0 B1 W0' (all on `stage`) or '0F0 2B1' (virtual stage first)."""
    actions = []
    for tok in text.split():
        kind_at = next(i for i, ch in enumerate(tok) if ch in "FBW")
        virtual = int(tok[:kind_at]) if kind_at else stage
        actions.append(Action(virtual, tok[kind_at], int(tok[kind_at + 1:])))
    return tuple(actions)


# ---- interleaved 1F1B -------------------------------------------------------------------------------------------
def test_interleaved_action_lists_and_printout():
    schedule = interleaved_one_f_one_b(2, 4, 2)
    # micro-batches in groups of p = 2, each group through chunk 0 then chunk 1; stage s warms up 2(p-1-s)+(v-1)p
    assert schedule.actions == (
        _row("0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3"),
        _row("1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3"),
    )
    text = str(schedule)
    assert "2 stages × 2 chunks = 4 virtual stages" in text
    assert "stage 1 (virtual 1, 3): 1F0 1F1 3F0 3B0" in text
    assert interleaved_one_f_one_b(3, 5, 1) == one_f_one_b(3, 5)  # one chunk per rank is plain 1F1B


@pytest.mark.parametrize("stages,micro", [(2, 2), (2, 8), (3, 3), (3, 6), (4, 4), (4, 8), (4, 16)])
@pytest.mark.parametrize("chunks", [2, 3])
def test_interleaved_dry_run_bubble_matches_theory(stages, micro, chunks):
    schedule = build_schedule("interleaved_1f1b", stages, micro, chunks)
    theory = bubble_theory(stages, micro, schedule="interleaved_1f1b", chunks_per_rank=chunks)
    assert theory == pytest.approx((stages - 1) / (chunks * micro + stages - 1))
    for forward_cost, backward_cost in ((1.0, 2.0), (1.0, 1.0)):  # costs per chunk
        run = dry_run(schedule, forward_cost=forward_cost, backward_cost=backward_cost)
        assert run.bubble == pytest.approx(theory, abs=1e-12)
        step = forward_cost + backward_cost
        assert run.makespan == pytest.approx((chunks * micro + stages - 1) * step)
    assert theory < bubble_theory(stages, micro)  # v-fold shorter fill and drain than 1F1B


def test_interleaved_holds_more_activations_than_1f1b():
    # chunk activations (each 1/v of a stage's) held on stage s: v·p + 2(p-1-s) at most, capped at v·m
    assert dry_run(interleaved_one_f_one_b(4, 8, 2)).peak_in_flight == (11, 9, 7, 5)
    assert dry_run(one_f_one_b(4, 8)).peak_in_flight == (4, 3, 2, 1)


def test_forward_only_through_chunks():
    assert forward_only(2, 5, 2).actions[0] == _row("0F0 0F1 2F0 2F1 0F2 0F3 2F2 2F3 0F4 2F4")  # a last group of 1
    assert dry_run(forward_only(2, 4, 2)).makespan == pytest.approx(9.0)  # 2 × 4 chunk forwards per rank + 1 hop


# ---- zero bubble (ZB-H1) ----------------------------------------------------------------------------------------
def test_zero_bubble_action_lists_and_timeline():
    assert zero_bubble(4, 6).actions == (
        _row("F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 B3 W3 B4 W4 B5 W5", 0),
        _row("F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 B4 W3 B5 W4 W5", 1),  # stage s holds back s W's
        _row("F0 F1 B0 F2 B1 F3 B2 W0 F4 B3 W1 F5 B4 W2 B5 W3 W4 W5", 2),
        _row("F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 W3 W4 W5", 3),
    )
    lines = dry_run(zero_bubble(2, 2)).format_timeline().splitlines()
    # F = B = W = 1 (the default backward of 2 split in half); stage 0 idles once while B0 comes back
    assert lines == ["stage 0: F0 F1 .. B0 W0 B1 W1", "stage 1: .. F0 B0 F1 B1 W0 W1"]


@pytest.mark.parametrize("stages,micro", [(2, 2), (2, 5), (3, 3), (3, 8), (4, 4), (4, 8), (4, 16), (5, 7)])
@pytest.mark.parametrize("costs", [(1.0, 2.0, 1.0), (1.0, 3.0, 1.0), (2.0, 2.0, 1.0), (1.0, 1.5, 0.5)])
def test_zero_bubble_dry_run_bubble_matches_theory(stages, micro, costs):
    forward_cost, backward_cost, weight_cost = costs  # W <= F and W <= B: ZB-H1's assumption
    run = dry_run(zero_bubble(stages, micro), forward_cost=forward_cost, backward_cost=backward_cost,
                  weight_cost=weight_cost)
    theory = bubble_theory(stages, micro, schedule="zero_bubble", forward_cost=forward_cost,
                           backward_cost=backward_cost, weight_cost=weight_cost)
    assert run.bubble == pytest.approx(theory, abs=1e-12)
    idle = (stages - 1) * (forward_cost + backward_cost - 2 * weight_cost)  # (p-1)(F+B-W) per stage
    assert run.makespan == pytest.approx(micro * (forward_cost + backward_cost) + idle)
    whole = dry_run(one_f_one_b(stages, micro), forward_cost=forward_cost, backward_cost=backward_cost)
    assert run.bubble < whole.bubble
    assert run.peak_in_flight == (min(stages, micro),) * stages  # held until W: 1F1B's first-stage peak everywhere


def test_zero_bubble_theory_is_a_third_of_1f1b_idle_with_equal_costs():
    assert bubble_theory(4, 8, schedule="zero_bubble") == pytest.approx(3 / (3 * 8 + 3))
    assert dry_run(zero_bubble(4, 2)).bubble < dry_run(one_f_one_b(4, 2)).bubble  # m < p: still better


# ---- what the dry run refuses --------------------------------------------------------------------------------------
def test_dry_run_rejects_broken_split_and_interleaved_schedules():
    with pytest.raises(ScheduleError, match="weight gradient before its backward"):
        dry_run(Schedule("early-w", 1, 1, (_row("F0 W0 B0", 0),)))
    with pytest.raises(ScheduleError, match="appears twice"):
        dry_run(Schedule("two-w", 1, 1, (_row("F0 B0 W0 W0", 0),)))
    good = interleaved_one_f_one_b(2, 2, 2).actions
    with pytest.raises(ScheduleError, match="action 1F0: belongs to stage 1"):
        dry_run(Schedule("wrong-row", 2, 2, (good[0][:-1] + _row("1F0"), good[1]), chunks_per_rank=2))
    with pytest.raises(ScheduleError, match="stage 0: missing actions 2B0 2B1"):
        dry_run(Schedule("no-2b", 2, 2, (tuple(a for a in good[0] if a.stage != 2 or a.kind != "B"), good[1]),
                         chunks_per_rank=2))


def test_dry_run_catches_activation_and_gradient_out_of_order_on_one_channel():
    # p = 2: the channel stage 0 -> stage 1 carries activations (into virtual stages 1 and 3) and gradients (into 1)
    good = interleaved_one_f_one_b(2, 2, 2)
    assert good.actions[1] == _row("1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1")
    dry_run(good)
    # stage 1 moves 1B0 before 3F1, but stage 0 sends 3F1's activation (after 2F1) before 1B0's gradient (after 2B0)
    broken = Schedule("swapped", 2, 2, (good.actions[0], _row("1F0 1F1 3F0 3B0 1B0 3F1 3B1 1B1")),
                      chunks_per_rank=2)
    with pytest.raises(ScheduleError, match=r"mismatched send/recv order on stage 1: action 1B0 expects gradient of "
                                            r"micro-batch 0 from virtual stage 2 \(stage 0\), but stage 0 sent the "
                                            r"activation of micro-batch 1 for virtual stage 3 first"):
        dry_run(broken)


def test_dry_run_names_virtual_stages_in_a_deadlock():
    # each stage starts with a forward that waits for the other: nothing was sent, nothing can move
    broken = Schedule("stuck", 2, 1, (_row("2F0 0F0 2B0 0B0"), _row("1F0 3F0 3B0 1B0")), chunks_per_rank=2)
    with pytest.raises(DeadlockError, match=r"stage 0 at 2F0 waits for the activation of micro-batch 0 from virtual "
                                            r"stage 1 \(stage 1\); stage 1 at 1F0 waits for the activation of "
                                            r"micro-batch 0 from virtual stage 0 \(stage 0\)"):
        dry_run(broken)


def test_schedule_sizes_are_checked_with_the_setting_named():
    with pytest.raises(ValueError, match="parallel.micro_batches = 6 must be a multiple of parallel.stages = 4"):
        build_schedule("interleaved_1f1b", 4, 6, 2)
    with pytest.raises(ValueError, match="needs parallel.stages >= 2"):
        build_schedule("interleaved_1f1b", 1, 4, 2)
    with pytest.raises(ValueError, match="parallel.chunks_per_rank = 2 needs parallel.schedule = 'interleaved_1f1b'"):
        build_schedule("zero_bubble", 2, 4, 2)
    with pytest.raises(ValueError, match="parallel.chunks_per_rank must be >= 1"):
        build_schedule("interleaved_1f1b", 2, 4, 0)
    with pytest.raises(ValueError, match="weight_cost"):
        dry_run(zero_bubble(2, 2), backward_cost=1.0, weight_cost=2.0)


# ---- B and W apart compute what one backward computes ------------------------------------------------------------
def _reference_grads(module: nn.Module, x: torch.Tensor, out_grad: torch.Tensor | None, finish=None):
    x = x.detach().requires_grad_(x.requires_grad)
    out = module(x)
    if finish is not None:
        out = finish(out)
    out.backward(out_grad)
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return (x.grad.clone() if x.grad is not None else None), grads


@pytest.mark.parametrize("where", ["middle", "first", "last", "not_sequential"])
def test_split_backward_equals_one_backward(where):
    torch.manual_seed(0)
    module: nn.Module = deep_mlp(depth=3, hidden=8, in_features=6)[1:] if where != "first" else deep_mlp(3, 8, 10, 6)
    if where == "not_sequential":
        module = _Wrapped(module)  # one segment: W redoes the input-gradient chain inside it, still exact
    x = torch.randn(5, 6, requires_grad=where != "first")
    target = torch.randint(0, 10, (5,))
    finish = (lambda out: F.cross_entropy(out, target)) if where == "last" else None
    out_grad = None if where == "last" else torch.randn(5, 10)
    want_input, want_params = _reference_grads(module, x, out_grad, finish)

    graph = SplitBackward(module, x, finish)
    input_grad = graph.backward_input(out_grad)
    assert all(p.grad is None for p in module.parameters())  # B computed no weight gradient
    if where == "first":
        assert input_grad is None
    else:
        torch.testing.assert_close(input_grad, want_input, atol=1e-6, rtol=0)
    graph.backward_weight()
    for p, want in zip(module.parameters(), want_params):
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=0)
    assert graph.segments == []  # the graphs are released after W


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


# ---- config ------------------------------------------------------------------------------------------------------
def test_config_schedule_choices_and_impossible_combinations():
    par = from_dict(PipelineRunConfig, {"parallel": {"schedule": "interleaved_1f1b"}}).parallel
    assert (par.chunks_per_rank, par.stages, par.micro_batches) == (2, 2, 4)
    assert from_dict(PipelineRunConfig, {"parallel": {"schedule": "zero_bubble"}}).parallel.chunks_per_rank == 1
    cases = {
        "parallel.micro_batches = 6 must be a multiple of parallel.stages = 4":
            {"parallel": {"schedule": "interleaved_1f1b", "stages": 4, "micro_batches": 6}},
        "parallel.chunks_per_rank = 2 needs parallel.schedule = 'interleaved_1f1b', not 'zero_bubble'":
            {"parallel": {"schedule": "zero_bubble", "chunks_per_rank": 2}},
        r"model.depth = 5 gives 10 layers, fewer than parallel.stages × parallel.chunks_per_rank = 4 × 3 = 12":
            {"model": {"depth": 5}, "parallel": {"schedule": "interleaved_1f1b", "stages": 4, "micro_batches": 8,
                                                 "chunks_per_rank": 3}},
        r"model.name = '2nn' gives 6 layers, fewer than parallel.stages = 8":
            {"model": {"name": "2nn"}, "parallel": {"stages": 8, "micro_batches": 8}},
        r"parallel.boundaries with 3 entries \(2 stages × 2 chunks\)":
            {"parallel": {"schedule": "interleaved_1f1b", "partition": "explicit", "boundaries": [3]}},
    }
    for message, raw in cases.items():
        with pytest.raises(ConfigError, match=message):
            from_dict(PipelineRunConfig, raw)


def test_layer_count_matches_the_built_models():
    for name, depth in (("mlp", 2), ("mlp", 8), ("2nn", 8), ("cnn", 8)):
        assert layer_count(name, depth, 16) == len(build_sequential(name, depth, 16)), name


def test_cli_refuses_an_impossible_interleaving_before_starting(tmp_path):
    result = run_plait("train", "examples/pipeline.toml", "--nproc", "4",
                                      "--set", 'parallel.schedule="interleaved_1f1b"',
                                      "--set", "parallel.micro_batches=6", "--set", f'run.root="{tmp_path}"')
    assert result.exit_code == 2
    assert "parallel.micro_batches = 6 must be a multiple of parallel.stages = 4" in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())  # nothing was created for a run that cannot start


def test_split_backward_segments_end_at_parameter_layers():
    from plait.parallel.pipeline.split_backward import _segments

    relu_inplace = nn.ReLU(inplace=True)
    layers = [nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), relu_inplace, nn.Dropout(0.0),
              nn.Linear(4, 2), nn.ReLU()]
    groups = _segments(nn.Sequential(*layers))
    # W on a segment runs only its parameter layer's backward; an in-place layer stays before the cut
    assert [[type(layer).__name__ for layer in g] for g in groups] == [
        ["Flatten", "Linear"], ["ReLU", "Linear", "ReLU"], ["Dropout", "Linear"], ["ReLU"]]
    torch.manual_seed(0)
    module = nn.Sequential(*layers)
    x = torch.randn(3, 4, requires_grad=True)
    out_grad = torch.randn(3, 2)
    want_input, want_params = _reference_grads(module, x, out_grad)
    graph = SplitBackward(module, x)
    torch.testing.assert_close(graph.backward_input(out_grad), want_input, atol=1e-6, rtol=0)
    graph.backward_weight()
    for p, want in zip(module.parameters(), want_params):
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=0)


def test_split_backward_frees_every_saved_activation_after_w():
    from plait.parallel.pipeline.memory import ActivationMeter

    # W prunes the ReLU at the start of [ReLU, Linear]: its saved output must still be freed with the graph
    torch.manual_seed(0)
    stage = deep_mlp(depth=4, hidden=8, in_features=6)[1:]  # Linear, ReLU, Linear, ReLU, ...
    meter = ActivationMeter(stage.parameters())
    with meter.recording():
        graph = SplitBackward(stage, torch.randn(5, 6, requires_grad=True))
    held = meter.live_bytes
    graph.backward_input(torch.randn(5, 10))
    assert meter.live_bytes == held  # B keeps what W needs
    graph.backward_weight()
    assert held > 0 and meter.live_bytes == 0
