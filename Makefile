# The README's commands:
#   make lab       set up .venv and the data, open the notebooks in JupyterLab (the quick start)
#   make figures   regenerate every figure, table and report/report.md from the committed models
#                  (trains only what is missing; `make retrain` rebuilds every model)
#   make test      the test suite + every notebook under nbval (smoke profile), as CI runs it
#   make book      the notebooks (committed outputs) and the report as static HTML in site/
# They create .venv (unless a virtual environment is active) and install into it once:
# requirements.txt for every target, requirements-test.txt on top for `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddpm-installed
TEST_STAMP := $(VENV)/.ddpm-test-installed
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.d/ddpm-fruits.json
PIP := $(PY) -m pip install --disable-pip-version-check -q
FRUITS360_DIR ?= ../shared/fruits-360-subset
export FRUITS360_DIR
# Notebooks 01–03 run as they are; 04 and 05 with the counts of the committed figures (their
# parameters cells hold counts that step through in minutes), through papermill; then every
# notebook is stored as JupyterLab keeps it (tools/normalize_notebooks.py: papermill's injected
# cell, run metadata and widget state dropped), so opening one changes nothing.
NOTEBOOKS := $(sort $(wildcard notebooks/0[1-3]*.ipynb))
NB04 := notebooks/04_ssim_evaluation.ipynb
NB04_PARAMS := -p N_EVAL 500 -p N_NATIVE 200
NB05 := notebooks/05_generation.ipynb
NB05_PARAMS := -p N_SAMPLES 500 -p N_REPORT 16 -p N_FIG5 4 -p N_FIG5_NATIVE 0 -p N_GRID 16 -p N_PROG 4 -p N_PER_CLASS 10
PAPERMILL := DDPM_PROGRESS=0 timeout 2400 $(PY) -m papermill --cwd notebooks --no-progress-bar
# no progress bars in stored outputs (ddpm_lib.tqdm); a notebook may take 30 min, a cell 20
NBEXEC := DDPM_PROGRESS=0 timeout 1800 $(PY) -m nbconvert --to notebook --execute --inplace \
  --ExecutePreprocessor.timeout=1200 --ExecutePreprocessor.record_timing=False

.PHONY: figures test book env test-env cluster-tools browser-tools data train retrain notebooks \
  report bench clean lab figure5-native generation-seeds

figures: env data train notebooks report

env: $(STAMP) $(LAB_SETTINGS)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

# JupyterLab of this environment saves only when asked (no autosave: opening or running a notebook
# changes no file), through JupyterLab's own defaults mechanism, an overrides.d file of its
# application settings; a user's own settings still win.
$(LAB_SETTINGS): tools/jupyterlab-settings.json
	mkdir -p "$(dir $@)" && cp tools/jupyterlab-settings.json "$@"

# the test-only packages, with the main job's pins kept (-c)
test-env: $(TEST_STAMP)
$(TEST_STAMP): requirements-test.txt $(STAMP)
	$(PIP) -r requirements-test.txt -c requirements.txt
	touch $(TEST_STAMP)

# re-indexed whenever FRUITS360_DIR (or the zip it names) is not what data/index.csv was made
# from (data/source.txt records it; --if-changed compares), so `make figures` never runs on old data
data: env
	$(PY) -m ddpm_cli data --from "$(FRUITS360_DIR)" --if-changed

# every model the notebooks need, resumed where a run stopped, skipped when finished or committed
train: env data
	$(PY) -m ddpm_cli train-all

# every model from scratch, the committed ones too (into runs/, which the notebooks then prefer)
retrain: env data
	$(PY) -m ddpm_cli train-all --retrain

