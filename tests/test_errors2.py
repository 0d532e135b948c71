"""Honest errors, part two (issue 36): no traceback, no silent wrong picture, no mismatched pair of
files. One test per case; each names what used to happen."""
import dataclasses
import errno
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

import ddpm_lib as dl
import ddpm_cli
import ddpm_io
import ddpm_train as dt

def main_error(args, capsys) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, its message: the exit text or stderr)."""
    with pytest.raises(SystemExit) as e:
        ddpm_cli.main(args)
    code = e.value.code
    return (1, code) if isinstance(code, str) else (code, capsys.readouterr().err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dl.Config:
    """A smoke config rooted in a temporary folder, with its synthetic data (the `data`
    command) and fold 0 trained (2 epochs)."""
    cfg = dl.get_config("smoke", root=str(tmp_path_factory.mktemp("home")))
    ddpm_cli.main(["data", "--synthetic", "--synthetic-size", "32",
                   "--out", str(cfg.home / cfg.data_dir)])
    dt.train(cfg, 0, progress=False)
    return cfg


@pytest.fixture
def home(trained, monkeypatch) -> dl.Config:
    """The CLI's configs rooted where `trained` is."""
    real = dl.get_config
    monkeypatch.setattr(ddpm_cli, "get_config", lambda *a, **k: real(*a, root=trained.root, **k))
    return trained


@pytest.fixture
def no_model(monkeypatch):
    """`sample` must stop before it loads (or trains) a generation model."""
    def refuse(*a, **k):
        raise AssertionError("reached the model")
    monkeypatch.setattr(ddpm_cli, "generation_model", refuse)


def best(cfg: dl.Config) -> dict:
    return dl.load_checkpoint(cfg.run_dir(0) / "best.pt")


def planted(tmp_path: Path, ck) -> Path:
    path = tmp_path / "best.pt"
    torch.save(ck, path)
    return path


# -----------------------------------------------------------------------------------------------
# 1. errors outside ValueError: a message naming the file and what to do, never a traceback


def oserror(code: int, path: Path):
    def fail(*a, **k):
        raise OSError(code, os.strerror(code), str(path))
    return fail


@pytest.mark.parametrize("code, words", [(errno.EROFS, "The file system is read-only: choose"),
                                         (errno.EACCES, "Choose a folder you may write to"),
                                         (errno.ENOSPC, "The disk is full (or your quota")])
def test_data_out_not_writable(tmp_path, monkeypatch, capsys, code, words):
    monkeypatch.setattr(ddpm_cli, "make_synthetic", oserror(code, tmp_path / "d" / "x.jpg"))
    rc, msg = main_error(["data", "--synthetic", "--out", str(tmp_path / "d")], capsys)
    assert rc == 1 and f"{tmp_path / 'd' / 'x.jpg'}:" in msg and words in msg
    assert "Traceback" not in msg


def test_data_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, msg = main_error(["data", "--synthetic", "--out", str(tmp_path / "f" / "d")], capsys)
    assert rc == 1 and str(tmp_path / "f") in msg and "A file stands where a folder" in msg


def test_train_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, msg = main_error(["train", "--profile", "smoke", "--out", str(tmp_path / "f")], capsys)
    assert rc == 1 and str(tmp_path / "f") in msg and "A file stands where a folder" in msg


def test_export_into_an_unwritable_folder_keeps_the_run(home, tmp_path, capsys):
    blocker = Path(home.root) / "data" / "checkpoints"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the exports' folder goes")
    before = (home.run_dir(0) / "best.pt").read_bytes()
    try:
        rc, msg = main_error(["export", "--profile", "smoke", "--fold", "0"], capsys)
    finally:
        blocker.unlink()
    assert rc == 1 and str(blocker) in msg and "Traceback" not in msg
    assert (home.run_dir(0) / "best.pt").read_bytes() == before


def test_zip_that_does_not_fit_on_the_disk(tmp_path, monkeypatch, capsys):
    src = ddpm_cli.make_synthetic(tmp_path / "src", n_classes=2, frames=20, size=32)
    z = Path(shutil.make_archive(str(tmp_path / "fruits"), "zip", src))
    monkeypatch.setattr(zipfile.ZipFile, "extractall", oserror(errno.ENOSPC, tmp_path / "d"))
    rc, msg = main_error(["data", "--from", str(z), "--out", str(tmp_path / "d")], capsys)
    assert rc == 1 and "The disk is full" in msg and not list((tmp_path / "d").glob(".unzip-*"))


