"""The core: everything one trial needs, importing no Ray, Optuna or MLflow.

R2 losses, models, datasets, the pre-training loop, quantization and
compression, one trial end to end, and the configuration that describes them
(``core.config``: one strict loader for every section of a YAML file). The
adapters (``r2sweep.tune``, ``r2sweep.tracking``) and the faces (``r2sweep.api``,
``r2sweep.cli``) build on it; it never imports them (tests/test_layers.py).
"""
