"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(ValueError):
    """Bad input from the user. Scripts print its message on one line and exit with status 2."""
