"""First-come-first-served and priority scheduling."""

from __future__ import annotations

from pagedserve.core.policies import SchedulingPolicy
from pagedserve.core.request import Request


class FCFSPolicy(SchedulingPolicy):
    """Serve in arrival order; preempt the request admitted most recently."""

    def sort_key(self, request: Request) -> tuple:
        return (request.arrival_time,)

    def pick_victim(self, running: list[Request]) -> Request:
        return running[-1]


class PriorityPolicy(SchedulingPolicy):
    """Serve the lowest ``priority`` value first (vLLM's convention), then by arrival; preempt
    the lowest priority (largest value), latest arrival first."""

    def sort_key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)

    def pick_victim(self, running: list[Request]) -> Request:
        return max(running, key=self.sort_key)
