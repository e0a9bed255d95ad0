# network3: `make demo` runs the main job, `make test` runs the tests. Both install from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PRESET ?= default
EPOCHS ?=
DEVICE ?= auto
SEED ?= 0
MODEL ?= models/$(PRESET).onnx
PORT ?= 50051
PRECISION ?=
TRAIN_ARGS ?=
export PYTHONUNBUFFERED := 1

.PHONY: help install install-gpu install-serving data train evaluate export serve classify demo test test-serving lint protos \
	book bench bench-train bench-export bench-serve bench-scale bench-http bench-peers perf-analyzer-deps bench-client bench-preprocess bench-unsure bench-mouse mouse-set soak fuzz image image-test clean
.DEFAULT_GOAL := help

# `make` and `make help`: every target with the one line after its `##`.
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z0-9-]*:.*## / {printf "  %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The stamp makes `install` idempotent: pip runs again only when pyproject.toml changes, and
# what is installed already (torch, several GB) is kept.
install: $(VENV)/.installed ## the training and serving packages with the test tools, in .venv
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[train,dev]'
	touch $@

# onnxruntime-gpu alone in .venv: beside the CPU onnxruntime (which the base dependencies bring)
# the CUDA provider disappears, as both write the same package (microsoft/onnxruntime#26996).
install-gpu: install ## .venv with onnxruntime-gpu in place of the CPU build (a GPU host)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[train,dev,gpu]'
	$(PY) -m pip uninstall -q -y onnxruntime
	$(PY) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps onnxruntime-gpu
	$(PY) -c 'import onnxruntime as o; p = o.get_available_providers(); print(p); assert "CUDAExecutionProvider" in p'

# A server host's environment: the server's dependencies and the test tools, no PyTorch.
VENV_SERVING ?= .venv-serving
install-serving: $(VENV_SERVING)/.installed ## the server's dependencies and the test tools, no PyTorch, in .venv-serving
$(VENV_SERVING)/.installed: pyproject.toml
	test -x $(VENV_SERVING)/bin/python || $(PYTHON) -m venv $(VENV_SERVING)
	$(VENV_SERVING)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@! $(VENV_SERVING)/bin/python -c 'import torch' 2>/dev/null || { echo "$(VENV_SERVING) has torch" >&2; exit 1; }
	touch $@

data: install ## fetch, check and cache MNIST in data/
	$(BIN)/network3-train data

train: install ## train PRESET (default: default) into runs/PRESET
	$(BIN)/network3-train train --preset $(PRESET) --device $(DEVICE) --seed $(SEED) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(PRECISION),--precision $(PRECISION)) $(TRAIN_ARGS)

evaluate: install ## test accuracy and confusion matrix of runs/PRESET/best.pt
	$(BIN)/network3-train evaluate runs/$(PRESET)/best.pt

test: install ## every test, training and serving (under 15 minutes on 2 cores)
	$(PY) tests/uci.py
	$(PY) -m pytest -q

# The serving tests where a server host stands: no PyTorch installed, a model built without it.
test-serving: install-serving ## the serving, client and protocol tests without PyTorch (.venv-serving)
	$(VENV_SERVING)/bin/python tests/uci.py
	NETWORK3_SERVING_ONLY=1 $(VENV_SERVING)/bin/python -m pytest -q tests/serving

lint: install ## ruff (pyflakes' checks) and the import-cycle check
	$(BIN)/ruff check --select F training serving tests benchmarks demo deploy
	$(PY) ../shared/tools/imports.py . training serving

# Every bench-* target, in one go (a quiet machine only: a benchmark is void while anything else runs).
bench: bench-train bench-export bench-serve bench-scale bench-http bench-peers bench-client bench-preprocess bench-unsure ## every bench-* target (a quiet machine only)

