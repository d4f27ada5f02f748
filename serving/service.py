"""The CMC embedding server (BentoML 1.4): per-view embeddings, cross-view similarity and cross-view search.

Thin by design: every endpoint delegates to :class:`serving.core.Core` (ONNX runtime + index store, no torch).
Run ``bentoml serve`` in the project root (bentofile.yaml names this service). Settings come from the environment
(see serving.core.Settings): CMC_MODEL, CMC_INDEX, CMC_WORKERS, CMC_THREADS, CMC_BATCHING, CMC_MAX_BATCH_SIZE,
CMC_MAX_LATENCY_MS, CMC_MAX_ITEMS, CMC_MAX_PIXELS, CMC_MAX_K, CMC_MAX_BODY_MB, CMC_TIMEOUT_S, CMC_DEVICE,
CMC_API_TOKEN.
"""
from __future__ import annotations

import os

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import bentoml  # noqa: E402

from serving.auth import PUBLIC_PATHS, BearerAuth, BodyLimit, ErrorEnvelope  # noqa: E402
from serving.core import Core, Settings, respond  # noqa: E402
from serving.schemas import AddItem, Input  # noqa: E402
from serving import web  # noqa: E402

SETTINGS = Settings()


@bentoml.service(name="cmc", workers=SETTINGS.workers, traffic={"timeout": SETTINGS.timeout_s})
class CMCService:
    def __init__(self) -> None:
        self.ready = False
        self.core = Core.load(SETTINGS)  # model, warm-up, index, batcher
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    def close(self) -> None:
        self.core.close()

    @bentoml.api
    async def embed(self, view: str, images: Optional[list[str]] = None,
                    arrays: Optional[list[list[float]]] = None) -> dict:
        """Embed base64 images (image views) or arrays (vector views) in one view -> L2-normalised embeddings."""
        return await respond(self.core.embed(view, images, arrays))

    @bentoml.api
    async def embed_file(self, image: Path, view: str) -> dict:
        """Multipart form of /embed for one image: curl -F image=@x.png -F view=L."""
        return await respond(self.core.embed_file(view, image))

    @bentoml.api
    async def similarity(self, a: Optional[Input] = None, b: Optional[Input] = None, query: Optional[Input] = None,
                         candidates: Optional[list[Input]] = None) -> dict:
        """Pair form {a, b} -> cosine and critic exp(cos/tau); rank form {query, candidates} -> sorted scores."""
        return await respond(self.core.similarity(a, b, query, candidates))

    @bentoml.api
    async def search(self, query: Input, target_view: Optional[str] = None, k: int = 10) -> dict:
        """The k nearest indexed items in target_view (default: the query's view) of a query in any view."""
        return await respond(self.core.search(query, target_view, k))

    @bentoml.api(route="/index/add")
    async def index_add(self, items: list[AddItem]) -> dict:
        """Embed and add items (inputs by source or vector view name); answered once durable."""
        return await respond(self.core.index_add(items))

    @bentoml.api(route="/index/remove")
    async def index_remove(self, keys: list[str]) -> dict:
        """Remove items by key; answered once durable."""
        return await respond(self.core.index_remove(keys))

    @bentoml.api
    async def info(self) -> dict:
        """The model card, the views and their input specs, index sizes, settings and batching statistics."""
        return await respond(self.core.info())


CMCService.add_asgi_middleware(ErrorEnvelope)
CMCService.add_asgi_middleware(BearerAuth, token=SETTINGS.token, public_paths=PUBLIC_PATHS | web.PUBLIC_PATHS)
CMCService.mount_asgi_app(web.app, path="/")  # the web page, thumbnails, search by key (serving/web.py)
CMCService.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.max_body_mb << 20)

__all__: list[Any] = ["CMCService"]
