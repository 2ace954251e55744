"""deploy/kubernetes/ and the Dockerfile, checked offline (no cluster, no image build).

- The manifests against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: a field the
  schema does not know fails), at the oldest and the newest Kubernetes version it bundles.
- The ServiceMonitor and PodMonitor against prometheus-operator's CRD schemas, as the pydantic
  models cloudcoil generates from them; a round trip catches a field the models ignored.
- What ties the pieces together, which no schema checks: the container's arguments parsed by the
  real ``pagedserve serve`` parser, probe and scrape paths that are real server routes, names and
  ports that match across objects, and the metric the HPA asks for being what the Prometheus
  adapter's rule makes of the gauge pagedserve exports.

The CUDA overlay is rendered here as kustomize would (``resources`` and JSON ``patches``, the
only two features it uses; anything else fails the test rather than being ignored).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate.utils import all_versions, latest_version

from pagedserve import __version__

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
#: The files of base/ that its kustomization leaves out on purpose (the alternative to one it lists).
ALTERNATIVES = {"podmonitor.yaml": "servicemonitor.yaml"}
K8S_VERSIONS = (all_versions()[0], latest_version())


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize folder`` prints, for the features our kustomizations use."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, kustomization
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = folder / resource
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, patch
        target = patch["target"]
        operations = jsonpatch.JsonPatch(yaml.safe_load((folder / patch["path"]).read_text()))
        matched = [
            i for i, obj in enumerate(objects)
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]
            and obj["apiVersion"] == f"{target['group']}/{target['version']}"
        ]
        assert len(matched) == 1, f"patch {patch['path']} matches {len(matched)} objects"
        objects[matched[0]] = operations.apply(objects[matched[0]])
    return objects


BASE = render(DEPLOY / "base")
CUDA = render(DEPLOY / "cuda")
PODMONITOR = load_documents(DEPLOY / "base" / "podmonitor.yaml")
ADAPTER_VALUES = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only_container,) = deployment["spec"]["template"]["spec"]["containers"]
    return only_container


def named_port(deployment: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container(deployment)["ports"] if p["name"] == name)


def serve_params(deployment: dict[str, Any]) -> dict[str, Any]:
    """The container's arguments as ``pagedserve serve`` parses them."""
    from pagedserve.cli import cli

    command, *args = container(deployment)["args"]
    return cli.commands[command].make_context(command, list(args)).params


