"""The OpenAI-compatible HTTP server: ``pagedserve serve`` or ``python -m pagedserve.server``."""
