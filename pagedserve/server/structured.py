"""From a request's ``response_format``, vLLM's ``structured_outputs`` extra or its older
``guided_*`` extras to the engine's ``StructuredOutputsParams``; 400s name the field at fault.

Whether a schema or grammar is valid is the grammar backend's to say: the engine raises a
ValueError when the request is added, which ``schema_error`` turns into a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from pagedserve.core.sampling_params import StructuredOutputsParams
from pagedserve.server.errors import APIError
from pagedserve.server.protocol import ResponseFormat, SamplingRequest

#: vLLM's older extras and the StructuredOutputsParams field each one sets.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
#: vLLM backend names a client may send; pagedserve's one backend is xgrammar.
BACKEND_NAMES = ("auto", "xgrammar")


def structured_outputs_params(body: SamplingRequest) -> tuple[StructuredOutputsParams | None, str | None]:
    """The constraint the request asks for and the field that asked (or None, None);
    APIError 400 for two ways at once or an invalid value."""
    if body.guided_whitespace_pattern is not None:
        raise APIError(400, "guided_whitespace_pattern is not supported", param="guided_whitespace_pattern")
    if body.guided_decoding_backend not in (None, *BACKEND_NAMES):
        raise APIError(
            400,
            f"guided_decoding_backend {body.guided_decoding_backend!r} is not available; this "
            "server's backend is xgrammar",
            param="guided_decoding_backend",
        )
    sources: list[tuple[str, dict[str, Any]]] = []
    if body.response_format is not None and body.response_format.type != "text":
        sources.append(("response_format", _from_response_format(body.response_format)))
    if body.structured_outputs is not None:
        sources.append(("structured_outputs", dict(body.structured_outputs)))
    for name, field in GUIDED_FIELDS.items():
        if getattr(body, name) is not None:
            sources.append((name, {field: getattr(body, name)}))
    if not sources:
        return None, None
    if len(sources) > 1:
        names = " and ".join(name for name, _ in sources)
        raise APIError(400, f"give one way to constrain the output, not {names}", param=sources[1][0])
    param, fields = sources[0]
    try:
        return StructuredOutputsParams(**fields), param
    except TypeError as exc:  # an unknown key in structured_outputs
        message = str(exc).replace("StructuredOutputsParams.__init__() ", "")
        raise APIError(400, f"{param}: {message}", param=param) from None
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None


def _from_response_format(response_format: ResponseFormat) -> dict[str, Any]:
    if response_format.type == "json_object":
        return {"json_object": True}
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise APIError(
            400, "response_format of type json_schema needs json_schema.schema", param="response_format"
        )
    return {"json": spec.json_schema}


def schema_error(exc: ValueError, param: str | None) -> APIError | None:
    """The 400 for the engine's refusal of a schema or grammar, naming the request field that
    gave it (None for other ValueErrors)."""
    message = str(exc)
    if param is None or not message.startswith("structured_outputs."):
        return None
    if param != "structured_outputs":
        message = param + message[message.index(":") :]
    return APIError(400, message, param=param)
