"""Parameter server in the line of ps-lite / MXNet's KVStore, over ZeroMQ.

Servers own key ranges of the parameters (balanced by size), apply a server-side optimizer (SGD, momentum, Adam)
and answer push/pull under a consistency model enforced with per-worker clocks: BSP, SSP(s) or ASP. Workers use a
KVStore-style client: `init(key, value)`, `push(key, grad) -> ts`, `pull(key, out) -> ts`, `wait(ts)`.

    wire.py         the message: a fixed struct header, then raw array bytes (never pickle)
    transport.py    ZeroMQ sockets: bind / connect / send_msg / recv_msg
    security.py     CurveZMQ keys (sync.curve_keys): encrypted traffic, servers that accept only known peers
    trust.py        who may send what (key roles), and where a server may listen without CurveZMQ
    sharding.py     which server holds which element range of each key
    consistency.py  BSP / SSP(s) / ASP and the per-key, per-worker clock table
    optim.py        server-side SGD, momentum and Adam on numpy shards
    server.py       the server process loop; server_config.py its settings; checkpoint.py its atomic checkpoints
    admission.py    the checks in front of the server's handlers; refusals.py what is refused, logged as counts
    replication.py  primary-backup replication of a server's range (sync.replication = 2) and its server handlers
    kvstore.py      the worker's client
    config.py       the typed run config ([run] [model] [data] [train] [sync] [optimizer] [straggler] [fault])
    coordinator.py  the run's decisions: create the pieces, release the workers, evaluate, record, end (SHUTDOWN);
                    it is handed its run by the driver (`plait train`: plait/experiment/runs/parameter_server.py)
    launcher.py     start servers and workers on localhost and supervise them (restarts, faults) for the coordinator
    torchrun_roles.py  `plait train` under torchrun: rank 0 coordinates, the others each supervise one server or
                    worker process; torchrun_nodes.py the coordinator's view of them, through torchrun's store
    dashboard.py    the launcher's live page (sync.status_port), from the logs the processes write
    local_servers.py  servers on this machine for a user's own loop over the KVStore
    trainer.py      a worker's training loop (FedAvg models on MNIST); divergence.py a step that is not finite
    node.py         one server or worker process from the config file (`plait ps server|worker`, plait/cli/ps.py,
                    and the launcher's `python -m plait.ps.node`)
"""
