"""The CMC embedding server (BentoML 1.4): per-view embeddings, cross-view similarity and cross-view search.

Thin by design: every endpoint delegates to :class:`serving.core.Core` (ONNX runtime + index store, no torch).
Run ``bentoml serve`` in the project root (bentofile.yaml names this service). The service declares its model
(``CMC_MODEL`` when it is a tag, else ``cmc:latest``, pinned to a version at import), so ``bentoml build``
packages it and a Bento serves the model it carries; ``CMC_MODEL`` still overrides at serve time.
Settings come from the environment (see serving.settings.Settings): CMC_MODEL, CMC_INDEX, CMC_WORKERS, CMC_THREADS,
CMC_BATCHING, CMC_MAX_BATCH_SIZE, CMC_MAX_LATENCY_MS, CMC_MAX_ITEMS, CMC_MAX_PIXELS, CMC_MAX_K, CMC_MAX_BODY_MB,
CMC_MAX_METADATA_BYTES, CMC_DECODE_THREADS, CMC_TIMEOUT_S, CMC_DEVICE, CMC_API_TOKEN (unset: writes only from
loopback clients).
Speed settings: CMC_SPIN, CMC_ACCESS_LOG, CMC_TRACE_HOT, CMC_FAST_JSON (see README).
"""
from __future__ import annotations

import os

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402

import bentoml  # noqa: E402
from pydantic import Field  # noqa: E402

from models.artifact import declared_model  # noqa: E402
from serving.observability import QuietAccessLog, logging_config, tracing_config  # noqa: E402
from serving.auth import PUBLIC_PATHS, BearerAuth, BodyLimit, ErrorEnvelope  # noqa: E402
from serving.binary import BinaryEmbed, Encoding, embed_answer  # noqa: E402
from serving.core import Core, Settings, respond  # noqa: E402
from serving.guard import ContentGuard, FormSpec, install_route_metrics  # noqa: E402
from serving.schemas import AddItem, Base64Image, Input, Key, Vector, ViewName, max_items  # noqa: E402
from serving.fastjson import FastJSON  # noqa: E402
from serving.lifecycle import die_with_parent  # noqa: E402
from serving import web  # noqa: E402

SETTINGS = Settings()
N = SETTINGS.max_items
JSON_ROUTES = ("/embed", "/similarity", "/search", "/index/add", "/index/remove", "/info")
FORM_ROUTES = {"/embed_file": FormSpec(files=("image",), texts=("view",))}
# metrics are labelled by these paths only (every other path counts as /other)
install_route_metrics(JSON_ROUTES + tuple(FORM_ROUTES) + ("/", "/docs", "/docs.json", "/metrics", "/readyz",
                                                          "/livez", "/healthz") + web.METRIC_ROUTES)
MODEL_TAG, MODEL_IN_STORE = declared_model(Path(__file__).resolve().parents[1])


@bentoml.service(name="cmc", workers=SETTINGS.workers, traffic={"timeout": SETTINGS.timeout_s},
                 logging=logging_config(SETTINGS.access_log), tracing=tracing_config(SETTINGS.trace_hot))
class CMCService:
    if MODEL_TAG:
        model = bentoml.models.BentoModel(MODEL_TAG)  # packaged by `bentoml build`

    def __init__(self) -> None:
        self.ready = False
        die_with_parent()  # a worker never outlives `bentoml serve` (serving/lifecycle.py)
        if not SETTINGS.model and MODEL_IN_STORE:
            SETTINGS.model = self.model.path  # the declared model (inside a Bento: the one it carries)
        self.core = Core.load(SETTINGS)  # model, warm-up, index, batcher
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    def close(self) -> None:
        self.core.close()

    @bentoml.api
    async def embed(self, view: ViewName,
                    images: Annotated[Optional[list[Base64Image]], Field(json_schema_extra=max_items(N))] = None,
                    arrays: Annotated[Optional[list[Vector]], Field(json_schema_extra=max_items(N))] = None,
                    encoding: Encoding = "float") -> dict:
        """Embed base64 images (image views) or arrays (vector views) in one view -> L2-normalised embeddings.
        Also takes raw image bytes (Content-Type: image/png|jpeg|webp, ?view=L) and multipart (images parts,
        view field); answers base64 little-endian float32 (encoding=base64) or .npy (Accept: application/x-npy)."""
        return await respond(embed_answer(self.core, view, images, arrays, encoding))

    @bentoml.api
    async def embed_file(self, image: Path, view: ViewName) -> dict:
        """Multipart form of /embed for one uploaded image: curl -F image=@x.png -F view=L (a file part only:
        a text part, such as a URL, is a 400 and nothing is fetched)."""
        return await respond(self.core.embed_file(view, image))

    @bentoml.api
    async def similarity(self, a: Optional[Input] = None, b: Optional[Input] = None, query: Optional[Input] = None,
                         candidates: Annotated[Optional[list[Input]], Field(json_schema_extra=max_items(N))] = None
                         ) -> dict:
        """Pair form {a, b} -> cosine and critic exp(cos/tau); rank form {query, candidates} -> sorted scores."""
        return await respond(self.core.similarity(a, b, query, candidates))

    @bentoml.api
    async def search(self, query: Input, target_view: Optional[ViewName] = None,
                     k: Annotated[int, Field(ge=1, le=SETTINGS.max_k)] = 10, include_metadata: bool = True) -> dict:
        """The k nearest indexed items in target_view (default: the query's view) of a query in any view;
        include_metadata=false leaves each hit's metadata out."""
        return await respond(self.core.search(query, target_view, k, include_metadata))

    @bentoml.api(route="/index/add")
    async def index_add(self, items: Annotated[list[AddItem], Field(json_schema_extra=max_items(N))]) -> dict:
        """Embed and add items (inputs by source or vector view name); answered once durable."""
        return await respond(self.core.index_add(items))

    @bentoml.api(route="/index/remove")
    async def index_remove(self, keys: Annotated[list[Key], Field(json_schema_extra=max_items(N))]) -> dict:
        """Remove items by key; answered once durable."""
        return await respond(self.core.index_remove(keys))

    @bentoml.api
    async def info(self) -> dict:
        """The model card, the views and their input specs, index sizes, settings and batching statistics."""
        return await respond(self.core.info())


# outermost of ours: sees every answer, 401s included
CMCService.add_asgi_middleware(QuietAccessLog, enabled=not SETTINGS.access_log)
CMCService.add_asgi_middleware(ErrorEnvelope)
CMCService.add_asgi_middleware(BearerAuth, token=SETTINGS.token, public_paths=PUBLIC_PATHS | web.PUBLIC_PATHS)
CMCService.mount_asgi_app(web.app, path="/")  # the web page, thumbnails, search by key (serving/web.py)
CMCService.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.max_body_mb << 20)
CMCService.add_asgi_middleware(BinaryEmbed)  # binary forms of /embed, after auth and the body limit
CMCService.add_asgi_middleware(ContentGuard, json_routes=JSON_ROUTES, form_routes=FORM_ROUTES)
# innermost: JSON endpoints without BentoML's per-request work
CMCService.add_asgi_middleware(FastJSON, enabled=SETTINGS.fast_json)

__all__: list[Any] = ["CMCService"]
