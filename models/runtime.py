"""An exported CMC model through onnxruntime: no torch.

``Runtime(ref)`` resolves a model reference (a tag, a run or an artifact directory: ``models.artifact.resolve``,
the one resolver, which says in one line what is missing), verifies the card, opens one session per view (the CUDA
provider when a GPU is usable, on this worker's GPU, with IOBinding; else the CPU provider, without error spam), turns decoded images or arrays
into each view's input exactly as training did (decode, resize by the card's rule, scale to [0, 1];
the view transform itself is inside the graph) and embeds batches.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .artifact import resolve
from .card import Card, load_card
from .imageio import SERVED_FORMATS, ImageError, decode_depth, decode_image, fit_image, scale_shorter
from .views import source_key

LOG = logging.getLogger(__name__)

# What to_source keeps of a decoded image for later (``decoded``: /index/add's stored query input and display
# thumbnail): at most max(KEEP_AREA x the model's input area, KEEP_MIN_PIXELS) pixels per image, never the
# full-size decode (up to 64 items x max_pixels x 3 bytes a request).
KEEP_AREA = 4
KEEP_MIN_PIXELS = 256 * 256  # an image this small is kept as decoded: its thumbnail (<= 96 px) is unchanged


class DeviceError(RuntimeError):
    """device='cuda' was asked for and the sessions did not get onnxruntime's CUDA provider."""


class InputError(ValueError):
    """Input that does not fit a view: the message names the problem (HTTP 4xx)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def gpu_usable() -> bool:
    """CUDA provider present *and* a GPU device node visible: onnxruntime-gpu lists the provider even where it
    cannot load, then logs an error before falling back, so we do not ask for it there."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/dxg").exists()


def providers(device: str = "auto") -> list[str]:
    if device == "cpu" or (device == "auto" and not gpu_usable()):
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


# The batcher forms every batch size from 1 to its maximum. onnxruntime's default cuDNN algorithm search,
# EXHAUSTIVE, benchmarks every convolution algorithm the first time each input shape is seen (a stall of a first
# request per size and view, up to 64 sizes); HEURISTIC takes cuDNN's heuristic choice without trial runs, so a
# new batch size costs nothing extra, at a small loss on some shapes against the measured best.
CUDNN_CONV_ALGO_SEARCH = "HEURISTIC"
DEFAULT_MAX_BATCH = 64  # the micro-batcher's default largest batch (CMC_MAX_BATCH_SIZE)


def visible_gpus() -> int:
    """GPUs this process may use, without CUDA: CUDA_VISIBLE_DEVICES's entries, else the /dev/nvidiaN nodes."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit()])


def worker_index() -> int | None:
    """This BentoML worker's index (1-based), when running in a BentoML worker; None elsewhere. Read from
    bentoml's server context only if bentoml is already imported (the runtime itself never imports it)."""
    import sys
    bento = sys.modules.get("bentoml")
    return getattr(getattr(bento, "server_context", None), "worker_index", None) if bento else None


def device_id(device: str = "auto", worker: int | None = None, n_gpus: int | None = None) -> int:
    """The GPU of this process: N for cuda:N; else worker ``worker`` (1-based, BentoML's; this worker's when
    None) round-robin over the visible GPUs, so the workers of one server spread over a machine's GPUs
    (BentoML gives them all the same CUDA_VISIBLE_DEVICES); 0 outside a worker."""
    if device.startswith("cuda:"):
        return int(device.split(":")[1])
    worker = worker_index() if worker is None else worker
    n = visible_gpus() if n_gpus is None else n_gpus
    return (worker - 1) % n if worker and n > 0 else 0


