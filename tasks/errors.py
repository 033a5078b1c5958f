"""Error hierarchy. Transient errors are worth retrying (Prefect task retries are configured to
retry only these); terminal errors are not, and name the problem for a person to fix."""

from __future__ import annotations


class CqrsSyncError(Exception):
    """Base of every error this package raises on purpose."""


class TransientError(CqrsSyncError):
    """A service is down, slow or overloaded: the same call may succeed later."""


class TerminalError(CqrsSyncError):
    """Bad input, bad configuration or a broken invariant: retrying cannot help."""


class ConfigurationError(TerminalError):
    """A setting, parameter or the environment is wrong (missing slot, bad flow parameter...)."""


class ServiceUnavailable(TransientError):
    """A backing service (Postgres, Scylla, Kafka, Kafka Connect) did not answer."""

    def __init__(self, service: str, detail: str) -> None:
        super().__init__(f"{service} is unavailable: {detail}")
        self.service, self.detail = service, detail

    def __reduce__(self) -> tuple[type[ServiceUnavailable], tuple[str, str]]:
        # Pickled from a loader worker process to its parent: rebuild from both arguments.
        return type(self), (self.service, self.detail)


class DecodeError(TerminalError):
    """A change event could not be decoded or projected: it goes to the dead-letter topic."""


class InvalidInput(TerminalError):
    """Input from a caller (app code, flow parameters) is invalid; nothing was written."""


def is_transient(exc: BaseException) -> bool:
    """Retry condition for Prefect tasks: only transient errors are retried."""
    return isinstance(exc, TransientError)
