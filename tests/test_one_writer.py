"""Committed results have one writer (issue 44): only `make figures` (DDPM_COMMIT_RESULTS=1, which
its targets export) writes figures/; any other run writes to runs/<profile>/figures and says so;
`make notebooks` runs each notebook into a temporary and replaces it only on success."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

import ddpm_lib as dl

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile, scratch, committed", [
    ("cpu", "runs/cpu/figures", "figures"),
    ("native", "runs/native/figures", "figures/native"),
    ("smoke", "runs/smoke/figures", "runs/smoke/figures"),
    ("smoke-native", "runs/smoke/figures/native", "runs/smoke/figures/native")])
def test_tables_and_figures_go_to_scratch_unless_committing(tmp_path, monkeypatch, capsys,
                                                            profile, scratch, committed):
    import matplotlib.pyplot as plt
    cfg = dl.get_config(profile, root=str(tmp_path))
    df = pd.DataFrame({"a": [1.0]})
    monkeypatch.delenv("DDPM_COMMIT_RESULTS", raising=False)
    assert dl.save_table(df, "t", cfg) == tmp_path / scratch / "t.csv"
    assert dl.save_fig(plt.figure(), "f", cfg) == tmp_path / scratch / "f.png"
    said = capsys.readouterr().out
    if profile.startswith("smoke"):
        assert "scratch" not in said
    else:                                                  # said once, with the place
        assert said.count("scratch") == 1 and str(tmp_path / scratch) in said
        assert not (tmp_path / committed / "t.csv").exists()
    monkeypatch.setenv("DDPM_COMMIT_RESULTS", "1")
    assert dl.save_table(df, "t", cfg) == tmp_path / committed / "t.csv"
    assert dl.save_fig(plt.figure(), "f", cfg) == tmp_path / committed / "f.png"
    plt.close("all")


def _notebook_lines():
    out = subprocess.run(["make", "-n", "-o", "env", "-o", "data", "notebooks"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return out


def test_make_notebooks_executes_into_a_temporary_and_moves():
    out = _notebook_lines()
    for nb in sorted((REPO / "notebooks").glob("0*.ipynb")):
        name = f"notebooks/{nb.name}"
        runs = [ln for ln in out.splitlines() if ("papermill" in ln or "nbconvert" in ln)
                and (name in ln or "$nb" in ln or '"$tmp"' in ln)]
        assert runs, name
        for ln in runs:                                   # never executed in place
            assert not ln.rstrip(" \\").endswith(f"{name} {name}") and "--inplace \"$nb\"" not in ln
    assert 'mv "$tmp" "$nb"' in out
    assert "mv notebooks/.04.tmp.ipynb notebooks/04_ssim_evaluation.ipynb" in out
    assert "mv notebooks/.05.tmp.ipynb notebooks/05_generation.ipynb" in out


FAKE = r'''#!{py}
import os, signal, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:               # what each step saw
    f.write(os.environ.get("DDPM_COMMIT_RESULTS", "-") + "\n")
if not [a for a in args if a.endswith(".ipynb")]:
    sys.exit(0)                                            # normalize_notebooks, report, book
if args[0].endswith(".py"):
    sys.exit(0)
out = [a for a in args if a.endswith(".ipynb")][-1]        # nbconvert --inplace X / papermill IN OUT
mode = os.environ["FAKE_MODE"]
if mode == "kill" and "05" in os.path.basename(out):       # half a notebook written, then killed
    open(out, "w").write('{{"cells": [')
    os.kill(os.getpid(), signal.SIGKILL)
open(out, "w").write('{{"executed": true}}')
'''


@pytest.mark.parametrize("mode", ["kill", "ok"])
def test_a_killed_notebook_run_leaves_the_committed_notebook_whole(tmp_path, mode):
    """The Makefile's recipe on a copy, with a fake executor that writes half a notebook and is
    killed (SIGKILL) on notebook 05: every notebook is left as it was; without the kill each is
    replaced by its executed copy and no temporary is left."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks",
                    ignore=shutil.ignore_patterns(".*"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "notebooks").glob("*.ipynb")}
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE.format(py=sys.executable))
    fake.chmod(0o755)
    env = dict(os.environ, FAKE_MODE=mode, FAKE_LOG=str(tmp_path / "log"))
    env.pop("DDPM_COMMIT_RESULTS", None)
    r = subprocess.run(["make", "-o", "env", "-o", "data", "notebooks", f"PY={fake}"],
                       cwd=tmp_path, capture_output=True, text=True, env=env)
    after = {p.name: p.read_bytes() for p in (tmp_path / "notebooks").glob("*.ipynb")}
    assert not list((tmp_path / "notebooks").glob(".*.tmp.ipynb"))
    if mode == "kill":
        assert r.returncode != 0
        five = "05_generation.ipynb"
        assert after[five] == before[five]                 # whole, as committed
        assert after["04_ssim_evaluation.ipynb"] == b'{"executed": true}'   # done before: kept
    else:
        assert r.returncode == 0, r.stderr
        assert set(after) == set(before)
        assert all(v == b'{"executed": true}' for v in after.values())
    assert set((tmp_path / "log").read_text().split()) == {"1"}      # they write figures/


