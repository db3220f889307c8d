# fedstream: `make demo` runs the federation on real local brokers; `make test` runs every test.
PY := .venv/bin/python

.PHONY: install demo test lint bench proto

lint: install
	.venv/bin/ruff check .
	.venv/bin/mypy

install:
	@bash compose/install.sh

demo: install
	$(PY) -m global_aggregator.demo

test: install
	.venv/bin/ruff check .
	.venv/bin/mypy
	$(PY) -m pytest -p no:cacheprovider tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

proto: install
	$(PY) -m grpc_tools.protoc -Ischemas --python_out=schemas --pyi_out=schemas schemas/fedstream.proto

bench: install
	mkdir -p bench/results
	$(PY) bench/codec.py --params 1000000 --json bench/results/codec.json
	$(PY) bench/simulate.py --json bench/results/simulate.json
	$(PY) bench/pipeline.py --json bench/results/pipeline.json
	$(PY) bench/poison.py --json bench/results/poison.json
	$(PY) bench/edge.py --json bench/results/edge.json
	$(PY) bench/secure.py --json bench/results/secure.json
	$(PY) bench/privacy.py --json bench/results/privacy.json
