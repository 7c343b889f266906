"""The one exception type that dataward raises for user-facing problems."""


MAX_ECHO_CHARS = 80  # characters of a user's input that an error message repeats


def echo(text: str) -> str:
    """A user's input as an error message repeats it: at most ``MAX_ECHO_CHARS`` characters, the rest only counted."""
    return text if len(text) <= MAX_ECHO_CHARS else f"{text[:MAX_ECHO_CHARS]}... ({len(text) - MAX_ECHO_CHARS} more characters)"


class DatawardError(Exception):
    """A problem the user can fix: bad input, an unknown ID, a missing file.

    The CLI prints its message as one line and exits non-zero; the service answers 4xx with it.
    """


class LedgerUnavailable(DatawardError):
    """The ward's ledger database cannot be reached now (a PostgreSQL server down or restarting): nothing was changed,
    and the same call may succeed later. The service answers 503 with Retry-After: it never serves what it cannot check."""


class DataChanged(DatawardError):
    """A forget changed the data a training job was about to train on: ``results`` holds the stages the job finished
    before it noticed (still exact for the IDs they saw); :meth:`dataward.ward.Ward.train` registers them and plans again
    with the live IDs."""

    def __init__(self, message: str, results: list[dict] | None = None):
        super().__init__(message)
        self.results = results or []
