"""The OpenAPI document is the contract: every error status the server sends is in it with
OpenAI's error body, FastAPI's 422 (never sent) is not, ``/health`` answers as documented, and
schemathesis' generated requests (valid and invalid, a bounded number per operation) against a
live server never get a 5xx or a response the document does not describe."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from server_process import API_KEY, Server, free_port, start_server

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ERROR_STATUSES = ("400", "401", "404", "413", "503")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
#: Generated requests per operation and generation mode (valid, invalid), at most: about 250
#: requests in all (operations without input have only one).
EXAMPLES = 20


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose sequences are short and few, so any generated request is cheap to serve."""
    log = tmp_path_factory.mktemp("contract") / "server.log"
    command = [sys.executable, "-m", "pagedserve", "serve", str(tiny_model()), "--api-key", API_KEY]
    server = start_server(command, log, free_port(), "--max-model-len", "40", "--max-num-seqs", "8")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def document(server: Server) -> dict:
    return httpx2.get(f"{server.url}/openapi.json").json()


def test_every_operation_lists_the_error_statuses_and_no_422(document) -> None:
    assert "422" not in str(document["paths"])
    assert "HTTPValidationError" not in document["components"]["schemas"]
    error_schema = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = ERROR_STATUSES if path.startswith("/v1") else set(ERROR_STATUSES) - {"401"}
            assert ("401" in operation["responses"]) == ("security" in operation) == path.startswith("/v1")
            for status in statuses:
                response = operation["responses"].get(status)
                assert response is not None, f"{method} {path} does not list {status}"
                assert response["content"]["application/json"]["schema"] == error_schema


def test_health_answers_as_documented(server, document) -> None:
    documented = document["paths"]["/health"]["get"]["responses"]["200"]["content"]
    response = httpx2.get(f"{server.url}/health")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] in documented


def operations(server: Server) -> list:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_generated_requests_get_documented_answers_and_no_5xx(server) -> None:
    calls: dict[str, int] = {}
    found = operations(server)
    for operation in found:
        name = f"{operation.method.upper()} {operation.path}"
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS, timeout=60)
                calls[name] = calls.get(name, 0) + 1

            try:
                call()
            except Unsatisfiable:  # an operation with no input has no invalid request
                assert mode is schemathesis.GenerationMode.NEGATIVE and not list(operation.body), name
    assert len(calls) == len(found) >= 12, calls
    assert sum(calls.values()) >= 200, calls
    assert httpx2.get(f"{server.url}/health").status_code == 200
