"""What a network client trains, on its device (net.client_device): the model its config names, with that code
imported, or (net.ship_program) the program the server ships, with no model code at all.

The program is fetched once per run, after registering: a re-registration (the server restarted) keeps it when the
server announces the same hash. Its bytes are checked against the announced SHA-256 before any of them is parsed,
and every round's plan names the program it trains, so a client never trains one it was not told to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from plait.core.flat import FlatSpec
from plait.federated.client_update import ClientData
from plait.federated.components import build_model, build_task, check_model_fits
from plait.federated.net.config import NetworkRunConfig
from plait.federated.net.connection import Connection
from plait.federated.shipping.model import check_program_fits, load_program
from plait.federated.task import Task
from plait.federated.weights import flat_model_state, local_buffer_state

log = logging.getLogger("plait.fl.client")


@dataclass(slots=True)
class Trainee:
    model: torch.nn.Module
    task: Task
    spec: FlatSpec
    local: tuple[torch.Tensor, FlatSpec] | None  # this client's own buffers (fl.buffers = "local")
    label: str                                   # the model as the server names it (checked at registration)
    program_sha256: str = ""                     # the shipped program's hash; "": the model's code is imported
    # The global weights arrive into this one CPU buffer every round (client_update copies them before training),
    # so a round maps no fresh pages for them.
    weights: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.weights = torch.empty(self.spec.numel())


def _trainee(model: torch.nn.Module, task: Task, buffers: str, label: str, program_sha256: str = "") -> Trainee:
    _, spec = flat_model_state(model, buffers=buffers == "federated")
    local = local_buffer_state(model) if buffers == "local" else None
    return Trainee(model, task, spec, local, label, program_sha256)


def imported_trainee(config: NetworkRunConfig, data: ClientData, num_classes: int, device: torch.device) -> Trainee:
    """The config's model and task (their code imported here), checked on this client's data."""
    task, model = build_task(config.fl), build_model(config.model, num_classes)
    check_model_fits(task, model, data.x, data.y, num_classes)
    return _trainee(model.to(device), task, config.fl.buffers, config.model.label)


def shipped_trainee(conn: Connection, reply: Any, config: NetworkRunConfig, data: ClientData,
                    device: torch.device, held: Trainee | None) -> Trainee:
    """The server's program (the one `held` already, if its hash is the announced one), checked on this client's
    data; ValueError saying why it is refused. `reply`: the server's RegisterReply."""
    if not reply.program_sha256:
        raise ValueError("net.ship_program is on in this client's config but the server ships no program: turn it "
                         "on in the server's config too, or give this client the model's code ([model], and "
                         "net.ship_program = false)")
    if held is not None and held.program_sha256 == reply.program_sha256:
        return held
    max_bytes = config.net.max_program_bytes
    program = conn.get_program(reply.session, reply.program_sha256, max_bytes)
    model, task = load_program(program, reply.program_sha256, max_bytes, device)  # the hash first, then parsing
    check_program_fits(model, task, data.x, data.y)
    log.info("client %d: training the server's program for %s (%d bytes, sha256 %s…)", conn.client_id,
             model.program.model, len(program), reply.program_sha256[:16])
    return _trainee(model, task, config.fl.buffers, model.program.model, reply.program_sha256)
