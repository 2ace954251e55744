"""The built-in speculative-decoding proposers, registered like any third-party plugin's.

Importing this module must not import torch: targets are lazy ``"module:attr"`` strings.
"""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl

_PACKAGE = "pagedserve.plugins.speculative"


@hookimpl
def register_speculative_proposers(register: Register) -> None:
    register("ngram", f"{_PACKAGE}.ngram:NgramProposer")
    register("suffix", f"{_PACKAGE}.suffix:SuffixProposer")
    register("draft_model", f"{_PACKAGE}.draft_model:DraftModelProposer")
