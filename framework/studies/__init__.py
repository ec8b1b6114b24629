"""Studies: a study file (``study``) and its configurations (``configurations``), the sweep
that runs its trials (``sweep_plan``, ``sweep``, ``summary``), one trial (``trials``),
statistics over seeds (``stats``, ``compare``).
"""
