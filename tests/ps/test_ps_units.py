"""Parameter server, pure parts: wire header, sharding, consistency rules, server optimizers vs torch.optim."""

import math

import numpy as np
import pytest
import torch

from plait.ps.consistency import ClockTable, Consistency
from plait.ps.coordinator import time_at_target
from plait.ps.optim import OptimizerConfig, ShardOptimizer
from plait.ps.sharding import Piece, plan_shards, server_loads
from plait.ps.wire import HEADER_BYTES, Flag, Header, Op, payload_array


def test_header_round_trip_is_fixed_size_struct():
    header = Header(Op.PUSH, worker=3, key=7, clock=41, req=2**40, offset=100, numel=5, extra=-2,
                    flags=Flag.OBSERVER)
    data = header.pack()
    assert len(data) == HEADER_BYTES == 52
    assert Header.unpack(data) == header
    with pytest.raises(ValueError, match="version"):
        Header.unpack(b"\x09" + data[1:])


def test_payload_is_a_view_and_checks_its_length():
    values = np.arange(5, dtype=np.float32)
    frame = memoryview(values.tobytes())
    array = payload_array(Header(Op.PUSH, numel=5), frame)
    np.testing.assert_array_equal(array, values)
    assert not array.flags.writeable  # a view of the received frame, never a copy
    with pytest.raises(ValueError, match="says 4 elements"):
        payload_array(Header(Op.PUSH, numel=4), frame)


def test_shards_are_balanced_by_size_and_cover_every_element():
    sizes = {0: 784 * 200, 1: 200, 2: 200 * 200, 3: 200, 4: 2000, 5: 10}
    plan = plan_shards(sizes, 3)
    total = sum(sizes.values())
    loads = server_loads(plan, 3)
    assert sum(loads) == total and max(loads) - min(loads) <= 1
    for key, size in sizes.items():  # each key's pieces tile it, in order
        pieces = plan[key]
        assert pieces[0].offset == 0 and sum(p.numel for p in pieces) == size
        assert all(a.offset + a.numel == b.offset for a, b in zip(pieces, pieces[1:]))
    assert [p.server for p in plan[0]] == [0, 1, 2]   # the big first layer is split across the servers
    assert len(plan[5]) == 1                          # a tiny key stays whole
    with pytest.raises(ValueError, match="sync.servers"):
        plan_shards(sizes, 0)


def test_pieces_cut_each_server_range_and_keep_the_balance():
    sizes = {0: 1000, 1: 7, 2: 500}
    plan = plan_shards(sizes, 2, max_piece=300)
    assert plan[0] == [Piece(0, 0, 300), Piece(0, 300, 300), Piece(0, 600, 153),   # server 0 owns [0, 753)
                       Piece(1, 753, 247)]
    assert plan[1] == [Piece(1, 0, 7)]
    assert plan[2] == [Piece(1, 0, 300), Piece(1, 300, 200)]
    assert server_loads(plan, 2) == server_loads(plan_shards(sizes, 2), 2) == [753, 754]
    with pytest.raises(ValueError, match="sync.piece_numel"):
        plan_shards(sizes, 2, max_piece=-1)


def test_consistency_from_setting():
    assert Consistency.from_setting("bsp").staleness == 0
    assert Consistency.from_setting("ssp:3").staleness == 3 and str(Consistency.from_setting("SSP:3")) == "ssp:3"
    assert Consistency.from_setting("asp").staleness == math.inf
    for bad in ("ssp", "ssp:-1", "sync"):
        with pytest.raises(ValueError, match="'bsp'|'ssp:3'"):
            Consistency.from_setting(bad)


def test_sync_consistency_is_built_once_when_the_config_is_read_and_written_back_as_text(tmp_path):
    """The config holds the Consistency object the servers use (nothing parses the text again); config.toml, which
    every process reads, holds the text; a bad value is a ConfigError naming the key."""
    import tomllib

    from plait.experiment.rundir import RunDir
    from plait.ps.config import PSRunConfig
    from plait.settings.config import ConfigError, from_dict, load_toml

    config = from_dict(PSRunConfig, {"sync": {"consistency": "SSP:2"}})
    assert config.sync.consistency == Consistency("ssp", 2)
    RunDir(tmp_path).write_config(config)
    assert tomllib.loads(RunDir(tmp_path).config_path.read_text())["sync"]["consistency"] == "ssp:2"
    assert from_dict(PSRunConfig, load_toml(RunDir(tmp_path).config_path)) == config
    assert PSRunConfig().sync.consistency == Consistency("bsp", 0)
    with pytest.raises(ConfigError, match="sync.consistency = 'ssp:x': SSP needs a staleness bound"):
        from_dict(PSRunConfig, {"sync": {"consistency": "ssp:x"}})
    with pytest.raises(ConfigError, match="sync.consistency must be a string, got int 3"):
        from_dict(PSRunConfig, {"sync": {"consistency": 3}})


