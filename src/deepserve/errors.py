"""The one exception type a user's bad input raises, from the library and the CLI alike."""

from __future__ import annotations


class DeepserveError(ValueError):
    """A problem with what the user asked for: the message names the value and the fix.

    ``param`` names the offending argument (used by the server for the OpenAI error
    body) and ``status`` the HTTP status the server answers with.
    """

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


class ModelLoadError(DeepserveError):
    """A model path, config or tensor that does not fit what deepserve expects."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", status=404, code="model_not_found")
