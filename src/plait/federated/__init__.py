"""Federated learning: server round loop, client update, selection, stragglers, strategies, executors."""
