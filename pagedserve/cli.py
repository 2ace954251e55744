"""The ``pagedserve`` command line. Imports nothing heavy until a command runs."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from pagedserve import __version__

def _json_object(value: Any) -> dict[str, Any] | None:
    """A flag given as a JSON object (vLLM's ``--pooler-config``)."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"give a JSON object, not {value}")
    return parsed


def _level_or_json(value: Any) -> int | dict[str, Any] | None:
    """vLLM's ``-O``/``--compilation-config``: a level (``-O3``) or a JSON object."""
    if value is None or isinstance(value, (int, dict)):
        return value
    return int(value) if value.strip().isdigit() else _json_object(value)


class _NargsPlusOption(click.Option):
    """vLLM's ``nargs="+"``: ``--lora-modules a=x b=y`` takes values up to the next option
    (``--lora-modules`` may also be repeated)."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for opt in self.opts:
            parser_option = parser._long_opt.get(opt)
            if parser_option is None:
                continue
            process = parser_option.process

            def take_all(value: Any, state: Any, _process: Any = process) -> None:
                _process(value, state)
                while state.rargs and not state.rargs[0].startswith("-"):
                    _process(state.rargs.pop(0), state)

            parser_option.process = take_all


#: Engine flags shared by the commands that build an engine, with vLLM's names.
_ENGINE_OPTIONS = [
    click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "float16", "bfloat16"])),
    click.option("--max-model-len", type=int, default=None),
    click.option("--max-num-seqs", type=int, default=None,
                 help="Sequences a step may hold [default: 256; generate, chat and complete in-process: 1]."),
    click.option("--max-num-batched-tokens", type=int, default=None),
    click.option("--block-size", type=int, default=16),
    click.option("--num-kv-blocks", type=int, default=None),
    click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True),
    click.option("--kv-cache-dtype", default="auto", type=click.Choice(["auto", "fp8"])),
    click.option("--load-format", default="auto", type=click.Choice(["auto", "dummy"]),
                 help="dummy: random weights, no checkpoint read (benchmarks)."),
    click.option("--attention-backend", default=None),
    click.option("--torch-compile", is_flag=True, help="Compile the model forward (slower start, faster steps)."),
    click.option("--enforce-eager", is_flag=True, help="Never capture CUDA graphs: every step runs eagerly."),
    click.option("--cuda-graph-sizes", type=int, multiple=True, cls=_NargsPlusOption, metavar="N [N ...]",
                 help="Decode batch sizes captured as CUDA graphs (one value N: 1, 2, 4, multiples of 8 "
                      "up to N; default up to --max-num-seqs)."),
    click.option("--compilation-config", "-O", type=_level_or_json, default=None, metavar="LEVEL|JSON",
                 help="vLLM's compilation level: -O3 compiles the CPU decode step (one graph per padded "
                      "batch size; slower start, see docs/cli.md), 0 (default) runs it eagerly."),
    click.option("--device", default="auto"),
    click.option("--seed", type=int, default=0),
    click.option("--pooler-config", type=_json_object, default=None, metavar="JSON",
                 help='How embeddings pool, JSON: \'{"pooling_type": "MEAN", "normalize": true}\' '
                      "(default LAST, normalised)."),
    click.option("--enable-lora", is_flag=True, help="Serve LoRA adapters (requests pick one by model name)."),
    click.option("--max-loras", type=int, default=1, show_default=True, help="Distinct LoRA adapters a step may hold."),
    click.option("--max-lora-rank", type=int, default=16, show_default=True, help="The largest adapter rank served."),
    click.option("--max-cpu-loras", type=int, default=None, help="LoRA adapters kept in memory (default: --max-loras)."),
    click.option("--sampler", default="default", show_default=True,
                 help="The registered sampler that picks tokens (pagedserve plugins lists them)."),
    click.option("--logits-processors", cls=_NargsPlusOption, multiple=True, metavar="MODULE:CLASS ...",
                 help="Logits processors beyond the registered ones, by qualified class name; run after them."),
    click.option("--speculative-config", type=_json_object, default=None, metavar="JSON",
                 help='Speculative decoding, JSON with vLLM\'s keys: \'{"method": "ngram", '
                      '"num_speculative_tokens": 4}\' (methods: ngram, suffix, draft_model).'),
    click.option("--tensor-parallel-size", "-tp", type=int, default=1, show_default=True,
                 help="Ranks the model is split over (one process each; see docs/parallel.md)."),
    click.option("--nnodes", type=int, default=1, show_default=True, help="Machines the ranks span."),
    click.option("--node-rank", type=int, default=0, show_default=True, help="This machine's index (0: the server)."),
    click.option("--master-addr", default=None, help="Address of node 0 the ranks meet at [default: $MASTER_ADDR or 127.0.0.1]."),
    click.option("--master-port", type=int, default=None, help="Port the ranks meet at [default: $MASTER_PORT or a free one]."),
]


def engine_options(func: Any) -> Any:
    """Add the engine flags to a command (each command declares its own ``--model``)."""
    for option in reversed(_ENGINE_OPTIONS):
        func = option(func)
    return func


def engine_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The engine arguments among a command's parsed options."""
    names = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
             "num_kv_blocks", "enable_prefix_caching", "kv_cache_dtype", "load_format",
             "attention_backend", "torch_compile", "device", "seed", "pooler_config", "enable_lora",
             "max_loras", "max_lora_rank", "max_cpu_loras", "speculative_config", "enforce_eager", "sampler", "compilation_config",
             "tensor_parallel_size", "nnodes", "node_rank", "master_addr", "master_port")
    args = {name: kwargs[name] for name in names}
    args["cuda_graph_sizes"] = list(kwargs["cuda_graph_sizes"]) or None
    args["logits_processors"] = list(kwargs["logits_processors"])
    return args


