"""The FastAPI application: ``create_app(engine, registry)``, and ``run_server`` for the CLI."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest
from transformers import PreTrainedTokenizerBase

from pagedserve import __version__
from pagedserve.core.async_engine import AsyncLLMEngine
from pagedserve.core.config import EngineConfig
from pagedserve.core.plugins import get_plugin_manager
from pagedserve.core.sampling_params import generation_config_defaults
from pagedserve.core.tokenizer import load_model_tokenizer
from pagedserve.server import chat, completions, tokens
from pagedserve.server.auth import bearer, require_api_key
from pagedserve.server.connections import protocol_with_header_timeout
from pagedserve.server.errors import APIError, error_response, install_error_handlers
from pagedserve.server.limits import BodySizeLimitMiddleware, ServerLimits
from pagedserve.server.listen import bind_socket
from pagedserve.server.middleware import CORSOptions, install_middleware, uvicorn_log_config
from pagedserve.server.openapi import ERROR_RESPONSES, install_openapi
from pagedserve.server.protocol import ModelCard, ModelList
from pagedserve.server.lora import ServedAdapters
from pagedserve.server.lora import router as lora_router
from pagedserve.server.serving import ServerState, get_state
from pagedserve.server.tools import ToolOptions, check_tool_options, load_tool_parser
from pagedserve.server.tokenizer_pool import TokenizerPool

logger = logging.getLogger(__name__)

#: How long ``/health`` answers 503 after the engine failed before the server exits (status 1).
ENGINE_DEATH_GRACE_SECONDS = 1.0
router = APIRouter()


async def check_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """With ``--api-key``, every ``/v1`` route needs it as a bearer token (as in vLLM, the
    health, metrics and tokenizer routes stay open)."""
    if request.url.path.startswith("/v1"):
        require_api_key(get_state(request).api_key, credentials)


@router.api_route(
    "/health",
    methods=["GET", "HEAD"],
    response_class=PlainTextResponse,
    responses={200: {"description": "The engine is running (an empty body, as vLLM's)"}},
)
async def health(state: Annotated[ServerState, Depends(get_state)]) -> Response:
    if not state.engine.is_running:
        return error_response(503, "the engine is not running")
    return PlainTextResponse("")


@router.api_route(
    "/ping",
    methods=["GET", "POST"],
    response_class=PlainTextResponse,
    responses={200: {"description": "The engine is running (an empty body)"}},
)
async def ping(state: Annotated[ServerState, Depends(get_state)]) -> Response:
    """SageMaker's health check, as vLLM serves it: the same as ``/health``."""
    return await health(state)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


def model_cards(state: ServerState) -> list[ModelCard]:
    """The models this server answers to: the base model, then each LoRA adapter (its parent)."""
    cards = [ModelCard(id=state.model_name, root=state.model_path, max_model_len=state.max_model_len)]
    for lora in (state.adapters.adapters.values() if state.adapters is not None else ()):
        cards.append(
            ModelCard(id=lora.lora_name, root=lora.lora_path, parent=state.model_name, max_model_len=state.max_model_len)
        )
    return cards


@router.get("/v1/models")
async def list_models(state: Annotated[ServerState, Depends(get_state)]) -> ModelList:
    return ModelList(data=model_cards(state))


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: Annotated[ServerState, Depends(get_state)]) -> ModelCard:
    """One model by id (a path id, such as a model folder, may hold slashes)."""
    for card in model_cards(state):
        if card.id == model_id:
            return card
    raise APIError(404, f"The model `{model_id}` does not exist.", param="model")


@router.api_route("/metrics", methods=["GET", "HEAD"], response_class=PlainTextResponse)  # aiperf probes with HEAD
async def metrics(state: Annotated[ServerState, Depends(get_state)]) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


def served_model_name(config: EngineConfig) -> str:
    return config.model.served_model_name or config.model.model


