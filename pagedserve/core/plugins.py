"""The plugin manager: entry points, the allow list and the registries.

Plugins are modules (or objects) exposed under the entry-point group ``pagedserve``. The
built-in ones are declared in pagedserve's own ``pyproject.toml`` like any third party's.
``PAGEDSERVE_PLUGINS=name,name`` limits which third-party entry points load; the built-ins
(those of the ``pagedserve`` distribution) always load, since the engine cannot run without them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from pagedserve.core import hookspecs

ENTRY_POINT_GROUP = "pagedserve"
ALLOW_LIST_ENV = "PAGEDSERVE_PLUGINS"
BUILTIN_DISTRIBUTION = "pagedserve"

#: Registry name -> the registration hook that fills it.
REGISTRY_HOOKS: dict[str, str] = {
    "scheduling_policies": "register_scheduling_policies",
    "prefix_hash_functions": "register_prefix_hash_functions",
    "eviction_policies": "register_eviction_policies",
    "model_runners": "register_model_runners",
    "models": "register_models",
    "attention_backends": "register_attention_backends",
    "quantization_methods": "register_quantization_methods",
    "samplers": "register_samplers",
    "logits_processors": "register_logits_processors",
    "speculative_proposers": "register_speculative_proposers",
    "lora_formats": "register_lora_formats",
    "tool_parsers": "register_tool_parsers",
    "routes": "register_routes",
}


class PluginError(RuntimeError):
    """A plugin or registry problem: a conflict, an unknown name, a target that will not import."""


@dataclass(frozen=True)
class Entry:
    """One registered object: its name, lazy target and the plugin that registered it."""

    name: str
    target: str
    plugin: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def load(self) -> Any:
        """Import the target (``"module:attr"``) and return the attribute."""
        module_name, _, attr = self.target.partition(":")
        if not attr:
            raise PluginError(f"{self.plugin}: target {self.target!r} must be 'module:attr'")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise PluginError(
                f"{self.plugin} registered {self.name!r} as {self.target!r}, which cannot be "
                f"loaded: {exc}"
            ) from exc
        return obj


class Registry:
    """Names to lazy targets, for one kind of extension (models, attention backends, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, target: str, plugin: str, **metadata: Any) -> None:
        """Register ``name``; the same (name, target) twice is a no-op, a different target raises."""
        if not isinstance(name, str) or not name:
            raise PluginError(f"{plugin}: a {self.kind} name must be a non-empty string")
        if not isinstance(target, str) or ":" not in target:
            raise PluginError(
                f"{plugin}: {self.kind} {name!r} must be registered as a lazy 'module:attr' "
                f"string, got {target!r}"
            )
        existing = self._entries.get(name)
        if existing is not None:
            if existing.target == target:
                return
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: {existing.target!r} by plugin "
                f"{existing.plugin!r} and {target!r} by plugin {plugin!r}. Disable one of them "
                f"with {ALLOW_LIST_ENV}."
            )
        self._entries[name] = Entry(name, target, plugin, dict(metadata))

    def get(self, name: str) -> Entry:
        """The entry for ``name``; the error lists every known name."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise PluginError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def load(self, name: str) -> Any:
        return self.get(name).load()

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries


@dataclass
class PluginInfo:
    """What ``pagedserve plugins`` shows for one loaded plugin."""

    name: str
    distribution: str | None
    version: str | None
    registered: dict[str, list[str]] = field(default_factory=dict)


class PluginManager:
    """Loads the ``pagedserve`` entry points once and fills the registries from their hooks."""

    def __init__(self, allow: list[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registries: dict[str, Registry] = {kind: Registry(kind) for kind in REGISTRY_HOOKS}
        self.infos: dict[str, PluginInfo] = {}
        self._allow = allow

    # -- loading ------------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        """Import and register every allowed entry point of the ``pagedserve`` group."""
        allow = self._allow if self._allow is not None else allow_list_from_env()
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if allow is not None:
            unknown = sorted(set(allow) - {ep.name for ep in entry_points})
            if unknown:
                third_party = sorted(
                    ep.name for ep in entry_points
                    if ep.dist is None or ep.dist.metadata["Name"] != BUILTIN_DISTRIBUTION
                )
                raise PluginError(
                    f"{ALLOW_LIST_ENV} names {', '.join(unknown)}, which no installed package "
                    f"provides; installed third-party plugins: {', '.join(third_party) or 'none'}"
                )
        for ep in entry_points:
            dist = ep.dist.metadata["Name"] if ep.dist is not None else None
            builtin = dist == BUILTIN_DISTRIBUTION
            if not builtin and allow is not None and ep.name not in allow:
                continue
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must say who it is
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
            version = ep.dist.version if ep.dist is not None else None
            self.register_plugin(plugin, ep.name, distribution=dist, version=version)

    def register_plugin(
        self, plugin: Any, name: str, distribution: str | None = None, version: str | None = None
    ) -> None:
        """Register one plugin object and fill the registries from its registration hooks."""
        if self.pm.get_plugin(name) is not None:
            return
        self.pm.register(plugin, name=name)
        info = PluginInfo(name, distribution, version)
        self.infos[name] = info
        for kind, hook_name in REGISTRY_HOOKS.items():
            registry = self.registries[kind]
            hook = getattr(self.pm.hook, hook_name)

            def register(reg_name: str, target: str, _registry=registry, **metadata: Any) -> None:
                _registry.add(reg_name, target, name, **metadata)
                info.registered.setdefault(_registry.kind, [])
                if reg_name not in info.registered[_registry.kind]:
                    info.registered[_registry.kind].append(reg_name)

            # Call this plugin's implementation alone, so each entry is attributed to its plugin.
            for impl in hook.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=register)

    # -- access -------------------------------------------------------------------------------

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    @property
    def hook(self) -> Any:
        """Lifecycle hooks: ``manager.hook.engine_started(engine=...)``."""
        return self.pm.hook


def allow_list_from_env() -> list[str] | None:
    """``PAGEDSERVE_PLUGINS`` as a list of entry-point names, or None when it is unset."""
    raw = os.environ.get(ALLOW_LIST_ENV)
    if raw is None:
        return None
    return [name.strip() for name in raw.split(",") if name.strip()]


_manager: PluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _manager
    with _lock:
        if _manager is None:
            manager = PluginManager()
            manager.load_entry_points()
            _manager = manager
        return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins (tests that change the allow list or install a plugin)."""
    global _manager
    with _lock:
        _manager = None
