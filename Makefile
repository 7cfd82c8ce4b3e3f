# Two commands on a fresh machine: `make test` and `make sweep`.
# Each creates .venv (pip + venv) when it is missing and installs the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.r2sweep-installed
# The torch pair this project is tested with (installed first so that pip does not
# pick another build while resolving the rest). Elsewhere: make test TORCH_PACKAGES="torch torchvision"
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test test-fast test-zoo sweep cluster-check install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PACKAGES)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# .ci/system-deps installs PostgreSQL and Docker Compose's plugin when missing
# (as root with apt-get; otherwise it says what to install).
# Two workers, each taking whole files (module fixtures start Ray or a server once):
# the suite waits on subprocesses, servers and Ray start-ups much of the time, so two
# workers overlap well even on two cores. TEST_WORKERS=0 runs it in one process.
# --no-loadscope-reorder: files are handed out in collection order, the longest first
# (tests/conftest.py, LONGEST_FIRST); xdist would otherwise hand out the files with
# the most tests first, which left the two longest single-test files to run last.
TEST_WORKERS ?= 2

test: $(STAMP)
	@.ci/system-deps
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The developers' loop (under 3 minutes on 2 cores): everything but the tests marked
# slow (long training), ray (a real Ray starts) or server (a real MLflow server or
# PostgreSQL starts). `make test` still runs them all. The same two workers: one
# process took 3m15s here, two take 2 minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) -m "not slow and not ray and not server"

# Every torchvision builder, the large ones included (hours on 2 cores, more than 24 GiB for the largest; docs/zoo.md).
test-zoo: $(STAMP)
	$(PY) -m pytest -q -n $(if $(filter 0,$(TEST_WORKERS)),1,$(TEST_WORKERS)) --dist load tests/test_zoo_generated.py -m "slow or not slow"

# The quickstart: a real Ray Tune + Optuna sweep on digits, tracked in ./mlflow.db,
# results under ./r2sweep_results, then its report in ./quickstart-report/index.html
# (a few minutes on 2 cores).
sweep: $(STAMP)
	$(VENV)/bin/r2sweep sweep search_spaces/quickstart.yaml
	$(VENV)/bin/r2sweep report quickstart --out quickstart-report

# The cluster kit for real (needs a Docker engine with Compose v2): build the images, bring
# docker/compose.yaml up, run a shrunk quickstart sweep in it and as a Ray job, check it
# through the MLflow server, tear it down. One line per stage with its time.
cluster-check: $(STAMP)
	$(PY) docker/cluster_check.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
