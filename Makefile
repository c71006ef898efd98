PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test test-slow bench lint clean

.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[test,demo]'
	touch $@

demo: .venv/.installed
	$(PY) -m fxcompress demo

test: .venv/.installed
	$(PY) -m pytest -q

test-slow: .venv/.installed
	$(PY) -m pytest -q -m slow

bench: .venv/.installed
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.qat_profile
	$(PY) -m benchmarks.transform
	$(PY) -m benchmarks.sparsity_alloc
	$(PY) -m benchmarks.quality
	$(PY) -m benchmarks.deploy

lint: .venv/.installed
	$(PY) -m ruff check fxcompress passes tests benchmarks

clean:
	rm -rf .venv *.egg-info build
