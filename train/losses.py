"""CMC losses: pure functions of embeddings (no model inside), and the memory bank as explicit state.

Critic: h(v1, v2) = exp(cos(v1, v2) / tau). For a pair of views (i, j) and anchor n in view i,

    L^{i,j} = -E_n log [ h(z_i[n], z_j[n]) / sum_{m in candidates} h(z_i[n], c_m) ]          (CMC eq. 3-5)

with candidates = the positive plus k-1 negatives: the other samples of the batch (``batch``) or K entries
of view j's momentum memory bank (``memory``, softmax form). Memory-bank negatives are either drawn per
anchor (``per-sample``: an (N, K, D) gather) or drawn once per batch and shared by its anchors
(``shared``: one (N, D) x (D, K) product); a shared draw that hits an anchor's own sample is masked out of
that anchor's candidates, so no anchor ever has its own sample as a negative. The two-view loss is symmetric,
L(V_i, V_j) = L^{i,j} + L^{j,i} (eq. 7); several views sum pairs: the core view L_C = sum_j L(V_1, V_j)
(eq. 8) or the full graph L_F = sum_{i<j} L(V_i, V_j) (eq. 9-10). For every pair, log(k) - L^{i,j} bounds
the mutual information I(z_i; z_j) from below (eq. 6); we report the mean over both directions.
Gathering across ranks happens before these calls, so they run the same on one CPU and under torchrun.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def pairs(views: list[str], graph: str) -> list[tuple[str, str]]:
    """View pairs of the objective: 'core' pairs the first view with each other, 'full' takes every pair."""
    if graph == "core":
        return [(views[0], v) for v in views[1:]]
    if graph == "full":
        return [(a, b) for i, a in enumerate(views) for b in views[i + 1:]]
    raise ValueError(f"unknown graph {graph!r}: 'core' or 'full'")


def critic(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    """h = exp(cos / tau) between rows of unit-norm z1 (N, D) and z2 (N, D) -> (N,)."""
    return torch.exp((z1 * z2).sum(-1) / tau)


def nce_direction(anchor: Tensor, positive: Tensor, negatives: Tensor | None, tau: float,
                  neg_mask: Tensor | None = None) -> Tensor:
    """L^{i,j}: softmax cross-entropy of the positive against negatives, mean over anchors.

    anchor, positive: (N, D). negatives: None for in-batch negatives (the other rows of ``positive``),
    (N, K, D) per-anchor negatives, or (K, D) negatives shared by every anchor (memory bank); ``neg_mask``
    (N, K), True where negative k must not count for anchor n (its own sample)."""
    if negatives is None:
        logits = anchor @ positive.t() / tau  # (N, N): row n's positive is column n
        target = torch.arange(anchor.shape[0], device=anchor.device)
        return F.cross_entropy(logits, target)
    pos = (anchor * positive).sum(-1, keepdim=True)  # (N, 1)
    if negatives.dim() == 2:
        neg = anchor @ negatives.t()  # (N, K): one product for the whole batch
    else:
        neg = torch.einsum("nd,nkd->nk", anchor, negatives)  # (N, K)
    if neg_mask is not None:
        neg = neg.masked_fill(neg_mask, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / tau  # (N, K+1): the positive is column 0
    return F.cross_entropy(logits, torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device))


def cmc_loss(z: Mapping[str, Tensor], tau: float, graph: str = "full",
             targets: Mapping[str, Tensor] | None = None,
             negatives: Mapping[str, Tensor] | None = None,
             neg_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum of symmetric two-view losses over view pairs (CMC eq. 7-10); z[v] is (N, D), unit norm.

    Batch form (default): the positive of z[i][n] is z[j][n], negatives are the other rows of z[j].
    Memory form: pass ``targets[v]`` (N, D), the bank's entries of the batch's own samples (positives), and
    ``negatives[v]`` (N, K, D), K bank entries per anchor that exclude the anchor's own sample, or (K, D)
    entries shared by the batch with ``neg_mask`` (N, K) marking each anchor's own sample among them.
    Returns the loss and, per pair 'i~j', the loss and the mutual-information bound log(k) - L/2, as detached
    0-d tensors on the loss's device (no host synchronisation here; ``read_stats`` turns them into floats with
    one). The bound is float64, so it equals the float arithmetic on the float32 loss exactly.
    """
    views = list(z)
    total = z[views[0]].new_zeros(())
    stats: dict[str, Tensor] = {}
    for a, b in pairs(views, graph):
        if negatives is None:
            l_ab = nce_direction(z[a], z[b], None, tau)
            l_ba = nce_direction(z[b], z[a], None, tau)
            k = z[a].shape[0]
        else:
            assert targets is not None, "memory form needs targets"
            l_ab = nce_direction(z[a], targets[b], negatives[b], tau, neg_mask)
            l_ba = nce_direction(z[b], targets[a], negatives[a], tau, neg_mask)
            k = negatives[b].shape[-2] + 1
        pair = l_ab + l_ba
        total = total + pair
        stats[f"loss/{a}~{b}"] = pair.detach()
        stats[f"mi/{a}~{b}"] = math.log(k) - pair.detach().double() / 2
    stats["loss"] = total.detach()
    return total, stats


