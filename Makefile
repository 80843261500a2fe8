# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Both create or update .venv idempotently first.
.PHONY: setup demo test test-slow
VENV := .venv/bin

setup:
	bash scripts/setup_env.sh

demo: setup
	$(VENV)/exitrl demo --out runs/demo

test: setup
	$(VENV)/python -m pytest -m "not slow" -q

test-slow: setup
	$(VENV)/python -m pytest -m slow -q