# Each notebook runs into notebooks/.NAME.tmp.ipynb and replaces NAME only when it finished, so an
# interrupted run (Ctrl-C, a timeout, an error) leaves every committed notebook whole.
notebooks: env data
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; tmp="$$(dirname $$nb)/.$$(basename $$nb .ipynb).tmp.ipynb"; cp "$$nb" "$$tmp" && \
	  { $(NBEXEC) "$$tmp" || { echo "== $$nb again (nbconvert can hang on widgets: jupyter/nbconvert#2029)"; \
	                          $(NBEXEC) "$$tmp"; }; } && mv "$$tmp" "$$nb" || { rm -f "$$tmp"; exit 1; }; \
	done
	$(PAPERMILL) $(NB04) notebooks/.04.tmp.ipynb $(NB04_PARAMS) && mv notebooks/.04.tmp.ipynb $(NB04) \
	  || { rm -f notebooks/.04.tmp.ipynb; exit 1; }
	$(PAPERMILL) $(NB05) notebooks/.05.tmp.ipynb $(NB05_PARAMS) && mv notebooks/.05.tmp.ipynb $(NB05) \
	  || { rm -f notebooks/.05.tmp.ipynb; exit 1; }
	$(PY) tools/normalize_notebooks.py notebooks/*.ipynb

# the committed results have one writer: these targets (and `make figures` through them) write
# figures/ and report/; any other run writes to runs/<profile>/figures (ddpm_lib.Config.fig_dir)
train notebooks report figure5-native generation-seeds: export DDPM_COMMIT_RESULTS = 1

report: env
	$(PY) -m ddpm_cli report

# Run once, not by `make figures` (which reads the tables it writes, figures/native/figure5_*.csv,
# and says so): Figure 5 at 100×100 with the native models, the report's two samplers and DDIM-50,
# 8 samples each: 16,400 network evaluations at 100×100 in fp32 (its time: figure5_run.csv).
figure5-native: env data
	$(PY) -m ddpm_cli figure5 --profile native --n 8

# the quick start: JupyterLab on the repository (ddpm_lib.py opens beside the notebooks), showing
# notebooks/; LAB_ARGS: more jupyter lab options (--no-browser, --port=…)
# Run once, not by `make figures` (which reads the tables it writes, figures/generation_seeds*.csv,
# and says so): the cause table (CAUSES, five of its rows 1000-step samplers, 64 samples a row)
# and the headline sets (the generation table's DDIM rows, 500 each; guidance at every w, 10 a
# class) on the held-out seeds 1–3. Resumable (its cells are cached in runs/cpu/seeds/); two runs
# side by side (each `OMP_NUM_THREADS=1`) share the cells. Its time: generation_seeds_run.csv.
generation-seeds: env data
	$(PY) -m ddpm_cli seeds

lab: env data
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

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

# Debian's Chromium for tests/test_browser.py (driven by the playwright package; Playwright's own
# browser download is never used). Root with apt-get (the lists cluster-tools updated, else
# updated here); elsewhere that test skips.
browser-tools:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium (apt-get) for the browser test"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null; }; } || echo "warning: could not install chromium: the browser test will skip"; \
	else echo "note: no /usr/bin/chromium, and no root apt-get to install it: the browser test will skip"; fi

# the smoke data, models and classifier come from the command line first (the library never
# trains or makes data: trained(), load_classifier and load_index name the command instead)
SMOKE_DATA := runs/smoke/data
test: test-env cluster-tools browser-tools
	test -f $(SMOKE_DATA)/index.csv || \
	  $(PY) -m ddpm_cli data --synthetic --synthetic-size 32 --out $(SMOKE_DATA)
	DDPM_PROFILE=smoke $(PY) -m ddpm_cli train-all --profile smoke
	DDPM_PROFILE=smoke $(PY) -m ddpm_cli train-all --profile smoke-native
	test -f runs/smoke/classifier.pt || DDPM_PROFILE=smoke $(PY) -m ddpm_cli classifier --profile smoke
	test -f runs/smoke/figures/native/figure5_run.csv || \
	  DDPM_PROFILE=smoke $(PY) -m ddpm_cli figure5 --profile smoke-native --n 1
	test -f runs/smoke/figures/generation_seeds_run.csv || \
	  DDPM_PROFILE=smoke $(PY) -m ddpm_cli seeds --profile smoke --seeds 1 2
	DDPM_PROFILE=smoke $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with=$(CURDIR)/tests/nbval_sanitize.cfg --nbval-cell-timeout=600 -q

# static HTML of the committed notebooks and the report (nothing is run), with navigation
book: env
	$(PY) tools/build_book.py --out site

clean:
	rm -rf runs/smoke runs/smoke-native
