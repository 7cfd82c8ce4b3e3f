"""MLflow tracking: the only package that imports MLflow.

``store`` opens a tracking store (Tracker) and its experiments, ``runs`` holds a
sweep's parent run and its trial runs (SweepRun), ``journal`` the local write-ahead
journal that a sweep logs through, ``names`` the tag names and MLflow's limits
(no MLflow import), ``uri`` the check of a tracking URI, ``errors`` which
failures are permanent.
"""