# The book's table: every nielsen-* preset x 3 seeds into runs/book/, resumable: run it again
# after an interruption (hours on a CPU; BOOK_ARGS="--workers 6" on a GPU box, DEVICE=cuda).
# BOOK_BATCH=10: the book's own mini-batch and eta, into runs/book10/ (slower than batch 100;
# what it costs and gains is in docs/results.md).
BOOK_BATCH ?= 100
book: install ## the book's table: every nielsen-* preset x 3 seeds, resumable (hours on a CPU)
	$(PY) benchmarks/book.py run --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE)) --batch-size $(BOOK_BATCH) $(BOOK_ARGS)
	$(PY) benchmarks/book.py table --batch-size $(BOOK_BATCH)

# On a GPU (DEVICE=cuda) also the time to 99% of `fast` beside `default` (the GPU goal: under a second).
TRAIN99 = $(PY) benchmarks/bench_train.py --device cuda --presets fast,default --target 0.99 --json bench-results/train99.json $(if $(PRECISION),--precision $(PRECISION))
bench-train: install ## time to 98.9% test accuracy (and 99% on a GPU)
	$(PY) benchmarks/bench_train.py --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE)) $(if $(PRECISION),--precision $(PRECISION))
	$(if $(filter cuda,$(DEVICE)),$(TRAIN99))

clean: ## remove runs/, models/, demo samples
	rm -rf runs models demo/samples .pytest_cache

# ---- export (ONNX) ----
# The checked ONNX file from the preset's best checkpoint; QUANTIZE=int8 and TRITON_REPO=DIR pass through.
QUANTIZE ?=
TRITON_REPO ?=
export: install ## PRESET's best checkpoint to MODEL (QUANTIZE=int8, TRITON_REPO=DIR)
	@test -f runs/$(PRESET)/best.pt || { echo "runs/$(PRESET)/best.pt: no checkpoint; run 'make train PRESET=$(PRESET)' first" >&2; exit 1; }
	$(BIN)/network3-train export runs/$(PRESET)/best.pt -o $(MODEL) $(if $(QUANTIZE),--quantize $(QUANTIZE)) $(if $(TRITON_REPO),--triton-repo $(TRITON_REPO))

# onnxruntime float32/int8 vs PyTorch eager, images/s at batch 1, 64, 256 (quiet machine only).
bench-export: install ## onnxruntime float32 and int8 against PyTorch eager, images/s
	@test -f runs/$(PRESET)/best.pt || { echo "runs/$(PRESET)/best.pt: no checkpoint; run 'make train PRESET=$(PRESET)' first" >&2; exit 1; }
	$(PY) benchmarks/bench_export.py --checkpoint runs/$(PRESET)/best.pt

# ---- serving ----
PROTOS := protos/network3/v1/classifier.proto protos/inference/model_config.proto protos/inference/grpc_service.proto

# Stubs are committed; tests/test_protos.py fails when they are stale.  Run from the repo root so
# they import as `protos.network3.v1.classifier_pb2`.
protos: install ## regenerate the committed gRPC stubs
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# perf_analyzer (from the tritonclient wheel) loads Debian's libb64-0d and the CUDA runtime
# library (PyPI's nvidia-cuda-runtime-cu12, in the test extra) even on a CPU.
perf-analyzer-deps: install ## Debian's libb64-0d for perf_analyzer, installed when missing
	@dpkg -s libb64-0d >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libb64-0d; }

# perf_analyzer against the in-process ceiling, the simplest unbatched server and ours (quiet
# machine only).
BENCH_SERVE_ARGS ?=
bench-serve: install perf-analyzer-deps ## perf_analyzer against our server, an unbatched reference and the ceiling
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(PY) benchmarks/bench_serve.py --model $(MODEL) $(BENCH_SERVE_ARGS)

# Throughput with 1, 2, 4, ... workers up to the cores (perf_analyzer on the same host, else the
# Python load generator: BENCH_SCALE_ARGS="--load python"), the ceiling beside it (quiet machine only).
BENCH_SCALE_ARGS ?=
bench-scale: install perf-analyzer-deps ## 1- and 64-image throughput with 1, 2, 4, ... workers up to the cores, the ceiling beside it
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(PY) benchmarks/bench_scale.py --model $(MODEL) $(BENCH_SCALE_ARGS)

