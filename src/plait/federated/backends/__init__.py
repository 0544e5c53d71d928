"""Where a round's clients run: `simulated` (this process or a worker pool); the gRPC backend is `net/backend.py`."""
