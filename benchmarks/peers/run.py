"""The peer benchmark's measurements (issue 22), run by ``benchmarks/peers.sh``: pagedserve
against llama.cpp (``llama-server``, continuous batching), CTranslate2 and transformers on one
CPU, the same token-id workload for every system, interleaved round by round, medians kept.

Scenarios, per model:
- ``offline-64``: 64 requests (prompts 32-256 tokens, outputs 16-256, greedy, exact lengths):
  pagedserve's ``LLM.generate``, eager (the default) and ``pagedserve-O3`` (``compilation_config``
  level 3: the compiled CPU decode step, whose start-up compile is not timed); llama.cpp as ``llama-server`` under 64 concurrent requests (its
  only continuous batching); CTranslate2's ``generate_batch`` (one static batch: it runs to the
  longest output, only the requested tokens count); transformers ``generate`` one request at a
  time on the first ``--sequential-prompts`` requests (a rate).
- ``serve-64``: ``pagedserve serve`` (eager, and ``pagedserve-serve-O3`` with the same
  ``compilation_config`` as ``pagedserve-O3``) and ``llama-server``, the same 64 requests all at
  once through their OpenAI ``/v1/completions`` routes (token-id prompts, ``ignore_eos``).
- ``batch-1``: one request, a 32-token prompt and 256 output tokens (``--batch1-tokens``), every
  system.

Each round draws new prompts (the same for every system within the round), so no system's
prefix cache holds a round's prompts from the round before.

Every system runs at the same precision: ``fp32`` (float32 weights
everywhere), ``int8`` (pagedserve ``--quantization int8``, llama.cpp Q8_0, CTranslate2
``int8_float32``) or ``bf16`` (pagedserve ``--dtype bfloat16``, llama.cpp's BF16 GGUF;
CTranslate2 is not run: ``bfloat16`` is not one of its CPU compute types). transformers runs
float32 in the fp32 run and bfloat16 in the bf16 run (it has no int8 CPU path: not run there). ``--precision fp32,int8,bf16`` runs them
one after another and writes one JSON.

The 135M shape is run with fewer rounds and scenarios than tiny-py by default
(``--large-rounds``, ``--large-scenarios``, ``--large-sequential-prompts``): at its speed every
system takes a minute per 64-request pass, and the whole benchmark has to fit in about twenty
minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from pagedserve.bench.report import git_commit
from pagedserve.bench.workload import make_workload

HERE = Path(__file__).resolve().parent
TOKEN_IDS = 4096  # below both models' tokenizer vocabularies (the bundled tokenizer's size)
LARGE_MODEL = "smollm-135m-shape"
TARGETS = {  # (scenario, model or None for both): (peer, the least ratio pagedserve / peer)
    ("batch-1", "smollm-135m-shape"): ("llama.cpp", 0.7),
    ("batch-1", "tiny-py"): ("llama.cpp", 0.5),
    ("offline-64", None): ("llama.cpp", 1.2),
    ("serve-64", None): ("llama.cpp", 1.0),
}


class Worker:
    """A system in its own virtualenv's process (``workers.py``)."""

    def __init__(self, python: str, system: str, model: str, threads: int, extra: dict[str, Any]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [python, str(HERE / "workers.py"), system, model, str(threads), json.dumps(extra)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"worker {self.proc.args[1:3]} exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, prompts: list[list[int]], output_lens: list[int]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "output_lens": output_lens}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


class ServerExited(RuntimeError):
    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class Server:
    """An OpenAI-compatible server process, and the same concurrent client for every server."""

    def __init__(self, command: list[str], port: int, threads: int, name: str, log: Path,
                 no_penalty: dict[str, float]) -> None:
        self.name, self.port, self.log, self.command, self.no_penalty = name, port, log, command, no_penalty
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        for _ in range(600):
            if self.proc.poll() is not None:
                raise ServerExited(f"{name} exited ({self.proc.returncode}): {' '.join(command)}; see {log}",
                                   self.proc.returncode)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
                    self.model = models["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{name} did not start")

    def run(self, prompts: list[list[int]], output_lens: list[int]) -> dict[str, Any]:
        async def one(client: httpx.AsyncClient, prompt: list[int], n: int) -> int:
            body = {"model": self.model, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
                    **self.no_penalty}
            response = await client.post(f"http://127.0.0.1:{self.port}/v1/completions", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

        async def all_at_once() -> int:
            limits = httpx.Limits(max_connections=len(prompts))
            async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
                return sum(await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, output_lens))))

        start = time.perf_counter()
        tokens = asyncio.run(all_at_once())
        return {"seconds": time.perf_counter() - start, "output_tokens": tokens}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def start_systems(args: argparse.Namespace, model: str, precision: str, wanted: set[str]) -> dict[str, Any]:
    """Every wanted system, started (any already started are stopped if one fails)."""
    systems: dict[str, Any] = {}
    try:
        _start_systems(args, model, precision, wanted, systems)
    except BaseException:
        for system in systems.values():
            system.close()
        raise
    return systems


