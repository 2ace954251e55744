"""Sparse mixture-of-experts: the fused experts layer MoE families share, and its kernels.

Not an entry-point plugin (it registers nothing): model plugins build ``FusedMoE`` the way they
build ``Linear``, and the layer picks how to compute (the Triton kernel on CUDA, else the torch
path that groups tokens by expert).
"""

from pagedserve.plugins.moe.layer import FusedMoE, route_top_k

__all__ = ["FusedMoE", "route_top_k"]
