"""Built-in plugin: the server routes beyond completions and chat (the Responses API,
embeddings, the dashboard), added with ``register_routes`` as a third party adds its own. Only
registrations here."""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_routes(register: Register) -> None:
    register("responses", "pagedserve.server.responses:router")
    register("embeddings", "pagedserve.server.embeddings:router")
    register("dashboard", "pagedserve.server.dashboard:router")
