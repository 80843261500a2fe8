# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Both create or update .venv idempotently first.
.PHONY: setup demo demo-joint lint test test-slow
VENV := .venv/bin

setup:
	bash scripts/setup_env.sh

demo: setup
	$(VENV)/exitrl demo --out runs/demo

# the same run as `make demo` (joint training is part of it; kept for old scripts)
demo-joint: demo

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports --no-logo

test: lint
	$(VENV)/python -m pytest -m "not slow" -q

test-slow: setup
	$(VENV)/python -m pytest -m slow -q
