"""The CMC embedding server (BentoML 1.4): per-view embeddings, cross-view similarity and cross-view search.

Thin by design: every endpoint delegates to :class:`serving.core.Core` (ONNX runtime + index store, no torch).
Run ``bentoml serve`` in the project root (bentofile.yaml names this service). The service declares its model
(``CMC_MODEL`` when it is a tag, else ``cmc:latest``, pinned to a version at import), so ``bentoml build``
packages it and a Bento serves the model it carries; ``CMC_MODEL`` still overrides at serve time.
Settings come from the environment (see serving.settings.Settings): CMC_MODEL, CMC_INDEX, CMC_WORKERS, CMC_THREADS,
CMC_BATCHING, CMC_MAX_BATCH_SIZE, CMC_MAX_LATENCY_MS, CMC_MAX_ITEMS, CMC_MAX_PIXELS, CMC_MAX_K, CMC_MAX_BODY_MB,
CMC_MAX_METADATA_BYTES, CMC_MAX_IMAGE_MB, CMC_MAX_CONCURRENCY, CMC_MAX_INFLIGHT_MB, CMC_DECODE_THREADS,
CMC_TIMEOUT_S, CMC_DEVICE, CMC_API_TOKEN (unset: protected mode, writes only from local, direct, same-site clients).
The HTTP edge (who may call what, body forms and limits, metrics labels) derives from serving/routes.py.
Speed settings: CMC_SPIN, CMC_ACCESS_LOG, CMC_TRACE_HOT, CMC_FAST_JSON (see README).
"""
from __future__ import annotations

import os

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from serving.lifecycle import follow_serve_process  # noqa: E402

follow_serve_process()  # first of all: a worker never outlives `bentoml serve`, even one killed during start-up

from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402

import bentoml  # noqa: E402
from pydantic import Field  # noqa: E402

from models.artifact import declared_model, store_model  # noqa: E402
from serving import routes, web  # noqa: E402
from serving.admission import Admission  # noqa: E402
from serving.auth import AccessControl, BodyLimit, ErrorEnvelope  # noqa: E402
from serving.binary import BinaryEmbed, Encoding, embed_answer  # noqa: E402
from serving.core import Core, current_core, respond  # noqa: E402
from serving.fastjson import FastJSON  # noqa: E402
from serving.guard import ContentGuard, install_route_metrics  # noqa: E402
from serving.observability import QuietAccessLog, logging_config, tracing_config  # noqa: E402
from serving.schemas import AddItem, Base64Image, Input, Key, Vector, ViewName, items  # noqa: E402
from serving.settings import from_env  # noqa: E402

SETTINGS = from_env()
install_route_metrics(routes.metric_paths())  # metrics are labelled by the table's paths (every other: /other)
MODEL_TAG, MODEL_IN_STORE = declared_model(Path(__file__).resolve().parents[1])


@bentoml.service(name="cmc", workers=SETTINGS.workers, traffic={"timeout": SETTINGS.timeout_s},
                 logging=logging_config(SETTINGS.access_log), tracing=tracing_config(SETTINGS.trace_hot))
class CMCService:
    if MODEL_TAG:
        model = store_model(MODEL_TAG)  # a bentoml.models.BentoModel: packaged by `bentoml build`

    def __init__(self) -> None:
        self.ready = False
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
                    images: Optional[items(Base64Image)] = None,
                    arrays: Optional[items(Vector)] = None,
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
                         candidates: Optional[items(Input)] = None
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
    async def index_add(self, items: items(AddItem)) -> dict:
        """Embed and add items (inputs by source or vector view name); answered once durable."""
        return await respond(self.core.index_add(items))

    @bentoml.api(route="/index/remove")
    async def index_remove(self, keys: items(Key)) -> dict:
        """Remove items by key; answered once durable."""
        return await respond(self.core.index_remove(keys))

    @bentoml.api
    async def info(self) -> dict:
        """The model card, the views and their input specs, index sizes, settings and batching statistics."""
        return await respond(self.core.info())


# outermost of ours: sees every answer, 401s included
CMCService.add_asgi_middleware(QuietAccessLog, enabled=not SETTINGS.access_log)
CMCService.add_asgi_middleware(ErrorEnvelope)
# then, from the route table (serving/routes.py): admission (503 + Retry-After), access (token or protected mode),
# the body limit, and the per-route body screening, before anything parses a body
CMCService.add_asgi_middleware(Admission, max_concurrency=SETTINGS.max_concurrency,
                               max_bytes=SETTINGS.max_inflight_mb << 20, chunked_bytes=SETTINGS.max_body_mb << 20)
CMCService.add_asgi_middleware(AccessControl, token=SETTINGS.token)
CMCService.mount_asgi_app(web.app, path="/")  # the web page, thumbnails, search by key (serving/web.py)
CMCService.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.max_body_mb << 20)
CMCService.add_asgi_middleware(ContentGuard, budgets=lambda: current_core().budgets)
CMCService.add_asgi_middleware(BinaryEmbed)  # binary forms of /embed, after the body screening
# innermost: JSON endpoints without BentoML's per-request work
CMCService.add_asgi_middleware(FastJSON, enabled=SETTINGS.fast_json)

__all__: list[Any] = ["CMCService"]
