"""MLflow: where runs go (``common``) and whether the server answers (``server``), a run's
lifecycle (``lifecycle``) and what it logs (``run``), models in and out (``models``,
``weights``), the SQLite store (``store``), and the spool that carries a run through a
server outage (``spool``, ``sync``).

mlflow and torch are imported inside the functions that need them: they take seconds to
import, and ``cifarx --help`` should not pay for them.
"""
