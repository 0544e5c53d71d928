"""Count the bytes of activations a stage holds for later backwards: tensors autograd saves plus the stage's stash.

Autograd's saved-tensor hooks see every tensor saved for backward; each distinct storage is counted once (a ReLU
output saved by the ReLU and by the next Linear is one buffer) and uncounted when the last holder is freed, i.e.
when the backward has consumed it. Parameters (and views of them) are weights, not activations, and are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _Held:
    __slots__ = ("tensor", "_meter", "_key")

    def __init__(self, tensor: torch.Tensor, meter: ActivationMeter):
        self.tensor = tensor
        self._meter = meter
        self._key = meter._acquire(tensor)

    def __del__(self) -> None:
        self._meter._release(self._key)


class ActivationMeter:
    def __init__(self, params: Iterable[torch.Tensor] = ()):
        self._weights = {p.untyped_storage().data_ptr() for p in params}  # storages never counted
        self._refs: dict[int, tuple[int, int]] = {}  # storage pointer -> (holders, bytes)
        self.live_bytes = 0
        self.peak_bytes = 0

    def _acquire(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        holders, nbytes = self._refs.get(key, (0, storage.nbytes()))
        if holders == 0:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] = (holders + 1, nbytes)
        return key

    def _release(self, key: int) -> None:
        holders, nbytes = self._refs[key]
        if holders == 1:
            del self._refs[key]
            self.live_bytes -= nbytes
        else:
            self._refs[key] = (holders - 1, nbytes)

    def hold(self, tensor: torch.Tensor) -> _Held:
        """Count a tensor the stage keeps itself (a stashed input or output) for as long as the handle lives."""
        return _Held(tensor, self)

    def _pack(self, tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() in self._weights:
            return tensor
        # detached: a saved output held with its grad_fn would be a cycle (node -> saved -> tensor -> node) that only
        # running the node breaks; a node that a backward prunes (zero bubble's W) would then never be freed.
        # Autograd puts the grad_fn back when it unpacks.
        return _Held(tensor.detach(), self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def recording(self):
        """Context manager: count what autograd saves inside it."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def exclude(self, tensor: torch.Tensor) -> None:
        """Do not count `tensor`'s storage (the first stage's input batch: data, not activations)."""
        self._weights.add(tensor.untyped_storage().data_ptr())

    def include(self, tensor: torch.Tensor) -> None:
        self._weights.discard(tensor.untyped_storage().data_ptr())

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
