"""Operator-facing errors: each says what failed, which file or field, and what to do."""


class DsserveError(Exception):
    """Base class for every error dsserve reports to a user."""


class ConfigError(DsserveError):
    """A configuration value, flag or config.json field is wrong or unsupported."""


class WeightsError(DsserveError):
    """A checkpoint file or tensor is missing, unreadable or malformed."""


class InvalidRequestError(DsserveError, ValueError):
    """A request (prompt or sampling parameter) is invalid; other requests are unaffected."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the offending field, when there is one


class RequestFailedError(DsserveError):
    """One request failed inside the engine (its sampling, its detokenization); the engine and the others go on.
    The message is safe to show a client: the cause is logged, not carried."""


class ShuttingDownError(DsserveError):
    """The server is draining and its shutdown timeout passed before this request finished."""


class EngineDeadError(DsserveError):
    """The engine loop stopped after an internal failure; the process must be restarted."""


class DistributedError(DsserveError):
    """A rank could not be reached, disagrees with the others, died or stalled; names the node and rank."""
