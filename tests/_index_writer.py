"""Helper for the kill -9 test: add keys one at a time, print each key once add() returned."""
import sys

import numpy as np

from index.store import IndexStore


def vec(i: int, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(1000 + i).standard_normal((1, dim)).astype(np.float32)
    return x / np.linalg.norm(x)


def main() -> None:
    store = IndexStore.open(sys.argv[1], snapshot_ops=int(sys.argv[2]) if len(sys.argv) > 2 else 7)
    i = 0
    while True:
        store.add([f"k{i}"], {"v": vec(i)}, [{"i": i}])
        sys.stdout.write(f"k{i}\n")
        sys.stdout.flush()
        i += 1


if __name__ == "__main__":
    main()
