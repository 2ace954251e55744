"""Suffix decoding (Oliaro et al. 2024, as vLLM's ``suffix`` method): match the end of the
request's tokens in suffix trees of its own history and of recent requests' outputs, and
propose the most frequent continuation. Built for agent-style traffic, where tool calls and
rewritten code repeat what came before.

Each tree is a trie of every substring up to ``suffix_decoding_max_tree_depth`` tokens with
occurrence counts. A request's own tree grows by one path per new token (depth-many nodes); the
global tree holds the outputs of the last ``suffix_decoding_max_cached_requests`` finished
requests and forgets the oldest. From the longest matched suffix (length m), the proposal
follows the most frequent child while its share of its siblings' counts stays at least
``suffix_decoding_min_token_prob``, for at most ``max_spec_factor * m`` tokens; the tree whose
proposal scores higher (the sum of those shares) wins.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from pagedserve.core.config import EngineConfig
from pagedserve.core.request import Request
from pagedserve.core.speculative import DraftTokens, ProposalBatch, Proposer


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] = {}


class SuffixTree:
    """Counts of every substring of at most ``depth`` tokens of the sequences added."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.root = _Node()

    def add(self, tokens: list[int], delta: int = 1) -> None:
        """Count (``delta`` 1) or uncount (-1) every substring of ``tokens``."""
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start : start + self.depth]:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                child.count += delta
                if child.count <= 0:
                    del node.children[token]
                    break
                node = child

    def find(self, context: list[int]) -> tuple[_Node | None, int]:
        """The node of the longest end of ``context`` that occurs with a continuation, and its
        length."""
        for length in range(min(self.depth - 1, len(context)), 0, -1):
            node: _Node | None = self.root
            for token in context[len(context) - length :]:
                node = node.children.get(token)  # type: ignore[union-attr]
                if node is None:
                    break
            if node is not None and node.children:
                return node, length
        return None, 0


class _RequestTree:
    """A request's own suffix tree, extended token by token: ``open`` holds the nodes of the
    substrings ending at its last token (at most depth - 1 of them)."""

    def __init__(self, depth: int) -> None:
        self.tree = SuffixTree(depth)
        self.open: list[_Node] = []
        self.num_indexed = 0

    def extend(self, tokens: list[int]) -> None:
        depth = self.tree.depth
        for token in tokens[self.num_indexed :]:
            grown = []
            for node in [*self.open, self.tree.root]:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                child.count += 1
                grown.append(child)
            self.open = grown[-(depth - 1) :] if depth > 1 else []
        self.num_indexed = len(tokens)


def follow(node: _Node, max_tokens: int, min_prob: float) -> tuple[list[int], float]:
    """The most frequent path below ``node`` while each step's share is >= ``min_prob``; its
    tokens and score (the sum of the shares)."""
    tokens: list[int] = []
    score = 1.0
    total_score = 0.0
    while len(tokens) < max_tokens and node.children:
        token, child = max(node.children.items(), key=lambda item: item[1].count)
        share = child.count / sum(c.count for c in node.children.values())
        score *= share
        if score < min_prob:
            break
        tokens.append(token)
        total_score += score
        node = child
    return tokens, total_score


class SuffixProposer(Proposer):
    """Proposes from the request's own suffix tree and the global tree of recent outputs."""

    #: ngram's measured cross-over (docs/speculative.md): its proposals cost as little and its
    #: verification rows the same.
    default_disable_by_batch_size = 4

    def __init__(self, config: EngineConfig, runner: Any) -> None:
        super().__init__(config, runner)
        spec = config.speculative
        assert spec is not None
        self.depth = spec.suffix_decoding_max_tree_depth
        self.max_cached = spec.suffix_decoding_max_cached_requests
        self.spec_factor = spec.suffix_decoding_max_spec_factor
        self.min_prob = spec.suffix_decoding_min_token_prob
        self.global_tree = SuffixTree(self.depth)
        self._cached_outputs: OrderedDict[str, list[int]] = OrderedDict()
        self._trees: dict[str, _RequestTree] = {}

    def propose(self, batch: ProposalBatch) -> list[DraftTokens]:
        proposals = []
        for request, k in zip(batch.requests, batch.max_num_tokens):
            own = self._trees.get(request.request_id)
            if own is None:
                own = self._trees[request.request_id] = _RequestTree(self.depth)
            own.extend(request.all_token_ids)
            context = request.all_token_ids[-self.depth :]
            best: tuple[list[int], float] = ([], 0.0)
            for tree in (own.tree, self.global_tree):
                node, length = tree.find(context)
                if node is None:
                    continue
                limit = min(k, max(1, int(self.spec_factor * length)))
                candidate = follow(node, limit, self.min_prob)
                if candidate[1] > best[1]:
                    best = candidate
            proposals.append(DraftTokens(best[0]))
        return proposals

    def request_finished(self, request: Request) -> None:
        self._trees.pop(request.request_id, None)
        if not request.output_token_ids or request.request_id in self._cached_outputs:
            return
        self._cached_outputs[request.request_id] = list(request.output_token_ids)
        self.global_tree.add(request.output_token_ids)
        while len(self._cached_outputs) > self.max_cached:
            _, tokens = self._cached_outputs.popitem(last=False)
            self.global_tree.add(tokens, delta=-1)
