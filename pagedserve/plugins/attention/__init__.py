"""Attention backends shipped with pagedserve, each its own plugin."""
