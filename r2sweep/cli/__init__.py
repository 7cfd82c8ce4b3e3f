"""The ``r2sweep`` command line (``r2sweep.cli.app:main``): a thin face over :mod:`r2sweep.api`."""
