# The two commands a newcomer needs: `make run` and `make test`. Everything else is below.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first, pinned, so that the finetune extra's loose requirement cannot pull another build. Where
# pip finds torch on PyPI, Linux gets the CUDA build (GBs, what `make gpu-check` needs on a GPU); a machine without
# a GPU can take the CPU build instead: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= router,feedback,optimizer,finetune,dashboard,dev
TASTE ?= demo# make demo TASTE=last-trait|pair|nothing: the simulated users' hidden taste (bench/tastes.py)
DEMO_ARGS ?=

.PHONY: install run test test-fast lint format bench chaos demo up down logs gpu-check openapi mutate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

run: install
	$(PY) -m gateway.run

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	$(PY) -m bench.feedback_throughput
	$(PY) -m bench.digest
	$(PY) -m bench.explain_overhead
	$(PY) -m bench.learning
	$(PY) -m bench.search_loop
	$(PY) -m bench.transport_loss --quick
	$(PY) -m bench.stuffing

# Not part of `make test`: minutes of load and SIGKILLs on 127.0.0.1 (CHAOS_ARGS=--quick for one minute).
chaos: install
	$(PY) -m bench.chaos $(CHAOS_ARGS)

# Not part of `make test`: mutation testing of the core modules (tools/mutate.py, [tool.mutate] in pyproject.toml),
# the score per module. MUTATE_MODULES=privacy,outbox picks modules; MUTATE_JOBS=2 runs two mutants at a time.
MUTATE_JOBS ?= 2
mutate: install
	MUTATE_JOBS=$(MUTATE_JOBS) MUTATE_MODULES=$(MUTATE_MODULES) $(PY) -m tools.mutate --fail-under 80

demo: install
	$(PY) -m bench.demo --taste $(TASTE) $(DEMO_ARGS)

gpu-check: install
	$(PY) -m bench.gpu_check

# The gateway's one OpenAPI document, as nginx serves it in the compose shape (a test fails when it is stale).
openapi: install
	$(PY) -m gateway.openapi > deploy/openapi.json

up:
	docker compose up -d --build

down:
	docker compose down

logs:
	docker compose logs -f --tail=100

clean:
	rm -rf data .pytest_cache .ruff_cache
