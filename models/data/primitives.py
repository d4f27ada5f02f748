"""Vectorised ray-primitive intersection in object space (numpy, float32).

Every function takes ray origins ``o`` (B, 3) and directions ``d`` (B, P, 3) in the object's
frame (directions need not be unit length; ``t`` is the parameter of ``o + t d``) and returns
``t`` (B, P) with ``inf`` on a miss, and an object-space normal ``n`` (B, P, 3), not normalised.
Objects are centred on the origin with a bounding radius of about 1; y points down.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

INF = np.float32(np.inf)
EPS = np.float32(1e-4)

Hit = tuple[np.ndarray, np.ndarray]


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _closest(cands: list[Hit]) -> Hit:
    """Nearest valid candidate hit per ray."""
    t = cands[0][0]
    n = cands[0][1]
    for tc, nc in cands[1:]:
        closer = tc < t
        t = np.where(closer, tc, t)
        n = np.where(closer[..., None], nc, n)
    return t, n


def _quadratic_roots(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roots of a t^2 + 2 b t + c = 0 (nan where none); near-linear a handled."""
    disc = b * b - a * c
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0))
    safe_a = np.where(np.abs(a) < 1e-9, np.float32(1e-9), a)
    t1 = np.where(ok, (-b - sq) / safe_a, np.nan)
    t2 = np.where(ok, (-b + sq) / safe_a, np.nan)
    return np.minimum(t1, t2), np.maximum(t1, t2)


def _valid(t: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask & (t > EPS), t, INF).astype(np.float32)


def _at(o: np.ndarray, d: np.ndarray, t: np.ndarray) -> np.ndarray:
    tt = np.where(np.isfinite(t), t, 0)[..., None]
    return o[:, None, :] + tt * d


def sphere(o: np.ndarray, d: np.ndarray, r: float = 0.9, centre: tuple[float, float, float] = (0, 0, 0)) -> Hit:
    c0 = np.asarray(centre, np.float32)
    oc = o - c0
    a = _dot(d, d)
    b = _dot(oc[:, None, :], d)
    c = _dot(oc, oc)[:, None] - np.float32(r * r)
    t1, _ = _quadratic_roots(a, b, c)
    t = _valid(t1, np.isfinite(t1))
    return t, _at(o, d, t) - c0


def convex(o: np.ndarray, d: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> Hit:
    """Convex polytope {p : N p <= D}; entry point by the slab method."""
    nrm = normals.astype(np.float32)  # (K, 3)
    num = offsets.astype(np.float32)[None, :] - np.einsum("bi,ki->bk", o, nrm)  # (B, K)
    den = np.einsum("bpi,ki->bpk", d, nrm)  # (B, P, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = num[:, None, :] / den
    enter = np.where(den < 0, q, -INF)
    leave = np.where(den > 0, q, INF)
    parallel_out = (den == 0) & (num[:, None, :] < 0)
    k_in = np.argmax(enter, axis=-1)
    t_in = np.take_along_axis(enter, k_in[..., None], -1)[..., 0]
    t_out = leave.min(-1)
    ok = (t_in <= t_out) & ~parallel_out.any(-1) & np.isfinite(t_in)
    t = _valid(t_in, ok)
    return t, nrm[k_in]


def cube(o: np.ndarray, d: np.ndarray, h: float = 0.62) -> Hit:
    n = np.concatenate([np.eye(3), -np.eye(3)]).astype(np.float32)
    return convex(o, d, n, np.full(6, h, np.float32))


def _pyramid_planes(half: float = 0.78, top: float = -0.8, base: float = 0.55) -> tuple[np.ndarray, np.ndarray]:
    rows, offs = [[0.0, 1.0, 0.0]], [base]
    apex = np.array([0.0, top, 0.0])
    for sx, sz in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        n = np.array([sx * (base - top), -half, sz * (base - top)], np.float64)
        n /= np.linalg.norm(n)
        rows.append(list(n))
        offs.append(float(n @ apex))
    return np.array(rows, np.float32), np.array(offs, np.float32)


_PYR = _pyramid_planes()
_OCT_N = np.array([[sx, sy, sz] for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)], np.float32) / np.sqrt(3)


def pyramid(o: np.ndarray, d: np.ndarray) -> Hit:
    return convex(o, d, *_PYR)


def octahedron(o: np.ndarray, d: np.ndarray, r: float = 1.0) -> Hit:
    return convex(o, d, _OCT_N, np.full(8, r / np.sqrt(3), np.float32))