@pytest.mark.parametrize("edit", ["shape", "missing", "extra", "tensor"])
def test_model_file_that_does_not_fit(trained, tmp_path, edit):
    ck = best(trained)
    name = next(iter(ck["ema"]))
    if edit == "shape":
        ck["ema"][name] = torch.zeros(3, 1)
    elif edit == "missing":
        del ck["ema"][name]
    elif edit == "extra":
        ck["ema"]["extra.weight"] = torch.zeros(1)
    else:
        ck["ema"] = torch.zeros(3)
    path = planted(tmp_path, ck)
    with pytest.raises(ddpm_io.CheckpointError, match=f"{path} does not fit this model .*train again"):
        dl.load_model(trained, 0, path)


@pytest.mark.parametrize("content, lacks", [("bare", "config, ema"), ("list", "config, ema"),
                                            ("no-ema", "ema")])
def test_model_file_that_lacks_keys(trained, tmp_path, content, lacks):
    ck = best(trained)
    ck = {"bare": ck["ema"], "list": [ck["ema"]], "no-ema": {"config": ck["config"]}}[content]
    path = planted(tmp_path, ck)
    with pytest.raises(ddpm_io.CheckpointError, match=f"{path} lacks {lacks}: it is not a file"):
        dl.load_model(trained, 0, path)


@pytest.mark.parametrize("which", ["export", "best"])
def test_resume_from_a_file_that_is_not_a_training_checkpoint(trained, tmp_path, capsys, which):
    out = tmp_path / "run"
    out.mkdir()
    if which == "export":                          # an fp16 export renamed checkpoint.pt
        dt.export_ema(trained, 0, out / "checkpoint.pt")
    else:
        shutil.copy(trained.run_dir(0) / "best.pt", out / "checkpoint.pt")
    rc, msg = main_error(["train", "--profile", "smoke", "--resume", "--out", str(out)], capsys)
    assert rc == 1 and f"{out / 'checkpoint.pt'} lacks model, optimizer" in msg


def test_resume_with_a_misshapen_optimizer_state(trained, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ck = dl.load_checkpoint(trained.run_dir(0) / "checkpoint.pt")
    ck["optimizer"]["param_groups"] = []
    torch.save(ck, out / "checkpoint.pt")
    rc, msg = main_error(["train", "--profile", "smoke", "--resume", "--out", str(out)], capsys)
    assert rc == 1 and f"{out / 'checkpoint.pt'} does not fit this model" in msg


@pytest.mark.parametrize("entry", ["fast", {"img_s": [1, 2]}, {"img_s": {"fp32/nchw": "fast"}}])
def test_malformed_speed_cache_entry(tmp_path, monkeypatch, entry):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("DDPM_PRECISION")
    monkeypatch.setattr(dt, "_SPEED_MEMO", {})
    monkeypatch.setattr(dt, "bf16_fast", lambda d: False)
    cfg, path = dl.get_config("smoke", bf16=None), dt.speed_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({dt.speed_key(cfg): entry}))
    with pytest.warns(UserWarning, match=f"{path}: the entry for this machine is malformed"):
        c = dt.speed_choice(cfg, torch.device("cpu"), timer=lambda *a, **k: 50.0)
    assert c["img_s"] == {"fp32/nchw": 50.0}
    assert json.loads(path.read_text())[dt.speed_key(cfg)]["img_s"]["fp32/nchw"] == 50.0


def boom(a):
    raise ZeroDivisionError("a bug")


def test_unexpected_error_is_one_line_and_a_file(monkeypatch, capsys):
    monkeypatch.setitem(ddpm_cli.COMMANDS, "report", boom)
    monkeypatch.delenv("DDPM_DEBUG", raising=False)
    rc, msg = main_error(["report", "--profile", "smoke"], capsys)
    assert rc == 1 and len(msg.splitlines()) == 1 and "unexpected ZeroDivisionError: a bug" in msg
    path = Path(msg.split("the full traceback is in ")[1].split(" ")[0])
    assert "Traceback" in path.read_text() and "ZeroDivisionError" in path.read_text()
    path.unlink()


