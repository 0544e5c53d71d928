"""Trusted-cluster training: launch, collectives, data / model / pipeline parallelism, checkpoints."""
