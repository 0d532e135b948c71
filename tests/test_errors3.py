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
    """The `python -m ddpm_cli …` commands a message suggests, as argument lists for main()."""
    found = [shlex.split(c) for c in re.findall(r"`([^`]+)`", msg)]
    return [c[3:] for c in found if c[:3] == ["python", "-m", "ddpm_cli"]]


@pytest.fixture
def home(tmp_path, monkeypatch) -> dl.Config:
    """A smoke config rooted in a fresh temporary folder, its synthetic data made there by the
    `data` command (the library never makes data); the CLI's configs rooted there too."""
    ddpm_cli.main(["data", "--synthetic", "--synthetic-size", "32",
                   "--out", str(tmp_path / "home" / "runs" / "smoke" / "data")])
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
    out, calls, real = tmp_path / "R", [0], dl.diffusion_loss

    def diverging(*a, **k):                                   # nan from epoch 2 (3 steps each)
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls[0] > 3 else loss
    monkeypatch.setattr(dl, "diffusion_loss", diverging)
    rc, msg = main_error(["train", "--profile", "smoke", "--fold", "0", "--out", str(out)], capsys)
    assert rc == 1 and "loss is nan" in msg
    (cmd,) = commands(msg)
    assert cmd[-3:] == ["--resume", "--set", "lr=2e-05"]
    monkeypatch.setattr(dl, "diffusion_loss", real)
    ddpm_cli.main(cmd)
    h = pd.read_csv(out / "history.csv")
    assert list(h.epoch) == [1, 2] and list(h.lr) == [2e-4, 2e-5]


def test_resume_without_set_lr_keeps_the_runs_learning_rate(home, tmp_path):
    """lr may change on resume only when asked: a run made with --set lr=1e-3 and resumed
    without --set keeps 1e-3 (not the profile's 2e-4)."""
    out = tmp_path / "R"
    ddpm_cli.main(["train", "--profile", "smoke", "--fold", "0", "--out", str(out),
                   "--max-epochs", "1", "--set", "lr=1e-3"])
    ddpm_cli.main(["train", "--profile", "smoke", "--fold", "0", "--out", str(out),
                   "--max-epochs", "2", "--resume"])
    assert list(pd.read_csv(out / "history.csv").lr) == [1e-3, 1e-3]


