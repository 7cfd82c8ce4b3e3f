"""The Ray Tune side (with Optuna as Tune's searcher): the only package that imports Ray or Optuna's search.

``tuner`` runs or restores one Tune experiment, ``space`` turns a search space
into Optuna's define-by-run function, ``callbacks`` feed the tracking journal and
the console, ``experiment_files`` and ``cluster``/``ray_address``/``ray_temp`` look
after Tune's folder and Ray's cluster. Import the submodules you need.
"""
