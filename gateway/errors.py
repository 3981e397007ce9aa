"""Errors in OpenAI's shape, so the official clients raise the right exception classes."""
from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.logs import get_logger

log = get_logger("gateway.errors")


class GatewayError(Exception):
    """An error a client should see: HTTP status plus OpenAI's {type, code, param}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


# What a client never reads in an error: URLs (database, vLLM servers), file paths, tracebacks.
_TRACEBACK = re.compile(r"Traceback \(most recent call last\).*", re.S)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*:/{1,2}[^\s'\"<>]+")
_PATH = re.compile(r"(?<![\w.:/<])(?:~|\.{1,2})?/(?:[^\s/'\"():,;<>]+/)*[^\s/'\"():,;<>]*"
                   r"|\b[\w.-]+(?:/[\w.-]+)+")  # absolute, ~ and ./ paths; relative ones like a/b


def public_text(message: str) -> str:
    """A message fit for a client: tracebacks cut, URLs and file paths replaced by placeholders."""
    message = _TRACEBACK.sub("", message)
    message = _URL.sub("<url>", message)
    return _PATH.sub("<path>", message).strip()


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": public_text(message), "type": type, "code": code, "param": param}}


def bad_request(message: str, code: str | None = None, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than this gateway accepts ({limit} bytes; "
                             "FLYWHEEL_MAX_REQUEST_BYTES)", code="request_too_large")


def model_not_found(name: str, known: list[str]) -> GatewayError:
    return GatewayError(
        404, f"The model {name!r} does not exist or is not served here; available: {', '.join(known)}",
        code="model_not_found", param="model")


def unavailable(message: str, code: str = "backend_unavailable") -> GatewayError:
    return GatewayError(503, message, type="service_unavailable", code=code, headers={"Retry-After": "1"})


def install_handlers(app) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, exc: GatewayError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
            f"{'unknown or unsupported field' if e.get('type') == 'extra_forbidden' else e.get('msg')}"
            for e in errors[:5]
        ) or "invalid request"
        return JSONResponse(error_body(message, code="invalid_request", param=loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        """A bug: the client gets a plain 500; the log gets the kind and place (no message text)."""
        log.error("unhandled_error", path=request.url.path, error=type(exc).__name__)
        return JSONResponse(error_body("The gateway failed to handle this request.", type="server_error",
                                       code="internal_error"), status_code=500)
