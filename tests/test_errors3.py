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