def lora_adapters_from_flags(
    served_name: str, lora_modules: tuple[str, ...], enable_lora: bool, runtime_updating: bool,
    lora_roots: tuple[str, ...],
) -> Any:
    """The server's LoRA adapter table from its flags (None without ``--enable-lora``)."""
    if not enable_lora:
        if lora_modules or runtime_updating or lora_roots:
            raise click.UsageError("--lora-modules, --enable-lora-runtime-updating and --lora-root need --enable-lora")
        return None
    if runtime_updating and not lora_roots:
        raise click.UsageError("--enable-lora-runtime-updating needs --lora-root: the folders adapters may load from")
    from pagedserve.server.lora import LoRAModulePath, ServedAdapters

    adapters = ServedAdapters(served_name, roots=list(lora_roots), runtime_updating=runtime_updating)
    for value in lora_modules:
        module = LoRAModulePath.parse(value)
        lora = adapters.new_request(module.name, module.path, module.base_model_name)
        adapters.adapters[lora.lora_name] = lora
    return adapters


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group()
@click.version_option(__version__, prog_name="pagedserve")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def cli(log_level: str) -> None:
    """pagedserve: a plugin-based LLM inference engine with a paged KV cache."""
    setup_logging(log_level)


@cli.command()
@click.option("--model", default=None, help="HF model folder or hub id (default: the bundled model).")
@engine_options
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=64)
@click.option("--temperature", type=float, default=None, help="Default: the model's generation_config (0 = greedy).")
@click.option("--top-p", type=float, default=None, help="Default: the model's generation_config.")
@click.option("--top-k", type=int, default=None, help="Default: the model's generation_config.")
@click.option("--repetition-penalty", type=float, default=None, help="Default: the model's generation_config.")
@click.option("--sampling-seed", type=int, default=None, help="Seed of this request's sampling.")
@click.option("--stop", multiple=True, help="A stop string (repeatable).")
def generate(prompt: str, max_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
             repetition_penalty: float | None, sampling_seed: int | None, stop: tuple[str, ...],
             model: str | None, **kwargs: Any) -> None:
    """Complete PROMPT, printing tokens as they come. Sampling flags not given take the model's
    generation_config.json defaults, as the server and vLLM do."""
    from pagedserve.core.config import engine_config_from_args
    from pagedserve.core.engine import LLMEngine
    from pagedserve.core.loader import ModelLoadError
    from pagedserve.core.plugins import PluginError
    from pagedserve.core.sampling_params import SamplingParams, generation_config_defaults

    model = model or default_model()
    if model is None:
        raise click.UsageError("give --model (a HF folder or hub id)")
    if kwargs["max_num_seqs"] is None:  # one prompt: a cache and a warm-up for one sequence
        kwargs["max_num_seqs"] = 1
    try:
        engine = LLMEngine(engine_config_from_args(model, **engine_args(kwargs)))
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}
        defaults = {"temperature": 0.0, **generation_config_defaults(engine.generation_config)}  # else greedy
        params = SamplingParams(**{**defaults, **{k: v for k, v in given.items() if v is not None}},
                                max_tokens=max_tokens, seed=sampling_seed, stop=list(stop))
        engine.add_request("cli", prompt, params)
    except (ValueError, ModelLoadError, PluginError) as exc:
        raise click.ClickException(str(exc)) from exc
    printed = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            text = output.outputs[0].text
            click.echo(text[printed:], nl=False)
            printed = len(text)
            sys.stdout.flush()
    click.echo()
    engine.shutdown()


