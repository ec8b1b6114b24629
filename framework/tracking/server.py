"""Is the tracking server there: :func:`require_server` before a command starts,
MLflow's HTTP waits bounded, and which failures are an outage (see
:mod:`cifarx.tracking.spool`).
"""

from __future__ import annotations

import contextlib
import os

from ..errors import UserError

# MLflow's own settings, with cifarx's defaults: MLflow's (120 s, 7 retries with back-off)
# make a call to a server that went away hang for minutes.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def bound_waits():
    """Give MLflow's HTTP timeout and retries cifarx's defaults, where the user set none (the
    environment: a sweep's worker processes inherit them)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def request_timeout() -> float:
    bound_waits()
    try:
        return max(float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]), 0.1)
    except ValueError:
        return float(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])


def silence(uri: str, timeout: float | None = None) -> str | None:
    """Why the server at ``uri`` does not answer within ``timeout`` (default: the request
    timeout), or None when it does (any HTTP status is an answer: a proxy without
    ``/health`` still answers)."""
    import urllib.error
    import urllib.request

    timeout = timeout or request_timeout()
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return getattr(exc.reason, "strerror", None) or str(exc.reason)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as exc:  # a reset, a URL that is not one
        return str(exc) or type(exc).__name__


def require_server(uri: str):
    """Raise a :class:`UserError` now when ``uri`` is a tracking server that does not answer."""
    if not is_server(uri):
        return
    reason = silence(uri)
    if reason is not None:
        raise UserError(f"the tracking server {uri} does not answer ({reason}); check "
                        "--tracking-uri (or $MLFLOW_TRACKING_URI) and that the server is running")


@contextlib.contextmanager
def brief_waits():
    """While it lasts, MLflow's calls give up after a second, with no retry: for a call made
    only for what it does in this process (leaving the fluent run) to a server known lost."""
    saved = {name: os.environ.get(name) for name in HTTP_DEFAULTS}
    os.environ.update({"MLFLOW_HTTP_REQUEST_TIMEOUT": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_outage(exc: BaseException) -> bool:
    """True when a failed tracking call failed for want of the server: no connection, a
    timeout, a 5xx after the retries. An error the server answered with (a bad value, an
    unknown run) is not one."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, RestException):
        return False
    if isinstance(exc, requests.HTTPError):  # artifact uploads
        return exc.response is None or exc.response.status_code >= 500
    if isinstance(exc, MlflowException):  # MLflow wraps what requests raised in its own
        return exc.error_code == "INTERNAL_ERROR"
    return isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError))