# perf_analyzer -i http against our server and the thinnest aiohttp one (benchmarks/reference_http.py),
# the same requests over gRPC, and /v1/classify's p50/p99 (quiet machine only).
BENCH_HTTP_ARGS ?=
bench-http: install perf-analyzer-deps ## perf_analyzer over HTTP against a thin aiohttp server, gRPC beside it, /v1/classify latency
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(PY) benchmarks/bench_http.py --model $(MODEL) $(BENCH_HTTP_ARGS)

# network3 beside KServe's and MLServer's Python model servers and the thin reference, all serving
# MODEL with onnxruntime under one Python load generator over gRPC v2 (quiet machine only).  Each
# peer gets its own environment under PEERS_VENV, created once (the stamp names the version): a
# peer whose install fails is reported as not run and the others still run (pip runs again when
# the Makefile changes: quick when all is installed).
PEERS_VENV ?= .venv-peers
KSERVE_VERSION ?= 0.21.0
MLSERVER_VERSION ?= 1.7.1
BENCH_PEERS_ARGS ?=
$(PEERS_VENV)/kserve/.installed-$(KSERVE_VERSION): Makefile
	test -x $(PEERS_VENV)/kserve/bin/python || $(PYTHON) -m venv $(PEERS_VENV)/kserve
	$(PEERS_VENV)/kserve/bin/python -m pip install -q --disable-pip-version-check 'kserve==$(KSERVE_VERSION)' onnxruntime numpy
	touch $@
# uvloop<0.22: with uvloop 0.22 and later MLServer 1.7.1's inference worker dies at start-up
# ("There is no current event loop", SeldonIO/MLServer#2286, unfixed in 1.7.1).
$(PEERS_VENV)/mlserver/.installed-$(MLSERVER_VERSION): Makefile
	test -x $(PEERS_VENV)/mlserver/bin/python || $(PYTHON) -m venv $(PEERS_VENV)/mlserver
	$(PEERS_VENV)/mlserver/bin/python -m pip install -q --disable-pip-version-check 'mlserver==$(MLSERVER_VERSION)' 'uvloop<0.22' onnxruntime numpy
	touch $@
bench-peers: install ## network3 beside KServe 0.21, MLServer 1.7.1 and the thin reference, one Python load generator
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	-$(MAKE) --no-print-directory $(PEERS_VENV)/kserve/.installed-$(KSERVE_VERSION)
	-$(MAKE) --no-print-directory $(PEERS_VENV)/mlserver/.installed-$(MLSERVER_VERSION)
	$(PY) benchmarks/bench_peers.py --model $(MODEL) --peers-venv $(PEERS_VENV) $(BENCH_PEERS_ARGS)

# Serve MODEL on 127.0.0.1:PORT until Ctrl-C (SERVE_ARGS for anything else: --metrics-port, --token-file...).
SERVE_ARGS ?=
serve: install ## serve MODEL on 127.0.0.1:PORT until Ctrl-C
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(BIN)/network3 serve --model $(MODEL) --port $(PORT) $(SERVE_ARGS)

# ---- client and demo ----
# Classify images with the client: SERVER=host:port (else $$NETWORK3_SERVER, else 127.0.0.1:$(PORT)),
# SAMPLES=paths (files, folders, globs, IDX files), CLASSIFY_ARGS for anything else (--local FILE...).
SAMPLES ?= demo/samples
SERVER ?= $(or $(NETWORK3_SERVER),127.0.0.1:$(PORT))
CLASSIFY_ARGS ?=
classify: install ## classify SAMPLES against SERVER
	$(BIN)/network3 classify $(SAMPLES) --server $(SERVER) $(CLASSIFY_ARGS)

# The whole journey from a fresh clone: install, data, train and export PRESET (skipped when
# $(MODEL) exists), write sample digits, serve, wait for health, classify, stop the server.
demo: install ## the whole journey from a fresh clone: data, train, export, serve, classify
	@test -f $(MODEL) || $(MAKE) --no-print-directory data train export PRESET=$(PRESET) MODEL=$(MODEL)
	$(PY) demo/make_samples.py --out demo/samples
	BIN=$(BIN) MODEL=$(MODEL) SAMPLES=demo/samples CLASSIFY_ARGS="$(CLASSIFY_ARGS)" bash demo/demo.sh