def test_clock_table_rules_by_hand():
    table = ClockTable(num_workers=3, worker_timeout_s=1.0, now=0.0, join_grace_s=1.0)
    table.add_key(0)
    for worker, clock in ((0, 5), (1, 3), (2, 4)):
        table.advance(0, worker, clock)
    bsp, ssp2, asp = (Consistency.from_setting(text) for text in ("bsp", "ssp:2", "asp"))
    assert table.slowest(0) == 3
    assert table.ready(0, 3, bsp) and not table.ready(0, 4, bsp)
    assert table.ready(0, 5, ssp2) and not table.ready(0, 6, ssp2)
    assert table.ready(0, 100, asp)
    assert table.staleness_seen(0, 5) == 2 and table.staleness_seen(0, 2) == 0
    # worker 1 falls silent: dropped after the timeout unless it is blocked in a pull here
    for worker in (0, 2):
        table.seen(worker, 1.5)
    assert table.drop_silent(1.5, busy={1}) == []
    assert table.drop_silent(1.5, busy=set()) == [1]
    assert table.slowest(0) == 4 and table.ready(0, 4, bsp)
    assert table.seen(1, 2.0) is True and table.slowest(0) == 3  # it came back
    table.finish(1)
    assert table.slowest(0) == 4


def _run_torch(name, params, grads, cfg):
    p = torch.nn.Parameter(torch.tensor(params))
    if name == "sgd":
        opt = torch.optim.SGD([p], lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif name == "momentum":
        opt = torch.optim.SGD([p], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam([p], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
    for grad in grads:
        p.grad = torch.tensor(grad)
        opt.step()
    return p.detach().numpy()


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_server_optimizers_match_torch_optim(name):
    rng = np.random.default_rng(0)
    params = rng.normal(size=1000).astype(np.float32)
    grads = [rng.normal(size=1000).astype(np.float32) for _ in range(5)]
    cfg = OptimizerConfig(name=name, lr=0.05, momentum=0.9, weight_decay=0.01)
    opt = ShardOptimizer(cfg)
    shard = params.copy()
    state = opt.init(shard)
    for grad in grads:
        grad.setflags(write=False)  # as the received wire buffer: the optimizer must not write it
        opt.apply(shard, grad, state)
    np.testing.assert_allclose(shard, _run_torch(name, params, grads, cfg), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fused", [True, False])
def test_plain_sgd_updates_in_place_fused_or_not(monkeypatch, dtype, fused):
    """Plain SGD (the per-push hot path) is one BLAS axpy pass when SciPy is there, two numpy passes otherwise:
    both update the stored array itself (zero-copy pull answers alias it) and never write the wire buffer."""
    from plait.ps import optim

    if fused:
        pytest.importorskip("scipy.linalg.blas")
    monkeypatch.setattr(optim, "_AXPY", None if fused else {})
    rng = np.random.default_rng(1)
    params = rng.normal(size=3001).astype(dtype)
    grad = np.frombuffer(rng.normal(size=3001).astype(dtype).tobytes(), dtype)  # read-only, as received
    wire = grad.copy()
    shard = params.copy()
    opt = ShardOptimizer(OptimizerConfig(name="sgd", lr=0.05))
    state = opt.init(shard)
    opt.apply(shard, grad, state, 1.0 / 3)
    opt.apply(shard, grad, state, 1.0 / 3)
    expected = params.astype(np.float64) - 2 * (0.05 / 3) * wire.astype(np.float64)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(shard, expected, rtol=tol, atol=tol)
    np.testing.assert_array_equal(grad, wire)
    assert (optim._AXPY.get(np.dtype(dtype)) is not None) == fused


def test_optimizer_config_names_the_setting():
    with pytest.raises(ValueError, match="optimizer.lr"):
        OptimizerConfig(lr=0)


def test_example_config_loads_and_unknown_keys_are_errors():
    from pathlib import Path

    from plait.ps.config import PSRunConfig
    from plait.settings.config import ConfigError, from_dict, load_toml

    data = load_toml(Path(__file__).parents[2] / "examples" / "parameter_server.toml")
    config = from_dict(PSRunConfig, data)
    assert config.sync.kind == "ps" and config.sync.servers == 2 and str(config.sync.consistency) == "ssp:3"
    data["sync"]["consistancy"] = "bsp"
    with pytest.raises(ConfigError, match="sync.consistancy"):
        from_dict(PSRunConfig, data)
    with pytest.raises(ConfigError, match="sync.consistency"):
        from_dict(PSRunConfig, {"sync": {"consistency": "ssp"}})
    with pytest.raises(ValueError, match="straggler.worker = 4"):
        from_dict(PSRunConfig, {"straggler": {"worker": 4}}).check_workers(4)


def test_a_rejoining_worker_catches_up_to_the_slowest_other_live_worker():
    from plait.ps.consistency import ClockTable

    table = ClockTable(3, worker_timeout_s=1.0, now=0.0, join_grace_s=0.0)
    table.add_key("a", [9, 4, 7])
    table.add_key("b", [9, 4, 5])
    assert table.drop_silent(now=10.0, busy={0, 2}) == [1]  # worker 1 went silent at clock 4
    table.seen(1, now=11.0)
    assert table.catch_up(1) == 5  # up to min(9, 7) on "a" and min(9, 5) on "b"
    assert table.clocks == {"a": [9, 7, 7], "b": [9, 5, 5]}
    assert table.catch_up(1) == 5  # never moves a clock down
    alone = ClockTable(1, 1.0, 0.0)
    alone.add_key("a", [3])
    assert alone.catch_up(0) is None and alone.clocks["a"] == [3]
    table.finish(2)  # said goodbye: nobody waits for it, until it registers again
    assert table.slowest("b") == 5 and 2 not in table.live
    assert table.start_again(2, now=12.0) and 2 in table.live and not table.start_again(0, now=12.0)


def test_straggler_step_time_by_hand():
    from plait.ps.config import StragglerSection

    fixed = StragglerSection(worker=1, factor=3.0)
    assert fixed.step_time(0.01, rank=1, step=5, num_workers=4) == pytest.approx(0.03)  # slowed: 3x its compute
    assert fixed.step_time(0.01, rank=0, step=5, num_workers=4) == 0.01                  # the others: as computed
    rotating = StragglerSection(factor=3.0, mode="rotating", step_s=0.02)  # an emulated 20 ms device
    assert rotating.step_time(0.005, rank=2, step=6, num_workers=4) == pytest.approx(0.06)  # 6 mod 4 = 2: slowed
    assert rotating.step_time(0.005, rank=1, step=6, num_workers=4) == 0.02                 # padded to 20 ms
    assert rotating.step_time(0.03, rank=1, step=6, num_workers=4) == 0.03                  # never shortened
    assert StragglerSection(step_s=0.02).step_time(0.005, rank=0, step=0, num_workers=1) == 0.02  # no straggler
    with pytest.raises(ValueError, match="straggler.step_s"):
        StragglerSection(step_s=-1)


def test_shard_checkpoint_round_trip_and_the_format_before_pieces(tmp_path):
    from plait.ps.checkpoint import ServerSnapshot, ShardState, checkpointed_clock, load_shards, save_shards

    shards = {(0, 0): ShardState(0, np.arange(3, dtype=np.float32), {"m": np.ones(3, np.float32)}, [4, 5]),
              (0, 3): ShardState(3, np.arange(2, dtype=np.float32), {"m": np.zeros(2, np.float32)}, [4, 4]),
              (7, 10): ShardState(10, np.full(1, 2.0, np.float32), {}, [1, -1])}
    save_shards(tmp_path / "new.npz", ServerSnapshot(shards, [1], 9))
    back = load_shards(tmp_path / "new.npz")
    assert sorted(back.shards) == sorted(shards) and back.finished == [1] and back.updates == 9
    for slot, shard in shards.items():
        np.testing.assert_array_equal(back.shards[slot].param, shard.param)
        assert back.shards[slot].offset == shard.offset and back.shards[slot].clocks == shard.clocks
        assert set(back.shards[slot].opt_state) == set(shard.opt_state) | {"scratch"}
    # one piece per key and server, its offset in a field of its own
    np.savez(tmp_path / "old.npz", finished=np.zeros(0, np.int64), updates=np.array([5]),
             **{"k2.offset": np.array([6]), "k2.param": np.zeros(3, np.float32), "k2.clocks": np.array([4, 4])})
    old = load_shards(tmp_path / "old.npz")
    assert list(old.shards) == [(2, 6)] and old.shards[2, 6].offset == 6 and old.shards[2, 6].clocks == [4, 4]
    # the furthest clock pushed, where a resumed run's records go on from
    assert checkpointed_clock(tmp_path / "new.npz") == 5 and checkpointed_clock(tmp_path / "old.npz") == 4


def test_a_node_is_checked_against_the_config_before_it_starts(tmp_path):
    from plait.ps.node import run_server_node, run_worker_node

    config = tmp_path / "cfg.toml"
    config.write_text('[run]\nroot = "runs"\n[sync]\nkind = "ps"\nservers = 2\n')
    with pytest.raises(ValueError, match=r"--index 2 outside 0..1 \(sync.servers\)"):
        run_server_node(str(config), workers=2, index=2)
    with pytest.raises(ValueError, match=r"--replica 1 outside 0..0 \(sync.replication\)"):
        run_server_node(str(config), workers=2, index=0, replica=1)
    with pytest.raises(ValueError, match="--servers lists 1 endpoints, sync.servers = 2"):
        run_worker_node(str(config), workers=2, rank=0, servers=["tcp://127.0.0.1:5000"])
    with pytest.raises(ValueError, match="--rank 2 outside 0..1"):
        run_worker_node(str(config), workers=2, rank=2, servers=["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"])


def test_curve_key_directory_is_made_once_and_missing_keys_name_the_setting(tmp_path):
    import zmq

    from plait.cli import app
    from plait.ps.security import CurveKeys

    def plait_ps(*args: str) -> None:
        app(["ps", *args])

    plait_ps("keys", str(tmp_path / "keys"))
    made = {p.relative_to(tmp_path / "keys").as_posix() for p in (tmp_path / "keys").rglob("*") if p.is_file()}
    assert made == {"server.key", "server.key_secret", "client.key", "client.key_secret", "launcher.key",
                    "launcher.key_secret", "authorized/client.key", "authorized/launcher.key", "authorized/server.key",
                    "control/launcher.key"}  # control/: the keys that may send control messages (trust.py)
    assert (tmp_path / "keys" / "client.key_secret").stat().st_mode & 0o077 == 0  # secrets are private
    with pytest.raises(SystemExit, match="already holds keys"):
        plait_ps("keys", str(tmp_path / "keys"))
    worker_host = tmp_path / "worker-host"  # given the public server key only: it cannot act as a server
    worker_host.mkdir()
    (worker_host / "server.key").write_bytes((tmp_path / "keys" / "server.key").read_bytes())
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        with pytest.raises(FileNotFoundError, match="sync.curve_keys: .*server.key_secret is missing"):
            CurveKeys(worker_host).secure_server(socket, zmq.Context.instance())
        (worker_host / "client.key_secret").write_text("not a certificate")
        with pytest.raises(ValueError, match="sync.curve_keys: .*client.key_secret is not a CurveZMQ certificate"):
            CurveKeys(worker_host).secure_client(socket)
    finally:
        socket.close(linger=0)


def test_curve_servers_in_one_process_each_have_their_own_authenticator(tmp_path):
    from plait.ps.security import make_keys
    from plait.ps.transport import ServerTransport

    keys = make_keys(tmp_path / "keys")
    first, second = ServerTransport(curve=keys), ServerTransport(curve=keys)  # two at once
    first.bind("tcp://127.0.0.1:0")
    second.bind("tcp://127.0.0.1:0")
    first.close()
    second.close()
    again = ServerTransport(curve=keys)  # and one right after a close, as a restart would
    again.close()


def test_the_time_to_target_is_the_first_evaluation_at_or_under_the_target_loss():
    evaluations = [{"test_loss": 0.5, "elapsed_s": 1.0}, {"step": 3, "elapsed_s": 1.5},  # no test set this time
                   {"test_loss": 0.1, "elapsed_s": 2.0}, {"test_loss": 0.05, "elapsed_s": 3.0}]
    reached = None
    for record in evaluations:
        reached = time_at_target(record, reached, 0.1)
    assert reached == 2.0
    assert time_at_target({"test_loss": 0.0, "elapsed_s": 1.0}, None, 0.0) is None  # target_loss 0: no target