def test_resume_with_a_recipe_advises_the_recipe(home, tmp_path):
    cfg = dl.get_config("smoke", root=home.root, min_snr_gamma=5.0, max_epochs=3)
    cmd = dt.run_command(cfg, 0, tmp_path / "R")
    assert cmd == (f"python -m ddpm_cli train --profile smoke --fold 0 --set min_snr_gamma=5.0 "
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
        dl.get_config(p)
    for p in dl.GENERATION:
        dl.get_config(p, generation=True)


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
        cells = json.loads(nb.read_text())["cells"]           # and the next cell checks them all
        after = "".join(cells[cells.index(cell) + 1]["source"])
        call = re.search(r"dl\.check_params\(([^)]*)\)", after)
        assert call and set(re.findall(r"(\w+)=\1", call.group(1))) == set(names), nb.name


def test_sample_n_beyond_memory_says_how_much(monkeypatch, capsys):
    """--n 4096 used to take 5.5 GB without a word."""
    monkeypatch.setattr(ddpm_cli, "available_memory", lambda: 2 * 10**9)
    monkeypatch.setattr(ddpm_cli, "generation_model", lambda *a, **k: pytest.fail("allocated"))
    rc, msg = main_error(["sample", "--profile", "cpu", "--n", "4096"], capsys)
    assert rc == 1 and "--n 4096 at 32×32 would take about 5.6 GB of memory" in msg
    assert "2.0 GB is available: use --n 1166 or fewer" in msg
    assert commands(msg.replace("use --n 1166", "`python -m ddpm_cli sample --n 1166`")) == [
        ["sample", "--n", "1166"]]
    ddpm_cli.check_sample_memory(1166, 32)                     # the advice fits


# -----------------------------------------------------------------------------------------------
# 4. files that are not what they claim


def test_fifo_as_a_model_file_is_refused_before_it_is_opened(home, tmp_path):
    """Used to hang forever (open() of a FIFO waits for a writer)."""
    import signal
    fifo = tmp_path / "best.pt"
    os.mkfifo(fifo)

    def hung(*a):
        raise TimeoutError("opened the FIFO and waited")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(ddpm_io.CheckpointError, match=f"{fifo} is a FIFO .named pipe., not a "
                                                          f"model file: it was not opened"):
            dl.load_model(home, 0, fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_device_as_a_model_file(home):
    with pytest.raises(ddpm_io.CheckpointError, match="/dev/null is a device, not a model file"):
        dl.load_model(home, 0, "/dev/null")


def test_folder_as_a_model_file(home, tmp_path):
    with pytest.raises(ddpm_io.CheckpointError, match=f"{tmp_path} is a folder, not a model"):
        ddpm_io.load_checkpoint(tmp_path)


def test_zip_bomb_is_refused_before_it_is_unpacked(tmp_path, monkeypatch):
    """A 2 MB zip-bomb model file used to reach 2.7 GB of memory before it was refused."""
    bomb = tmp_path / "best.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * 50_000_000)
        z.writestr("archive/version", b"3\n")
    assert bomb.stat().st_size < 1_000_000
    monkeypatch.setattr(ddpm_io.torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    with pytest.raises(ddpm_io.CheckpointError, match=r"is not a model file of this project "
                                                      r"\(its entries would unpack to 50.0 MB"):
        ddpm_io.load_checkpoint(bomb)


def test_oversized_model_file_is_refused_unread(tmp_path, monkeypatch):
    big = tmp_path / "best.pt"
    with open(big, "wb") as f:                           # sparse: no disk used
        f.truncate(3 * 1024**3)
    monkeypatch.setattr(ddpm_io.torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    with pytest.raises(ddpm_io.CheckpointError, match=r"3.2 GB, more than any model file"):
        ddpm_io.load_checkpoint(big)


def test_random_bytes_as_a_model_file(tmp_path):
    """19 of 300 random files used to end in "unexpected IndexError"."""
    rng = random.Random(45)
    for i in range(300):
        path = tmp_path / f"random{i}.pt"
        head = b"PK\x03\x04" if i % 3 == 0 else b""              # a third look like a zip
        path.write_bytes(head + rng.randbytes(rng.randint(0, 4096)))
        with pytest.raises(ddpm_io.CheckpointError, match=f"{path} is not a model file of this "
                                                          f"project"):
            ddpm_io.load_checkpoint(path)


def test_random_bytes_as_the_sample_model(home, capsys):
    gcfg = dl.generation_config(home)
    path = gcfg.run_dir("all") / "best.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(random.Random(0).randbytes(2000))
    rc, msg = main_error(["sample", "--profile", "smoke", "--n", "4"], capsys)
    assert rc == 1 and len(msg.splitlines()) == 1 and "is not a model file of this project" in msg


def test_data_out_is_taken_from_the_working_directory(tmp_path, monkeypatch, capsys):
    """`cd /tmp && data --synthetic --out reldata` used to write <repo>/reldata."""
    repo = tmp_path / "repo"
    monkeypatch.setattr(ddpm_cli, "ROOT", repo)
    monkeypatch.chdir(tmp_path)
    ddpm_cli.main(["data", "--synthetic", "--out", "reldata"])
    assert (tmp_path / "reldata" / "index.csv").exists() and not repo.exists()
    assert f"→ {tmp_path / 'reldata' / 'index.csv'}" in capsys.readouterr().out


def test_data_if_changed_reindexes_when_the_source_changes(tmp_path, capsys):
    a = ddpm_cli.make_synthetic(tmp_path / "a", n_classes=2, frames=20, size=32)
    b = ddpm_cli.make_synthetic(tmp_path / "b", n_classes=3, frames=20, size=32)
    out = tmp_path / "data"
    run = ["data", "--if-changed", "--out", str(out), "--from"]
    ddpm_cli.main([*run, str(a)])
    ddpm_cli.main([*run, str(a)])
    assert "is up to date: it was made from" in capsys.readouterr().out
    ddpm_cli.main([*run, str(b)])                        # FRUITS360_DIR changed
    assert "up to date" not in capsys.readouterr().out
    assert dl.read_index(out / "index.csv").label.nunique() == 3
    ddpm_cli.main([*run, str(b), "--classes", "Fake 0 1", "Fake 1 1"])     # other classes
    assert dl.read_index(out / "index.csv").label.nunique() == 2


def test_make_data_runs_when_fruits360_dir_changes(tmp_path):
    """`FRUITS360_DIR=/other make data` used to print "Nothing to be done" once data/index.csv
    existed, and `make figures` ran on the old data."""
    if not shutil.which("make"):
        pytest.skip("no make")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    venv = tmp_path / "venv"
    lab = "venv/share/jupyter/lab/settings/overrides.d/ddpm-fruits.json"
    for p in ("requirements.txt", "pyproject.toml", "data/index.csv", "venv/.ddpm-installed",
              "tools/jupyterlab-settings.json", lab):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("")
    for p in ("venv/.ddpm-installed", lab):                    # the environment is installed
        os.utime(tmp_path / p, (2e9, 2e9))
    r = subprocess.run(["make", "-n", "data", "FRUITS360_DIR=/other", f"VIRTUAL_ENV={venv}"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f'{venv}/bin/python -m ddpm_cli data --from "/other" --if-changed' in r.stdout


def test_transparent_png_goes_on_white_and_is_named(tmp_path, capsys):
    """A transparent PNG used to get a black background without a word."""
    from PIL import Image
    src = ddpm_cli.make_synthetic(tmp_path / "src", n_classes=2, frames=20, size=32)
    jpg = src / "Training" / "Fake 0 1" / "r_5_100.jpg"
    png = jpg.with_suffix(".png")
    img = torch.zeros(4, 32, 32, dtype=torch.uint8)
    img[0, :, :16] = 200                                      # left half red, opaque
    img[3, :, :16] = 255                                      # right half fully transparent
    jpg.unlink()
    Image.fromarray(img.permute(1, 2, 0).numpy(), "RGBA").save(png)
    ddpm_cli.prepare_data(src=src, out=tmp_path / "d")
    assert f"1 images have transparent pixels (first: {png})" in capsys.readouterr().out
    x = dl._decode(png)
    assert (x[:, :, 16:] == 255).all() and (x[0, :, :16] == 200).all()


def test_folder_named_like_an_image_is_skipped(tmp_path, capsys):
    """A folder named 912_100.jpg used to give a torch dispatcher message."""
    src = ddpm_cli.make_synthetic(tmp_path / "src", n_classes=2, frames=20, size=32)
    folder = src / "Training" / "Fake 0 1" / "912_100.jpg"
    folder.mkdir()
    index = ddpm_cli.prepare_data(src=src, out=tmp_path / "d")
    assert "skipped 1 files" in (out := capsys.readouterr().out) and f"{folder} (a folder)" in out
    assert not index.path.str.contains("912_100").any()


def test_empty_class_folder_without_classes(tmp_path, capsys):
    """Used to say "remove the class from --classes" when no --classes was given."""
    src = ddpm_cli.make_synthetic(tmp_path / "src", n_classes=2, frames=20, size=32)
    empty = src / "Training" / "Empty 1"
    empty.mkdir()
    rc, msg = main_error(["data", "--from", str(src), "--out", str(tmp_path / "d")], capsys)
    assert rc == 1 and f"class folder {empty} is missing or has no images" in msg
    assert "--classes" not in msg.split("or index the other classes only")[0]
    assert f"remove the empty folder {empty}" in msg
    shutil.rmtree(empty)                                      # the advice, followed
    ddpm_cli.main(["data", "--from", str(src), "--out", str(tmp_path / "d")])


def test_empty_class_folder_with_classes(tmp_path, capsys):
    src = ddpm_cli.make_synthetic(tmp_path / "src", n_classes=2, frames=20, size=32)
    (src / "Test" / "Fake 1 1").rename(tmp_path / "moved")
    (src / "Test" / "Fake 1 1").mkdir()
    rc, msg = main_error(["data", "--from", str(src), "--out", str(tmp_path / "d"),
                          "--classes", "Fake 0 1", "Fake 1 1"], capsys)
    assert rc == 1 and "remove the class from --classes" in msg


def test_report_error_table_names_each_case():
    text = (ROOT / "report" / "template.md").read_text()
    table = text[text.index("**When something goes wrong.**"):text.index("## Appendix")]
    for case in ("--resume --set lr=", "`--resume` after `data` re-indexed", "`--set image_size=7`",
                 "`T=0`", "`batch_size=0`", "`lr=1e10`", "ddpm_lib.check_params",
                 "`--fold all --target scaled_eps`", "`sample --n` beyond", "a FIFO, device",
                 "random bytes", "a zip bomb", "`FRUITS360_DIR` changed", "`data --out reldata`",
                 "a transparent PNG", "`912_100.jpg`", "an empty class folder"):
        assert case in table, case