def _json_list(value: Any) -> list[str]:
    """A flag given as a JSON list of strings, as vLLM takes its CORS flags."""
    if isinstance(value, list):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc}); give a list such as '[\"*\"]'") from exc
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise click.BadParameter(f"give a JSON list of strings, not {value}")
    return parsed


#: The ``serve`` flags that are ServerLimits fields (left out: ServerLimits' default).
_LIMIT_OPTIONS = ("max_request_body_bytes", "max_num_seqs_per_request", "trust_request_chat_template",
                  "timeout_keep_alive", "timeout_header_read")


def default_model() -> str | None:
    """The bundled default model's name, once the package ships one."""
    try:
        from pagedserve.assets import DEFAULT_MODEL
    except ImportError:
        return None
    return DEFAULT_MODEL


@cli.command()
@click.argument("model_argument", metavar="[MODEL]", required=False)
@click.option("--model", "model", default=None, help="HF model folder or hub id (or give it as MODEL).")
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 for all.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--served-model-name", default=None, help="The model name of the API (default: MODEL).")
@click.option("--api-key", envvar="PAGEDSERVE_API_KEY", default=None,
              help="Require this bearer token on /v1 routes (or set PAGEDSERVE_API_KEY).")
@click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True)
@click.option("--quantization", default=None, help="Weight format (default: the checkpoint's).")
@click.option("--allowed-origins", type=_json_list, default=None, metavar="JSON",
              help='CORS: origins allowed, a JSON list (\'["https://a.example"]\'); off if not given.')
@click.option("--allowed-methods", type=_json_list, default='["*"]', metavar="JSON", show_default=True,
              help="CORS: methods allowed, a JSON list.")
@click.option("--allowed-headers", type=_json_list, default='["*"]', metavar="JSON", show_default=True,
              help="CORS: request headers allowed, a JSON list.")
@click.option("--allow-credentials", is_flag=True, help="CORS: allow credentials (cookies).")
@click.option("--lora-modules", cls=_NargsPlusOption, multiple=True, metavar="NAME=PATH|JSON ...",
              help='LoRA adapters served as models: name=path, or {"name":..,"path":..,"base_model_name":..}.')
@click.option("--enable-lora-runtime-updating", is_flag=True,
              help="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --lora-root).")
@click.option("--lora-root", "lora_roots", multiple=True, metavar="DIR",
              help="A folder runtime-loaded adapters may come from (repeatable).")
@click.option("--enable-auto-tool-choice", is_flag=True,
              help='Serve tool_choice="auto" (needs --tool-call-parser).')
@click.option("--tool-call-parser", default=None,
              help="The parser of auto tool calls: hermes, llama3_json or a plugin's.")
@click.option("--max-request-body-bytes", type=int, default=None,
              help="Larger request bodies get a 413 [default: 8388608 (8 MiB)].")
@click.option("--max-num-seqs-per-request", type=int, default=None,
              help="Sequences (n x prompts) one request may ask for [default: half of --max-num-seqs].")
@click.option("--trust-request-chat-template", is_flag=True, default=None,
              help="Accept a chat_template in requests (a template is code the server runs).")
@click.option("--timeout-keep-alive", type=float, default=None,
              help="Seconds an idle keep-alive connection stays open [default: 5].")
@click.option("--timeout-header-read", type=float, default=None,
              help="Seconds a connection has to send a request's headers [default: 10].")
@click.option("--headless", is_flag=True,
              help="Run only this machine's tensor-parallel ranks (--node-rank >= 1), no server.")
