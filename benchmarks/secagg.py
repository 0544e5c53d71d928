"""Secure aggregation vs plain aggregation: 100 clients x 100k parameters, time and traffic per client.

    .venv/bin/python benchmarks/secagg.py            # 3 repetitions per setting
    .venv/bin/python benchmarks/secagg.py --quick    # 1 repetition

Every protocol message goes through its byte encoding (as a network transport would carry it) and traffic is
the encoded length. Inputs are 16-bit fixed point (clip 1, scale 2^15 - 1, uniform weights), the setting of
Bonawitz et al.'s 1.73x figure; the ring is the smallest holding the sum of 100 such values (23 bits). The
FedAvg-weighted variant (weights n_k <= 1000, ring 33 bits) is measured too. Plain aggregation sends fp32 deltas.
Settings: full SecAgg (every pair), SecAgg+ (k = 14 = 2 ceil(log2 100) neighbours), and both with 10% of
clients dropping after key sharing. The last line is the headline: full SecAgg's per-client traffic (up + down)
over sending the same 16-bit inputs in the clear.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from plait.federated.client_update import Update
from plait.federated.secagg import SecAggConfig, SecureAggregator
from plait.federated.strategy import FedAvgAggregator

NUM_CLIENTS, DIM = 100, 100_000


def make_updates(seed: int = 0) -> dict[int, Update]:
    gen = torch.Generator().manual_seed(seed)
    return {cid: Update(torch.randn(DIM, generator=gen).mul_(0.1).clamp_(-1, 1),
                        int(torch.randint(10, 1000, (), generator=gen))) for cid in range(NUM_CLIENTS)}


def run_plain(updates: dict[int, Update], weighting: str) -> dict:
    """FedAvg's running sum, each delta crossing the wire as raw fp32 bytes plus its n_k."""
    start, cpu = time.perf_counter(), time.process_time()
    agg = FedAvgAggregator(DIM, weighting)
    up = 0
    for cid, update in updates.items():
        payload = update.delta.numpy().tobytes() + update.num_examples.to_bytes(8, "little")
        up += len(payload)
        delta = torch.frombuffer(bytearray(payload[:-8]), dtype=torch.float32)
        agg.add(cid, Update(delta, int.from_bytes(payload[-8:], "little")))
    mean = agg.result()
    return {"time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "up_per_client": up / len(updates), "down_per_client": 0, "mean": mean}


def run_secure(updates: dict[int, Update], config: SecAggConfig, weighting: str, dropped: set[int]) -> dict:
    agg = SecureAggregator(DIM, config, weighting=weighting, seed=0, round_id=1, wire=True)
    t0, cpu = time.perf_counter(), time.process_time()
    agg.begin(updates)
    t1 = time.perf_counter()
    for cid, update in updates.items():
        if cid not in dropped:
            agg.add(cid, update)
    t2 = time.perf_counter()
    mean = agg.result()
    t3, cpu = time.perf_counter(), time.process_time() - cpu
    traffic = agg.traffic()
    ups, downs = traffic["per_client_up"], traffic["per_client_down"]
    survivors = [c for c in updates if c not in dropped]
    return {"time_s": t3 - t0, "cpu_s": cpu, "keys_s": t1 - t0, "mask_s": t2 - t1, "unmask_s": t3 - t2,
            "up_per_client": statistics.mean(ups[c] for c in survivors),
            "down_per_client": statistics.mean(downs[c] for c in survivors),
            "bits": agg.server.state.bits, "threshold": agg.server.state.threshold, "mean": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition per setting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else 3
    updates = make_updates()
    dropped = set(range(0, NUM_CLIENTS, 10))   # 10 clients vanish after sharing keys
    sixteen_bit = dict(clip=1.0, scale=2.0**15 - 1)
    settings = [
        ("secagg", SecAggConfig(**sixteen_bit), "uniform", set()),
        ("secagg_drop10", SecAggConfig(**sixteen_bit), "uniform", dropped),
        ("secagg_plus", SecAggConfig(graph="harary", **sixteen_bit), "uniform", set()),
        ("secagg_plus_drop10", SecAggConfig(graph="harary", **sixteen_bit), "uniform", dropped),
        ("secagg_fedavg", SecAggConfig(max_weight=1000, **sixteen_bit), "examples", set()),
    ]
    results = []
    for name, config, weighting, drop in settings:
        kept = {c: u for c, u in updates.items() if c not in drop}
        plain_runs = [run_plain(kept, weighting) for _ in range(repeats)]
        secure_runs = [run_secure(updates, config, weighting, drop) for _ in range(repeats)]
        plain, secure = min(plain_runs, key=lambda r: r["time_s"]), min(secure_runs, key=lambda r: r["time_s"])
        err = (secure["mean"] - plain["mean"]).abs().max().item()
        clear16 = DIM * 2                         # the same 16-bit inputs sent in the clear
        total = secure["up_per_client"] + secure["down_per_client"]
        row = {"setting": name, "bits": secure["bits"], "threshold": secure["threshold"],
               "secure_s": round(secure["time_s"], 3), "secure_cpu_s": round(secure["cpu_s"], 3),
               "keys_s": round(secure["keys_s"], 3),
               "mask_s": round(secure["mask_s"], 3), "unmask_s": round(secure["unmask_s"], 3),
               "plain_s": round(plain["time_s"], 3), "plain_cpu_s": round(plain["cpu_s"], 3),
               "up_bytes": round(secure["up_per_client"]),
               "down_bytes": round(secure["down_per_client"]), "plain_up_bytes": round(plain["up_per_client"]),
               "expansion_vs_fp32_up": round(secure["up_per_client"] / plain["up_per_client"], 3),
               "expansion_vs_16bit_clear": round(total / clear16, 3), "max_abs_error": err}
        results.append(row)
        print(json.dumps(row), flush=True)
    by = {r["setting"]: r for r in results}
    for name in ("secagg_plus", "secagg"):
        r = by[name]
        print(json.dumps({"benchmark": "secagg", "metric": f"{name}_time_s_vs_plain", "plait": r["secure_s"],
                          "reference": r["plain_s"], "ratio": round(r["secure_s"] / r["plain_s"], 1),
                          "goal": None}))
        print(json.dumps({"benchmark": "secagg", "metric": f"{name}_bytes_per_client_up_vs_fp32_plain",
                          "plait": r["up_bytes"], "reference": r["plain_up_bytes"],
                          "ratio": r["expansion_vs_fp32_up"], "goal": None}))
    plus = by["secagg_plus"]
    print(json.dumps({"benchmark": "secagg", "metric": "secagg_plus_expansion_vs_16bit_clear",
                      "plait": plus["up_bytes"] + plus["down_bytes"], "reference": DIM * 2,
                      "ratio": plus["expansion_vs_16bit_clear"], "goal": 1.73}))
    full = by["secagg"]
    print(json.dumps({"benchmark": "secagg", "metric": "secagg_expansion_vs_16bit_clear",
                      "plait": full["up_bytes"] + full["down_bytes"], "reference": DIM * 2,
                      "ratio": full["expansion_vs_16bit_clear"], "goal": 1.73}))


if __name__ == "__main__":
    main()
