"""python -m train.export --run RUN_DIR [--out DIR]: owns the artifact, one ONNX graph per view (the view
transform inside) plus the card, checked against torch, and saved into the BentoML model store.

Each graph takes the view's *source* as the server has it after decoding and resizing (float32 NCHW RGB or
depth in [0, 1] at the card's size, or a raw vector) and outputs the L2-normalised embedding; the batch
axis is dynamic. ``onnx.checker`` runs on every file and onnxruntime's output must equal torch's within
1e-4 (max abs) on fresh random inputs, or the export fails. The card goes beside the files, and the
artifact is saved into the BentoML model store as ``cmc:<version>``.
"""
from __future__ import annotations

import argparse
import copy
import io
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.artifact import RUN_EXPORT, save_to_store
from models.card import Card, CardError, git_commit, sha256_file
from models.encoders import CMCModel
from .config import ConfigError
from .model import load_run

LOG = logging.getLogger(__name__)
OPSET = 17
PARITY_ATOL = 1e-4
# onnxruntime's CUDA kernels against torch on the CPU: cuDNN's algorithms sum in other orders (TF32 is turned
# off for the check, so this is float32 rounding, not TF32's 10-bit mantissa)
PARITY_ATOL_CUDA = 1e-3


class ExportError(RuntimeError):
    pass


def random_source(spec_input: dict, n: int, seed: int, view_model: nn.Module | None = None) -> np.ndarray:
    """Fresh random inputs in the range the view takes (vectors at the scale of the training data)."""
    rng = np.random.default_rng(seed)
    shape = [n] + [int(d) for d in spec_input["shape"][1:]]
    if spec_input["source"] == "vector" and view_model is not None:
        t = view_model.transform
        return (rng.standard_normal(shape) * t.std.numpy() + t.mean.numpy()).astype(np.float32)
    return rng.random(shape, dtype=np.float32)


class _Fused(nn.Module):
    def __init__(self, model: CMCModel):
        super().__init__()
        self.model = model

    def forward(self, *xs):
        return torch.cat([m(x) for m, x in zip(self.model.views.values(), xs)], dim=1)


def _export_one(module: nn.Module, inputs: tuple, names: list[str], path: Path | io.BytesIO) -> None:
    """``module`` to ONNX with a dynamic batch axis: into a file, checked by ``onnx.checker``, or into memory."""
    dyn = {n: {0: "batch"} for n in names} | {"embedding": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, path if isinstance(path, io.BytesIO) else str(path), input_names=names,
                          output_names=["embedding"], dynamic_axes=dyn, opset_version=OPSET, dynamo=False)
    if not isinstance(path, io.BytesIO):
        import onnx  # lazy: heavy, and train.pretrain imports this module before training (check_exportable)
        onnx.checker.check_model(onnx.load(str(path)))