def create_app(
    engine: AsyncLLMEngine,
    registry: CollectorRegistry,
    api_key: str | None = None,
    cors: CORSOptions | None = None,
    adapters: ServedAdapters | None = None,
    tools: ToolOptions | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """The server of a built engine; the app's lifespan starts and stops the engine thread.
    ``registry`` holds the metrics ``/metrics`` exports. Routers that plugins register
    (``register_routes``) are included after the built-in ones. CORS headers are sent only
    when ``cors`` names origins. ``adapters``: the LoRA adapters served as models (their
    load/unload routes answer only with runtime updating on). ``limits``: what one
    client may ask (the defaults if None)."""
    llm_engine = engine.engine
    config = llm_engine.config
    model = config.model
    generation_config = llm_engine.generation_config
    limits = limits or ServerLimits()
    limits.seqs_per_request(config.scheduler.max_num_seqs)  # ValueError now, not per request

    def tokenizer() -> PreTrainedTokenizerBase:
        return load_model_tokenizer(model)

    state = ServerState(
        engine=engine,
        tokenizer=tokenizer(),
        tokenizers=TokenizerPool(tokenizer, limits.tokenizer_threads),
        model_name=served_model_name(config),
        model_path=model.model,
        max_model_len=llm_engine.max_model_len,
        max_num_seqs=config.scheduler.max_num_seqs,
        vocab_size=llm_engine.vocab_size,
        sampling_defaults=generation_config_defaults(generation_config),
        registry=registry,
        limits=limits,
        api_key=api_key,
        adapters=adapters,
    )
    state.tool_parser = load_tool_parser(tools or ToolOptions(), engine.plugins, state.tokenizer)
    if state.sampling_defaults:
        logger.info("sampling defaults from the model's generation_config.json: %s", state.sampling_defaults)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            state.tokenizers.shutdown()
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(
        title="pagedserve",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(check_api_key)],
        responses=ERROR_RESPONSES,
    )
    app.state.server = state
    install_error_handlers(app)
    install_openapi(app, api_key_set=api_key is not None)
    app.add_middleware(BodySizeLimitMiddleware, limit=limits.max_request_body_bytes)
    install_middleware(app, cors)
    for built_in in (router, completions.router, chat.router, tokens.router):
        app.include_router(built_in)
    if adapters is not None and adapters.runtime_updating:
        app.include_router(lora_router)
    for entry in engine.plugins.registry("routes").entries():
        app.include_router(entry.load())
    return app


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_server(
    config: EngineConfig,
    host: str,
    port: int,
    api_key: str | None = None,
    cors: CORSOptions | None = None,
    adapters: ServedAdapters | None = None,
    tools: ToolOptions | None = None,
    limits: ServerLimits | None = None,
    sock: socket.socket | None = None,
    **uvicorn_args: Any,
) -> None:
    """Load the model, then serve until SIGINT or SIGTERM, which shut down cleanly (exit 0).
    HTTP/1.1 is uvicorn's h11 protocol with ``limits``' keep-alive and header-read timeouts.
    ``sock``: the address already bound (``bind_socket``), else bound here before the model loads."""
    import uvicorn

    from pagedserve.core.metrics import EngineMetrics

    # uvicorn re-raises the signal that stopped it once it has shut down, under the handler
    # that was there before: this one, so the process exits 0 instead of dying of SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    disable_created_metrics()  # as vLLM: no ``*_created`` series
    metrics = EngineMetrics(served_model_name(config))
    tools = tools or ToolOptions()
    check_tool_options(tools, get_plugin_manager())  # before the model loads
    sock = sock or bind_socket(host, port)  # a port in use is said now, not after the model loaded
    try:
        engine = AsyncLLMEngine(config, observers=[metrics])
    except BaseException:
        sock.close()
        raise
    if adapters is not None:
        for lora in adapters.adapters.values():  # on the engine thread before it steps: checked at start-up
            try:
                engine.call_before_start(lambda llm, lora=lora: llm.lora_manager.add_adapter(lora))
            except BaseException:
                engine.shutdown()
                raise
    limits = limits or ServerLimits()
    app = create_app(engine, metrics.registry, api_key, cors, adapters, tools, limits)
    server = uvicorn.Server(uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=uvicorn_log_config(),
        http=protocol_with_header_timeout(limits.timeout_header_read),
        timeout_keep_alive=limits.timeout_keep_alive,  # type: ignore[arg-type]
        **uvicorn_args,
    ))
    threading.Thread(target=_stop_when_engine_dies, args=(engine, server), daemon=True).start()
    server.run(sockets=[sock])
    if engine.error is not None:
        raise SystemExit(f"the engine failed: {engine.error}")


def _stop_when_engine_dies(engine: AsyncLLMEngine, server: Any) -> None:
    """Once the engine loop has failed (``/health`` answers 503 from then on), shut the server
    down so the process exits non-zero and a supervisor can restart it, as vLLM does."""
    while not server.should_exit:
        if engine.error is not None:
            logger.error("the engine failed (%s); shutting the server down", engine.error)
            time.sleep(ENGINE_DEATH_GRACE_SECONDS)
            server.should_exit = True
            return
        time.sleep(0.2)

