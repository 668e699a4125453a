"""Errors that carry a message meant for an operator."""


class GpudError(Exception):
    """An error whose message is shown to the operator as is (no traceback)."""


class ConfigError(GpudError):
    """The configuration file is invalid; the message names the field."""


class ApiError(GpudError):
    """A request was refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
