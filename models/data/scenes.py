"""Procedural RGB-D scenes: one main primitive whose shape is the class, rendered by vectorised ray casting.

Camera: pinhole at the origin, x right, y down, z forward. Each scene has a randomly coloured,
sized, placed and rotated primitive, a random directional light (Lambert + ambient + Blinn-Phong
specular), a tilted textured background wall, and sometimes a small distractor sphere or box.
Outputs rgb uint8, depth uint16 (z / FAR_PLANE * 65535), reference normals uint8 and labels.

Every chunk of CHUNK scenes draws from its own ``SeedSequence([seed, chunk])``, so output is
identical whatever the number of worker processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from models.data.base import Dataset, DataError, check_split
from models.data.primitives import SHAPES, cube, sphere
from models.imageio import fit_image

LOG = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever the rendered output changes
CLASSES: list[str] = list(SHAPES)
FAR_PLANE = 12.0  # depth 65535 <-> z = FAR_PLANE (camera units)
TAN_HALF_FOV = 0.42
CHUNK = 256
TEST_SEED_OFFSET = 1_000_003
DEFAULTS = {"n": 20000, "size": 64, "seed": 0, "test_n": 2000, "ss": 1}


def _rotations(rng: np.random.Generator, b: int) -> np.ndarray:
    """Uniform random rotation matrices (b, 3, 3) from unit quaternions."""
    q = rng.standard_normal((b, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], 1).astype(np.float32)


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] -> RGB (b, 3) float32."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    return (v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0, 1)).astype(np.float32)


def _rays(size: int, ss: int) -> np.ndarray:
    """Unit ray directions (P, 3) for a size*ss square image, row-major."""
    m = size * ss
    c = (np.arange(m, dtype=np.float32) + 0.5) / m * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = np.meshgrid(c, c, indexing="ij")
    d = np.stack([xx * TAN_HALF_FOV, yy * TAN_HALF_FOV, np.ones_like(xx)], -1).reshape(-1, 3)
    return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


def _trace(shape_fn, rays: np.ndarray, centre: np.ndarray, rot: np.ndarray, scale: np.ndarray):
    """Intersect world rays with posed primitives; returns t (b, P) and unit world normals (b, P, 3)."""
    inv_s = (1.0 / scale).astype(np.float32)
    o_obj = (-centre[:, None, :] @ rot)[:, 0, :] * inv_s[:, None]  # R^T (0 - c) / s, (b, 3)
    d_obj = (rays[None] * inv_s[:, None, None]) @ rot  # R^T d / s, (b, P, 3)
    t, n_obj = shape_fn(o_obj.astype(np.float32), d_obj.astype(np.float32))
    n = n_obj.astype(np.float32) @ rot.transpose(0, 2, 1)  # R n, (b, P, 3)
    return t, _unit(n)


def _unit(v: np.ndarray) -> np.ndarray:
    """Normalise the last axis (size 3) without float64 temporaries."""
    sq = v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2]
    return v * (1.0 / np.sqrt(np.maximum(sq, np.float32(1e-16))))[..., None]


def _background(rng: np.random.Generator, b: int, rays: np.ndarray):
    """Tilted textured wall: t (b, P), normal (b, 3), albedo (b, P, 3)."""
    f32 = np.float32
    zb = rng.uniform(6.5, 7.5, b).astype(f32)
    n = np.stack([rng.uniform(-0.3, 0.3, b), rng.uniform(-0.3, 0.3, b), -np.ones(b)], 1)
    n = (n / np.linalg.norm(n, axis=1, keepdims=True)).astype(f32)
    t = (n[:, 2] * zb)[:, None] / (rays @ n.T).T  # plane through (0, 0, zb), (b, P)
    theta = rng.uniform(0, np.pi, b)
    rot2 = np.stack([np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta)], 1).reshape(b, 2, 2)
    uv = (t[..., None] * rays[None, :, :2]) @ rot2.astype(f32)  # texture coordinates (b, P, 2)
    u, v = uv[..., 0], uv[..., 1]
    freq = rng.uniform(1.5, 6.0, (b, 1)).astype(f32)
    phase = rng.uniform(0, 2 * np.pi, (b, 1)).astype(f32)
    kind = rng.integers(0, 3, b)
    waves = rng.uniform(0, 2 * np.pi, (b, 3, 4)).astype(f32)  # angle, frequency, phase of 4 sinusoids
    waves[:, 1] = waves[:, 1] / f32(2 * np.pi) * 2.5 + 0.5
    m = np.empty_like(u)
    i = kind == 0  # stripes
    m[i] = 0.5 + 0.5 * np.tanh(4 * np.sin(freq[i] * u[i] + phase[i]))
    i = kind == 1  # checker
    m[i] = (np.floor(freq[i] * u[i] / 3 + phase[i]) + np.floor(freq[i] * v[i] / 3)) % 2
    i = np.nonzero(kind == 2)[0]  # smooth noise from random sinusoids
    acc = np.zeros((i.size, u.shape[1]), f32)
    for j in range(4):
        a, f, ph = (waves[i, c, j][:, None] for c in range(3))
        acc += np.sin(f * (np.cos(a) * u[i] + np.sin(a) * v[i]) + ph)
    m[i] = 0.5 + 0.5 * np.tanh(acc)
    c1 = _hsv(rng.uniform(0, 1, b), rng.uniform(0, 0.7, b), rng.uniform(0.25, 0.9, b))
    c2 = _hsv(rng.uniform(0, 1, b), rng.uniform(0, 0.7, b), rng.uniform(0.25, 0.9, b))
    m = m[..., None]
    albedo = c1[:, None, :] * (1 - m) + c2[:, None, :] * m
    return t.astype(f32), n, albedo.astype(f32)


def render_chunk(seed: int, chunk: int, count: int, size: int, ss: int = 1) -> dict[str, np.ndarray]:
    """Render ``count`` scenes of chunk ``chunk``; deterministic in (seed, chunk, count, size, ss)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk]))
    b, k = count, len(CLASSES)
    rays = _rays(size, ss)
    y = rng.permutation((np.arange(b) + chunk * CHUNK) % k).astype(np.int64)
    # main object pose
    z0 = rng.uniform(4.3, 5.3, b)
    centre = np.stack([rng.uniform(-0.45, 0.45, b), rng.uniform(-0.45, 0.45, b), z0], 1).astype(np.float32)
    rot = _rotations(rng, b)
    scale = rng.uniform(0.85, 1.3, b).astype(np.float32)
    colour = _hsv(rng.uniform(0, 1, b), rng.uniform(0.3, 1.0, b), rng.uniform(0.5, 1.0, b))
    # light, pointing from the surface to the light, from the camera side
    light = np.stack([rng.uniform(-1, 1, b), rng.uniform(-1, 0.3, b), rng.uniform(-1.3, -0.4, b)], 1)
    light = (light / np.linalg.norm(light, axis=1, keepdims=True)).astype(np.float32)
    ambient = rng.uniform(0.15, 0.35, b).astype(np.float32)
    spec_k = rng.uniform(0.0, 0.45, b).astype(np.float32)
    shininess = rng.uniform(8, 48, b).astype(np.float32)
    # distractor: small sphere or box in a random corner, between object and wall
    has_d = rng.uniform(0, 1, b) < 0.5
    d_box = rng.uniform(0, 1, b) < 0.5
    d_z = rng.uniform(4.0, 6.0, b)
    corner = rng.choice([-1.0, 1.0], (b, 2)) * rng.uniform(1.2, 1.7, (b, 2)) * (d_z / 4.8)[:, None]
    d_centre = np.concatenate([corner, d_z[:, None]], 1).astype(np.float32)
    d_rot = _rotations(rng, b)
    d_scale = rng.uniform(0.22, 0.32, b).astype(np.float32)
    d_colour = _hsv(rng.uniform(0, 1, b), rng.uniform(0.2, 1.0, b), rng.uniform(0.4, 1.0, b))

    t_bg, n_bg, albedo = _background(rng, b, rays)
    t = t_bg
    normal = np.broadcast_to(n_bg[:, None, :], (b, rays.shape[0], 3)).copy()
    is_obj = np.zeros(t.shape, bool)  # pixels that receive specular highlights
    for ci, name in enumerate(CLASSES):
        sel = np.nonzero(y == ci)[0]
        if sel.size:
            _composite(SHAPES[name], sel, rays, centre, rot, scale, colour, t, normal, albedo, is_obj)
    for fn, mask in ((sphere, has_d & ~d_box), (cube, has_d & d_box)):
        sel = np.nonzero(mask)[0]
        if sel.size:
            _composite(fn, sel, rays, d_centre, d_rot, d_scale, d_colour, t, normal, albedo, is_obj)

    # shading (b, P)
    lam = np.maximum((normal @ light[:, :, None])[..., 0], 0)
    half = _unit(light[:, None, :] - rays[None])
    bi, pi = np.nonzero(is_obj)
    n_h = np.maximum((normal[bi, pi] * half[bi, pi]).sum(-1), 0)
    spec = np.zeros(t.shape, np.float32)
    spec[bi, pi] = spec_k[bi] * n_h ** shininess[bi]
    shade = ambient[:, None] + (1 - ambient[:, None]) * lam
    rgb = albedo * shade[..., None] + spec[..., None]
    rgb = rgb + rng.normal(0, 1.2 / 255, rgb.shape).astype(np.float32)
    z = t * rays[None, :, 2]  # z-buffer depth (b, P)
    m = size * ss
    rgb = _pool(rgb.reshape(b, m, m, 3), ss)
    z = _pool(z.reshape(b, m, m), ss)
    nrm = _pool(normal.reshape(b, m, m, 3), ss)
    nrm = _unit(nrm)
    nrm[..., 2] *= -1  # output convention: z towards the camera
    return {
        "rgb": np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8),
        "depth": np.clip(z / FAR_PLANE * 65535 + 0.5, 0, 65535).astype(np.uint16),
        "normals": np.clip((nrm + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8),
        "y": y,
    }


