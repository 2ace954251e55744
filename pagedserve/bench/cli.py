"""``pagedserve bench throughput | serve``: print one table and optionally write the JSON."""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import click

from pagedserve.cli import default_model, engine_args, engine_options


@click.group()
def bench() -> None:
    """Benchmarks: offline throughput against transformers, load against a server, start-up time."""


@bench.command()
@click.option("--model", default=None, help="HF model folder or hub id (default: the bundled model).")
@engine_options
@click.option("--quantization", default=None,
              help="The engine's weight format (default: the checkpoint's), e.g. int8; the baseline stays unquantized.")
@click.option("--num-prompts", type=int, default=64)
@click.option("--lengths", default="sharegpt", help="fixed:IN,OUT | uniform:A-B,C-D | sharegpt")
@click.option("--workload-seed", type=int, default=0)
@click.option("--baseline", type=click.Choice(["hf"]), default=None,
              help="Also run transformers generate (sequential and padded static batches).")
@click.option("--sequential-prompts", type=int, default=None,
              help="Run the sequential baseline on the first N prompts only (its tokens/s is a rate).")
@click.option("--baseline-dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="The baseline's dtype (default: the engine's), e.g. the fastest one transformers has here.")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="With --baseline hf: the engine and transformers' sequential generate take turns this many "
                   "times (each round the workload's lengths with fresh token ids, which the prefix cache cannot "
                   "skip); the speed-up is the median of the rounds' ratios, robust to a machine's speed drifting.")
@click.option("--warmup-prompts", type=int, default=0,
              help="First run this many other prompts of the same lengths through each system, unmeasured.")
@click.option("--profile", is_flag=True, help="Print the engine run's top functions (cProfile).")
@click.option("--num-loras", default=None, metavar="N[,N...]",
              help="Also run the workload spread over N random LoRA adapters (e.g. 1,4,8), against the base alone.")
@click.option("--lora-rank", type=int, default=8, show_default=True, help="The rank of the --num-loras adapters.")
@click.option("--compare-merged", is_flag=True,
              help="With --num-loras: also merge each adapter into the weights and serve them one after another.")
@click.option("--compare-output-kinds", is_flag=True,
              help="Also run the workload reading CUMULATIVE, DELTA and FINAL_ONLY outputs: the engine "
                   "overhead of each (CUMULATIVE copies every token id each step).")
