# The same commands CI and people use.
.PHONY: install test lint bench
install:
	pip install torch==2.13.0 && pip install -e ".[test]"
test:
	pytest
lint:
	ruff check . && ruff format --check .
bench:
	compress --target onnx --out runs/default
