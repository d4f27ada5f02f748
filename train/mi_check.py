"""The known-MI check (issue 20): does log(k) - L bound the mutual information where it is known?

Pairs of Gaussian vectors x, y in R^d with d independent coordinate pairs of correlation rho have the analytic
mutual information I = -(d/2) log(1 - rho^2) nats. Two small MLP encoders trained with the project's loss
(``train.losses.cmc_loss``: critic exp(cos/tau) over unit-norm embeddings, k - 1 in-batch negatives) give the
held-out bound ``train.metrics.mi_bound``. InfoNCE is a lower bound, and it cannot exceed log k, so the bound
must stay under min(I, log k) (up to its sampling noise) and approach it as training grows.

    python -m train.experiments mi-check [--quick] --out DIR   # DIR/mi_check.json: {rho, dim, k, true_mi, bound}
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import cmc_loss
from .metrics import mi_bound

# (rho, dim, k): I below log k, near it, and far above it
GRID = ((0.5, 4, 64), (0.8, 4, 64), (0.9, 8, 64), (0.9, 8, 512))


def true_mi(rho: float, dim: int) -> float:
    """I(x; y) in nats for ``dim`` independent pairs of unit Gaussians with correlation ``rho``."""
    return -0.5 * dim * math.log(1.0 - rho * rho)


def pairs(n: int, dim: int, rho: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """n samples of (x, y): x ~ N(0, I), y = rho x + sqrt(1 - rho^2) e."""
    x = torch.randn(n, dim, generator=g)
    return x, rho * x + math.sqrt(1 - rho * rho) * torch.randn(n, dim, generator=g)


def _mlp(dim: int, hidden: int, feat: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, feat))


def run(rho: float, dim: int, k: int, steps: int = 400, tau: float = 0.1, seed: int = 0, hidden: int = 128,
        feat: int = 64, lr: float = 2e-3, n_test: int = 8192) -> dict:
    """Train on fresh batches of k pairs for ``steps`` steps; the bound on n_test held-out pairs."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    fa, fb = _mlp(dim, hidden, feat), _mlp(dim, hidden, feat)
    opt = torch.optim.Adam([*fa.parameters(), *fb.parameters()], lr=lr)
    for _ in range(steps):
        x, y = pairs(k, dim, rho, g)
        loss, _ = cmc_loss({"a": F.normalize(fa(x), dim=1), "b": F.normalize(fb(y), dim=1)}, tau, "full")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, y = pairs(n_test, dim, rho, torch.Generator().manual_seed(10_000 + seed))
        bound = mi_bound(F.normalize(fa(x), dim=1), F.normalize(fb(y), dim=1), k, tau, seed=seed)
    mi = true_mi(rho, dim)
    return {"rho": rho, "dim": dim, "k": k, "steps": steps, "tau": tau, "seed": seed, "true_mi": mi,
            "log_k": math.log(k), "bound": bound, "ceiling": min(mi, math.log(k))}


def table(rows: list[dict]) -> str:
    head = ("| rho | dim | k | steps | true MI | log k | bound | bound / min(I, log k) |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [f"| {r['rho']} | {r['dim']} | {r['k']} | {r['steps']} | {r['true_mi']:.3f} | "
                               f"{r['log_k']:.3f} | {r['bound']:.3f} | {r['bound'] / r['ceiling']:.2f} |"
                               for r in rows])


def main(argv: list[str] | None = None, default_results: str = "") -> int:
    p = argparse.ArgumentParser(prog="python -m train.experiments mi-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/experiments", help="output directory (mi_check.json)")
    p.add_argument("--results", default=default_results,
                   help="directory of the raw rows kept with the code (mi_check.json, mi_check-quick.json with "
                        "--quick; '' for none)")
    p.add_argument("--quick", action="store_true", help="fewer steps (seconds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args(argv)
    steps = (150, 600) if a.quick else (600, 2400)  # the growth of training: the bound rises toward its ceiling
    rows = [run(rho, dim, k, s, seed=seed) for rho, dim, k in GRID for s in steps for seed in a.seeds]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mi_check.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"wrote {out / 'mi_check.json'}")
    if a.results:
        kept = Path(a.results) / f"mi_check{'-quick' if a.quick else ''}.json"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(rows, indent=1))
        print(f"the rows also in {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