# 10,000 PNG files through the server and with --local in one run (quiet machine only).
BENCH_CLIENT_ARGS ?=
bench-client: install ## 10,000 PNG files through the server and with --local
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(PY) benchmarks/bench_client.py --model $(MODEL) $(BENCH_CLIENT_ARGS)

# How the photo pipeline fares on digits that never came from MNIST (a table in docs/results.md).
bench-preprocess: install ## the photo pipeline on digits that never came from MNIST
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(PY) tests/uci.py
	$(PY) benchmarks/preprocess_report.py --model $(MODEL)

# What the service answers on letters, blank pages and noise, and what the `unsure` flag catches
# (UNSURE_SPLIT=calibration: the sets the rule and rate were chosen on, several rates).
UNSURE_SPLIT ?= held-out
bench-unsure: install ## letters, blank and noise images vs real digits: answers and the unsure flag
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(PY) benchmarks/unsure_report.py --model $(MODEL) --split $(UNSURE_SPLIT)

bench-mouse: install-serving ## the model on the recorded mouse-drawn digits, drawn again on the page in headless Chromium
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(VENV_SERVING)/bin/python benchmarks/mouse_set.py score --model $(MODEL)

mouse-set: install-serving ## record tests/data/mouse/ again: 200 mouse-drawn digits on the page (a test set: never train on it)
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(VENV_SERVING)/bin/python benchmarks/mouse_set.py record --model $(MODEL)

# ---- reliability ----
# Hostile input with a longer budget than `make test` gives it: FUZZ_EXAMPLES fresh random
# examples per fuzz test (make test runs 40, the same ones every time).
FUZZ_EXAMPLES ?= 2000
fuzz: install ## hostile input with FUZZ_EXAMPLES examples per fuzz test
	NETWORK3_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/serving/test_fuzz_grpc.py tests/training/test_fuzz_data.py

# The server under a mix of clients for SOAK_SECONDS (default 600), then overloaded past its
# queue, then the mix again (quiet machine only).  SOAK_ARGS for more, e.g. --json soak.json.
SOAK_SECONDS ?= 600
SOAK_ARGS ?=
soak: install ## the server under a mix of clients for SOAK_SECONDS, then overloaded
	@test -f $(MODEL) || { echo "$(MODEL): no model; run 'make train export PRESET=$(PRESET)' first" >&2; exit 1; }
	$(PY) benchmarks/soak.py --model $(MODEL) --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

# ---- container image ----
# The server's image (Containerfile) as IMAGE:latest and IMAGE:<version in pyproject.toml>, with
# podman (else docker), MODEL baked in; the default MODEL is trained and exported first when it is
# missing (as `make demo` does), any other MODEL must exist.  Where debian:bookworm-slim cannot be
# pulled, the base is built from Debian's packages (deploy/image/debian-base.sh: debootstrap).
IMAGE ?= network3
image: ## the server's container image IMAGE:latest and :version (podman or docker), MODEL baked in
	@test -f $(MODEL) || [ "$(MODEL)" != "models/$(PRESET).onnx" ] || $(MAKE) --no-print-directory data train export PRESET=$(PRESET) MODEL=$(MODEL)
	IMAGE=$(IMAGE) deploy/image/build.sh $(MODEL)

# Build the image, check it (size, non-root, no torch) and run it: cold start, HEALTHCHECK, PNGs
# classified over gRPC and HTTP from outside, metrics, SIGTERM and exit 0 (deploy/image/check.py;
# where `podman run` cannot start, a chroot of the mounted image stands in for it, as root).
image-test: image install-serving ## build the image, run it, classify over gRPC and HTTP from outside, SIGTERM
	$(VENV_SERVING)/bin/python demo/make_samples.py --out demo/samples
	$(VENV_SERVING)/bin/python deploy/image/check.py --image $(IMAGE):latest --samples demo/samples
