"""The sweep service: search-space files, Optuna define-by-run spaces, Ray Tune orchestration.

``spec`` is plain Python (validation only); ``space`` imports Optuna and
``tuner`` imports Ray. Import the submodules you need: importing this package
imports neither Ray nor Optuna.
"""