def test_only_the_makefile_writers_set_the_flag(tmp_path):
    """`make report` writes the committed report (the flag set); `make book` and `make test` are
    not writers of results (the flag not set)."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE.format(py=sys.executable))
    fake.chmod(0o755)
    env = dict(os.environ, FAKE_MODE="ok", FAKE_LOG=str(tmp_path / "log"))
    env.pop("DDPM_COMMIT_RESULTS", None)
    for target, seen in (("report", "1"), ("book", "-")):
        (tmp_path / "log").unlink(missing_ok=True)
        subprocess.run(["make", "-o", "env", target, f"PY={fake}"], cwd=tmp_path, env=env,
                       capture_output=True, check=True)
        assert (tmp_path / "log").read_text().split() == [seen], target


def test_report_refuses_smaller_n_than_the_committed_report(tmp_path):
    """The committed report at n = 500 is kept against tables at n = 16 or n/a (notebook 05 at
    its defaults once wrote "n/a× the FFD floor (n = n/a…)" into the Key results)."""
    import ddpm_cli
    template = (REPO / "report" / "template.md").read_text()
    committed = (REPO / "report" / "report.md").read_text()
    sizes = ddpm_cli._report_sizes(committed, template)
    assert int(sizes["n_ffd"]) >= 100 and "guidance_n_per_class" in sizes
    old = tmp_path / "report.md"
    old.write_text(committed)
    n, i = sizes["n_ffd"], template.find("${n_ffd}")
    pre = template[max(0, i - 24):i].split("}")[-1]            # the words before it, as found
    for small in ("16", "n/a"):
        with pytest.raises(dl.DataError, match="n_ffd"):
            ddpm_cli._keep_better(old, committed.replace(f"{pre}{n}", f"{pre}{small}"), tmp_path,
                                  template)
    with pytest.raises(dl.DataError, match="n/a×"):
        ddpm_cli._keep_better(old, committed + "\n1.2× and n/a× the floor", tmp_path, template)
    ddpm_cli._keep_better(old, committed, tmp_path, template)          # as large: written


def test_a_scratch_training_table_starts_from_the_committed_one(tmp_path, monkeypatch):
    """A run without the flag keeps the committed rows of the runs it has no history of."""
    monkeypatch.delenv("DDPM_COMMIT_RESULTS", raising=False)
    cfg = dl.get_config("cpu", root=str(tmp_path))
    old = pd.DataFrame([dict(run="eps-grouped/all", epochs=9, best_epoch=9, best_val_loss=0.01,
                             final_train_loss=0.01, early_stopped=False, minutes=5.0,
                             images_per_s=1.0)])
    dl.write_csv(old, cfg.committed_dir() / "training_summary.csv")
    s = dl.training_summary([(cfg, "all", None)], cfg)
    assert list(s.run) == ["eps-grouped/all"] and s.iloc[0].epochs == 9


NOTEBOOKS = sorted((REPO / "notebooks").glob("0*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_write_results_only_through_save_table_and_save_fig(nb):
    """So Config.fig_dir decides where every table and picture goes: no code cell writes a file
    itself or names figures/ as a place to write."""
    import json
    import re
    cells = [("".join(c["source"])) for c in json.loads(nb.read_text())["cells"]
             if c["cell_type"] == "code"]
    writes = re.compile(r"\.to_csv\(|\.savefig\(|\bopen\([^)]*['\"][wa]|write_text\(|"
                        r"write_csv\(|torch\.save\(|['\"]figures/")
    found = [ln.strip() for src in cells for ln in src.splitlines() if writes.search(ln)]
    assert not found, found