def _start_systems(args: argparse.Namespace, model: str, precision: str, wanted: set[str],
                   systems: dict[str, Any]) -> None:
    folder = Path(args.models_dir) / model
    gguf_type, ct2_type, pagedserve_extra = PRECISIONS[precision]
    options = [f"--{name.replace('_', '-')}={value}" for name, value in pagedserve_extra.items()]
    logs = Path(args.log_dir)
    if "pagedserve" in wanted:
        systems["pagedserve"] = Worker(sys.executable, "pagedserve", str(folder), args.threads, pagedserve_extra)
    if "pagedserve-O3" in wanted:  # the compiled CPU decode step (compilation_config level 3), opt-in
        systems["pagedserve-O3"] = Worker(sys.executable, "pagedserve", str(folder), args.threads,
                                          {**pagedserve_extra, "compilation_config": json.loads(args.o3_config)})
    # Plain greedy on every server: pagedserve serve takes the model's generation_config defaults,
    # as vLLM does (tiny-py's has repetition_penalty 1.1); llama-server's default is 1.0 already.
    ours, theirs = {"repetition_penalty": 1.0}, {"repeat_penalty": 1.0}
    serve = [str(Path(sys.executable).parent / "pagedserve"), "--log-level", "WARNING", "serve", str(folder),
             "--max-num-seqs", "64", "--max-model-len", "512", *options]
    if "pagedserve-serve" in wanted:
        systems["pagedserve-serve"] = Server([*serve, "--port", str(args.port)], args.port, args.threads,
                                             "pagedserve serve", logs / f"pagedserve-serve-{model}-{precision}.log", ours)
    if "pagedserve-serve-O3" in wanted:
        command = [*serve, "--port", str(args.port + 2), "--compilation-config", args.o3_config]
        systems["pagedserve-serve-O3"] = Server(command, args.port + 2, args.threads, "pagedserve serve -O3",
                                                logs / f"pagedserve-serve-O3-{model}-{precision}.log", ours)
    if "llama.cpp" in wanted:
        gguf = Path(args.gguf_dir) / f"{model}-{gguf_type}.gguf"
        command = [args.llama_server, "-m", str(gguf), "--port", str(args.port + 1), "-t", str(args.threads),
                   "-tb", str(args.threads), "-np", "64", "-c", str(64 * 512), "-cb", "--no-webui"]
        log = logs / f"llama-server-{model}-{precision}.log"
        try:
            systems["llama.cpp"] = Server(command, args.port + 1, args.threads, "llama-server", log, theirs)
        except ServerExited as exc:
            if exc.returncode >= 0:
                raise
            # ggml's AMX int8 kernels (the Q8_0 weights repacked for AMX) die of an illegal
            # instruction or a segmentation fault where the CPU lists AMX but the virtual machine
            # does not keep the tile state: run without the repacked weights (the command is in
            # the results), not without llama.cpp.
            print(f"llama-server died of signal {-exc.returncode} ({log}); restarting it with --no-repack",
                  flush=True)
            systems["llama.cpp"] = Server([*command, "--no-repack"], args.port + 1, args.threads, "llama-server", log,
                                          theirs)
    if "ctranslate2" in wanted and ct2_type is not None:
        ct2 = Path(args.ct2_dir) / f"{model}"
        systems["ctranslate2"] = Worker(args.ct2_python, "ctranslate2", str(ct2), args.threads,
                                        {"compute_type": ct2_type})
    hf_dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(precision)  # it has no int8 CPU path
    if "transformers" in wanted and hf_dtype is not None:
        systems["transformers"] = Worker(args.hf_python, "transformers", str(folder), args.threads, {"dtype": hf_dtype})


