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
	@echo "make test   lint (ruff, pyright) and run the test suite on 2 processes (starts real mlflow servers on 127.0.0.1)"
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

# The suite on PYTEST_WORKERS processes (pytest-xdist, one thread each; 0 runs it serially).
# loadgroup keeps tests that share an expensive fixture on one worker (tests/conftest.py).
PYTEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

# Speed targets as ratios against baselines measured in the same run. Every bench prints its
# table and PASS/MISS per target and exits 1 when one is missed; all of them run, then the
# target fails if any bench did.
BENCHES = bench_probabilistic.py \
	bench_adversarial.py \
	bench_resnet.py \
	bench_shard.py \
	bench_memory.py \
	bench_data.py \
	bench_blackbox.py \
	bench_cli.py \
	bench_bounds.py \
	bench_images.py \
	bench_overhead.py
# bench_probabilistic  MC sampling and smoothing <= 1.5x ideal, Han et al. <= 5x at MAE <= 0.005
# bench_adversarial    CLEVER <= 2x ideal, PGD <= 1.1x torchattacks, corruptions <= 1.5x ideal
#                      (the ART comparison rows need adversarial-robustness-toolbox)
# bench_resnet         the production suite on ResNet-18 w16: every metric <= 1.5x its ideal,
#                      PGD/APGD <= 1.05x torchattacks (~11 min on 2 idle cores; --quick: minutes)
# bench_shard          torchrun on 2 processes against one, certificates compared
# bench_memory         peak RSS of digits-adversarial.yaml < 500 MB
# bench_data           a 100,000 x 30 CSV loads and hashes in <= 5 s
# bench_blackbox       Square vs the model's own predict_proba <= 1.2x
# bench_cli            certify (accuracy only) <= 1.8x and report --pdf off <= 0.4x the time
#                      of python -c "import torch, mlflow"
# bench_bounds         safe radius: median certified/witnessed >= 0.4 (digits CNN, L2 and Linf),
#                      0 sandwich violations, 0 flips, bound cost <= 3x a forward-backward
# bench_images         20,000 vs 2,000 RGB 64x64 uint8 images: peak <= 1.5x the uint8 data size
# bench_overhead       ResNet-18 w16: each sampling/attack metric's own time (outside the model's
#                      forward and backward calls, same run) <= 10% (~8 min idle; --quick)
bench: $(STAMP)
	@status=0; for b in $(BENCHES); do \
	  echo "== bench/$$b"; $(PY) bench/$$b || { echo "== bench/$$b: a target was missed"; status=1; }; \
	done; exit $$status

clean:
	rm -rf $(VENV) demo_out build *.egg-info
