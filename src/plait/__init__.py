"""Plait: distributed and federated training for PyTorch."""

__version__ = "0.1.0"
