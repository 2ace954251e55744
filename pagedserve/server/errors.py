"""Every error as OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

Invalid requests are 400 (pydantic's 422 included, as in OpenAI's API and vLLM's), an unknown
model 404, a missing or wrong API key 401, a dead engine 503. Anything else is a 500 whose body
says nothing about the code: the traceback goes to the server log only.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pagedserve.core.async_engine import EngineDeadError
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.server.protocol import ErrorInfo, ErrorResponse

#: The names the openai SDK gives its exceptions, as vLLM uses them.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


#: Field names a ValueError's message may start with (then named as the error's param).
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__) | {"best_of", "use_beam_search"}


class APIError(Exception):
    """An error to answer with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    error_type = ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=status))


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status)


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        return error_response(400, f"the request body is not valid JSON: {reason}")
    message = "; ".join(f"{_location(e['loc'])}: {e['msg']}" for e in errors)
    param = _location(errors[0]["loc"]) if errors else None
    return error_response(400, message or "invalid request", param)


def _routing_message(request: Request, exc: HTTPException) -> str:
    """Starlette's bare "Not Found" / "Method Not Allowed" of its router, naming the route."""
    route = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"Not Found: {route} is not a route of this server"
    if exc.status_code == 405 and exc.detail == "Method Not Allowed":
        allowed = (exc.headers or {}).get("Allow", "")
        return f"Method Not Allowed: {route}; {request.url.path} allows {allowed or 'no method'}"
    return str(exc.detail)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    response = error_response(exc.status_code, _routing_message(request, exc))
    response.headers.update(exc.headers or {})
    return response


async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
    """A refused value; SamplingParams' messages start with the field they name."""
    message = str(exc)
    first = message.split(" ", 1)[0].split("[", 1)[0].strip("'\"(),:")
    return error_response(400, message, first if first in _SAMPLING_FIELDS else None)


async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
    return error_response(503, f"the engine is not running: {exc}")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this response, so uvicorn logs the traceback.
    return error_response(500, "internal server error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    handlers: list[tuple[type[Exception], Any]] = [
        (APIError, _api_error),
        (RequestValidationError, _validation_error),
        (HTTPException, _http_error),
        (EngineDeadError, _engine_dead),
        (ValueError, _value_error),
        (Exception, _internal_error),
    ]
    for exc_class, handler in handlers:
        app.add_exception_handler(exc_class, handler)