def provider_options(names: list[str], gpu: int) -> list[dict]:
    """onnxruntime's per-provider options, parallel to ``names``: the CUDA provider on GPU ``gpu`` with the
    cuDNN search above; nothing for the others."""
    return [{"device_id": str(gpu), "cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH}
            if n == "CUDAExecutionProvider" else {} for n in names]


def warmup_sizes(max_batch: int) -> list[int]:
    """The batch sizes a warm-up runs: powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max(1, max_batch)]


def keep_pixels(image_size: int) -> int:
    """The most pixels to_source keeps of one decoded image for ``decoded``."""
    return max(KEEP_AREA * image_size * image_size, KEEP_MIN_PIXELS)


def _kept(a: np.ndarray, scaled: np.ndarray, fitted: np.ndarray, image_size: int) -> np.ndarray:
    """What is kept of a decoded image ``a`` (``scaled`` = scale_shorter(a, S), ``fitted`` = fit_image(a, S)):
    ``a`` itself when small (every row index.thumbs.item_rows makes from it is unchanged), else the whole picture
    with its shorter side S, else (a long strip) the model's input itself. fit_image of each is exactly
    ``fitted``, so the stored query input is what was embedded. A copy: nothing holds the full decode alive."""
    bound = keep_pixels(image_size)
    for cand in (a, scaled):
        if cand.shape[0] * cand.shape[1] <= bound:
            return np.array(cand, copy=True)
    return np.array(fitted, copy=True)


def to_source(view: dict, items: list, image_size: int, max_pixels: int = 40_000_000,
              decoded: list | None = None) -> np.ndarray:
    """Decoded inputs of one view -> the float32 batch its graph takes; ``decoded``, when given, receives each
    input as decoded but reduced to what its stored query input and thumbnail need (see _kept: at most
    keep_pixels(image_size) pixels, and fit_image of it is exactly the model input that was embedded): uint8
    RGB, uint16 depth, or the float32 vector.

    rgb views: bytes (PNG/JPEG/WebP only; JPEG decoded in draft mode near S) or uint8 (H, W, 3) arrays
    -> (N, 3, S, S) in [0, 1]; depth views: bytes (16-bit PNG) or uint16 (H, W) arrays -> (N, 1, S, S) in [0, 1];
    vector views: numbers (D,) -> (N, D), finite. The input tensor depends on the source only (every view's
    transform is inside its graph), so views of one source can share it."""
    if len(items) == 0:
        raise InputError("empty list of inputs", "inputs")
    src = view["source"]
    if src == "vector":
        dim = int(view["channels"])
        try:
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
                x = np.asarray(items, dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as e:
            raise InputError(f"view {view['name']!r} takes vectors of {dim} numbers ({type(e).__name__}: "
                             f"{str(e)[:80]})", "arrays") from None
        if x.ndim != 2 or x.shape[1] != dim:
            raise InputError(f"view {view['name']!r} takes vectors of length {dim}, got shape {list(x.shape)}", "arrays")
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise InputError(f"input {bad}: vector contains NaN or inf (or a number beyond float32)", "arrays")
        if decoded is not None:
            decoded.extend(x)
        return x
    out = np.empty((len(items), 3 if src == "rgb" else 1, image_size, image_size), np.float32)
    for i, it in enumerate(items):
        try:
            if isinstance(it, (bytes, bytearray, memoryview)):
                a = (decode_image(bytes(it), max_pixels, SERVED_FORMATS, draft=image_size) if src == "rgb"
                     else decode_depth(bytes(it), max_pixels, SERVED_FORMATS))
            else:
                a = np.asarray(it)
        except ImageError as e:
            raise InputError(f"input {i}: {e}", "images") from None
        if src == "rgb":
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise InputError(f"input {i}: view {view['name']!r} takes RGB images", "images")
        elif a.ndim != 2 or a.dtype != np.uint16:
            raise InputError(f"input {i}: view {view['name']!r} takes 16-bit depth maps", "images")
        scaled = scale_shorter(a, image_size)
        fitted = fit_image(scaled, image_size)  # == fit_image(a, image_size): the crop of scaled
        if decoded is not None:
            decoded.append(_kept(a, scaled, fitted, image_size))
        del a, scaled  # the full-size decode goes now, not at the next item
        if src == "rgb":
            out[i] = fitted.transpose(2, 0, 1) / np.float32(255.0)
        else:
            out[i, 0] = fitted / np.float32(65535.0)
    return out


class Runtime:
    """The exported per-view encoders of one model, ready to embed."""

    def __init__(self, ref: str | Path | None = None, device: str = "auto", intra_op_threads: int = 0,
                 verify: bool = True, spin: bool | None = None, iobinding: bool | None = None):
        self.path = resolve(ref)
        self.card: Card = load_card(self.path, verify=verify)
        self.requested = providers(device.split(":")[0] if device.startswith("cuda:") else device)
        self.device_id = device_id(device) if "CUDAExecutionProvider" in self.requested else None
        options = provider_options(self.requested, self.device_id or 0)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
            opts.inter_op_num_threads = 1
        if spin is not None:  # intra-op workers busy-wait between ops (onnxruntime's default: on)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {v["name"]: ort.InferenceSession(str(self.path / v["file"]), opts, providers=self.requested,
                                                         provider_options=options)
                         for v in self.card.views}
        self.views = {v["name"]: v for v in self.card.views}
        # what the sessions got, not what was asked: onnxruntime falls back to the CPU when the CUDA provider
        # cannot load (missing CUDA/cuDNN libraries), with a warning only
        got = {n: s.get_providers() for n, s in self.sessions.items()}
        self.providers = next(iter(got.values()))
        if device.startswith("cuda") and any("CUDAExecutionProvider" not in p for p in got.values()):
            raise DeviceError(
                f"device {device!r}: onnxruntime did not give the sessions its CUDA provider (they got "
                f"{', '.join(sorted({x for p in got.values() for x in p}))}; available here: "
                f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu with the CUDA and cuDNN "
                f"libraries it was built for, or use device 'auto' (falls back to the CPU) or 'cpu'")
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        # IOBinding on the CUDA provider: the input is copied to the GPU once, straight from the caller's array,
        # and the output comes back with one copy (a plain run stages both through onnxruntime's own copies)
        self.iobinding = on_cuda if iobinding is None else iobinding
        LOG.info("loaded %s (%s) with %s%s", self.path, ", ".join(self.views), self.providers[0],
                 f" on GPU {self.device_id}" if on_cuda else "")

    @property
    def dim(self) -> int:
        return self.card.feat_dim

    @property
    def image_size(self) -> int:
        return self.card.image_size

    @property
    def fingerprint(self) -> str:
        return self.card.fingerprint

    def view(self, name: str) -> dict:
        if name not in self.views:
            raise InputError(f"unknown view {name!r}; this model has: {', '.join(self.views)}", "view")
        return self.views[name]

    def preprocess(self, view: str, items: list, max_pixels: int = 40_000_000,
                   decoded: list | None = None) -> np.ndarray:
        return to_source(self.view(view), items, self.image_size, max_pixels, decoded)

    def embed(self, view: str, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """A preprocessed source batch (N, ...) float32 -> (N, D) float32 unit-norm embeddings."""
        sess = self.sessions[self.view(view)["name"]]
        name = sess.get_inputs()[0].name
        x = np.ascontiguousarray(x, dtype=np.float32)
        run = self._run_bound if self.iobinding else lambda s, n, c: s.run(None, {n: c})[0]
        outs = [run(sess, name, x[lo:lo + batch_size]) for lo in range(0, x.shape[0], batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)

    def _run_bound(self, sess: ort.InferenceSession, name: str, chunk: np.ndarray) -> np.ndarray:
        """One run through an IOBinding (one per call: safe from several threads): the input bound from host
        memory, the output allocated by onnxruntime on the provider's device, then copied to the host."""
        io = sess.io_binding()
        io.bind_cpu_input(name, np.ascontiguousarray(chunk))
        out = sess.get_outputs()[0].name
        if self.device_id is not None and self.providers[0] == "CUDAExecutionProvider":
            io.bind_output(out, "cuda", self.device_id)
        else:
            io.bind_output(out)
        sess.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    def embed_items(self, view: str, items: list, max_pixels: int = 40_000_000) -> np.ndarray:
        """Decode + resize + embed: bytes / arrays of one view -> (N, D)."""
        return self.embed(view, self.preprocess(view, items, max_pixels))

    def embed_sources(self, view: str, sources: dict[str, np.ndarray]) -> np.ndarray:
        """Embed a batch of a Dataset's raw sources (uint8 rgb (N,H,W,3), uint16 depth (N,H,W), vectors)."""
        v = self.view(view)
        return self.embed(view, to_source(v, list(sources[source_key(view, v)]), self.image_size))

    def warmup(self, max_batch: int | None = None) -> list[tuple[str, int]]:
        """Run every view once per batch size the batcher can form up to ``max_batch``: powers of two and the
        maximum (warmup_sizes), so the CUDA provider allocates its arena and loads its kernels before the first
        request. ``max_batch`` None: DEFAULT_MAX_BATCH on the CUDA provider, 1 on the CPU (whose kernels do
        not depend on the batch size). Returns the (view, batch size) pairs run."""
        if max_batch is None:
            max_batch = DEFAULT_MAX_BATCH if self.providers[0] == "CUDAExecutionProvider" else 1
        done = []
        for name, v in self.views.items():
            for b in warmup_sizes(max_batch):
                shape = [b if i == 0 else (1 if d is None else d) for i, d in enumerate(v["input"]["shape"])]
                self.embed(name, np.random.default_rng(0).random(shape, dtype=np.float32), batch_size=max(b, 1))
                done.append((name, b))
        return done