def serve(model_argument: str | None, model: str | None, host: str, port: int, api_key: str | None,
          served_model_name: str | None, gpu_memory_utilization: float,
          quantization: str | None, allowed_origins: list[str] | None, allowed_methods: list[str],
          allowed_headers: list[str], allow_credentials: bool, lora_modules: tuple[str, ...],
          enable_lora_runtime_updating: bool, lora_roots: tuple[str, ...], enable_auto_tool_choice: bool,
          tool_call_parser: str | None, **kwargs: Any) -> None:
    """Serve MODEL with an OpenAI-compatible HTTP API until SIGINT or SIGTERM."""
    from pagedserve.server.listen import ServerStartError, bind_socket

    sock = None
    if not kwargs["headless"]:  # a headless node serves no HTTP: its --port is not its to take
        try:
            sock = bind_socket(host, port)  # first: a port in use is said before any slow import
        except ServerStartError as exc:
            raise click.ClickException(str(exc)) from exc
    from pagedserve.core.config import engine_config_from_args
    from pagedserve.core.loader import ModelLoadError
    from pagedserve.core.plugins import PluginError
    from pagedserve.server.app import run_server
    from pagedserve.server.limits import ServerLimits
    from pagedserve.server.middleware import CORSOptions
    from pagedserve.server.tools import ToolOptions

    if model_argument and model and model_argument != model:
        raise click.UsageError(f"MODEL ({model_argument}) and --model ({model}) differ; give one")
    model = model_argument or model or default_model()
    if model is None:
        raise click.UsageError("give a model: pagedserve serve MODEL (a HF folder or hub id)")
    try:
        config = engine_config_from_args(
            model, **engine_args(kwargs), served_model_name=served_model_name,
            gpu_memory_utilization=gpu_memory_utilization,
            quantization=quantization,
        )
        if kwargs["headless"]:
            from pagedserve.distributed.workers import run_headless

            sys.exit(run_headless(config))
        cors = None
        if allowed_origins:
            cors = CORSOptions(allowed_origins, allowed_methods, allowed_headers, allow_credentials)
        elif allow_credentials:
            raise click.UsageError("--allow-credentials needs --allowed-origins")
        adapters = lora_adapters_from_flags(
            served_model_name or model, lora_modules, kwargs["enable_lora"], enable_lora_runtime_updating, lora_roots
        )
        tools = ToolOptions(enable_auto_tool_choice, tool_call_parser)
        limits = ServerLimits(**{name: kwargs[name] for name in _LIMIT_OPTIONS if kwargs[name] is not None})
        run_server(config, host, port, api_key, cors, adapters, tools, limits, sock=sock,
                   log_level=logging.getLogger().getEffectiveLevel())
    except (ValueError, ModelLoadError, PluginError, ServerStartError) as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List the loaded plugins, their package versions and what each registers."""
    from pagedserve.core.plugins import get_plugin_manager

    manager = get_plugin_manager()
    rows = [
        {"name": info.name, "distribution": info.distribution, "version": info.version,
         "registers": info.registered, "http_routes": _http_routes(manager, info.registered.get("routes", []))}
        for info in manager.infos.values()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']}  ({row['distribution'] or '?'} {row['version'] or ''})".rstrip())
        for kind, names in sorted(row["registers"].items()):
            click.echo(f"    {kind}: {', '.join(names)}")
        for route in row["http_routes"]:
            click.echo(f"        {route}")


def _http_routes(manager: Any, router_names: list[str]) -> list[str]:
    """``METHODS /path`` of each route in the named routers (``register_routes``)."""
    routes = []
    for name in router_names:
        for route in manager.registry("routes").load(name).routes:
            methods = ",".join(sorted(getattr(route, "methods", None) or ["WS"]))
            routes.append(f"{methods} {route.path}")
    return routes


def _add_plugin_commands() -> None:
    """Let plugins add subcommands (``register_commands(cli)``), each plugin's implementation
    alone, so ``pagedserve plugins`` can say which plugin added which command."""
    from pagedserve.core.plugins import get_plugin_manager

    manager = get_plugin_manager()
    for impl in manager.hook.register_commands.get_hookimpls():
        before = set(cli.commands)
        impl.function(cli=cli)
        added = sorted(set(cli.commands) - before)
        info = manager.infos.get(impl.plugin_name)
        if added and info is not None:
            info.registered.setdefault("commands", []).extend(added)


def _add_interactive_commands() -> None:
    """``chat`` and ``complete`` live in their own module (which builds on this one's options)."""
    from pagedserve.interactive import chat, complete

    cli.add_command(chat)
    cli.add_command(complete)


def main() -> None:
    from pagedserve.core.plugins import PluginError

    _add_interactive_commands()
    try:
        _add_plugin_commands()
    except PluginError as exc:  # a bad PAGEDSERVE_PLUGINS or a broken plugin: one line, no traceback
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    cli()
