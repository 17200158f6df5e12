"""The one exception type that reaches a user as a single line instead of a traceback."""

import functools
import sys


class UserError(Exception):
    """Bad input from the user: command-line entry points print it as one line and exit 2."""


def user_errors(fn):
    """Decorate a click command: print UserError as one line and exit 2, instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"ds-upcycle: error: {err}", file=sys.stderr)
            sys.exit(2)
    return wrapper
