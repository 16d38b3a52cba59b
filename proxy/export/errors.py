"""Why an export cannot be served: each error carries its HTTP status and metrics outcome."""

from __future__ import annotations


class ExportError(Exception):
    """An export that cannot be served; status is the HTTP status that says why."""

    status = 500
    outcome = "failed"

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ExportError):
    status, outcome = 400, "bad_request"


class MissingToken(ExportError):
    status, outcome = 401, "unauthorized"


class NotExportable(ExportError):
    status, outcome = 403, "not_exportable"


class UnknownTopic(ExportError):
    status, outcome = 404, "unknown_topic"


class TooManyExports(ExportError):
    status, outcome = 429, "too_many_exports"


class ExportKafkaUnavailable(ExportError):
    status, outcome = 503, "kafka_unavailable"


class ExportCancelled(ExportError):
    """The client went away or the server is shutting down."""

    status, outcome = 503, "cancelled"


class ExportFailed(ExportError):
    """The export file could not be written (permissions, an I/O error)."""

    status, outcome = 500, "failed"


class InsufficientStorage(ExportError):
    """The data folder's file system is full (or the file too large for it): 507, nothing is kept."""

    status, outcome = 507, "insufficient_storage"
