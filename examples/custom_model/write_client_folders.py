"""Give each network client a folder of its own data, as real clients would have:

    python examples/custom_model/write_client_folders.py clients 3     # clients/client-0/data.npz ... and test.npz

Then `plait fl client ... --data-path clients/client-K` reads that folder and nothing else; the server reads only
`test.npz` (data.test_path in fl_network.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from shapes import load_client, make_images


def write(root: Path, num_clients: int) -> None:
    for client_id in range(num_clients):
        folder = root / f"client-{client_id}"
        folder.mkdir(parents=True, exist_ok=True)
        x, y = load_client(client_id)
        np.savez(folder / "data.npz", x=x.numpy(), y=y.numpy())
    test_x, test_y = make_images(600, seed=2)
    np.savez(root / "test.npz", x=test_x.numpy(), y=test_y.numpy())


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "clients"), int(sys.argv[2]) if len(sys.argv) > 2 else 3)
