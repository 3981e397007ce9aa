"""Bearer-token checks: API keys for /v1 (when configured), the admin token for /admin.
The admin token also works as an API key, and on /v1 it unlocks versions that are not approved
(rejected, gate-failed, waiting for review) by name."""
from __future__ import annotations

import hmac

from fastapi import Request

from gateway.errors import GatewayError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)


def is_admin(request: Request) -> bool:
    admin = request.app.state.gateway.settings.admin_token
    token = _bearer(request)
    return bool(admin and token and _matches(token, [admin]))


async def require_api_key(request: Request) -> None:
    keys = request.app.state.gateway.settings.api_keys
    if not keys or is_admin(request):
        return
    token = _bearer(request)
    if token is None:
        raise GatewayError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, keys):
        raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request) -> None:
    admin = request.app.state.gateway.settings.admin_token
    if not admin:
        raise GatewayError(403, "Admin endpoints are disabled: set FLYWHEEL_ADMIN_TOKEN.", type="permission_error",
                           code="admin_disabled")
    token = _bearer(request)
    if token is None or not _matches(token, [admin]):
        raise GatewayError(401, "Missing or wrong admin token.", code="invalid_admin_token",
                           headers={"WWW-Authenticate": "Bearer"})