def test_the_base_kustomization_lists_every_manifest_but_the_alternatives() -> None:
    listed = set(yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (DEPLOY / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert present - listed == set(ALTERNATIVES)
    assert set(ALTERNATIVES.values()) <= listed and listed <= present


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    built_in = [obj for obj in BASE + CUDA if not obj["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {obj["kind"] for obj in built_in} == {
        "Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler"
    }
    for obj in built_in:
        kubernetes_validate.validate(obj, version, strict=True)


def test_monitors_match_the_prometheus_operator_crds() -> None:
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor, ServiceMonitor

    monitors = [obj for obj in BASE + PODMONITOR if obj["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(obj["kind"] for obj in monitors) == ["PodMonitor", "ServiceMonitor"]
    for obj in monitors:
        model = {"ServiceMonitor": ServiceMonitor, "PodMonitor": PodMonitor}[obj["kind"]].model_validate(obj)
        assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == obj, "a field was ignored"


@pytest.mark.parametrize("objects", [BASE, CUDA], ids=["cpu", "cuda"])
def test_container_args_are_pagedserve_serve_flags(objects: list[dict[str, Any]], monkeypatch) -> None:
    from pagedserve.cli import cli

    deployment = only(objects, "Deployment")
    spec = container(deployment)
    api_key_option = next(p for p in cli.commands["serve"].params if p.name == "api_key")
    (env,) = [e for e in spec["env"] if e["name"] == api_key_option.envvar]
    assert set(env["valueFrom"]) == {"secretKeyRef"}
    monkeypatch.setenv(api_key_option.envvar, "from-the-secret")
    params = serve_params(deployment)  # a flag `serve` does not have fails here
    assert params["api_key"] == "from-the-secret"
    assert params["host"] == "0.0.0.0"
    assert params["port"] == named_port(deployment, "http")
    # The model is a folder on the model volume, the PersistentVolumeClaim of base/.
    (mount,) = [m for m in spec["volumeMounts"] if Path(params["model"]).is_relative_to(m["mountPath"])]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = only(BASE, "PersistentVolumeClaim")["metadata"]["name"]
    assert mount["readOnly"] and volume["persistentVolumeClaim"]["claimName"] == claim


def test_probes_and_scrape_paths_are_server_routes() -> None:
    from pagedserve.server.app import router

    get_routes = {route.path for route in router.routes if "GET" in route.methods}
    deployment = only(BASE, "Deployment")
    spec = container(deployment)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert "/health" in get_routes and "/metrics" in get_routes
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = only(BASE, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    service_monitor = only(BASE, "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"
    pod_monitor = only(PODMONITOR, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["port"] == "http" and pod_endpoint["path"] == "/metrics"


def go_expand(template: str, match: re.Match[str]) -> str:
    """Go's ``Regexp.ExpandString``, as the adapter names a metric: ``$1`` / ``${1}``."""
    return re.sub(r"\$\{?(\d+)\}?", lambda m: match.group(int(m.group(1))), template)


def test_the_hpa_metrics_are_what_the_adapter_makes_of_exported_gauges() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pagedserve.core.metrics import EngineMetrics

    registry = EngineMetrics("llm").registry
    exported = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    (rule,) = ADAPTER_VALUES["rules"]["custom"]
    assert ADAPTER_VALUES["rules"]["default"] is False
    selector = re.fullmatch(r"\{(.*)\}", rule["seriesQuery"])
    assert selector, rule["seriesQuery"]
    matchers = {name: (op, value) for name, op, value in re.findall(r'(\w+)(=~|!=|=)"([^"]*)"', selector.group(1))}
    op, name_regex = matchers.pop("__name__")
    assert op == "=~"
    # The ServiceMonitor's targets carry namespace and pod, which the rule maps to resources.
    assert matchers == {"namespace": ("!=", ""), "pod": ("!=", "")}
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    discovered = {name: family for name, family in exported.items() if re.fullmatch(name_regex, name)}
    assert discovered and all(family.type == "gauge" for family in discovered.values())
    api_names = {}
    for name in discovered:
        match = re.search(rule["name"]["matches"], name)
        assert match, f"the rule's name regex does not match {name}"
        api_names[go_expand(rule["name"]["as"], match)] = name
    assert not any(":" in api_name for api_name in api_names)
    hpa = only(BASE, "HorizontalPodAutoscaler")
    targets = {}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        targets[api_names[metric["pods"]["metric"]["name"]]] = float(metric["pods"]["target"]["averageValue"])
    assert set(targets) == {"pagedserve:num_requests_waiting", "pagedserve:num_requests_running"}
    deployment = only(BASE, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"], "kind": "Deployment", "name": deployment["metadata"]["name"]
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    # The running target is 3/4 of the sequences a pod may run, in each variant.
    for objects in (BASE, CUDA):
        max_num_seqs = serve_params(only(objects, "Deployment"))["max_num_seqs"]
        assert targets["pagedserve:num_requests_running"] == 0.75 * max_num_seqs


def dockerfile(variant: str) -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"), build_args={"VARIANT": variant})


def stages(parser: DockerfileParser) -> dict[str, list[dict[str, Any]]]:
    """Each stage's instructions by its name, after a first pseudo-instruction PARENT naming the
    image or stage it starts from (build arguments substituted); the global ARGs under ''."""
    found: dict[str, list[dict[str, Any]]] = {"": []}
    current = ""
    parents = iter(parser.parent_images)
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            current = instruction["value"].split(" AS ")[1]
            found[current] = [{"instruction": "PARENT", "value": next(parents)}]
        elif instruction["instruction"] != "COMMENT":
            found[current].append(instruction)
    return found


def values(instructions: list[dict[str, Any]], kind: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == kind]


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_the_dockerfile_variant_installs_its_torch_then_pins_it(variant: str) -> None:
    parser = dockerfile(variant)
    assert parser.baseimage == f"torch-{variant}"
    by_stage = stages(parser)
    torch_stage = by_stage[f"torch-{variant}"]
    (index,) = [v.split("=", 1)[1] for v in values(torch_stage, "ARG") if v.startswith("TORCH_INDEX_URL=")]
    if variant == "cpu":  # CPU-only wheels: nothing pulls the CUDA libraries
        assert index == "https://download.pytorch.org/whl/cpu"
    assert any('--index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"' in run for run in values(torch_stage, "RUN"))
    pin, install = values(by_stage["image"], "RUN")
    assert "torch.__version__" in pin and pin.endswith("> /opt/venv/constraints.txt")
    assert install.startswith('pip install -c /opt/venv/constraints.txt "/src[server]"')


def test_dockerfile_variables_are_in_scope() -> None:
    """A RUN sees the ARGs declared in its stage and the ENV of its stage and its parents, not a
    global ARG that the stage does not declare again (Docker's scoping rule)."""
    by_stage = stages(dockerfile("cpu"))
    global_args = {v.split("=")[0] for v in values(by_stage.pop(""), "ARG")}
    env: dict[str, set[str]] = {}  # each stage's ENV names, its parents' included
    for name, instructions in by_stage.items():
        env[name] = set(env.get(instructions[0]["value"], set()))
        args: set[str] = set()
        for instruction in instructions[1:]:
            kind, value = instruction["instruction"], instruction["value"]
            if kind == "ARG":
                arg = value.split("=")[0]
                assert "=" in value or arg in global_args, f"ARG {arg} has no value"
                args.add(arg)
            elif kind == "ENV":
                env[name] |= set(re.findall(r"(?:^|\s)(\w+)=", value))
            elif kind == "RUN":
                used = set(re.findall(r"\$\{?(\w+)", value))
                assert used <= env[name] | args, f"stage {name}: {used - env[name] - args} not declared: {value}"


def test_the_image_runs_the_cli_as_the_deployment_expects() -> None:
    import json
    from importlib.metadata import entry_points

    from pagedserve.cli import cli

    parser = dockerfile("cpu")
    final = stages(parser)["image"]
    (entrypoint,) = values(final, "ENTRYPOINT")
    (cmd,) = values(final, "CMD")
    (script,) = entry_points(group="console_scripts", name="pagedserve")
    assert json.loads(entrypoint) == [script.name] and script.value == "pagedserve.cli:main"
    command, *args = json.loads(cmd)
    params = cli.commands[command].make_context(command, args).params
    deployment = only(BASE, "Deployment")
    assert params["host"] == "0.0.0.0"
    assert values(final, "EXPOSE") == [str(params["port"])] == [str(named_port(deployment, "http"))]
    assert values(final, "USER") == [str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])]
    for objects, variant in ((BASE, "cpu"), (CUDA, "cuda")):
        assert container(only(objects, "Deployment"))["image"] == f"pagedserve:{__version__}-{variant}"


def test_dockerignore_keeps_only_what_the_image_copies() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # everything out, then back in only what COPY needs
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {src for value in values(stages(dockerfile("cpu"))["image"], "COPY") for src in value.split()[:-1]}
    assert copied == kept
    for path in copied:
        assert (ROOT / path).exists()
