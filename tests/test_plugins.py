"""The plugin system: registries, the allow list, and an out-of-tree plugin package installed
for real (a wheel built from tests/toy_plugin) that adds an architecture and an attention backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.core.plugins import PluginError, PluginManager, Registry

TOY_SOURCE = Path(__file__).parent / "toy_plugin"


def test_registering_twice_is_harmless_and_conflicts_name_both() -> None:
    registry = Registry("models")
    registry.add("A", "pkg.mod:A", plugin="one")
    registry.add("A", "pkg.mod:A", plugin="one-again")
    assert registry.names() == ["A"]
    with pytest.raises(PluginError, match="pkg.mod:A.*other.mod:B"):
        registry.add("A", "other.mod:B", plugin="two")


def test_registry_needs_lazy_targets_and_lists_known_names() -> None:
    registry = Registry("models")
    with pytest.raises(PluginError, match="module:attr"):
        registry.add("A", object(), plugin="p")  # type: ignore[arg-type]
    registry.add("LlamaForCausalLM", "x:y", plugin="p")
    with pytest.raises(PluginError, match="unknown models 'Nope'; known: LlamaForCausalLM"):
        registry.get("Nope")


def test_builtin_plugins_are_entry_points() -> None:
    manager = PluginManager(allow=[])
    manager.load_entry_points()
    assert {"torch_ref", "llama", "mistral", "default_sampler", "core_policies", "torch_runner"} <= set(manager.infos)
    assert manager.infos["llama"].distribution == "pagedserve"
    assert "LlamaForCausalLM" in manager.registry("models")
    assert "torch_ref" in manager.registry("attention_backends")
    assert {"fcfs", "priority"} <= set(manager.registry("scheduling_policies").names())


def test_loading_plugins_does_not_import_torch() -> None:
    code = (
        "import sys; from pagedserve.core.plugins import get_plugin_manager; get_plugin_manager();"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy plugin, built and installed by pip into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(TOY_SOURCE)],
        check=True,
        cwd=build,
    )
    return target


def _run(code: str, site: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(site), **env}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)


@pytest.mark.slow
def test_out_of_tree_plugin_adds_an_architecture_and_a_backend(toy_site: Path, tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "toy-model"
    folder.mkdir()
    for item in tiny_model().iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["ToyLlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    code = f"""
from pagedserve import LLM, SamplingParams
import pagedserve_toy_plugin.attention as attention, pagedserve_toy_plugin.model as model
ref = LLM({str(tiny_model())!r}, dtype="float32", attention_backend="torch_ref")
toy = LLM({str(folder)!r}, dtype="float32")
assert toy.engine.runner.backend.name == "toy", toy.engine.runner.backend.name
assert model.ToyLlamaForCausalLM.built == 1
params = SamplingParams(temperature=0.0, max_tokens=8)
want = ref.generate(["def f():"], params, use_tqdm=False)[0].outputs[0].token_ids
got = toy.generate(["def f():"], params, use_tqdm=False)[0].outputs[0].token_ids
assert got == want, (got, want)
assert attention.ToyBackend.calls > 0
print("OK")
"""
    result = _run(code, toy_site)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout

    listing = subprocess.run(
        [sys.executable, "-m", "pagedserve", "plugins", "--json"],
        env={**os.environ, "PYTHONPATH": str(toy_site)}, capture_output=True, text=True, check=True,
    )
    toy = next(p for p in json.loads(listing.stdout) if p["name"] == "toy")
    assert toy["distribution"] == "pagedserve-toy-plugin" and toy["version"] == "0.3.1"
    assert toy["registers"] == {"models": ["ToyLlamaForCausalLM"], "attention_backends": ["toy"]}

    # The allow list keeps third-party plugins out (the built-ins still load).
    blocked = _run(code, toy_site, PAGEDSERVE_PLUGINS="")
    assert blocked.returncode != 0
    assert "unknown models 'ToyLlamaForCausalLM'" in blocked.stderr
    allowed = _run(code, toy_site, PAGEDSERVE_PLUGINS="toy")
    assert allowed.returncode == 0, allowed.stderr
