"""Simulated clients for the round loop: every registered client's data in this process (laid out at start, or made
when a client is asked for: data/lazy.py), simulated devices (speed, bandwidth, per-round states) that decide before
training who misses the deadline, simulated attackers, and a `ClientExecutor` (sequential or a worker pool) that
trains the ones kept.

Past `SCAN_UP_TO` registered clients (or with `devices.selection = "sample"`) a round's candidates are a
`DevicePopulation`, found client by client, so nothing in a round grows with the number registered.

A fast simulator decides who is late before training and skips them; the first `target` to finish in simulated time
are kept, the rest (over-selected surplus, stragglers) are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from plait.core.flat import FlatSpec
from plait.data.lazy import ClientSets
from plait.federated.attacks import attacker_ids, flip_labels, poison_count, poison_delta
from plait.federated.bounds import Diverged, UpdateRefused
from plait.federated.client_program import ClientProgram
from plait.federated.client_update import ClientData, Update
from plait.federated.config import FLConfig
from plait.federated.evaluate import evaluate
from plait.federated.executor import ClientExecutor, ClientTask
from plait.federated.population import DevicePopulation
from plait.federated.round_loop import Collected, Evaluation, RoundTasks
from plait.federated.seeds import stage_seed
from plait.federated.stragglers import SCAN_UP_TO, DevicePool, split_on_time
from plait.federated.task import Task
from plait.federated.weights import local_buffer_state

ATTACK_STAGE = 3  # stage index in plait.federated.seeds.stage_seed (1: codecs and local DP, 2: central DP)


class SimulatedBackend:
    aggregates_secagg = False  # simulated secure aggregation is an aggregator (secagg/aggregator.py)

    def __init__(self, config: FLConfig, model: torch.nn.Module, spec: FlatSpec, data: ClientSets,
                 executor: ClientExecutor, seed: int, num_params: int, task: Task | None = None):
        self.config, self.model, self.spec, self.data = config, model, spec, data
        self.executor, self.seed = executor, seed
        self.devices = DevicePool(config.devices, data.num_clients, seed)
        how = config.devices.selection
        self.sampled = how == "sample" or (how == "auto" and data.num_clients > SCAN_UP_TO)
        self.program = ClientProgram(config, seed)
        self.model_bytes = num_params * 4
        # what one compressed update costs on the uplink, for the simulated devices' transfer times
        self.upload_bytes = self.program.stages.codec.encode(torch.ones(num_params)).nbytes
        self.attackers = attacker_ids(config.attack, data.num_clients)
        self.task = task or Task()
        self.clock_s, self.ran_last_round = 0.0, True  # simulated time since the run began
        # fl.buffers = "local": each client's own buffers (BatchNorm statistics), from the model's initial ones
        self.initial_local = local_buffer_state(model) if config.buffers == "local" else None
        self.local: dict[int, torch.Tensor] = {}

    def _local(self, cid: int) -> tuple[torch.Tensor, FlatSpec] | None:
        if self.initial_local is None:
            return None
        return self.local.get(cid, self.initial_local[0]), self.initial_local[1]

    def candidates(self, round_idx: int) -> dict[int, dict[str, bool]] | DevicePopulation:
        """The clients online when the round starts on the virtual clock, with this round's device states: listed,
        or as a population that finds them one by one (`self.sampled`)."""
        if not self.ran_last_round and round_idx > 1:  # the last round found too few clients: time passed anyway
            self.clock_s += self.config.devices.retry_s
        self.ran_last_round = False
        if self.sampled:
            return DevicePopulation(self.devices, round_idx, self.clock_s)
        properties = self.devices.properties(round_idx)
        if self.config.devices.availability == "always":
            return properties
        online = self.devices.online(self.clock_s)
        return {cid: props for cid, props in properties.items() if online[cid]}

    def declared_examples(self, client_ids: list[int]) -> dict[int, int]:
        """The partition sizes; an attacker claiming more examples declares its claim (as it would when it
        registers over the network)."""
        kind = self.config.attack.kind
        return {cid: poison_count(kind, self.data.num_examples(cid)) if cid in self.attackers
                else self.data.num_examples(cid) for cid in client_ids}

    def _client_data(self, cid: int) -> ClientData:
        """The client's rows as stored, converted where it trains (a pool's worker converts its own)."""
        x, y, convert = self.data.client_train_raw(cid)
        if self.config.attack.kind == "label_flip" and cid in self.attackers:
            y = flip_labels(y, self.data.num_classes)
        return ClientData(x, y, convert)

    def collect(self, tasks: RoundTasks, record: dict[str, Any]) -> Collected:
        plans, round_idx = tasks.plans, tasks.round_idx
        finish = {cid: self.devices.finish_time(cid, plans[cid].num_steps(self.data.num_examples(cid)),
                                                self.model_bytes, self.upload_bytes) for cid in tasks.selected}
        kept, dropped = split_on_time(finish, tasks.target, self.config.devices.deadline_s)
        record["bytes_down"] = self.model_bytes * len(tasks.selected)
        # the virtual clock: the round ends with its target's last report, or at the deadline without enough
        waited = max(finish[cid] for cid in kept) if len(kept) >= tasks.target or not self.config.devices.deadline_s \
            else self.config.devices.deadline_s
        self.clock_s += float(waited if kept else (self.config.devices.deadline_s or self.config.devices.retry_s))
        self.ran_last_round = True
        record["sim_clock_h"] = self.clock_s / 3600
        if len(kept) < tasks.quorum:  # the round cannot reach its quorum: nobody needs to train
            record["on_time"] = len(kept)  # selected = on_time + dropped: the on-time few were not enough
            return Collected(participants=0, dropped=len(dropped))
        record["sim_time_s"] = float(max(finish[cid] for cid in kept))  # a plain number in the summary and log
        if self.attackers:
            record["attackers"] = 0
        got = Collected(participants=0, dropped=len(dropped))
        too_large = 0  # honest updates refused for their norm
        for cid, update in self.train(kept, tasks):
            delta, examples = update.delta, update.num_examples
            if update.local_buffers is not None:
                self.local[cid] = update.local_buffers
            if cid in self.attackers:
                record["attackers"] += 1
                generator = torch.Generator().manual_seed(stage_seed(self.seed, round_idx, cid, ATTACK_STAGE))
                delta = poison_delta(self.config.attack.kind, delta, self.config.attack.scale, generator)
                examples = poison_count(self.config.attack.kind, examples)
            encoded = self.program.finish(cid, delta, round_idx)  # the client program's stages, as on a device
            record["bytes_up"] += encoded.nbytes
            try:
                tasks.aggregator.add(cid, Update(self.program.decode(cid, encoded), examples, update.metrics))
            except UpdateRefused as refusal:
                self._refused(refusal, round_idx, cid, update, record)
                too_large += refusal.reason == "norm" and cid not in self.attackers
                continue
            got.loss_sum += update.metrics.get("train_loss", 0.0) * update.num_examples
            got.examples += update.num_examples
            got.participants += 1
        if kept and too_large == len(kept):
            self._stuck(round_idx, too_large, record)
        return got

    def _stuck(self, round_idx: int, refused: int, record: dict[str, Any]) -> None:
        """Every client, all honest, sent an update above the norm bound: the bound comes from the norms accepted
        before, so no later round can be accepted either, and the model would stay where it is to the end (a model
        blown up to large but finite weights, say by a server optimizer's rate). Said as a divergence."""
        what = (f"round {round_idx}: all {refused} clients' updates were refused as above the norm bound "
                "(fl.bounds); no later round could be accepted: the global model has likely diverged (lower "
                "fl.plan.lr or fl.server_opt.lr; or raise fl.bounds.norm_factor or max_norm)")
        if self.config.bounds.on_divergence == "stop":
            raise Diverged(f"{what} (fl.bounds.on_divergence = 'stop')")
        record["diverged"] = what

    def train(self, kept: list[int], tasks: RoundTasks) -> Iterator[tuple[int, Update]]:
        """Each kept client's raw update, in client order (the order they are aggregated in)."""
        work = [ClientTask(cid, tasks.plans[cid], self._client_data(cid), self.task, self._local(cid))
                for cid in kept]
        for task, update in self.executor.run(self.model, self.spec, tasks.params, work):
            yield task.client_id, update

    def _refused(self, refusal: UpdateRefused, round_idx: int, cid: int, update: Update,
                 record: dict[str, Any]) -> None:
        """A simulated client's update failed a bound: counted; a non-finite one from an honest client means its
        local training diverged, which stops the run unless fl.bounds.on_divergence says skip."""
        if refusal.reason == "nonfinite" and cid not in self.attackers \
                and self.config.bounds.on_divergence == "stop":
            raise Diverged(f"round {round_idx}: {refusal} (train loss {update.metrics.get('train_loss')}): its "
                           "local training diverged (fl.bounds.on_divergence = 'stop'; lower "
                           f"{self.config.server_opt.rates_to_lower()}, or set it to 'skip')")
        record["refused"] = record.get("refused", 0) + 1
        record[f"refused_{refusal.reason}"] = record.get(f"refused_{refusal.reason}", 0) + 1

    def evaluate(self, params: torch.Tensor, client_ids: list[int], round_idx: int) -> list[Evaluation]:
        out = []
        for cid in client_ids:
            x, y = self.data.client_eval(cid)
            if len(y):
                m = evaluate(self.model, self.spec, params, x, y, task=self.task, local=self._local(cid))
                out.append(Evaluation(cid, len(y), m.get("accuracy"), m["loss"]))
        return out

    def checkpoint_extra(self) -> dict[str, Any]:
        # simulated clients' error-feedback residuals and own buffers: real clients keep theirs
        return {"residuals": self.program.stages.residuals(), "local_buffers": dict(self.local),
                "sim_clock_s": float(self.clock_s)}  # a plain float: checkpoints load with weights_only

    def load_checkpoint_extra(self, ckpt: dict[str, Any]) -> None:
        self.program.stages.load_residuals(ckpt.get("residuals", {}))
        self.local = {int(cid): t for cid, t in ckpt.get("local_buffers", {}).items()}
        self.clock_s = float(ckpt.get("sim_clock_s", 0.0))

    def close(self) -> None:
        self.executor.close()
