"""Errors in OpenAI's shape, so the official clients raise the right exception classes."""
from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class GatewayError(Exception):
    """An error a client should see: HTTP status plus OpenAI's {type, code, param}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def bad_request(message: str, code: str | None = None, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


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
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors[:5]
        ) or "invalid request"
        return JSONResponse(error_body(message, code="invalid_request", param=loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