@click.option("--output-json", type=click.Path(dir_okay=False), default=None)
def throughput(model: str | None, quantization: str | None, num_prompts: int, lengths: str, workload_seed: int, baseline: str | None,
               sequential_prompts: int | None, baseline_dtype: str | None, rounds: int, warmup_prompts: int, profile: bool,
               num_loras: str | None, lora_rank: int, compare_merged: bool, compare_output_kinds: bool,
               output_json: str | None, **kwargs: Any) -> None:
    """Offline throughput of the engine in-process (greedy, ignore_eos: exact lengths).

    A warm-up (``--warmup-prompts``) runs a workload of other prompts through each system first:
    the first time a matmul shape is seen costs a one-time set-up in oneDNN (bf16 on the CPU,
    about 0.5 ms a shape), which a server pays once, not on every run.
    """
    from pagedserve.bench.report import format_table, write_result
    from pagedserve.bench.throughput import run_throughput
    from pagedserve.bench.workload import make_workload, with_fresh_ids
    from pagedserve.core.config import engine_config_from_args
    from pagedserve.core.engine import LLMEngine

    model = model or default_model()
    if model is None:
        raise click.UsageError("give --model")
    if rounds < 1:
        raise click.BadParameter(f"{rounds} is below 1", param_hint="--rounds")
    if rounds > 1 and baseline != "hf":
        raise click.UsageError("--rounds takes turns with transformers' generate: give --baseline hf too")
    if num_loras is not None:
        _lora_throughput(model, kwargs, num_loras, lora_rank, compare_merged, lengths, num_prompts,
                         workload_seed, output_json)
        return
    engine = LLMEngine(engine_config_from_args(model, **engine_args(kwargs), quantization=quantization))
    workload = make_workload(lengths, num_prompts, engine.vocab_size, engine.max_model_len, workload_seed)
    warmup = make_workload(lengths, warmup_prompts, engine.vocab_size, engine.max_model_len, workload_seed + 1)
    if warmup:
        run_throughput(engine, warmup)
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        results = profiler.runcall(run_throughput, engine, workload)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    else:
        results = run_throughput(engine, workload)
    if compare_output_kinds:
        from pagedserve.bench.throughput import compare_output_kinds as compare

        results["output_kinds"] = compare(engine, workload)
    if engine.config.speculative is not None:
        # The same workload without speculation, in the same run: the speed-up to read.
        plain_args = {**engine_args(kwargs), "speculative_config": None}
        plain = run_throughput(LLMEngine(engine_config_from_args(model, **plain_args)), workload)
        results["no_speculation_output_tokens_per_s"] = plain["output_tokens_per_s"]
        results["speedup_vs_no_speculation"] = results["output_tokens_per_s"] / plain["output_tokens_per_s"]
    if engine.config.parallel.tensor_parallel_size > 1:
        # The same workload on one rank, in the same run (the N-rank engine's cores freed first).
        engine.shutdown()
        one_rank_args = {**engine_args(kwargs), "tensor_parallel_size": 1}
        one_rank_engine = LLMEngine(engine_config_from_args(model, **one_rank_args))
        if warmup:
            run_throughput(one_rank_engine, warmup)
        one_rank = run_throughput(one_rank_engine, workload)
        results["one_rank_output_tokens_per_s"] = one_rank["output_tokens_per_s"]
        results["speedup_vs_one_rank"] = results["output_tokens_per_s"] / one_rank["output_tokens_per_s"]
    rows: list[tuple[str, Any]] = []
    for name, value in results.items():
        rows += [(f"{name}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(name, value)]
    if baseline == "hf":
        from pagedserve.bench.hf_baseline import hf_sequential, hf_static_batches, load_hf_model

        import torch

        runner = engine.runner
        dtype = getattr(torch, baseline_dtype) if baseline_dtype else runner.dtype
        results["hf_dtype"] = str(dtype).removeprefix("torch.")
        hf_model = load_hf_model(
            engine.config.model.model_path, dtype, runner.device.type,
            random_weights=engine.config.model.load_format == "dummy",
        )
        max_batch = engine.config.scheduler.max_num_seqs
        if warmup:
            hf_sequential(hf_model, warmup[:8])
            hf_static_batches(hf_model, warmup[:max_batch], max_batch)
        sequential = hf_sequential(hf_model, workload[:sequential_prompts])
        turns = [(results["output_tokens_per_s"], sequential["output_tokens_per_s"])]
        for turn in range(1, rounds):
            fresh = with_fresh_ids(workload, workload_seed + 1000 + turn, engine.vocab_size)
            engine_rate = run_throughput(engine, fresh)["output_tokens_per_s"]
            turns.append((engine_rate, hf_sequential(hf_model, fresh[:sequential_prompts])["output_tokens_per_s"]))
        static = hf_static_batches(hf_model, workload, max_batch)
        results["hf_sequential"], results["hf_static_batches"] = sequential, static
        results["speedup_vs_hf_sequential"] = statistics.median(ours / theirs for ours, theirs in turns)
        if rounds > 1:
            results["rounds"] = [{"output_tokens_per_s": ours, "hf_sequential_output_tokens_per_s": theirs,
                                  "speedup_vs_hf_sequential": ours / theirs} for ours, theirs in turns]
        results["speedup_vs_hf_static_batches"] = results["output_tokens_per_s"] / static["output_tokens_per_s"]
        rows += [
            ("hf_dtype", results["hf_dtype"]),
            ("hf_sequential_output_tokens_per_s", sequential["output_tokens_per_s"]),
            ("hf_static_output_tokens_per_s", static["output_tokens_per_s"]),
            ("speedup_vs_hf_sequential", results["speedup_vs_hf_sequential"]),
            ("speedup_vs_hf_static_batches", results["speedup_vs_hf_static_batches"]),
        ]
    click.echo(format_table(rows))
    if output_json:
        settings = {"model": model, "num_prompts": num_prompts, "lengths": lengths,
                    "sequential_prompts": sequential_prompts, "baseline_dtype": baseline_dtype, "rounds": rounds,
                    "warmup_prompts": warmup_prompts, "quantization": quantization,
                    "workload_seed": workload_seed, **engine_args(kwargs),
                    "max_model_len": engine.max_model_len,
                    "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens}
        path = write_result(output_json, "throughput", settings, results, str(engine.runner.device))
        click.echo(f"wrote {path}")


@bench.command()
@click.option("--model", default=None, help="HF model folder or hub id (default: the bundled model).")
@engine_options
@click.option("--batch-size", default="1", metavar="N[,N...]", show_default=True,
              help="Sequences per batch; several (1,16,64) to find where speculation stops paying.")
@click.option("--input-len", type=int, default=256, show_default=True, help="Most prompt tokens.")
@click.option("--output-len", type=int, default=128, show_default=True)
@click.option("--workload", type=click.Choice(["random", "stdlib", "stdlib-edit"]), default="random",
              show_default=True, help="Prompts: random ids, held-out stdlib files, or a held-out file to rewrite.")
@click.option("--num-iters", type=int, default=30, show_default=True,
              help="Measured batches (vLLM's default): each a new prompt, 30 covers the held-out stdlib files.")
@click.option("--num-iters-warmup", type=int, default=1, show_default=True)
@click.option("--workload-seed", type=int, default=0)
@click.option("--output-json", type=click.Path(dir_okay=False), default=None)
def latency(model: str | None, batch_size: str, input_len: int, output_len: int, workload: str, num_iters: int,
            num_iters_warmup: int, workload_seed: int, output_json: str | None, **kwargs: Any) -> None:
    """Latency of one batch end to end (greedy, ignore_eos), as ``vllm bench latency``. With
    ``--speculative-config``, also without it in the same run, the two engines taking turns
    batch by batch: the speed-up and the mean accepted length (tokens per verification step,
    the target's own one included)."""
    from pagedserve.bench.latency import make_prompts, run_latency
    from pagedserve.bench.report import format_table, write_result
    from pagedserve.core.config import engine_config_from_args
    from pagedserve.core.engine import LLMEngine

    model = model or default_model()
    try:
        sizes = [int(n) for n in batch_size.split(",")]
    except ValueError:
        raise click.BadParameter(f"{batch_size!r} is not a comma-separated list", param_hint="--batch-size")
    args = engine_args(kwargs)
    speculative = args.pop("speculative_config")
    engines = {"plain": LLMEngine(engine_config_from_args(model, **args))}
    if speculative is not None:
        engines["speculative"] = LLMEngine(engine_config_from_args(model, speculative_config=speculative, **args))
    plain = engines["plain"]
    prompts = make_prompts(workload, plain, max(sizes) * (num_iters + num_iters_warmup), input_len, output_len,
                           workload_seed)
    results: dict[str, Any] = {}
    rows: list[tuple[str, Any]] = []
    for size in sizes:
        for name, result in run_latency(engines, prompts, size, output_len, num_iters, num_iters_warmup).items():
            results[f"{name}_batch_{size}"] = result
            rows += [(f"{name} batch {size} {key}", value) for key, value in result.items() if key != "batch_size"]
        if speculative is not None:
            speedup = (results[f"speculative_batch_{size}"]["output_tokens_per_s"]
                       / results[f"plain_batch_{size}"]["output_tokens_per_s"])
            results[f"speedup_batch_{size}"] = speedup
            rows.append((f"speed-up batch {size}", speedup))
    click.echo(format_table(rows))
    if output_json:
        settings = {"model": model, "batch_sizes": sizes, "input_len": input_len, "output_len": output_len,
                    "workload": workload, "num_iters": num_iters, "num_iters_warmup": num_iters_warmup,
                    "speculative_config": speculative, **args}
        click.echo(f"wrote {write_result(output_json, 'latency', settings, results, str(plain.runner.device))}")


def _lora_throughput(model: str, kwargs: dict[str, Any], num_loras: str, rank: int, compare_merged: bool,
                     lengths: str, num_prompts: int, workload_seed: int, output_json: str | None) -> None:
    from pagedserve.bench.lora import run_lora_benchmark
    from pagedserve.bench.report import format_table, write_result
    from pagedserve.bench.workload import make_workload
    from pagedserve.core.loader import get_model_max_len, load_hf_config, resolve_model_path

    try:
        counts = sorted({int(n) for n in num_loras.split(",")})
    except ValueError:
        raise click.BadParameter(f"{num_loras!r} is not a comma-separated list of counts", param_hint="--num-loras")
    if counts[0] < 1:
        raise click.BadParameter("adapter counts must be at least 1", param_hint="--num-loras")
    path = resolve_model_path(model, None)
    hf_config = load_hf_config(path)
    max_len = kwargs["max_model_len"] or get_model_max_len(hf_config)
    workload = make_workload(lengths, num_prompts, int(hf_config.vocab_size), max_len, workload_seed)
    results = run_lora_benchmark(path, engine_args(kwargs), workload, counts, rank, compare_merged)
    click.echo(format_table([(k, v) for k, v in results.items() if not isinstance(v, list)]))
    if output_json:
        settings = {"model": model, "num_prompts": num_prompts, "lengths": lengths, "workload_seed": workload_seed,
                    "num_loras": counts, "lora_rank": rank, "compare_merged": compare_merged, **engine_args(kwargs)}
        click.echo(f"wrote {write_result(output_json, 'throughput-lora', settings, results, 'cpu')}")


@bench.command()
@click.option("--base-url", default="http://127.0.0.1:8000/v1")
@click.option("--api-key", envvar="OPENAI_API_KEY", default="EMPTY",
              help="The server's --api-key (or set OPENAI_API_KEY).")
@click.option("--num-prompts", type=int, default=64)
@click.option("--lengths", default="sharegpt", help="fixed:IN,OUT | uniform:A-B,C-D | sharegpt")
@click.option("--workload-seed", type=int, default=0)
@click.option("--vocab-size", type=int, default=256, help="Prompt token ids are drawn below this.")
@click.option("--max-model-len", type=int, required=True, help="The server's max_model_len.")
@click.option("--request-rate", type=float, default=float("inf"), help="Requests/s (Poisson); inf = all at once.")
@click.option("--max-concurrency", type=int, default=None)
@click.option("--compare-offline", "offline_model", default=None,
              help="Model folder: also run the same workload offline in-process and compare throughput.")
@click.option("--output-json", type=click.Path(dir_okay=False), default=None)
def serve(base_url: str, api_key: str, num_prompts: int, lengths: str, workload_seed: int, vocab_size: int,
          max_model_len: int, request_rate: float, max_concurrency: int | None, offline_model: str | None,
          output_json: str | None) -> None:
    """Streaming load against a running server: TTFT / ITL / E2E percentiles and tokens/s."""
    from pagedserve.bench.report import format_table, write_result
    from pagedserve.bench.serve import run_load
    from pagedserve.bench.workload import make_workload

    import openai

    workload = make_workload(lengths, num_prompts, vocab_size, max_model_len, workload_seed)
    try:
        results = asyncio.run(run_load(base_url, workload, request_rate, max_concurrency, api_key))
    except openai.AuthenticationError as exc:
        raise click.ClickException(
            f"the server at {base_url} refused the API key ({exc.status_code}): give the server's key "
            "with --api-key (or OPENAI_API_KEY)"
        ) from exc
    except openai.APIConnectionError as exc:
        raise click.ClickException(f"no server answers at {base_url} ({exc}); start one or fix --base-url") from exc
    rows: list[tuple[str, Any]] = []
    for name, value in results.items():
        if isinstance(value, dict):
            rows += [(f"{name}_{k}", v) for k, v in value.items()]
        elif not isinstance(value, list):
            rows.append((name, value))
    if offline_model:
        from pagedserve.bench.throughput import run_throughput
        from pagedserve.core.config import engine_config_from_args
        from pagedserve.core.engine import LLMEngine

        engine = LLMEngine(engine_config_from_args(offline_model, max_model_len=max_model_len))
        offline = run_throughput(engine, workload)
        results["offline_output_tokens_per_s"] = offline["output_tokens_per_s"]
        results["server_vs_offline"] = results["output_tokens_per_s"] / offline["output_tokens_per_s"]
        rows += [("offline_output_tokens_per_s", offline["output_tokens_per_s"]),
                 ("server_vs_offline", results["server_vs_offline"])]
    click.echo(format_table(rows))
    if output_json:
        settings = {"base_url": base_url, "num_prompts": num_prompts, "lengths": lengths,
                    "request_rate": request_rate, "max_concurrency": max_concurrency}
        click.echo(f"wrote {write_result(output_json, 'serve', settings, results, 'server')}")


@bench.command()
@click.option("--model", default=None, help="HF model folder or hub id (default: the bundled model).")
@click.option("--num-runs", type=int, default=3, show_default=True)
@click.option("--prompt", default="def fibonacci(n):", show_default=True)
@click.option("--output-json", type=click.Path(dir_okay=False), default=None)
def startup(model: str | None, num_runs: int, prompt: str, output_json: str | None) -> None:
    """Start-up as a user waits for it, each run a fresh process: ``pagedserve generate`` to its
    first printed token, ``pagedserve serve`` to its first /health 200 (best and median of
    --num-runs; the targets are 3 s and 5 s on an idle 2-core machine, and the machine's load
    average is reported with them)."""
    from pagedserve.bench.report import format_table, write_result
    from pagedserve.bench.startup import run_startup

    if num_runs < 1:
        raise click.BadParameter("give at least 1", param_hint="--num-runs")
    model_args = ["--model", model] if model else []
    try:
        results = run_startup(model_args, num_runs, prompt)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    rows: list[tuple[str, Any]] = []
    for name, value in results.items():
        if name == "runs":
            continue
        rows += [(f"{name} {k}", v) for k, v in value.items()] if isinstance(value, dict) else [(name, value)]
    click.echo(format_table(rows))
    if output_json:
        settings = {"model": model or default_model(), "num_runs": num_runs, "prompt": prompt}
        click.echo(f"wrote {write_result(output_json, 'startup', settings, results, 'cpu')}")
