# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in $(VENV) and install what is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first: this pinned CPU wheel is available locally; an unpinned `torch` pulls GBs of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.robust_cert-installed

.PHONY: venv demo test lint typecheck unit bench clean help

help:
	@echo "make demo   train two digits CNNs (+ an ONNX export), register them in a local sqlite MLflow store, certify them"
	@echo "make test   lint (ruff, pyright) and run the test suite (starts a real mlflow server on 127.0.0.1)"
	@echo "make typecheck  pyright (basic) on robust_cert/"
	@echo "make bench  benchmarks (bench/): costs as multiples of the measured ideal"
	@echo "make clean  remove the virtual environment and demo output"

venv: $(STAMP)

$(STAMP): pyproject.toml .ci/system-packages
	bash .ci/system-packages  # apt-get as root (WeasyPrint's libraries, poppler, chromium), else prints the command
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" || { \
	  echo "note: $(TORCH_SPEC) is not available here; installing the newest torch instead"; \
	  $(PIP) install --quiet torch; }
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robust-cert demo --workdir demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check robust_cert tests examples bench
	$(VENV)/bin/pyright --pythonpath $(PY)  # [tool.pyright] in pyproject.toml (basic, robust_cert/)

typecheck: $(STAMP)  # pyright basic on robust_cert/ ([tool.pyright]), alone
	$(VENV)/bin/pyright --pythonpath $(PY)

unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)  # speed targets as ratios against baselines measured in the same run
	$(PY) bench/bench_probabilistic.py
	$(PY) bench/bench_adversarial.py  # the ART comparison row needs adversarial-robustness-toolbox
	$(PY) bench/bench_resnet.py  # the production suite on ResNet-18 (~14 min on 2 cores)
	$(PY) bench/bench_shard.py  # torchrun speed-up on 2 processes, certificates compared
	$(PY) bench/bench_memory.py  # peak RSS of digits-adversarial.yaml (target < 500 MB)
	$(PY) bench/bench_data.py  # a 100,000 × 30 CSV loads and hashes in <= 5 s
	$(PY) bench/bench_blackbox.py  # Square vs the model's own predict_proba (target <= 1.2x)

clean:
	rm -rf $(VENV) demo_out build *.egg-info
