# The README's two commands:
#   make figures   regenerate every figure, table and report/report.md (trains what is missing)
#   make test      the test suite + every notebook under nbval (smoke profile), as CI runs it
# Both create .venv (unless a virtual environment is active) and install into it once.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddpm-installed
FRUITS360_DIR ?= ../shared/fruits-360-subset
export FRUITS360_DIR
NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
# execute a notebook in place, outputs kept, no timings;
# a cell may take 40 min (notebook 05 on the CPU), a notebook 90
NBEXEC := timeout 5400 $(PY) -m nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=2400 \
  --ExecutePreprocessor.record_timing=False

.PHONY: figures test env cluster-tools data train retrain notebooks b256 mixture norm finetune report bench clean

figures: env data train notebooks b256 mixture norm finetune report

env: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

data: env data/index.csv
data/index.csv:
	$(PY) -m ddpm_lib data --from "$(FRUITS360_DIR)"

# every model the notebooks need, resumed where a run stopped, skipped when finished or committed
train: env data
	$(PY) -m ddpm_lib train-all

# every model from scratch, the committed ones too (into runs/, which the notebooks then prefer)
retrain: env data
	$(PY) -m ddpm_lib train-all --retrain

notebooks: env data
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(NBEXEC) "$$nb" || { echo "== $$nb again (nbconvert can hang on widgets: jupyter/nbconvert#2029)"; \
	                        $(NBEXEC) "$$nb"; } || exit 1; \
	done

# the committed b256 generation model (made on a GPU), scored and sampled here: figures/b256/
b256: env data
	$(PY) -m ddpm_lib evaluate --profile b256 --what generation
	$(PY) -m ddpm_lib sample --profile b256 --method ddpm --n 64
	$(PY) -m ddpm_lib sample --profile b256 --method ddim --steps 100 --eta 1 --recompute-eps --n 64
	$(PY) -m ddpm_lib evaluate --profile b256 --what mixture

# the cheap DDIM samplers with ε̂ at high t from Gaussian mixtures of the training images
mixture: env data
	$(PY) -m ddpm_lib evaluate --what mixture
	$(PY) -m ddpm_lib sample --method ddim --steps 50 --gaussian segment --n 64
	$(PY) -m ddpm_lib sample --method ddim --steps 20 --gaussian segment --n 64

# deterministic DDIM with the network alone: x̂0 clipped, not clipped, and norm-matched
norm: env data
	$(PY) -m ddpm_lib evaluate --what norm
	$(PY) -m ddpm_lib sample --method ddim --steps 50 --norm-match --n 64
	$(PY) -m ddpm_lib sample --method ddim --steps 20 --norm-match --n 64

# the cpu model trained on for 100 epochs with an output path s(t)·x_t that sees ‖x_t‖ (skip),
# with EDM's preconditioning (precond) and as it is (cpu-ft, the control): all committed
# (data/checkpoints/), scored here: figures/skip/ (the table of all four), figures/precond/
finetune: env data
	$(PY) -m ddpm_lib evaluate --profile skip --what generation
	$(PY) -m ddpm_lib evaluate --profile precond --what generation
	$(PY) -m ddpm_lib evaluate --profile skip --what finetune
	for p in skip precond; do \
	  $(PY) -m ddpm_lib sample --profile $$p --method ddpm --n 64 && \
	  $(PY) -m ddpm_lib sample --profile $$p --method ddim --steps 50 --n 64 && \
	  $(PY) -m ddpm_lib sample --profile $$p --method ddim --steps 20 --n 64 || exit 1; \
	done

report: env
	$(PY) -m ddpm_lib report

bench: env
	$(PY) tests/bench.py

# Debian's SLURM and munge for tests/test_cluster.py (root with apt-get; elsewhere those tests skip)
cluster-tools:
	@if command -v sbatch >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing slurm-wlm and munge (apt-get) for the SLURM tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge \
	    >/dev/null; } || echo "warning: could not install slurm-wlm/munge: the SLURM tests will skip"; \
	else echo "note: no sbatch, and no root apt-get to install it: the SLURM tests will skip"; fi

test: env cluster-tools
	DDPM_PROFILE=smoke $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with=$(CURDIR)/tests/nbval_sanitize.cfg --nbval-cell-timeout=600 -q

clean:
	rm -rf runs/smoke