Work = dict[str, tuple[list[list[int]], list[int]]]


def scenarios(args: argparse.Namespace, names: list[str], seed: int) -> Work:
    """The scenarios' prompts and output lengths, drawn from ``seed`` (one seed per round)."""
    workload = make_workload(args.lengths, args.num_prompts, TOKEN_IDS, 512, seed=seed)
    one = make_workload(f"fixed:32,{args.batch1_tokens}", 1, TOKEN_IDS, 512, seed=seed + 1)
    every = {
        "offline-64": ([r.prompt_token_ids for r in workload], [r.output_len for r in workload]),
        "serve-64": ([r.prompt_token_ids for r in workload], [r.output_len for r in workload]),
        "batch-1": ([one[0].prompt_token_ids], [one[0].output_len]),
    }
    return {name: every[name] for name in names}


#: Per precision: the GGUF file type, CTranslate2's compute type (None: not run), pagedserve's options.
PRECISIONS: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "fp32": ("f32", "float32", {"dtype": "float32"}),
    "int8": ("q8_0", "int8_float32", {"dtype": "float32", "quantization": "int8"}),
    "bf16": ("bf16", None, {"dtype": "bfloat16"}),
}

#: Which system answers which scenario (llama.cpp's offline figure is its server's: it has no
#: offline continuous batching).
PLAN = {
    "offline-64": ["pagedserve", "pagedserve-O3", "llama.cpp", "ctranslate2", "transformers"],
    "serve-64": ["pagedserve-serve", "pagedserve-serve-O3", "llama.cpp"],
    "batch-1": ["pagedserve", "pagedserve-O3", "llama.cpp", "ctranslate2", "transformers"],
}


def measure(args: argparse.Namespace, model: str, precision: str) -> dict[str, Any]:
    large = model == LARGE_MODEL
    names = args.large_scenarios if large else args.scenarios
    rounds = args.large_rounds if large else args.rounds
    sequential = args.large_sequential_prompts if large else args.sequential_prompts
    wanted = {system for name in names for system in PLAN[name] if system in args.systems}
    systems = start_systems(args, model, precision, wanted)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in names}
    try:
        warmup = scenarios(args, names, args.seed + 1000)
        for name, (prompts, lens) in warmup.items():  # one short unmeasured pass: oneDNN/ggml set-up
            for system in PLAN[name]:
                if system in systems and not (name == "serve-64" and system == "llama.cpp"):
                    n = min(4, sequential if system == "transformers" else len(prompts))
                    systems[system].run(prompts[:n], [min(x, 16) for x in lens[:n]])
        for round_index in range(rounds):
            for name, (prompts, lens) in scenarios(args, names, args.seed + 10 * round_index).items():
                for system in PLAN[name]:
                    if system not in systems:
                        continue
                    if name == "serve-64" and system == "llama.cpp" and "offline-64" in runs:
                        continue  # the same measurement as offline-64
                    n = sequential if system == "transformers" and name == "offline-64" else len(prompts)
                    result = systems[system].run(prompts[:n], lens[:n])
                    result["tokens_per_s"] = result["output_tokens"] / result["seconds"]
                    result["load_average"] = os.getloadavg()[0]
                    runs[name].setdefault(system, []).append(result)
                    print(f"{model} {precision} round {round_index} {name} {system}: "
                          f"{result['tokens_per_s']:.1f} tok/s in {result['seconds']:.1f} s "
                          f"(load {result['load_average']:.1f})", flush=True)
    finally:
        for system in systems.values():
            system.close()
    if "llama.cpp" in runs.get("offline-64", {}) and "serve-64" in runs:
        runs["serve-64"]["llama.cpp"] = runs["offline-64"]["llama.cpp"]
    medians = {name: {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in by.items()}
               for name, by in runs.items()}
    commands = {name: system.command for name, system in systems.items() if isinstance(system, Server)}
    return {"rounds": rounds, "scenarios": names, "sequential_prompts": sequential, "server_commands": commands,
            "runs": runs,
            "median_tokens_per_s": medians, "targets": targets(model, medians)}


