"""``python -m pagedserve.server --model MODEL ...``: the same as ``pagedserve serve``."""

from pagedserve.cli import serve, setup_logging

setup_logging("INFO")
serve(prog_name="python -m pagedserve.server")