def test_unexpected_error_without_a_temp_folder(monkeypatch, capsys):
    monkeypatch.setitem(ddpm_cli.COMMANDS, "report", boom)
    monkeypatch.delenv("DDPM_DEBUG", raising=False)
    monkeypatch.setattr(ddpm_cli.tempfile, "mkstemp", oserror(errno.EROFS, Path("/tmp/x")))
    rc, msg = main_error(["report", "--profile", "smoke"], capsys)
    assert rc == 1 and "rerun with DDPM_DEBUG=1 to see the full traceback" in msg


def test_unexpected_error_with_ddpm_debug_raises(monkeypatch):
    monkeypatch.setitem(ddpm_cli.COMMANDS, "report", boom)
    monkeypatch.setenv("DDPM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        ddpm_cli.main(["report", "--profile", "smoke"])


# -----------------------------------------------------------------------------------------------
# 2. no silent wrong picture


@pytest.mark.parametrize("args, words", [
    (["--fruit", "Fake 0 1", "--w", "nan"], "--w: must be in [-20, 20]"),
    (["--fruit", "Fake 0 1", "--w", "inf"], "--w: must be in [-20, 20]"),
    (["--fruit", "Fake 0 1", "--w", "1e9"], "--w: must be in [-20, 20]"),
    (["--fruit", "Fake 0 1", "--w=-1e9"], "--w: must be in [-20, 20]"),
    (["--fruit", "Fake 0 1", "--w", "abc"], "--w: expected a number in [-20, 20]"),
    (["--eta", "inf"], "--eta: must be in [0, 1]"),
    (["--n", "100000"], "--n: must be ≤ 4,096 (one grid picture"),
    (["--n", "4097"], "--n: must be ≤ 4,096"),
    (["--seed", "1e23"], "--seed: expected a whole number, not '1e23'"),
    (["--seed", str(10**23)], "--seed: must be ≤ 9,223,372,036,854,775,807"),
    (["--seed", "-1"], "--seed: must be ≥ 0"),
])
def test_sample_flags_out_of_range(no_model, capsys, args, words):
    rc, msg = main_error(["sample", "--profile", "smoke", *args], capsys)
    assert rc == 2 and words in msg


def test_data_seed_out_of_range(capsys):
    rc, msg = main_error(["data", "--synthetic", "--seed", "1e23"], capsys)
    assert rc == 2 and "--seed: expected a whole number" in msg


def test_w_without_fruit(no_model, capsys):
    rc, msg = main_error(["sample", "--profile", "smoke", "--w", "2"], capsys)
    assert rc == 1 and "--w is the guidance weight of --fruit" in msg


def plant_conditional(cfg: dl.Config, n_classes: int, classes=None) -> Path:
    """A conditional generation model file of n_classes (named classes) where `sample` looks."""
    gcfg = dl.generation_config(cfg, conditional=True)
    saved = dataclasses.replace(gcfg, n_classes=n_classes)
    path = gcfg.run_dir("all") / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    ck = {"config": dataclasses.asdict(saved), "ema": dl.build_model(saved, verbose=False)
          .state_dict(), **({"classes": classes} if classes else {})}
    torch.save(ck, path)
    return path


def test_fruit_with_another_class_count(home, capsys):
    classes = sorted(dl.load_index(home).label.unique())
    path = plant_conditional(home, len(classes) + 1)
    try:
        rc, msg = main_error(["sample", "--profile", "smoke", "--fruit", classes[0]], capsys)
    finally:
        path.unlink()
    assert rc == 1 and f"{path} was trained on {len(classes) + 1} classes" in msg
    assert "--fruit would draw another fruit" in msg and "--resume" not in msg


def test_fruit_with_renamed_classes(home, capsys):
    classes = sorted(dl.load_index(home).label.unique())
    path = plant_conditional(home, len(classes), ["Kiwi"] + classes[1:])
    try:
        rc, msg = main_error(["sample", "--profile", "smoke", "--fruit", classes[0]], capsys)
    finally:
        path.unlink()
    assert rc == 1 and f"{path} was trained on {len(classes)} classes (Kiwi" in msg


def test_non_finite_weights_in_a_model_file(trained, tmp_path):
    ck = best(trained)
    name = next(k for k, v in ck["ema"].items() if v.is_floating_point())
    ck["ema"][name] = ck["ema"][name] * float("nan")
    path = planted(tmp_path, ck)
    with pytest.raises(ddpm_io.CheckpointError, match=f"{path} holds non-finite weights .*{name}"):
        dl.load_model(trained, 0, path)


def fake_sampler(monkeypatch, value=None):
    """generation_model and sample stubbed: a picture in a second, nan where value is nan."""
    monkeypatch.setattr(ddpm_cli, "generation_model", lambda *a, **k: None)

    def fake(model, fp, method, n, size, seed, **kw):
        x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return (x if value is None else torch.full_like(x, value)), None
    monkeypatch.setattr(ddpm_cli, "sample", fake)


def test_sample_output_with_nan_is_not_written(tmp_path, monkeypatch, capsys):
    fake_sampler(monkeypatch, float("nan"))
    rc, msg = main_error(["sample", "--profile", "smoke", "--out", str(tmp_path)], capsys)
    assert rc == 1 and "the samples hold nan or inf: nothing was written" in msg
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------------------------
# 3. pairs of files that must match


def test_export_failing_keeps_the_old_pair(trained, monkeypatch):
    path = dt.export_ema(trained, 0)
    old = (path.read_bytes(), (path.parent / "history.csv").read_bytes())
    assert len(dl.load_checkpoint(path)["history"]) == len(pd.read_csv(path.parent / "history.csv"))
    run_history = trained.run_dir(0) / "history.csv"
    saved = run_history.read_bytes()
    h = pd.read_csv(run_history)
    pd.concat([h, h.tail(1)]).to_csv(run_history, index=False)     # a longer run, then disk full
    monkeypatch.setattr(dt, "save_checkpoint", oserror(errno.ENOSPC, path))
    try:
        with pytest.raises(OSError):
            dt.export_ema(trained, 0)
    finally:
        run_history.write_bytes(saved)
    assert (path.read_bytes(), (path.parent / "history.csv").read_bytes()) == old
    assert not list(path.parent.glob(".*.tmp"))


def test_leftover_of_an_interrupted_export_is_removed(trained):
    folder = dl.committed_dir(trained, 0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".ema_fp16.pt.x1y2.tmp").write_bytes(b"half")
    dt.export_ema(trained, 0)
    assert not list(folder.glob(".*.tmp"))


def synthetic(root: Path) -> Path:
    return ddpm_cli.make_synthetic(root, n_classes=2, frames=20, size=32)


def test_kill_between_index_and_link(tmp_path, monkeypatch):
    out = tmp_path / "data"
    cfg = dl.get_config("smoke", data_dir=str(out))
    ddpm_cli.prepare_data(src=synthetic(tmp_path / "a"), out=out)
    real = ddpm_cli._switch_link

    def killed(link, root):
        raise KeyboardInterrupt
    monkeypatch.setattr(ddpm_cli, "_switch_link", killed)
    with pytest.raises(KeyboardInterrupt):
        ddpm_cli.prepare_data(src=synthetic(tmp_path / "b"), out=out)
    with pytest.raises(dl.DataError, match="stopped while switching index.csv and fruits-360"):
        dl.load_index(cfg)
    monkeypatch.setattr(ddpm_cli, "_switch_link", real)
    ddpm_cli.prepare_data(src=tmp_path / "b", out=out)
    assert (out / "fruits-360").resolve() == (tmp_path / "b").resolve()
    assert len(dl.load_index(cfg))


def test_full_disk_writing_the_index_keeps_the_old_pair(tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    ddpm_cli.prepare_data(src=synthetic(tmp_path / "a"), out=out)
    before, new = (out / "index.csv").read_bytes(), synthetic(tmp_path / "b")
    monkeypatch.setattr(pd.DataFrame, "to_csv", oserror(errno.ENOSPC, out / "index.csv"))
    rc, msg = main_error(["data", "--from", str(new), "--out", str(out)], capsys)
    monkeypatch.undo()
    assert rc == 1 and "The disk is full" in msg
    assert (out / "index.csv").read_bytes() == before
    assert (out / "fruits-360").resolve() == (tmp_path / "a").resolve()
    assert len(dl.load_index(dl.get_config("smoke", data_dir=str(out))))


# -----------------------------------------------------------------------------------------------
# 4. never a good output replaced by a worse one


def test_report_without_figures_keeps_the_report(tmp_path):
    out = tmp_path / "report.md"
    out.write_text("a good report\n")
    (tmp_path / "figures").mkdir()
    with pytest.raises(dl.DataError, match="holds none of the report's tables.*left as it is"):
        ddpm_cli.write_report(dl.get_config("smoke"), figs=tmp_path / "figures", out=out)
    assert out.read_text() == "a good report\n"


def test_sample_file_named_by_every_setting(tmp_path, monkeypatch, capsys):
    fake_sampler(monkeypatch)
    for n in ("4", "9"):
        ddpm_cli.main(["sample", "--profile", "smoke", "--n", n, "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"samples_smoke_ddim50_eta0_clip_n{n}_seed0.png" for n in (4, 9)]


def test_sample_out_is_a_file(tmp_path, monkeypatch, capsys):
    fake_sampler(monkeypatch)
    (tmp_path / "f").write_text("x")
    rc, msg = main_error(["sample", "--profile", "smoke", "--out", str(tmp_path / "f")], capsys)
    assert rc == 1 and str(tmp_path / "f") in msg and "A file stands where a folder" in msg


# -----------------------------------------------------------------------------------------------
# 5. messages that say what to do


def test_from_a_tar_gz(tmp_path, capsys):
    src = synthetic(tmp_path / "src")
    tgz = tmp_path / "fruits.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(src, arcname="fruits")
    rc, msg = main_error(["data", "--from", str(tgz), "--out", str(tmp_path / "d")], capsys)
    assert rc == 1 and "is not a folder or a .zip" in msg and "tar xf fruits.tar.gz" in msg


@pytest.mark.parametrize("name", ["missing.zip", "missing-folder"])
def test_from_a_missing_path(tmp_path, capsys, name):
    rc, msg = main_error(["data", "--from", str(tmp_path / name), "--out", str(tmp_path / "d")],
                         capsys)
    assert rc == 1 and f"{tmp_path / name} does not exist: check the path given to --from" in msg


def test_from_a_text_file(tmp_path, capsys):
    (tmp_path / "fruits.txt").write_text("apples")
    rc, msg = main_error(["data", "--from", str(tmp_path / "fruits.txt"),
                          "--out", str(tmp_path / "d")], capsys)
    assert rc == 1 and "fruits.txt is not a folder or a .zip" in msg and "tar xf" not in msg


def test_webp_is_listed_as_skipped(tmp_path, capsys):
    src = synthetic(tmp_path / "src")
    webp = src / "Training" / "Fake 0 1" / "r_5_100.webp"
    webp.write_bytes(b"RIFF")
    ddpm_cli.prepare_data(src=src, out=tmp_path / "d")
    out = capsys.readouterr().out
    assert "skipped 1 files" in out and str(webp) in out


def test_export_of_a_never_trained_fold(home, capsys):
    rc, msg = main_error(["export", "--profile", "smoke", "--fold", "3"], capsys)
    assert rc == 1 and "fold 3 of this profile has no trained weights" in msg
    assert "python -m ddpm_cli train --profile smoke --fold 3" in msg


def test_cpu_command_meets_a_smoke_checkpoint():
    saved = dataclasses.asdict(dl.get_config("smoke"))
    with pytest.raises(ValueError, match=r"^x.pt belongs to the smoke profile, not cpu: pass "
                                         r"--profile smoke"):
        dl.check_config(saved, dl.get_config("cpu"), Path("x.pt"))


@pytest.mark.parametrize("left", [".unzip-k2j3", ".synthetic-8fa1"])
def test_leftover_of_an_interrupted_unpack_is_removed(tmp_path, capsys, left):
    out = tmp_path / "d"
    (out / left / "Training").mkdir(parents=True)
    ddpm_cli.prepare_data(src=synthetic(tmp_path / "src"), out=out)
    assert not (out / left).exists() and f"removing {out / left}" in capsys.readouterr().out
