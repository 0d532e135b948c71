"""Honest errors, part three (issue 45): a run remembers what it was made from, advice that works
when run as printed, one range check per setting, and files that are not what they claim. One
test per case; each names what used to happen."""
import os
import random
import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

import ddpm_cli
import ddpm_io
import ddpm_lib as dl
import ddpm_train as dt

ROOT = Path(__file__).resolve().parents[1]


def main_error(args, capsys) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, its message: the exit text or stderr)."""
    with pytest.raises(SystemExit) as e:
        ddpm_cli.main(args)
    code = e.value.code
    return (1, code) if isinstance(code, str) else (code, capsys.readouterr().err)


def commands(msg: str) -> list[list[str]]:
    """The `python -m ddpm_lib …` commands a message suggests, as argument lists for main()."""
    found = [shlex.split(c) for c in re.findall(r"`([^`]+)`", msg)]
    return [c[3:] for c in found if c[:3] == ["python", "-m", "ddpm_lib"]]


@pytest.fixture
def home(tmp_path, monkeypatch) -> dl.Config:
    """A smoke config rooted in a fresh temporary folder; the CLI's configs rooted there too."""
    real = dl.get_config
    monkeypatch.setattr(ddpm_cli, "get_config",
                        lambda *a, **k: real(*a, **{"root": str(tmp_path / "home"), **k}))
    return real("smoke", root=str(tmp_path / "home"))


# -----------------------------------------------------------------------------------------------
# 1. a run remembers what it was made from (defect 1: a resume after a re-index went on silently,
#    with images moved between its training and validation sides)


def test_resume_after_a_reindex_is_refused_and_both_ways_out_work(home, tmp_path, capsys):
    out = tmp_path / "R"
    train = ["train", "--profile", "smoke", "--fold", "0", "--out", str(out)]
    ddpm_cli.main([*train, "--max-epochs", "1"])
    data = home.home / home.data_dir
    source = (data / "fruits-360").resolve()
    other = ddpm_cli.make_synthetic(tmp_path / "other", n_classes=4, frames=40, size=32)
    ddpm_cli.prepare_data(src=other, out=data)                # a 4th class: the folds move
    rc, msg = main_error([*train, "--resume", "--max-epochs", "2"], capsys)
    assert rc == 1 and f"{out / 'checkpoint.pt'} was trained on other data" in msg
    assert "classes added: Fake 3 1" in msg and "fold 0's images changed" in msg
    back, fresh = commands(msg)
    assert back == ["data", "--from", str(source), "--out", str(data)]
    ddpm_cli.main(fresh)                                      # a fresh run on the new data
    assert len(pd.read_csv(Path(fresh[fresh.index("--out") + 1]) / "history.csv")) == 2
    ddpm_cli.main(back)                                       # or the old data back, and resume
    ddpm_cli.main([*train, "--resume", "--max-epochs", "2"])
    assert len(pd.read_csv(out / "history.csv")) == 2


def test_checkpoint_records_its_data(home, tmp_path):
    dt.train(dl.get_config("smoke", root=home.root, max_epochs=1), 0, out=tmp_path / "R",
             progress=False)
    data = dl.load_checkpoint(tmp_path / "R" / "checkpoint.pt")["data"]
    assert data == dt.data_fingerprint(home, 0) and data["classes"] == ["Fake 0 1", "Fake 1 1",
                                                                        "Fake 2 1"]


# -----------------------------------------------------------------------------------------------
# 2. advice that works, run as printed (defect 2: "lower the learning rate … then rerun with
#    --resume", but --resume --set lr=… was refused)


def test_nan_advice_run_as_printed_continues_with_a_lower_lr(home, tmp_path, monkeypatch, capsys):
    out, calls, real = tmp_path / "R", [0], dt.diffusion_loss

    def diverging(*a, **k):                                   # nan from epoch 2 (3 steps each)
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls[0] > 3 else loss
    monkeypatch.setattr(dt, "diffusion_loss", diverging)
    rc, msg = main_error(["train", "--profile", "smoke", "--fold", "0", "--out", str(out)], capsys)
    assert rc == 1 and "loss is nan" in msg
    (cmd,) = commands(msg)
    assert cmd[-3:] == ["--resume", "--set", "lr=2e-05"]
    monkeypatch.setattr(dt, "diffusion_loss", real)
    ddpm_cli.main(cmd)
    h = pd.read_csv(out / "history.csv")
    assert list(h.epoch) == [1, 2] and list(h.lr) == [2e-4, 2e-5]


def test_resume_with_a_recipe_advises_the_recipe(home, tmp_path):
    cfg = dl.get_config("smoke", root=home.root, min_snr_gamma=5.0, max_epochs=3)
    cmd = dt.run_command(cfg, 0, tmp_path / "R")
    assert cmd == (f"python -m ddpm_lib train --profile smoke --fold 0 --set min_snr_gamma=5.0 "
                   f"--max-epochs 3 --out {tmp_path / 'R'}")


