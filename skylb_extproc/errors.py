"""Errors of skylb_extproc. Each carries the HTTP status it maps to at the edge."""

from __future__ import annotations


class SkylbError(Exception):
    """Base error; `status` is the HTTP status a client sees, `code` the OpenAI-style error type."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(SkylbError):
    """The body is not valid JSON or not the shape the endpoint expects."""

    status = 400
    code = "invalid_request_error"


class BodyTooLarge(SkylbError):
    """The body exceeds limits.max_body_bytes."""

    status = 413
    code = "request_too_large"


class ConfigError(SkylbError):
    """The configuration is invalid; `path` names the offending key (e.g. `replicas[1].address`)."""

    status = 500
    code = "config_error"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
