"""A Bento that carries its model: `bentoml build` in the repository packages the declared model, `bentoml
export` writes it to a file, `bentoml import` puts it into a second, empty BENTOML_HOME, and `bentoml serve
<bento tag>` from a directory outside the repository, without CMC_MODEL, answers /embed exactly as the runtime
does on the original artifact directory. The index is state, not part of the Bento: none by default (503), or a
directory given by CMC_INDEX (a mounted volume in a deployment). No network is needed once package locking is
off: the project's bentofile locks PyPI versions at build time (`lock_packages: true`, which resolves against
PyPI), so the test builds with a copy that turns it off; `export`, `import` and `serve` are offline anyway
(`bentoml containerize` would also pull base images and packages).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from server_fixtures import ROOT, ServerProcess, build_index, build_model, png_b64, scenes

pytestmark = pytest.mark.server

SAVE = ("import sys; from models.artifact import save_to_store; from models.card import load_card; "
        "print(save_to_store(sys.argv[1], load_card(sys.argv[1])))")


def clean_env(home: Path, cmc_home: Path, **extra: str) -> dict:
    """The environment of a fresh machine: its own BentoML home, no CMC_MODEL / CMC_INDEX."""
    env = {k: v for k, v in os.environ.items() if k not in ("CMC_MODEL", "CMC_INDEX", "CMC_API_TOKEN")}
    return env | {"BENTOML_HOME": str(home), "CMC_HOME": str(cmc_home), "BENTOML_DO_NOT_TRACK": "true",
                  "PYTHONUNBUFFERED": "1", "CMC_THREADS": "1"} | extra


def run(args: list[str], env: dict, cwd: Path, timeout: int = 180) -> str:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def bentoml(*args: str, env: dict, cwd: Path) -> str:
    return run([sys.executable, "-m", "bentoml", *args], env, cwd)


class BentoServer(ServerProcess):
    """`bentoml serve <bento tag>` from ``cwd`` (outside the repository); stopped and awaited as ServerProcess."""

    def __init__(self, bento: str, env: dict, cwd: Path, log: Path):
        from serving.measure.launch import free_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._f = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", bento, "--port", str(self.port),
                                      "--host", "127.0.0.1"], cwd=cwd, env=env, stdout=self._f,
                                     stderr=subprocess.STDOUT, start_new_session=True)


def post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


@pytest.fixture(scope="module")
def bento(tmp_path_factory):
    """Model saved into home A; Bento built in the repository from A, exported, imported into an empty home B."""
    base = tmp_path_factory.mktemp("bento")
    build_model(base / "model", image_size=32)
    home_a, home_b = base / "home_a", base / "home_b"
    env_a = clean_env(home_a, base / "cmc_a")
    model_tag = run([sys.executable, "-c", SAVE, str(base / "model")], env_a, ROOT).strip().splitlines()[-1]
    assert model_tag.startswith("cmc:") and model_tag != "cmc:latest"

    # build from the repository with no CMC_MODEL: the service declares cmc:latest, pinned to its version.
    # The project's bentofile, except that PyPI version locking (the one step that needs the network) is off.
    import yaml
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    spec["python"]["lock_packages"] = False
    (base / "bentofile.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = bentoml("build", "-f", str(base / "bentofile.yaml"), "-o", "tag", ".", env=env_a, cwd=ROOT)
    bento_tag = out.strip().splitlines()[-1].removeprefix("__tag__:")
    assert bento_tag.startswith("cmc:"), out
    info = json.loads(bentoml("get", bento_tag, "-o", "json", env=env_a, cwd=ROOT))
    archive = base / "cmc.bento"
    bentoml("export", bento_tag, str(archive), env=env_a, cwd=ROOT)

    env_b = clean_env(home_b, base / "cmc_b")
    assert not home_b.exists()
    bentoml("import", str(archive), env=env_b, cwd=base)
    # a newer model in B's store: `cmc:latest` there is no longer the packaged one, which must still be served
    decoy = base / "decoy"
    shutil.copytree(base / "model", decoy)
    decoy_tag = run([sys.executable, "-c", SAVE, str(decoy)], env_b, base).strip().splitlines()[-1]
    assert decoy_tag != model_tag
    return {"base": base, "model_dir": base / "model", "model_tag": model_tag, "bento_tag": bento_tag,
            "info": info, "archive": archive, "env_b": env_b, "home_b": home_b}


def test_bento_records_and_packages_the_model(bento):
    svc = bento["info"]["services"]
    assert [m["tag"] for s in svc for m in s["models"]] == [bento["model_tag"]]
    assert bento["archive"].stat().st_size > 100_000
    version = bento["model_tag"].split(":")[1]
    assert (bento["home_b"] / "models" / "cmc" / version / "card.json").is_file()  # came with the Bento


def test_imported_bento_serves_its_model_outside_the_repository(bento, tmp_path):
    from models.runtime import Runtime

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert ROOT not in cwd.parents
    server = BentoServer(bento["bento_tag"], bento["env_b"], cwd, tmp_path / "serve.log")
    try:
        server.wait_ready()
        info = post(server, "/info", {}).json()
        version = bento["model_tag"].split(":")[1]
        assert Path(info["settings"]["model"]) == bento["home_b"] / "models" / "cmc" / version, info["settings"]
        rt = Runtime(bento["model_dir"])
        assert info["fingerprint"] == rt.fingerprint
        ds = scenes(6, size=40)
        for view, spec in rt.views.items():
            if spec["source"] == "vector":
                arrays = np.random.default_rng(1).standard_normal((5, spec["channels"])).astype(np.float32)
                r = post(server, "/embed", {"view": view, "arrays": arrays.tolist()})
                ref = rt.embed(view, arrays)
            else:
                imgs = [png_b64(a) for a in ds.sources[spec["source"]][:5]]
                r = post(server, "/embed", {"view": view, "images": imgs})
                ref = rt.embed_items(view, [base64.b64decode(s) for s in imgs])
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["embeddings"], np.float32)
            assert got.shape == ref.shape == (5, rt.dim)
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=view)
        # the index is state, not packaged: none here, so search is a clear 503
        r = post(server, "/search", {"query": {"view": "L", "image": png_b64(ds.sources["rgb"][0])}, "k": 3})
        assert r.status_code == 503 and r.json()["error"] == "no_index", r.text
    finally:
        server.stop()


def test_bento_with_mounted_index_and_model_override(bento, tmp_path):
    """CMC_INDEX names a mounted index directory; CMC_MODEL still overrides the packaged model at serve time."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    other = tmp_path / "other_model"
    build_model(other, image_size=32, seed=1)
    ds = scenes(12, size=32)
    keys = build_index(tmp_path / "volume" / "index", other, ds, 12)
    env = bento["env_b"] | {"CMC_MODEL": str(other), "CMC_INDEX": str(tmp_path / "volume" / "index")}
    server = BentoServer(bento["bento_tag"], env, cwd, tmp_path / "serve.log")
    try:
        server.wait_ready()
        info = post(server, "/info", {}).json()
        from models.card import load_card
        assert info["fingerprint"] == load_card(other).fingerprint != load_card(bento["model_dir"]).fingerprint
        assert info["index"]["available"] and info["index"]["counts"]["L"] == 12
        r = post(server, "/search", {"query": {"view": "L", "image": png_b64(ds.sources["rgb"][3])},
                                     "target_view": "L", "k": 1})
        assert r.status_code == 200 and r.json()["results"][0]["key"] == keys[3], r.text
    finally:
        server.stop()


def test_declared_model_rules(tmp_path, monkeypatch):
    """Directory -> nothing declared; invalid tag -> nothing; unknown tag -> declared, not in the store (import
    still works, `bentoml build` fails naming it); inside a Bento -> the tag its bento.yaml records."""
    import yaml

    from models.artifact import bento_model_tag, declared_model
    (tmp_path / "m").mkdir()
    for ref, want in ((str(tmp_path / "m"), (None, False)), ("Bad Tag!", (None, False)),
                      ("cmc:nosuchversion", ("cmc:nosuchversion", False))):
        monkeypatch.setenv("CMC_MODEL", ref)
        assert declared_model(ROOT) == want, ref
    bento_dir = tmp_path / "bento"
    (bento_dir / "src").mkdir(parents=True)
    assert bento_model_tag(bento_dir / "src") is None
    (bento_dir / "bento.yaml").write_text(yaml.safe_dump(
        {"models": [], "services": [{"name": "cmc", "models": [{"tag": "photos:v1"}]}]}))
    assert declared_model(bento_dir / "src") == ("photos:v1", True)  # CMC_MODEL does not change the packaged one
