# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both set up what they need on a fresh Debian 12 machine (scripts/bootstrap).

PY := .venv/bin/python

.PHONY: demo test test-fast lint bench clean

demo:
	@scripts/bootstrap
	@$(PY) -m vdeliver.demo

test:
	@scripts/bootstrap --peers
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast:
	@scripts/bootstrap
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench:
	@scripts/bootstrap --peers
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf .venv build *.egg-info
