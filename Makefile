# The two commands a new machine needs: `make serve` (the server, on the built-in tiny model unless
# MODEL=... is given) and `make test`. Everything else installs itself on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SD := $(VENV)/bin/swiftdiffusion
MODEL ?=
CONTROLNETS ?=
LORAS ?=
SERVE_ARGS ?=

.PHONY: setup serve demo test bench soak gpu-check gpu-carry tiny export perf-analyzer clean

setup: $(VENV)/.installed

# torch first, pinned: on a CPU machine the local CPU wheel satisfies it, where an unpinned resolve would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[server,bench,dev]'
	touch $@

serve: setup
	$(SD) serve $(if $(MODEL),--model $(MODEL)) $(if $(CONTROLNETS),--controlnets $(CONTROLNETS)) $(if $(LORAS),--loras $(LORAS)) $(SERVE_ARGS)

demo: setup
	$(SD) demo

test: setup
	$(PY) -m pytest -q -ra tests

tiny: setup
	$(SD) tiny --size tiny --out models/tiny

export: setup
	$(SD) export --size tiny --out artifacts/tiny

# Both families: the small SD1.5 model, then the small SDXL model (about 15 minutes each on 2 cores).
bench: setup
	$(SD) bench --out perf/results/bench
	$(SD) bench --family sdxl --out perf/results/bench_sdxl

# 30 minutes of open-loop load at 80% of capacity with faults injected every 5 minutes (perf/soak.py).
soak: setup
	$(PY) perf/soak.py --minutes 30 --window-minutes 5 --load 0.8 --capacity-seconds 60 --out perf/results/soak

# Which path can carry ControlNet residuals between Triton's model processes on this machine, with which server
# settings (perf/triton_gpu_check.py; GPU cases are recorded as skipped without a GPU). Its JSON feeds
# `swiftdiffusion serve --gpu-check perf/results/triton_gpu_check/triton_gpu_check.json`.
gpu-check: setup
	$(PY) perf/triton_gpu_check.py --out perf/results/triton_gpu_check

# What a GPU machine lacks, as wheels for its Python 3.12, in two folders that each fit one call's 64 MiB carry:
# the tritonserver (.carry/pytriton) and diffusers with the versions of its companions we pin (.carry/hf).
CARRY_WHEELS := $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	--platform manylinux_2_35_x86_64 --platform manylinux2014_x86_64 --platform any
gpu-carry: setup
	$(CARRY_WHEELS) -d .carry/pytriton nvidia-pytriton==0.7.0
	$(CARRY_WHEELS) -d .carry/hf diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 \
		safetensors==0.8.0 regex==2026.11.19 peft==0.21.2 fsspec==2026.9.0

# Which routing policy Envoy should use over N replicas: a discrete-event simulation on the production trace's
# statistics and the measured service times (perf/routing_sim.py, about a minute); JSON and chart.
.PHONY: routing-sim
routing-sim: setup
	$(PY) perf/routing_sim.py --out perf/results/routing_sim.json

clean:
	rm -rf models artifacts
