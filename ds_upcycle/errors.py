"""The one exception type that reaches a user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: command-line entry points print it as one line and exit 2."""