def targets(model: str, medians: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for (name, target_model), (peer, least) in TARGETS.items():
        if target_model not in (None, model):
            continue
        if name not in medians:
            continue
        ours_list = ["pagedserve-serve", "pagedserve-serve-O3"] if name == "serve-64" else ["pagedserve", "pagedserve-O3"]
        for system in ours_list:
            ours, theirs = medians[name].get(system), medians[name].get(peer)
            if ours is None and system.endswith("-O3"):
                continue
            ratio = ours / theirs if ours and theirs else None
            rows.append({"scenario": name, "system": system, "peer": peer, "ratio": ratio, "target": least,
                         "met": ratio is not None and ratio >= least})
    offline = medians.get("offline-64", {})
    for system in ["pagedserve", "pagedserve-O3"]:
        ours, hf = offline.get(system), offline.get("transformers")
        if ours and hf:
            rows.append({"scenario": "offline-64", "system": system, "peer": "transformers", "ratio": ours / hf,
                         "target": 15.0, "met": ours / hf >= 15.0})
    return rows


def table(results: dict[str, Any]) -> str:
    """The docs table: medians per model, scenario and precision, then every target's ratio."""
    systems = ["pagedserve", "pagedserve-O3", "pagedserve-serve", "pagedserve-serve-O3", "llama.cpp", "ctranslate2",
               "transformers"]
    lines = ["| output tok/s (medians) | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]
    for precision, by_model in results["precisions"].items():
        for model, result in by_model.items():
            for name, by in result["median_tokens_per_s"].items():
                cells = [f"{by[s]:,.1f}" if s in by else "" for s in systems]
                lines.append(f"| {model}, {name}, {precision} | " + " | ".join(cells) + " |")
    lines += ["", "| target (same precision on both sides) | ratio | met |", "|---|---|---|"]
    for precision, by_model in results["precisions"].items():
        for model, result in by_model.items():
            for row in result["targets"]:
                ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
                lines.append(f"| {model} {row['scenario']} {precision}: {row['system']} / {row['peer']} >= "
                             f"{row['target']}x | {ratio} | {'yes' if row['met'] else 'no'} |")
    return "\n".join(lines)


#: The CMake options of llama.cpp's CPU build recorded with the results (the rest are other backends').
CPU_BUILD_OPTIONS = ("GGML_NATIVE", "GGML_OPENMP", "GGML_LLAMAFILE", "GGML_CPU", "GGML_BLAS", "GGML_AVX",
                     "GGML_AMX", "GGML_F16C", "GGML_FMA", "GGML_BMI2")


def llama_cpp_info(server: str, source: str | None) -> dict[str, Any]:
    """What llama-server was built from and how: its ``--version``, the llama.cpp commit the
    llama-cpp-python sdist vendors (its CHANGELOG names it), and the build's CMake options."""
    info: dict[str, Any] = {"server": server}
    try:
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=60)
        info["version"] = " ".join((out.stdout + out.stderr).split())
    except (OSError, subprocess.SubprocessError) as exc:
        info["version"] = f"unknown ({exc})"
    if source:
        changelog = Path(source) / "CHANGELOG.md"
        if changelog.exists():
            match = re.search(r"update llama\.cpp to (\S+@[0-9a-f]+)", changelog.read_text())
            info["vendored_commit"] = match.group(1) if match else None
        info["llama_cpp_python_source"] = Path(source).name
    cache = Path(server).resolve().parent.parent / "CMakeCache.txt"
    if cache.exists():
        flags = {}
        for line in cache.read_text().splitlines():
            name, _, value = line.partition("=")
            key, _, kind = name.partition(":")
            if key == "CMAKE_BUILD_TYPE" or (kind == "BOOL" and key.startswith(CPU_BUILD_OPTIONS)):
                flags[key] = value
        info["cmake"] = flags
    return info


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--models", default="tiny-py,smollm-135m-shape")
    parser.add_argument("--systems",
                        default="pagedserve,pagedserve-O3,pagedserve-serve,pagedserve-serve-O3,llama.cpp,ctranslate2,transformers")
    parser.add_argument("--precision", default="fp32,int8", help="comma-separated: fp32, int8, bf16")
    parser.add_argument("--scenarios", default=",".join(PLAN), help="a subset of " + ", ".join(PLAN))
    parser.add_argument("--large-scenarios", default="offline-64,batch-1", help=f"the same, for {LARGE_MODEL}")
    parser.add_argument("--gguf-dir")
    parser.add_argument("--llama-server")
    parser.add_argument("--llama-source", help="the llama-cpp-python source folder (its CHANGELOG names the commit)")
    parser.add_argument("--ct2-dir")
    parser.add_argument("--ct2-python")
    parser.add_argument("--hf-python")
    parser.add_argument("--o3-config", default='{"level": 3}', help="pagedserve-O3's compilation_config (JSON)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--lengths", default="uniform:32-256,16-256", help="the requests' lengths (bench --lengths)")
    parser.add_argument("--sequential-prompts", type=int, default=8)
    parser.add_argument("--large-sequential-prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large-rounds", type=int, default=1)
    parser.add_argument("--batch1-tokens", type=int, default=256, help="batch-1 output tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8190)
    parser.add_argument("--log-dir", default=None, help="the servers' logs (default: next to the JSON)")
    parser.add_argument("--output-json", required=True)
    args = parser.parse_args()
    # A timeout's SIGTERM still stops the servers and workers (``measure``'s finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    args.systems = args.systems.split(",")
    args.scenarios = args.scenarios.split(",")
    args.large_scenarios = args.large_scenarios.split(",")
    precisions = args.precision.split(",")
    for precision in precisions:
        if precision not in PRECISIONS:
            parser.error(f"unknown precision {precision!r}: give {', '.join(PRECISIONS)}")
    output = Path(args.output_json)
    args.log_dir = args.log_dir or str(output.parent / f"{output.stem}-logs")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(), "load_average_at_start": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "threads": args.threads, "num_prompts": args.num_prompts, "lengths": args.lengths, "batch1_tokens": args.batch1_tokens,
        "seed": args.seed, "precisions": {},
    }
    if "llama.cpp" in args.systems:
        results["llama.cpp"] = llama_cpp_info(args.llama_server, args.llama_source)
    for precision in precisions:
        results["precisions"][precision] = {}
        for model in args.models.split(","):
            results["precisions"][precision][model] = measure(args, model, precision)
            results["seconds"] = time.perf_counter() - started
            output.write_text(json.dumps(results, indent=1))  # what is done so far
    markdown = table(results)
    output.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    print(f"wrote {output} and {output.with_suffix('.md')}; the measurements took {results['seconds']:.0f} s")


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions (AMX changes which kernels are fastest)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


if __name__ == "__main__":
    main()
