"""The one exception type for bad input."""


class UserError(Exception):
    """Bad input from the user (a name, a value, a missing file).

    The CLI prints it as one line, ``cifarx: error: <message>``, and exits with status 2.
    The message says what was wrong and what is accepted. Anything else is a bug and keeps
    its traceback.
    """
