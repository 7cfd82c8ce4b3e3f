"""The Python face of r2sweep: what ``r2sweep/__init__.py`` exports, module by module.

``sweep`` runs a sweep (:func:`run_sweep`, :func:`prepare_sweep`), ``results``
is what it returns (:class:`SweepResult`, also opened later by :func:`load_sweep`),
``readers`` read finished sweeps (:func:`best`, :func:`compare`, :func:`confirm`,
:func:`report`), ``trial`` runs one trial, ``options`` checks the values a
caller passes, ``stores`` opens MLflow for reading. The CLI calls these and
only prints.
"""