def _composite(fn, sel, rays, centre, rot, scale, colour, t, normal, albedo, is_obj) -> None:
    """Z-buffer the posed primitive into the scenes ``sel`` (in place)."""
    t_o, n_o = _trace(fn, rays, centre[sel], rot[sel], scale[sel])
    closer = t_o < t[sel]
    t[sel] = np.where(closer, t_o, t[sel])
    normal[sel] = np.where(closer[..., None], n_o, normal[sel])
    albedo[sel] = np.where(closer[..., None], colour[sel][:, None, :], albedo[sel])
    is_obj[sel] |= closer


def _pool(a: np.ndarray, ss: int) -> np.ndarray:
    """Box-average ss x ss blocks of (b, M, M, ...) arrays."""
    if ss == 1:
        return a
    b, m = a.shape[:2]
    s = m // ss
    return a.reshape(b, s, ss, s, ss, *a.shape[3:]).mean(axis=(2, 4))


def _render_args(args: tuple[int, int, int, int, int]) -> dict[str, np.ndarray]:
    return render_chunk(*args)


def generate(n: int, size: int = 64, seed: int = 0, ss: int = 1, *, progress: bool = False,
             workers: int | None = None) -> dict[str, np.ndarray]:
    """Render ``n`` scenes; returns {'rgb', 'depth', 'normals', 'y'}. Uses up to ``workers`` processes."""
    jobs = [(seed, c, min(CHUNK, n - c * CHUNK), size, ss) for c in range((n + CHUNK - 1) // CHUNK)]
    if workers is None:
        workers = int(os.environ.get("CMC_SCENES_WORKERS", os.cpu_count() or 1))
    workers = max(1, min(workers, len(jobs)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"scenes seed={seed}", unit="img")
    parts: list[dict[str, np.ndarray]] = []
    if workers == 1 or "fork" not in mp.get_all_start_methods() or mp.current_process().daemon:
        results = map(_render_args, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
        results = pool.map(_render_args, jobs)
    try:
        for part in results:
            parts.append(part)
            if bar is not None:
                bar.update(len(part["y"]))
    finally:
        if pool is not None:
            pool.shutdown()
        if bar is not None:
            bar.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def parse_params(arg: str, image_size: int | None = None) -> dict[str, int]:
    """'n=2000,seed=3,size=64' -> full parameter dict (defaults filled in)."""
    params = dict(DEFAULTS)
    if image_size is not None:
        params["size"] = int(image_size)
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, sep, val = part.partition("=")
        if not sep or key not in DEFAULTS:
            raise DataError(f"bad scenes option {part!r}: expected key=value with key in {sorted(DEFAULTS)}")
        try:
            params[key] = int(val)
        except ValueError:
            raise DataError(f"scenes option {key} must be an integer, got {val!r}") from None
    if not 8 <= params["size"] <= 512:
        raise DataError(f"scenes size must be in 8..512, got {params['size']}")
    if params["n"] < 1 or params["test_n"] < 1 or params["ss"] not in (1, 2, 3, 4) or params["seed"] < 0:
        raise DataError(f"bad scenes parameters {params}: n, test_n >= 1, seed >= 0, ss in 1..4")
    return params


def default_cache_dir() -> Path:
    env = os.environ.get("CMC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cmc" / "scenes"


def cache_path(n: int, size: int, seed: int, ss: int, cache_dir: str | Path | None = None) -> Path:
    key = {"version": GENERATOR_VERSION, "n": n, "size": size, "seed": seed, "ss": ss, "chunk": CHUNK,
           "classes": CLASSES, "far": FAR_PLANE, "fov": TAN_HALF_FOV}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"scenes_v{GENERATOR_VERSION}_n{n}_s{size}_seed{seed}_{digest}.npz"


def load_scenes(arg: str, split: str = "train", *, image_size: int | None = None,
                cache_dir: str | Path | None = None, progress: bool = False) -> Dataset:
    """The 'scenes' spec: render (or read from the cache) one split."""
    check_split(split)
    p = parse_params(arg, image_size)
    n = p["n"] if split == "train" else p["test_n"]
    seed = p["seed"] if split == "train" else p["seed"] + TEST_SEED_OFFSET
    path = cache_path(n, p["size"], seed, p["ss"], cache_dir)
    arrays = None
    if path.exists():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("rgb", "depth", "normals", "y")}
            LOG.info("scenes cache hit %s", path)
        except Exception as e:  # corrupt cache: regenerate
            LOG.warning("ignoring unreadable scenes cache %s: %s", path, e)
    if arrays is None:
        t0 = time.perf_counter()
        arrays = generate(n, p["size"], seed, p["ss"], progress=progress)
        LOG.info("rendered %d scenes in %.1f s", n, time.perf_counter() - t0)
        _save_atomic(path, arrays)
    if image_size is not None and image_size != p["size"]:  # spec pinned another render size
        arrays = {k: (np.stack([fit_image(a, image_size) for a in v]) if k != "y" else v) for k, v in arrays.items()}
    keys = [f"scenes:seed={seed}/{i:06d}" for i in range(n)]
    info = {"spec": f"scenes:{arg}" if arg else "scenes", "split": split, "params": p, "seed": seed,
            "cache": str(path), "far_plane": FAR_PLANE, "skipped": 0, "skipped_files": []}
    return Dataset(sources={k: arrays[k] for k in ("rgb", "depth", "normals")}, y=arrays["y"].astype(np.int64),
                   classes=list(CLASSES), keys=keys, info=info)


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp.npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # a read-only cache is not fatal
        LOG.warning("could not write scenes cache %s: %s", path, e)
