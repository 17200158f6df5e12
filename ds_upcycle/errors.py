"""The one exception type that reaches a user as a single line instead of a traceback."""

import difflib
import functools
import sys
from collections.abc import Iterable


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


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close: for refusals of unknown names."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
