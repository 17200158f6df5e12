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
    # 0.8 rather than difflib's 0.6: among thousands of lm-eval task names 0.6 finds a "match" for
    # nearly anything (an unknown task drew 'noor_stem_tasks'); a typo of one or two letters passes 0.8.
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""
