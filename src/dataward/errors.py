"""The one exception type that dataward raises for user-facing problems."""


class DatawardError(Exception):
    """A problem the user can fix: bad input, an unknown ID, a missing file.

    The CLI prints its message as one line and exits non-zero; the service answers 4xx with it.
    """


class LedgerUnavailable(DatawardError):
    """The ward's ledger database cannot be reached now (a PostgreSQL server down or restarting): nothing was changed,
    and the same call may succeed later. The service answers 503 with Retry-After: it never serves what it cannot check."""
