"""The one exception type that dataward raises for user-facing problems."""


class DatawardError(Exception):
    """A problem the user can fix: bad input, an unknown ID, a missing file.

    The CLI prints its message as one line and exits non-zero; the service answers 4xx with it.
    """
