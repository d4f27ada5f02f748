"""Synthetic test images: smooth random colour patterns and tilted depth planes, what the load test adds
(``loadtests/plan.py``) and what ``python -m index.thumbs measure --data loadtest`` stores."""
from __future__ import annotations

import numpy as np


def synth_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour pattern with noise -> uint8 (H, W, 3)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)  # (H, W) each
    f = rng.uniform(1, 6, (3, 2))
    ph = rng.uniform(0, 2 * np.pi, 3)
    img = 0.5 + 0.5 * np.sin(2 * np.pi * (f[:, :1, None] * x + f[:, 1:, None] * y) + ph[:, None, None])  # (3, H, W)
    img = img + rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def synth_depth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A tilted plane with a bump -> uint16 (H, W) depth (0 near, 65535 far)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.3, 0.7)
    cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.05, 0.2)]
    d = a * x + b * y + c - 0.2 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    return (np.clip(d, 0, 1) * 65535).astype(np.uint16)
