"""The one error a request gets, in OpenAI's shape; headless, so the job manager raises it too."""

from __future__ import annotations


class ApiError(Exception):
    """Answered as ``status`` with ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
