"""Reading finished sweeps from MLflow: select the best, compare, confirm on fresh seeds, report with figures."""