def _side(o: np.ndarray, d: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of the infinite y-axis cylinder x^2 + z^2 = r^2."""
    a = d[..., 0] ** 2 + d[..., 2] ** 2
    b = o[:, None, 0] * d[..., 0] + o[:, None, 2] * d[..., 2]
    c = (o[:, 0] ** 2 + o[:, 2] ** 2 - np.float32(r * r))[:, None]
    return _quadratic_roots(a, b, c)


def _cap(o: np.ndarray, d: np.ndarray, y: float, r: float, sign: float) -> Hit:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.float32(y) - o[:, None, 1]) / d[..., 1]
    p = _at(o, d, np.where(np.isfinite(t), t, 0))
    t = _valid(t, np.isfinite(t) & (p[..., 0] ** 2 + p[..., 2] ** 2 <= r * r))
    n = np.zeros_like(d)
    n[..., 1] = sign
    return t, n


def _radial(p: np.ndarray, ny: np.ndarray | float = 0.0) -> np.ndarray:
    n = p.copy()
    n[..., 1] = ny
    return n


def cylinder(o: np.ndarray, d: np.ndarray, r: float = 0.58, h: float = 0.72) -> Hit:
    t1, _ = _side(o, d, r)
    p1 = _at(o, d, t1)
    side_t = _valid(t1, np.isfinite(t1) & (np.abs(p1[..., 1]) <= h))
    return _closest([(side_t, _radial(p1)), _cap(o, d, -h, r, -1.0), _cap(o, d, h, r, 1.0)])


def cone(o: np.ndarray, d: np.ndarray, r: float = 0.72, h: float = 0.75) -> Hit:
    """Apex at y=-h (top), base disc of radius r at y=+h."""
    k2 = np.float32((r / (2 * h)) ** 2)
    oy = o[:, None, 1] + np.float32(h)
    a = d[..., 0] ** 2 + d[..., 2] ** 2 - k2 * d[..., 1] ** 2
    b = o[:, None, 0] * d[..., 0] + o[:, None, 2] * d[..., 2] - k2 * oy * d[..., 1]
    c = o[:, None, 0] ** 2 + o[:, None, 2] ** 2 - k2 * oy**2
    cands = []
    for root in _quadratic_roots(a, b, c):
        p = _at(o, d, root)
        yy = p[..., 1] + h
        t = _valid(root, np.isfinite(root) & (yy >= 0) & (yy <= 2 * h))
        cands.append((t, _radial(p, -k2 * yy)))
    cands.append(_cap(o, d, h, r, 1.0))
    return _closest(cands)


def capsule(o: np.ndarray, d: np.ndarray, r: float = 0.42, h: float = 0.52) -> Hit:
    t1, _ = _side(o, d, r)
    p1 = _at(o, d, t1)
    side_t = _valid(t1, np.isfinite(t1) & (np.abs(p1[..., 1]) <= h))
    cands = [(side_t, _radial(p1))]
    for cy in (-h, h):
        cands.append(sphere(o, d, r, (0.0, cy, 0.0)))
    return _closest(cands)


def torus(o: np.ndarray, d: np.ndarray, big: float = 0.64, small: float = 0.27, steps: int = 48) -> Hit:
    """Torus around the y axis, by sphere tracing from the bounding-sphere entry point."""
    t_b, _ = sphere(o, d, big + small + 0.01)
    bi, pi = np.nonzero(np.isfinite(t_b))
    t_out = np.full(t_b.shape, INF, np.float32)
    n_out = np.zeros(d.shape, np.float32)
    if bi.size == 0:
        return t_out, n_out
    oo, dd = o[bi], d[bi, pi]  # (M, 3)
    inv_len = 1.0 / np.sqrt(_dot(dd, dd))
    t = t_b[bi, pi].copy()
    t_far = t + 2.0 * (big + small + 0.01) * inv_len
    big32, small32 = np.float32(big), np.float32(small)
    for _ in range(steps):
        p = oo + t[:, None] * dd
        q = np.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - big32
        sdf = np.sqrt(q * q + p[:, 1] ** 2) - small32
        t = np.minimum(t + sdf * inv_len, t_far)
    p = oo + t[:, None] * dd
    rad = np.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2)
    sdf = np.sqrt((rad - big32) ** 2 + p[:, 1] ** 2) - small32
    hit = (np.abs(sdf) < 2e-3) & (t < t_far)
    scale = 1.0 - big32 / np.maximum(rad, 1e-6)
    n = np.stack([p[:, 0] * scale, p[:, 1], p[:, 2] * scale], axis=1)
    t_out[bi, pi] = np.where(hit, t, INF)
    n_out[bi, pi] = n
    return t_out, n_out


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], Hit]] = {
    "sphere": sphere,
    "cube": cube,
    "cylinder": cylinder,
    "cone": cone,
    "torus": torus,
    "capsule": capsule,
    "pyramid": pyramid,
    "octahedron": octahedron,
}
