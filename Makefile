# The commands of the README (demo, check, test) and what they need. Each installs what it
# needs itself: the virtual environment and dependencies here, the Kafka jars on first use,
# and Docker Compose for `make test` when the docker CLI lacks it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo check test lint compose chaos soak fuzz compat clean

demo: $(STAMP)
	$(VENV)/bin/pipeline demo

# The inner loop: lint, types and the unit tests, which need no server and no external tool.
check: lint
	$(VENV)/bin/pytest -q tests/unit

# Everything: check's parts, then the tests that run external tools (tests/tools/) and real
# servers (tests/integration/) in WORKERS parallel processes sharing one local stack
# (tests/conftest.py). The integration tests spend most of their time waiting on servers and
# agent processes, so even two cores keep three workers busy. Tests of one xdist_group run on
# one worker: the network fault tests then start one Kafka broker of their own, not three.
WORKERS ?= 3
test: check compose
	$(VENV)/bin/pytest -n $(WORKERS) --dist loadgroup tests/tools tests/integration

# `docker compose`, which tests/tools/test_deploy.py runs: built once per machine when missing.
compose:
	deploy/install-compose

# The randomized SIGKILL test of tests/integration/test_faults.py once per seed 1..SEEDS, and
# the negative control (make test runs it too).
SEEDS ?= 5
chaos: $(STAMP)
	CHAOS_SEEDS="$$(seq -s ' ' 1 $(SEEDS))" $(VENV)/bin/pytest -q \
		tests/integration/test_faults.py -k "test_sigkill_at_random_moments or test_the_oracle_catches" \
		tests/integration/test_negative_control.py

# The soak run (tests/soak.py, docs/testing.md): MINUTES of RATE records/s and a seeded fault
# a minute on a stack of its own, then the oracle and the verdict on growth; SOAK_OUT gets
# soak.png and soak.json. make test runs a two-minute version (tests/integration/test_soak.py).
MINUTES ?= 30
RATE ?= 20000
SEED ?= 1
SOAK_OUT ?= soak-results
soak: $(STAMP)
	$(VENV)/bin/python -m tests.soak --minutes $(MINUTES) --rate $(RATE) --seed $(SEED) \
		--out $(SOAK_OUT)

# The decoders fuzzed: FUZZ_INPUTS records and control messages each (FUZZ_SEED: new inputs).
FUZZ_INPUTS ?= 100000
fuzz: $(STAMP)
	FUZZ_INPUTS=$(FUZZ_INPUTS) $(VENV)/bin/pytest -q tests/unit/test_fuzz_records.py \
		tests/unit/test_fuzz_control.py

# The exactly-once integration tests against each supported server (docs/compatibility.md):
# PostgreSQL 13 and 17, Kafka 3.9 and 4.3, PgBouncer in transaction and session mode; one
# stack per cell. CELLS picks some (`python -m tests.compat --list` names them).
CELLS ?=
compat: $(STAMP)
	$(VENV)/bin/python -m tests.compat $(CELLS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
