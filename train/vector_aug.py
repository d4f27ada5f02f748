"""Augmentation of vector views, in training only: SCARF-style corruption and Gaussian noise.

Images get a random resized crop and a flip; vector views had nothing, and an MLP per view then learns the
training pairs by heart (cross-view recall on held-out items falls as epochs grow). Per view and per
sample, independently:

- corruption (Bahri et al. 2022, SCARF): a fraction ``corrupt`` of the features, chosen at random, is
  replaced by the same feature of another random training row, i.e. a draw from that feature's empirical
  marginal, so a corrupted value is always a plausible value of its feature;
- noise: x + noise * std_f * e, e ~ N(0, 1), with std_f the feature's standard deviation on the training
  data (so ``noise`` is in units of each feature's own spread, whatever its scale).

Both act on the raw source, before the view's standardisation inside the model, and draw from the step's
generator (on the training device) for the *global* batch, so every rank and a resumed run draw the same numbers.
"""
from __future__ import annotations

import torch
from torch import Tensor


class VectorAugment:
    """Corrupt and perturb the vector sources of a batch. ``pool[v]`` (N, D): the training rows of view v,
    on the CPU (the empirical marginals)."""

    def __init__(self, pool: dict[str, Tensor], corrupt: float = 0.0, noise: float = 0.0):
        if not 0 <= corrupt < 1:
            raise ValueError(f"corrupt must be in [0, 1), not {corrupt}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, not {noise}")
        self.pool = {v: p.float().cpu() for v, p in pool.items()}
        self.std = {v: p.std(0) if p.shape[0] > 1 else torch.zeros(p.shape[1]) for v, p in self.pool.items()}
        self.corrupt, self.noise = corrupt, noise
        self._cache: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    @property
    def active(self) -> bool:
        return bool(self.pool) and (self.corrupt > 0 or self.noise > 0)

    def draw(self, view: str, n: int, generator: torch.Generator) -> Tensor:
        """(n, D) augmented offsets' ingredients for view ``view``: returns the replacement-or-keep mask
        folded into (values, mask, noise) as one (3, n, D) tensor on the generator's device."""
        dev = generator.device  # drawn where the generator lives (the GPU on a CUDA run): nothing is copied
        pool, std = self._on(view, dev)
        d = pool.shape[1]
        mask = torch.rand(n, d, generator=generator, device=dev) < self.corrupt  # (n, D): True = replace
        donor = torch.randint(0, pool.shape[0], (n, d), generator=generator, device=dev)  # (n, D): the lending row
        values = pool[donor, torch.arange(d, device=dev)]  # (n, D): feature f of row donor[n, f]
        eps = torch.randn(n, d, generator=generator, device=dev) * (self.noise * std)  # (n, D)
        return torch.stack([values, mask.float(), eps])

    def _on(self, view: str, device: torch.device) -> tuple[Tensor, Tensor]:
        """The pool and per-feature std of ``view`` on ``device`` (copied there once)."""
        key = (view, str(device))
        if key not in self._cache:
            self._cache[key] = (self.pool[view].to(device), self.std[view].to(device))
        return self._cache[key]

    def __call__(self, batch: dict[str, Tensor], generator: torch.Generator, n_global: int | None = None,
                 lo: int = 0) -> dict[str, Tensor]:
        """Augment ``batch``'s vector sources (local rows lo..lo+n of a global batch of ``n_global``)."""
        if not self.active:
            return batch
        out = dict(batch)
        for v in sorted(self.pool):  # a fixed order: the draws do not depend on dict order
            if v not in batch:
                continue
            x = batch[v]  # (n, D)
            n = x.shape[0]
            values, mask, eps = self.draw(v, n_global or n, generator)[:, lo:lo + n].to(x.device, x.dtype)
            out[v] = torch.where(mask.bool(), values, x) + eps
        return out


def vector_pool(sources: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """The training rows of the vector views ``names`` among host tensors ``sources``."""
    return {v: sources[v] for v in names if v in sources}
