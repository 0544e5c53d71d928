"""uint8 images -> the normalised float32 tensor a model reads, made in one pass over memory.

`(x.float() / 255 - MEAN) / STD` in torch makes three temporary copies of the whole set, and first touching fresh
memory is what costs most on a virtual machine (MNIST's 60 000 images: 188 MB of floats; that expression touched
about 1 GB and took 0.4-1 s of a run's start-up). Here the rows are gathered (in a given order, if any) a block at
a time into a small buffer, and each block is scaled while it is in the cache, straight into the one output. Every
value is rounded as torch rounds it (float32 divide, subtract, divide), so results do not change.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import torch

MEAN, STD = 0.1307, 0.3081  # per-pixel statistics of the MNIST training set (Fashion-MNIST's are close enough)
BLOCK_ROWS = 512            # images per block: 400 KB of uint8, 1.6 MB of float32, about a core's L2 cache
THREAD_MIN_ROWS = 2048      # images a thread converts at least: fewer go on the calling thread alone


def images_to_tensor(images: np.ndarray | torch.Tensor, order: np.ndarray | None = None) -> torch.Tensor:
    """uint8 images [N, H, W] (rows `order` of them, in that order, when given) -> float32 [N, 1, H, W]."""
    pixels = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if pixels.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {pixels.dtype}")
    rows = pixels.reshape(len(pixels), int(np.prod(pixels.shape[1:])))
    count = len(rows) if order is None else len(order)
    # torch's allocator, not numpy's: numpy asks for transparent huge pages past 4 MB, and where the kernel must
    # compact memory to find them (THP defrag "madvise") first touching 188 MB took 0.5-1.4 s, against 0.1 s here
    tensor = torch.empty((count, 1, *pixels.shape[1:]), dtype=torch.float32)
    out = tensor.numpy().reshape(count, rows.shape[1])
    scale, mean, std = np.float32(255.0), np.float32(MEAN), np.float32(STD)

    def convert(first: int, last: int) -> None:  # output rows first..last, a block at a time
        block = np.empty((min(BLOCK_ROWS, last - first), rows.shape[1]), dtype=np.uint8)
        for start in range(first, last, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, last)
            if order is None:
                source = rows[start:stop]
            else:
                source = np.take(rows, order[start:stop], axis=0, out=block[: stop - start])
            target = out[start:stop]
            np.divide(source, scale, out=target)  # uint8 -> float32 is exact; then torch's float32 ops, in place
            np.subtract(target, mean, out=target)
            np.divide(target, std, out=target)

    # numpy lets go of the GIL inside each block's ops: a large set is split among torch's threads (MNIST's 10,000
    # test images: 18 ms on one thread, 11 ms on two, most of it first touching the output); a client's few rows,
    # and a pool worker's (one torch thread), stay on the calling thread
    threads = min(torch.get_num_threads(), count // THREAD_MIN_ROWS)
    if threads < 2:
        convert(0, count)
        return tensor
    blocks = -(-count // BLOCK_ROWS)
    cuts = [min(count, blocks * i // threads * BLOCK_ROWS) for i in range(threads + 1)]
    with concurrent.futures.ThreadPoolExecutor(threads - 1) as helpers:
        rest = [helpers.submit(convert, cuts[i], cuts[i + 1]) for i in range(1, threads)]
        convert(cuts[0], cuts[1])
        for part in rest:
            part.result()
    return tensor
