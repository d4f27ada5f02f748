"""The CMC losses against explicit float64 formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.losses import MemoryBank, cmc_loss, nce_direction, pairs


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def explicit_direction(a: np.ndarray, b: np.ndarray, tau: float) -> float:
    """-mean_n log( h(a_n, b_n) / sum_m h(a_n, b_m) ), h = exp(cos / tau), in plain float64 numpy loops."""
    total = 0.0
    for n in range(a.shape[0]):
        h = [math.exp(float(a[n] @ b[m]) / tau) for m in range(b.shape[0])]
        total += -math.log(h[n] / sum(h))
    return total / a.shape[0]


def test_identical_embeddings_give_two_log_n():
    n = 16
    v = unit(1, 32, 0).expand(n, 32)  # every sample the same vector, in both views
    loss, stats = cmc_loss({"a": v, "b": v}, tau=0.07)
    assert float(loss) == pytest.approx(2 * math.log(n), abs=1e-9)
    assert float(stats["mi/a~b"]) == pytest.approx(0.0, abs=1e-9)


def test_batch_loss_matches_explicit_formula():
    a, b = unit(12, 8, 1), unit(12, 8, 2)
    loss, _ = cmc_loss({"a": a, "b": b}, tau=0.2)
    want = explicit_direction(a.numpy(), b.numpy(), 0.2) + explicit_direction(b.numpy(), a.numpy(), 0.2)
    assert float(loss) == pytest.approx(want, rel=1e-10)


def test_aligned_views_lower_than_shuffled_and_near_zero_at_small_tau():
    a = unit(64, 16, 3)
    b = F.normalize(a + 0.05 * unit(64, 16, 4), dim=1)
    aligned, _ = cmc_loss({"a": a, "b": b}, tau=0.07)
    shuffled, _ = cmc_loss({"a": a, "b": b[torch.randperm(64, generator=torch.Generator().manual_seed(0))]}, tau=0.07)
    assert float(aligned) < float(shuffled) - 5
    tiny, _ = cmc_loss({"a": a, "b": b}, tau=0.01)
    assert float(tiny) < 1e-3


def test_core_and_full_graph_equal_explicit_pair_sums():
    z = {v: unit(10, 8, i) for i, v in enumerate("pqrs")}
    two = lambda x, y: cmc_loss({x: z[x], y: z[y]}, tau=0.1)[0]  # noqa: E731
    core, _ = cmc_loss(z, 0.1, "core")
    full, stats = cmc_loss(z, 0.1, "full")
    assert float(core) == pytest.approx(float(two("p", "q") + two("p", "r") + two("p", "s")), rel=1e-12)
    want = sum(float(two(x, y)) for i, x in enumerate("pqrs") for y in "pqrs"[i + 1:])
    assert float(full) == pytest.approx(want, rel=1e-12)
    assert len([k for k in stats if k.startswith("mi/")]) == 6
    assert pairs(list("pqrs"), "core") == [("p", "q"), ("p", "r"), ("p", "s")]


def test_memory_form_matches_explicit_formula():
    n, k, d, tau = 6, 5, 8, 0.1
    a, pos, negs = unit(n, d, 5), unit(n, d, 6), unit(n * k, d, 7).view(n, k, d)
    got = float(nce_direction(a, pos, negs, tau))
    want = 0.0
    for i in range(n):
        hp = math.exp(float(a[i] @ pos[i]) / tau)
        hn = sum(math.exp(float(a[i] @ negs[i, j]) / tau) for j in range(k))
        want += -math.log(hp / (hp + hn))
    assert got == pytest.approx(want / n, rel=1e-10)


def test_memory_bank_momentum_update_is_exact_and_negatives_exclude_anchor():
    bank = MemoryBank(["a", "b"], n=50, dim=8, momentum=0.5, seed=0)
    before = {v: m.clone() for v, m in bank.memory.items()}
    idx = torch.tensor([3, 7, 11])
    z = {v: F.normalize(torch.randn(3, 8), dim=1) for v in ("a", "b")}
    bank.update(z, idx)
    for v in ("a", "b"):
        want = before[v][idx] * 0.5 + z[v] * 0.5
        want = want / want.norm(dim=1, keepdim=True)
        assert torch.allclose(bank.memory[v][idx], want, atol=1e-7)
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(bank.memory[v][untouched], before[v][untouched])
    neg = bank.sample(torch.arange(50), 4096, torch.Generator().manual_seed(1))
    assert not (neg == torch.arange(50)[:, None]).any()
    assert neg.min() >= 0 and neg.max() <= 49
    assert len(torch.unique(neg)) == 50  # uniform over the other slots: all of them get drawn


def explicit_memory_loss(z: dict, targets: dict, negatives: dict, tau: float, pair_list) -> float:
    """sum over pairs (i, j) of L^{i,j} + L^{j,i}, where L^{i,j} = -mean_n log(h(z_i[n], t_j[n]) /
    (h(z_i[n], t_j[n]) + sum_k h(z_i[n], neg_j[n, k]))): the anchor of view i meets view j's memory."""
    total = 0.0
    for a, b in pair_list:
        for anc, other in ((a, b), (b, a)):
            za, t, neg = z[anc].numpy(), targets[other].numpy(), negatives[other].numpy()
            s = 0.0
            for n in range(za.shape[0]):
                hp = math.exp(float(np.dot(za[n], t[n])) / tau)
                hn = sum(math.exp(float(np.dot(za[n], neg[n, k])) / tau) for k in range(neg.shape[1]))
                s += -math.log(hp / (hp + hn))
            total += s / za.shape[0]
    return total


@pytest.mark.parametrize("graph", ["core", "full"])
def test_memory_cmc_loss_through_the_bank_matches_a_float64_loop(graph):
    """The memory form of cmc_loss, fed by a real MemoryBank, equals an independent loop over the formula: an
    anchor of view i is scored against view j's bank entries, never its own view's (swapping them fails)."""
    n_bank, n, k, d, tau = 40, 6, 7, 8, 0.2
    views = ["p", "q", "r"]
    bank = MemoryBank(views, n=n_bank, dim=d, momentum=0.5, seed=3)
    for v in views:  # float64 memory, so the comparison is exact
        bank.memory[v] = unit(n_bank, d, 10 + views.index(v))
    idx = torch.tensor([0, 5, 9, 17, 22, 39])
    neg_idx = bank.sample(idx, k, torch.Generator().manual_seed(4))
    targets, negatives = bank.gather(idx, neg_idx)
    z = {v: unit(n, d, 20 + i) for i, v in enumerate(views)}
    got, _ = cmc_loss(z, tau, graph, targets, negatives)
    mem = {v: bank.memory[v] for v in views}
    want = explicit_memory_loss(z, {v: mem[v][idx] for v in views},
                                {v: mem[v][neg_idx] for v in views}, tau, pairs(views, graph))
    assert float(got) == pytest.approx(want, rel=1e-10)
    own = explicit_memory_loss({v: z[v] for v in views}, {v: mem[views[(views.index(v) + 1) % 3]][idx] for v in views},
                               {v: mem[v][neg_idx] for v in views}, tau, pairs(views, graph))
    assert abs(own - want) > 1e-3  # a wiring that mixes views' targets and negatives gives another value
