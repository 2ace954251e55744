"""The built-in scheduling policies, eviction policy and prefix hash functions.

Only registrations here: the implementations are imported when the engine selects them.
"""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl

_PACKAGE = "pagedserve.plugins.policies"


@hookimpl
def register_scheduling_policies(register: Register) -> None:
    register("fcfs", f"{_PACKAGE}.scheduling:FCFSPolicy")
    register("priority", f"{_PACKAGE}.scheduling:PriorityPolicy")


@hookimpl
def register_eviction_policies(register: Register) -> None:
    register("lru", f"{_PACKAGE}.eviction:LRUEvictionPolicy")


@hookimpl
def register_prefix_hash_functions(register: Register) -> None:
    register("sha256", f"{_PACKAGE}.hashing:sha256_block_hash")
    register("builtin", f"{_PACKAGE}.hashing:builtin_block_hash")
