"""The server's API key check (``--api-key``), shared by the ``/v1`` routes and any other route
that must not be open (the live engine page's state)."""

from __future__ import annotations

import secrets

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pagedserve.server.errors import APIError

#: The ``Authorization: Bearer <key>`` credentials of a request, or None (a FastAPI dependency).
bearer = HTTPBearer(auto_error=False)


def require_api_key(key: str | None, credentials: HTTPAuthorizationCredentials | None) -> None:
    """A 401 unless no key is set or the request sends it (compared in constant time)."""
    if key is None:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), key.encode()):
        raise APIError(401, "Unauthorized: send the server's API key as 'Authorization: Bearer <key>'")
