"""The exception types the CLI turns into one line: bad input, and a training that diverged."""


class UserError(Exception):
    """Bad input from the user (a name, a value, a missing file).

    The CLI prints it as one line, ``cifarx: error: <message>``, and exits with status 2.
    The message says what was wrong and what is accepted. Anything else is a bug and keeps
    its traceback.
    """


class Diverged(Exception):
    """Training stopped because the loss became NaN or infinite.

    The engine notices it where metrics reach the host (no per-step sync), keeps what was
    logged and ends the run FAILED. The CLI prints it as one line, ``cifarx: error: training
    diverged ...``, and exits with status 3: the input was valid, the training was not.
    """

    exit_status = 3

    def __init__(self, message: str, step: int, value: float):
        super().__init__(message)
        self.step = step
        self.value = value


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``kill``): handled as Ctrl-C is, so that the open runs
    end KILLED with what they logged; the CLI exits with status 143 (128 + SIGTERM)."""

    exit_status = 143


def raise_on_sigterm():
    """From now on, SIGTERM raises :class:`Terminated` in the main thread. Returns the handler
    it replaced, for the caller to put back (a command run inside a Python process, as tests
    do, must not leave the process deaf to SIGTERM)."""
    import signal

    def handler(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)
