"""Shared test set-up: a small thread count (the machine has 2 cores and tests may run beside ranks)."""

import torch

torch.set_num_threads(1)
