"""Real data sets that ship inside packages, cached as .npz, and partitioners for federated learning."""