def read_stats(stats: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Statistics as floats, with one host synchronisation for all the tensors among them (float32 and float64
    values convert exactly, so the numbers equal float() of each)."""
    keys = [k for k, v in stats.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in stats.items() if not isinstance(v, Tensor)}
    if keys:
        vals = torch.stack([stats[k].detach().reshape(()).to(torch.float64) for k in keys]).tolist()
        out |= dict(zip(keys, vals))
    return {k: out[k] for k in stats}


class MemoryBank:
    """Per-view memory of one unit-norm embedding per training sample (CMC section 3.3; Wu et al. 2018).

    Explicit training state, not part of any model. ``sample`` draws K negatives per anchor uniformly
    from the bank *excluding the anchor's own sample* (the reference code could draw the positive);
    ``update`` applies the momentum rule m <- normalize(mu * m + (1 - mu) * z). Under torchrun every rank
    keeps a full copy and updates it with the gathered batch, so the copies stay identical.
    """

    def __init__(self, views: list[str], n: int, dim: int, momentum: float = 0.5, device="cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.momentum = n, momentum
        stdv = 1.0 / math.sqrt(dim / 3)
        self.memory = {v: F.normalize(torch.rand(n, dim, generator=g).mul_(2 * stdv).add_(-stdv), dim=1).to(device)
                       for v in views}

    def sample(self, idx: Tensor, k: int, generator: torch.Generator) -> Tensor:
        """(N,) sample indices -> (N, K) negative indices, each != its anchor's index."""
        if self.n < 2:
            raise ValueError("a memory bank needs at least two samples")
        # drawn on the generator's device (the GPU on a CUDA run: no per-step copy)
        r = torch.randint(0, self.n - 1, (idx.shape[0], k), generator=generator, device=generator.device).to(idx.device)
        return r + (r >= idx[:, None]).long()  # skip the anchor's own slot

    def sample_shared(self, idx: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(N,) sample indices -> (K,) negative indices drawn once for the batch, and the (N, K) mask of
        draws that hit anchor n's own sample (excluded from its candidates)."""
        if self.n < 2:
            raise ValueError("a memory bank needs at least two samples")
        neg = torch.randint(0, self.n, (k,), generator=generator, device=generator.device).to(idx.device)
        return neg, neg[None, :] == idx[:, None]

    def gather(self, idx: Tensor, neg_idx: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Positives (N, D) and negatives (N, K, D), or (K, D) for shared (K,) indices, per view."""
        targets = {v: m[idx] for v, m in self.memory.items()}  # (N, D)
        negatives = {v: m[neg_idx] for v, m in self.memory.items()}  # (N, K, D) or (K, D)
        return targets, negatives

    @torch.no_grad()
    def update(self, z: Mapping[str, Tensor], idx: Tensor) -> None:
        for v, m in self.memory.items():
            new = m[idx] * self.momentum + z[v].detach().to(m.dtype) * (1 - self.momentum)
            m[idx] = F.normalize(new, dim=1)

    def state_dict(self) -> dict:
        return {"memory": {v: m.cpu() for v, m in self.memory.items()}, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        for v, m in state["memory"].items():
            self.memory[v].copy_(m)
