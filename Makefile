# Two commands do everything on a fresh Debian 12 machine (root, python3 only):
#   make demo   bring up the local lab, deploy Releasy to it, then a rolling deploy
#   make test   the whole test suite, lab included
# `make setup` is what both run first; it is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit faults bench lab-down clean

setup: $(VENV)/.installed
	@scripts/ensure-host-packages.sh
	@# Byte-compiled once here: every `fab` run then reads the .pyc files even where
	@# PYTHONDONTWRITEBYTECODE is set (compiling the sources doubled each run's start-up).
	@$(PY) -m compileall -q releasy_deploy fabfile lab >/dev/null

$(VENV)/.installed: requirements.txt
	@scripts/ensure-host-packages.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

demo: setup
	@scripts/demo.sh

test: setup
	$(PY) scripts/run-tests.py

unit: setup
	$(PY) -m pytest tests/unit

# Every injection point of a rolling deploy and of a rolling reconfiguration (`fab site`) on
# the split lab, and of a blue/green deploy on the single host, failing and connection-drop
# variants (make test tries the first, a middle and the last): the fleet must stay serving
# and a re-run converge. Run before submitting a change to a flow.
faults: setup
	RELEASY_FAULT_POINTS=all $(PY) -m pytest -s tests/integration/test_faults.py \
		tests/integration/test_faults_bluegreen.py tests/integration/test_faults_restore.py

# Not part of `test`: brings up its own lab (LAB_ID like every lab command), measures what
# the tasks cost against the SSH floor, prints a table, writes bench/results/latest.json.
bench: setup
	$(PY) bench/run.py

lab-down: setup
	$(VENV)/bin/inv lab.down

clean: lab-down
	rm -rf $(VENV) .lab .lab-*
