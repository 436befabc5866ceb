# The two commands: `make demo` (the main job) and `make test` (the whole suite, under coverage:
# it fails below the floor in pyproject.toml).  `make lint` (ruff, mypy) runs before it in CI.
# All set up what they need on a fresh Debian 12 machine (scripts/bootstrap).

PY := .venv/bin/python

.PHONY: demo test test-fast lint bench hubs clean

demo:
	@scripts/bootstrap
	@$(PY) -m vdeliver.demo

# A part of the suite (PYTEST_ARGS=...) reports its coverage but is not held to the floor.
test:
	@scripts/bootstrap --peers
	@$(PY) -m coverage erase
	$(PY) -m coverage run -m pytest $(PYTEST_ARGS)
	@$(PY) -m coverage combine -q
	$(PY) -m coverage report $(if $(PYTEST_ARGS),--fail-under=0)

lint:
	@scripts/bootstrap
	$(PY) -m ruff check .
	$(PY) -m mypy

test-fast:
	@scripts/bootstrap
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench:
	@scripts/bootstrap --peers
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Issue 20: a PostgreSQL primary and standby and two hubs in network namespaces, a failover drill
# with measurements (scripts/hubs-demo; as root).  HUBS_ARGS="--quick --json" etc.; the failure run
# with mail through both hubs: HUBS_ARGS="--mail" (3000 letters) or HUBS_ARGS="--mail --quick".
hubs:
	@scripts/bootstrap --peers
	$(PY) scripts/hubs-demo $(HUBS_ARGS)

clean:
	rm -rf .venv build *.egg-info .coverage .coverage.*
