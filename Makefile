# dass_ray — one-command setup. `make run` and `make test` install what they need first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench clean proto

# Generated gRPC code (never edited, not committed): rebuilt whenever a .proto changes.
PROTO_SRC := $(wildcard proto/dass_ray/v1/*.proto)
PROTO_OUT := dass_ray/v1/search_pb2.py


install: $(STAMP) $(PROTO_OUT)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test,timm]'
	$(BIN)/python scripts/gen_proto.py
	@touch $(STAMP)

$(PROTO_OUT): $(PROTO_SRC) scripts/gen_proto.py | $(STAMP)
	$(BIN)/python scripts/gen_proto.py

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

# The main job on the embedded default: shipped MNIST teacher + shipped predictor + bundled data, for a
# student at most a quarter of the teacher's FLOPs.
run: install
	rm -rf runs/demo
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python scripts/search.py --output runs/demo --candidates 2000 --top-k 5 \
		--max-flops-ratio 0.25

# The fault handler is on: a native crash prints every thread's Python stack (tests/conftest.py explains the exit).
test: install
	PYTHONFAULTHANDLER=1 $(BIN)/python -X faulthandler -m pytest -q --durations=15

test-fast: install
	PYTHONFAULTHANDLER=1 $(BIN)/python -X faulthandler -m pytest -q -m "not slow and not ray"

bench: install
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_kd.py
	$(BIN)/python benchmarks/bench_search.py

clean:
	rm -rf $(VENV) runs .pytest_cache
