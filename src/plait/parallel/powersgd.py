"""PowerSGD (Vogels, Karimireddy, Jaggi 2019) as a communication hook: each gradient matrix M (n × m) is sent as
two thin factors, P = M Q (n × r) and Q = Mᵀ P̂ (m × r), both *summed* by the run's all-reduce, so the bytes per
rank are 2(k−1)/k · 4r(n + m) for k ranks: flat as ranks grow, unlike all-gathered compression.

Per bucket, one step:
1. M ← gradient + error (error feedback: what earlier steps' low-rank approximations left out);
2. P ← M Q for every matrix (Q warm-started from the previous step: one power iteration per step refines it),
   all-reduced together with the bucket's uncompressed tensors (biases, and matrices too small to gain);
3. P̂ ← orthonormal basis of the summed P (QR: identical on every rank, as its input is);
4. Q ← Mᵀ P̂; error ← M − P̂ Qᵀ (this rank's own residual: the part of M outside the shared basis);
   Q all-reduced and divided by k; the gradient becomes P̂ Qᵀ, and Q is kept for the next step.

The first `start_step` steps of each bucket are plain all-reduces (the paper and PyTorch warm up the same way: the
early gradient changes fast, and a low-rank basis of it is a poor one). The first Q is drawn from `seed`, the same
on every rank (P = M Q is only summable if every rank multiplies by the same Q).
"""

from __future__ import annotations

import torch

from plait.parallel.collectives import Handle
from plait.parallel.comm_hooks import GradBucket, allreduce_hook


class _BucketState:
    __slots__ = ("calls", "q", "error")

    def __init__(self) -> None:
        self.calls = 0
        self.q: list[torch.Tensor] | None = None       # warm start, one [m, r] per compressed matrix
        self.error: list[torch.Tensor] | None = None   # error feedback, one [n, m] per compressed matrix


class PowerSGDHook:
    def __init__(self, *, rank: int = 4, start_step: int = 10, error_feedback: bool = True, seed: int = 0):
        if rank < 1:
            raise ValueError(f"comm_hook.rank must be >= 1, got {rank}")
        if start_step < 0:
            raise ValueError(f"comm_hook.start_step must be >= 0, got {start_step}")
        self.rank, self.start_step, self.error_feedback, self.seed = rank, start_step, error_feedback, seed
        self._state: dict[int, _BucketState] = {}

    def _split(self, bucket: GradBucket) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(matrices worth compressing, as [n, m] views; the other gradients, flat views)."""
        matrices, rest = [], []
        for view in bucket.views():
            if view.dim() >= 2:
                rows, cols = view.shape[0], view[0].numel()
                r = min(self.rank, rows, cols)
                if r * (rows + cols) < rows * cols:
                    matrices.append(view.reshape(rows, cols))
                    continue
            rest.append(view.reshape(-1))
        return matrices, rest

    def __call__(self, bucket: GradBucket) -> Handle:
        state = self._state.setdefault(bucket.index, _BucketState())
        state.calls += 1
        if state.calls <= self.start_step:
            return allreduce_hook(bucket)
        matrices, rest = self._split(bucket)
        if not matrices:
            return allreduce_hook(bucket)
        buffer, n = bucket.buffer, bucket.allreduce.world_size
        if state.q is not None and state.q[0].device != buffer.device:  # loaded from a checkpoint (host copies)
            state.q = [q.to(buffer.device) for q in state.q]
            state.error = [e.to(buffer.device) for e in state.error] if state.error is not None else None
        if state.q is None:
            # the same seed on every rank: the first Q must be shared (P = M Q is summed over ranks)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + bucket.index)
            state.q = [torch.randn(m.shape[1], min(self.rank, *m.shape), generator=gen).to(buffer.device, buffer.dtype)
                       for m in matrices]
            state.error = [torch.zeros_like(m) for m in matrices] if self.error_feedback else None
        if state.error is not None:
            for m, e in zip(matrices, state.error):
                m.add_(e)
        # one all-reduce for the uncompressed tensors and every P of the bucket
        packed = torch.cat([*rest, *(torch.mm(m, q).reshape(-1) for m, q in zip(matrices, state.q))])
        first = bucket.allreduce.all_reduce_async(packed)

        def finish() -> None:
            first.wait()
            offset = 0
            for view in rest:
                view.copy_(packed[offset:offset + view.numel()]).div_(n)
                offset += view.numel()
            bases, qs = [], []
            for m, q in zip(matrices, state.q):
                p = packed[offset:offset + m.shape[0] * q.shape[1]].view(m.shape[0], q.shape[1])
                offset += p.numel()
                p_hat = torch.linalg.qr(p).Q  # the same on every rank: its input is the same sum
                q_mine = torch.mm(m.t(), p_hat)
                if state.error is not None:
                    state.error[len(bases)].copy_(m).sub_(torch.mm(p_hat, q_mine.t()))  # what this rank leaves out
                bases.append(p_hat)
                qs.append(q_mine)
            q_flat = torch.cat([q.reshape(-1) for q in qs])
            bucket.allreduce.all_reduce_async(q_flat).wait()
            q_flat.div_(n)
            offset = 0
            for i, (m, p_hat) in enumerate(zip(matrices, bases)):
                q = q_flat[offset:offset + qs[i].numel()].view_as(qs[i])
                offset += q.numel()
                state.q[i] = q.clone()  # warm start: next step's power iteration begins here
                m.copy_(torch.mm(p_hat, q.t()))  # m is a view into the bucket: the gradient becomes P̂ Qᵀ

        return Handle(finish)

    # ---- checkpoint -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state (its errors differ from the other ranks'; Q is the same on all), on the host."""
        return {index: {"calls": st.calls, "q": [q.cpu() for q in st.q] if st.q is not None else None,
                        "error": [e.cpu() for e in st.error] if st.error is not None else None}
                for index, st in self._state.items()}

    def load_state_dict(self, state: dict) -> None:
        self._state = {}
        for index, saved in state.items():
            st = self._state[int(index)] = _BucketState()
            st.calls, st.q, st.error = int(saved["calls"]), saved["q"], saved["error"]
