"""eventstore's errors: ``Problem``, an exception carrying an HTTP status, a
detail and per-field errors, raised anywhere below the app (validation, the
rules, the group-commit writer) and turned into an RFC 9457
application/problem+json answer by the app alone, as falcon's HTTPError is.
Below the app and the engines; imports nothing of theirs.
"""

import http
import json
import logging

from eventstore_storage import Failure

log = logging.getLogger("eventstore")


class Problem(Exception):
    """An HTTP error: status, detail, optional per-field ``errors`` and headers."""

    MAX_ERRORS = 100  # listed in one problem: an answer stays small whatever the request

    def __init__(self, status, detail, errors=None, headers=(), **members):
        if errors:  # each listed once, at most MAX_ERRORS (a 60 KB request was answered with 5 MB)
            errors = list({json.dumps(error, sort_keys=True): error for error in errors}.values())
            if len(errors) > self.MAX_ERRORS:
                detail = f"{detail} The first {self.MAX_ERRORS} of {len(errors)} errors are listed."
                errors = errors[:self.MAX_ERRORS]
        super().__init__(detail)
        self.status = int(status)
        self.detail = detail
        self.errors = errors
        self.headers = list(headers)
        self.members = members  # extension members of the problem body ("Head", say)

    def to_dict(self):
        """The problem details object (RFC 9457) the client gets."""
        body = {
            "type": "about:blank",
            "title": http.HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        body.update(self.members)
        return body


def field_error(name, message):
    """One entry of a problem's ``errors``: the field and what was expected of it."""
    return {"field": name, "message": message}


def bad_request(detail, errors=None):
    return Problem(400, detail, errors)


def service_unavailable(detail, retry_after=1):
    return Problem(503, detail, headers=[("Retry-After", str(retry_after))])


# Each kind of storage Failure: its status, and when to try again (seconds).
FAILURE_ANSWERS = {Failure.BUSY: (503, 1), Failure.UNAVAILABLE: (503, 1), Failure.READ_ONLY: (503, 60),
                   Failure.DISK_FULL: (507, None)}


def storage_problem(storage, exc):
    """A database error -> the Problem the client gets: its Failure's answer, or
    (a bug) a bare 500, logged. The database's own message never leaves the server."""
    failure = storage.failure(exc)
    if failure is None:
        log.error("database error: %r", exc)
        return Problem(500, "Internal error.")
    status, retry_after = FAILURE_ANSWERS[failure.kind]
    return Problem(status, failure.detail, headers=[("Retry-After", str(retry_after))] if retry_after else ())