def test_fold_all_with_scaled_eps_gives_advice_that_applies(home, tmp_path, capsys):
    rc, msg = main_error(["train", "--profile", "smoke", "--fold", "all", "--target",
                          "scaled_eps"], capsys)
    assert rc == 1 and "use a profile such as cpu" not in msg
    (cmd,) = commands(msg)
    assert "--fold" in cmd and cmd[cmd.index("--fold") + 1] != "all"
    ddpm_cli.main([*cmd, "--out", str(tmp_path / "R")])                     # it trains
    assert (tmp_path / "R" / "best.pt").exists()


# -----------------------------------------------------------------------------------------------
# 3. one range check per setting, at the edge: Config, the command line, the notebooks


@pytest.mark.parametrize("setting, words", [
    ("image_size=7", "image_size = 7 is out of range: it must be a whole number in [8, 1,024]"),
    ("T=0", "T = 0 is out of range: it must be a whole number in [2, 100,000]"),
    ("batch_size=0", "batch_size = 0 is out of range: it must be a whole number in [1, 65,536]"),
    ("lr=1e10", "lr = 10000000000.0 is out of range: it must be a number in (0, 0.1]"),
    ("lr=nan", "lr = nan is out of range"),
    ("ema_decay=1.5", "ema_decay = 1.5 is out of range: it must be a number in [0, 1]"),
    ("schedule=cosin", "schedule = 'cosin' is out of range: it must be one of 'linear', 'cosine'"),
    ("seed=-1", "seed = -1 is out of range"),
])
def test_set_out_of_range(tmp_path, capsys, setting, words):
    """Used to end in "unexpected … please report it" (image_size, T), a raw torch.cat message
    (batch_size 0), or a message naming a checkpoint that does not exist (lr 1e10)."""
    rc, msg = main_error(["train", "--profile", "smoke", "--set", setting, "--out",
                          str(tmp_path / "R")], capsys)
    assert rc == 2 and words in msg.strip().splitlines()[-1]          # argparse's usage, one line
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize("over, words", [
    (dict(image_size=7), "image_size = 7 is out of range"),
    (dict(T=0), "T = 0 is out of range"),
    (dict(batch_size=0), "batch_size = 0 is out of range"),
    (dict(seed=1.5), "seed = 1.5 is out of range: it must be a whole number"),
    (dict(max_epochs=True), "max_epochs = True is out of range"),
    (dict(beta_1=0.03), "the noise schedule must rise, beta_1 < beta_T"),
    (dict(heads=3), "heads = 3 must divide the attention's 4 × width = 32 channels"),
])
def test_config_out_of_range(over, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        dl.get_config("smoke", **over)


def test_every_setting_has_a_rule_and_every_profile_passes():
    import dataclasses
    assert {f.name for f in dataclasses.fields(dl.Config)} == set(dl.SETTING_RULES)
    for p in dl.PROFILES:
        dl.get_config(p), dl.get_config(p, generation=True)


@pytest.mark.parametrize("params, words", [
    (dict(SEED=1.5), "SEED = 1.5 is out of range: it must be a whole number in [0, "),
    (dict(N_EVAL=-1), "N_EVAL = -1 is out of range: it must be a whole number ≥ 1"),
    (dict(N_EVAL=0), "N_EVAL = 0 is out of range"),                   # silently became 500
    (dict(N_SAMPLES="abc"), "N_SAMPLES = 'abc' is out of range"),
    (dict(IMAGE=99), "IMAGE = 99 is out of range: it must be a whole number in [0, 7]"),
    (dict(PROFILE="gpu"), "PROFILE = 'gpu' is out of range: it must be None (DDPM_PROFILE) or"),
])
def test_notebook_parameters_out_of_range(params, words):
    """Used to end in deep library tracebacks in cells 3–10 (N_EVAL 0 silently became 500)."""
    with pytest.raises(ValueError, match=re.escape(words)):
        dl.check_params(**{"PROFILE": None, "SEED": 0, **params})


def test_notebook_parameters_all_have_a_rule():
    import json
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cell = next(c for c in json.loads(nb.read_text())["cells"]
                    if "parameters" in c["metadata"].get("tags", []))
        names = re.findall(r"^([A-Z][A-Z0-9_]*) *=", "".join(cell["source"]), re.M)
        assert names and set(names) <= set(dl.PARAM_RULES), nb.name
        ns = {}
        exec("".join(cell["source"]), ns)                     # its defaults pass
        dl.check_params(**{k: ns[k] for k in names})


def test_sample_n_beyond_memory_says_how_much(monkeypatch, capsys):
    """--n 4096 used to take 5.5 GB without a word."""
    monkeypatch.setattr(ddpm_cli, "available_memory", lambda: 2 * 10**9)
    monkeypatch.setattr(ddpm_cli, "generation_model", lambda *a, **k: pytest.fail("allocated"))
    rc, msg = main_error(["sample", "--profile", "cpu", "--n", "4096"], capsys)
    assert rc == 1 and "--n 4096 at 32×32 would take about 5.6 GB of memory" in msg
    assert "2.0 GB is available: use --n 1166 or fewer" in msg
    assert commands(msg.replace("use --n 1166", "`python -m ddpm_lib sample --n 1166`")) == [
        ["sample", "--n", "1166"]]
    ddpm_cli.check_sample_memory(1166, 32)                     # the advice fits
