"""Federated learning over a real network: a gRPC server process and client processes that dial out to it.

    plait fl certs DIR --clients N           CA, server and client certificates, HMAC keys (test deployments)
    plait fl server CONFIG.toml [--resume]   round loop: select, broadcast, collect, aggregate, checkpoint
    plait fl client --server HOST:PORT --data CONFIG.toml --id K --certs DIR

Weights travel as raw tensor bytes in chunked streams (`wire.py`), never pickled; every call is signed with the
client's key and carries a fresh nonce (`auth.py`); the schema is `plait_fl.proto`. Secure aggregation
(`secagg_round.py`), local and central DP and compression (`pipeline.py`) run across the processes.
"""