def check_exportable(model: CMCModel, image_size: int) -> None:
    """Export every view of (a copy of) ``model`` to memory, before any training: an architecture and size that
    ONNX cannot express fail here, in seconds, with one line, instead of after training."""
    model = copy.deepcopy(model).cpu().eval()
    for name, m in model.views.items():
        spec = model.specs[name]
        inp = spec.input_spec(image_size if spec.is_image else None)
        try:
            _export_one(m, (torch.from_numpy(random_source(inp, 2, 0, m)),), ["source"], io.BytesIO())
        except Exception as e:  # noqa: BLE001 - any exporter failure means this model cannot be served
            arch = type(m.encoder).__name__
            raise ExportError(f"view {name!r} ({arch} at {image_size} px) cannot be exported to ONNX: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                              f"choose another --arch/--image-size or pass --export false") from None


def parity(module: nn.Module, path: Path, inputs: list[np.ndarray], device: str = "cpu") -> float | None:
    """Max abs difference between torch (on the CPU, float32) and onnxruntime on ``inputs``, run by the CPU
    provider (``device="cpu"``) or the CUDA provider (``"cuda"``, GPU 0, TF32 off); None when the CUDA provider
    was asked for and not granted (onnxruntime falls back to the CPU with a warning)."""
    import onnxruntime as ort  # lazy: heavy, and train.pretrain imports this module before training
    if device == "cuda":
        provs, opts = ["CUDAExecutionProvider", "CPUExecutionProvider"], [{"device_id": "0", "use_tf32": "0"}, {}]
    else:
        provs, opts = ["CPUExecutionProvider"], [{}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a provider this build lacks: reported below, not as a warning
        sess = ort.InferenceSession(str(path), providers=provs, provider_options=opts)
    if sess.get_providers()[0] != provs[0]:
        return None
    feed = {i.name: x for i, x in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        want = module(*[torch.from_numpy(x) for x in inputs]).numpy()
    return float(np.abs(got - want).max())


def _check_parity(module: nn.Module, path: Path, inputs: list[np.ndarray], cuda: bool) -> dict:
    """The CPU provider's parity (ExportError past ``PARITY_ATOL``) and, when a GPU is usable, the CUDA
    provider's (past ``PARITY_ATOL_CUDA``), as card fields: ``parity_max_abs``, ``parity_cuda``."""
    err = parity(module, path, inputs)
    if err > PARITY_ATOL:
        raise ExportError(f"{path}: onnxruntime differs from torch by {err:.2e} (> {PARITY_ATOL})")
    out: dict = {"parity_max_abs": err}
    if cuda:
        got = parity(module, path, inputs, "cuda")
        if got is None:
            out["parity_cuda"] = "not checked: the CUDA provider was not granted (onnxruntime fell back to the CPU)"
            LOG.warning("%s: %s", path, out["parity_cuda"])
        elif got > PARITY_ATOL_CUDA:
            raise ExportError(f"{path}: onnxruntime's CUDA provider differs from torch by {got:.2e} "
                              f"(> {PARITY_ATOL_CUDA})")
        else:
            out["parity_cuda"] = got
    return out


def _gpu_usable() -> bool:
    from models.runtime import gpu_usable  # lazy: models.runtime imports onnxruntime at the top
    return gpu_usable()


def export_model(model: CMCModel, image_size: int, out: str | Path, cfg: dict, evaluation: dict | None = None,
                 fused: bool = True) -> Card:
    """Write ``<view>.onnx`` per view (+ ``fused.onnx``) and ``card.json`` into ``out``; check parity."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    cuda = _gpu_usable()  # a GPU is present: check the CUDA provider too (the one a GPU server runs)
    views = []
    for name, m in model.views.items():
        spec = model.specs[name]
        inp = spec.input_spec(image_size if spec.is_image else None)
        path = out / f"{name}.onnx"
        _export_one(m, (torch.from_numpy(random_source(inp, 2, 0, m)),), ["source"], path)
        checked = _check_parity(m, path, [random_source(inp, 16, 1234, m)], cuda)
        LOG.info("exported %s (parity max abs %.1e)", path, checked["parity_max_abs"])
        views.append(spec.to_dict() | {"file": path.name, "sha256": sha256_file(path), "input": inp,
                                       "output": {"name": "embedding", "dim": int(cfg["feat_dim"])}} | checked)
    fused_entry = None
    if fused:
        f = _Fused(model).eval()
        ins = [random_source(v["input"], 2, 0, model.views[v["name"]]) for v in views]
        path = out / "fused.onnx"
        _export_one(f, tuple(torch.from_numpy(x) for x in ins), [v["name"] for v in views], path)
        checked = _check_parity(f, path, [random_source(v["input"], 8, 99, model.views[v["name"]]) for v in views],
                                cuda)
        fused_entry = {"file": path.name, "sha256": sha256_file(path), "views": [v["name"] for v in views],
                       "dim": int(cfg["feat_dim"]) * len(views)} | checked
    card = Card(views=views, feat_dim=int(cfg["feat_dim"]), image_size=int(image_size), tau=float(cfg["tau"]),
                loss={"graph": cfg["graph"], "negatives": cfg["negatives"], "nce_k": cfg["nce_k"],
                      "nce_momentum": cfg["nce_momentum"], "form": "softmax"},
                config=cfg, evaluation=evaluation or {}, data=cfg["data"], epochs=int(cfg["epochs"]),
                seed=int(cfg["seed"]), commit=git_commit(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                fused=fused_entry)
    card.save(out)
    return card


def export_run(run: str | Path, out: str | Path | None = None, store: bool = True, evaluation: dict | None = None) -> tuple[Card, Path, str | None]:
    """Export a run directory's checkpoint; returns (card, directory, BentoML tag or None)."""
    model, state = load_run(run)
    out = Path(out) if out else Path(run) / RUN_EXPORT
    cfg = state["config"]
    card = export_model(model, state["image_size"], out, cfg, evaluation)
    tag = save_to_store(out, card) if store else None
    return card, out, tag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description="Export a run to ONNX + card.json.")
    p.add_argument("--run", required=True, help="run directory of train.pretrain")
    p.add_argument("--out", default=None, help="artifact directory (default: RUN/export)")
    p.add_argument("--no-store", action="store_true", help="do not save into the BentoML model store")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        card, out, tag = export_run(a.run, a.out, store=not a.no_store)
    except (ConfigError, CardError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {', '.join(card.view_names)} to {out}" + (f" and the BentoML model store as {tag}" if tag else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
