"""Bad input, faults and interruption: each case gets a message that names the file or flag and
says what to do, a non-zero exit, and nothing already written is lost. One test per case."""
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

import ddpm_lib as dl
import ddpm_cli
import ddpm_io
import ddpm_train as dt

REPO = Path(__file__).resolve().parents[1]


def smoke_cfg(**kw) -> dl.Config:
    return dl.get_config("smoke", **kw)


def env() -> dict:
    return dict(os.environ, DDPM_PROFILE="smoke", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm_cli", *args], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kw)


def main_error(args, capsys) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, what it printed to stderr or as its exit message)."""
    with pytest.raises(SystemExit) as e:
        ddpm_cli.main(args)
    code = e.value.code
    msg = code if isinstance(code, str) else capsys.readouterr().err
    return (1 if isinstance(code, str) else code), msg


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished smoke run (2 epochs of fold 0)."""
    out = tmp_path_factory.mktemp("run") / "fold0"
    dt.train(smoke_cfg(), 0, out=out, progress=False)
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock"))
    return out


# -----------------------------------------------------------------------------------------------
# model files


class Payload:
    """Unpickling this calls os.system: what a planted checkpoint would do."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_pickle_payload_does_not_run(run, tmp_path):
    ck = torch.load(run / "best.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "best.pt"
    torch.save({**ck, "extra": Payload(marker)}, evil)
    with pytest.raises(ddpm_io.CheckpointError, match="holds more than tensors.*GLOBAL posix.system") as e:
        dl.load_model(smoke_cfg(), 0, evil)
    assert str(evil) in str(e.value)
    assert not marker.exists()
    # a plain pickle (not torch's zip format) is refused alike
    import pickle
    import warnings
    evil.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(ddpm_io.CheckpointError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dl.load_checkpoint(evil)
    assert not marker.exists()


def test_checkpoints_need_no_pickle(run):
    """What train() writes loads with weights_only=True, RNG states included."""
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(ck["rng"]) == {"torch", "numpy", "python"} and ck["fold"] == "0"
    state = dt.rng_state()
    import numpy as np
    a = np.random.rand(3)
    dt.set_rng_state(state)
    assert (np.random.rand(3) == a).all()


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", "truncated"])
def test_bad_checkpoint_on_resume(run, tmp_path, capsys, content):
    out = copy_run(run, tmp_path)
    ck = out / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:5000] if content == "truncated" else content)
    code, msg = main_error(["train", "--profile", "smoke", "--fold", "0", "--out", str(out),
                            "--resume", "--max-epochs", "3"], capsys)
    assert code == 1 and "not a readable checkpoint" in msg and str(ck) in msg


def test_corrupt_best_pt_on_load(run, tmp_path):
    out = copy_run(run, tmp_path)
    (out / "best.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ddpm_io.CheckpointError, match="not a readable checkpoint"):
        dl.load_model(smoke_cfg(), 0, out / "best.pt")


def test_full_disk_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    dl.save_checkpoint({"epoch": 1}, path)

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 0")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ddpm_io.CheckpointError, match="could not write .*is it full") as e:
        dl.save_checkpoint({"epoch": 2}, path)
    assert str(path) in str(e.value)
    assert dl.load_checkpoint(path)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


# -----------------------------------------------------------------------------------------------
# run folders


def test_run_folder_lock(tmp_path):
    out = tmp_path / "run"
    with dt.run_lock(out):
        with pytest.raises(dt.RunLocked, match=f"pid {os.getpid()}"):
            dt.train(smoke_cfg(), 0, out=out, progress=False)
    assert not (out / "checkpoint.pt").exists()
    dt.train(smoke_cfg(max_epochs=1), 0, out=out, progress=False)      # free again


def test_lock_of_a_killed_process_is_free(tmp_path):
    out = tmp_path / "run"
    code = (f"import ddpm_train as dt, time\nwith dt.run_lock({str(out)!r}):\n"
            f"    print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(dt.RunLocked, match=f"pid {p.pid}"):
        with dt.run_lock(out):
            pass
    p.kill()
    p.wait()
    with dt.run_lock(out):                 # the pid file is left, the lock is not
        assert (out / ".lock").read_text() == str(os.getpid())


def test_two_cli_trainings_on_one_folder(tmp_path):
    """The second process refuses, names the first, and exits non-zero; the first finishes."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "ddpm_cli", "train", "--profile", "smoke",
                              "--out", str(out), "--max-epochs", "40"], env=env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if (out / ".lock").exists() and (out / ".lock").read_text():
            break
        time.sleep(0.1)
    second = cli("train", "--profile", "smoke", "--out", str(out), "--resume")
    assert first.wait(timeout=300) == 0
    assert second.returncode != 0 and f"pid {first.pid}" in second.stderr


def test_resume_checks_the_fold(run, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    for fold in ("1", "all"):
        code, msg = main_error(["train", "--profile", "smoke", "--fold", fold, "--out", str(out),
                                "--resume"], capsys)
        assert code == 1 and "a run of fold 0" in msg and "--fold 0" in msg


def test_leftover_temporary_files_removed(run, tmp_path):
    out = copy_run(run, tmp_path)
    junk = out / ".checkpoint.pt.abc123.tmp"
    junk.write_bytes(b"x" * 1000)
    dt.train(smoke_cfg(), 0, resume=True, out=out, progress=False)
    assert not junk.exists() and (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_keeps_last_checkpoint_and_says_how_to_resume(tmp_path, sig):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "ddpm_cli", "train", "--profile", "smoke",
                          "--out", str(out), "--max-epochs", "400"], env=env(), cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        if (out / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "--resume" in err
    ck = dl.load_checkpoint(out / "checkpoint.pt")
    assert 1 <= ck["epoch"] < 400
    assert not list(out.glob(".*.tmp"))
    h = dt.train(smoke_cfg(max_epochs=ck["epoch"] + 1), 0, resume=True, out=out, progress=False)
    assert list(h.epoch) == list(range(1, ck["epoch"] + 2))


def ctrl_c(args: list[str], ready, tmp_path: Path, **env_over) -> tuple[float, int, str, str]:
    """Start `python -m ddpm_cli ARGS` (env() with env_over), wait until ready(stderr so far)
    says it is doing the work to stop, wait 2 s more and send SIGINT, as Ctrl-C does: (seconds
    from the signal to the exit, the exit code, stdout, stderr). Fails if it is not ready in
    120 s or still runs 60 s after the signal."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as o, open(err, "wb") as e:
        # SIGINT at its default in the child, as in a terminal's foreground process: a shell
        # without job control (CI, `nohup make test &`) starts background commands with SIGINT
        # ignored, and a Python started so never raises KeyboardInterrupt (seen in a clean-clone
        # run: `sample` ran on for 60 s and exited 0)
        p = subprocess.Popen([sys.executable, "-m", "ddpm_cli", *args], cwd=REPO, stdout=o,
                             stderr=e, env={**env(), **env_over}, stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        end = time.time() + 120
        while not ready(err.read_text(errors="replace")):
            assert p.poll() is None, f"exited ({p.returncode}) before it was ready:\n" \
                                     f"{err.read_text()}"
            assert time.time() < end, f"not ready in 120 s:\n{err.read_text()}"
            time.sleep(0.1)
        time.sleep(2)
        assert p.poll() is None, f"finished before the signal:\n{err.read_text()}"
        p.send_signal(signal.SIGINT)
        t0 = time.time()
        code = p.wait(timeout=60)
        return time.time() - t0, code, out.read_text(), err.read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def assert_stopped_cleanly(secs: float, code: int, err: str) -> str:
    """Within 10 s of the signal, exit 130, one `stopped: …` line last and no traceback;
    returns that line."""
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert secs < 10, f"{secs:.1f} s from SIGINT to exit:\n{err[-2000:]}"
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and last.startswith("stopped: "), err[-2000:]
    return last


def test_ctrl_c_stops_the_speed_measurement_at_once(tmp_path):
    """A new run on a profile that leaves precision to measuring (cpu; here on the smoke data,
    at a batch whose steps take seconds) stops within seconds of Ctrl-C in the measurement, and
    caches no half-measured choice. It used to finish every candidate (30 s on a 2-core Xeon),
    write the cache, load the data and take a step first."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    secs, code, stdout, err = ctrl_c(
        ["train", "--profile", "cpu", "--out", str(out), "--set", "data_dir=runs/smoke/data",
         "--set", "batch_size=256", "--max-epochs", "1"],
        lambda _: (out / ".lock").is_file() and (out / ".lock").read_text() != "", tmp_path,
        XDG_CACHE_HOME=str(cache), DDPM_PRECISION="", DDPM_MEMORY="")
    print(f"train's speed measurement: exit {secs:.1f} s after SIGINT")
    line = assert_stopped_cleanly(secs, code, err)
    assert "interrupted by SIGINT while fold 0's run was starting" in line and "--resume" in line
    assert "precision:" not in stdout                      # the signal came before the choice
    assert not cache.exists() or not list(cache.rglob("*"))        # nothing cached
    assert sorted(p.name for p in out.iterdir()) == [".lock"]      # nor a checkpoint


def test_ctrl_c_stops_sampling_and_writes_no_picture(tmp_path):
    """`sample` of 4096 smoke samples (about 40 s of sampling) stops within seconds of Ctrl-C
    and writes no picture, whole or partial."""
    out = tmp_path / "samples"
    secs, code, _, err = ctrl_c(["sample", "--profile", "smoke", "--n", "4096", "--out", str(out)],
                                lambda e: "sampling ddim" in e, tmp_path, DDPM_PROGRESS="1")
    print(f"sample: exit {secs:.1f} s after SIGINT")
    assert_stopped_cleanly(secs, code, err)
    assert not out.exists() or not list(out.iterdir())


def test_finished_run_without_best_pt(run, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    (out / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="continue that run with .*best weights are gone"):
        dl.load_model(smoke_cfg(), 0, out / "best.pt")
    code, msg = main_error(["train", "--profile", "smoke", "--fold", "0", "--out", str(out),
                            "--resume"], capsys)
    assert code == 1 and "best weights are gone" in msg and f"Delete {out}" in msg


def test_missing_committed_model_is_not_retrained(tmp_path, monkeypatch):
    monkeypatch.setattr(dt, "train", lambda *a, **k: pytest.fail("trained a shipped profile"))
    with pytest.raises(FileNotFoundError, match="git checkout -- data/checkpoints/runs/cpu/eps-grouped/all/"):
        dl.generation_model(dl.get_config("cpu", root=str(tmp_path)))


# -----------------------------------------------------------------------------------------------
# numbers on the command line


@pytest.mark.parametrize("args, words", [
    (["sample", "--eta", "nan"], "--eta: must be in [0, 1]"),
    (["sample", "--eta", "5"], "--eta: must be in [0, 1]"),
    (["sample", "--eta", "-1"], "--eta: must be in [0, 1]"),
    (["sample", "--steps", "0"], "--steps: must be ≥ 1"),
    (["sample", "--steps", "-5"], "--steps: must be ≥ 1"),
    (["sample", "--n", "0"], "--n: must be ≥ 1"),
    (["train", "--max-epochs", "0"], "--max-epochs: must be ≥ 1"),
    (["train", "--fold", "abc"], "--fold: expected 0, 1, 2, 3, 4 or 'all'"),
    (["train", "--fold", "7"], "--fold: expected 0, 1, 2, 3, 4 or 'all'"),
])
def test_bad_numbers_are_named(args, words, capsys):
    code, msg = main_error(args + ["--profile", "smoke"], capsys)
    assert code == 2 and words in msg


@pytest.mark.parametrize("args, words", [
    (["--steps", "5000"], "more than the schedule's T"),
    (["--method", "ddpm", "--steps", "7"], "--steps is a DDIM option"),
    (["--method", "report", "--eta", "0.5"], "--eta is a DDIM option"),
    (["--fruit", "Durian"], "is not a class of"),
])
def test_sampler_flags_that_do_not_apply(args, words, capsys):
    code, msg = main_error(["sample", "--profile", "smoke", *args], capsys)
    assert code == 1 and words in msg


# -----------------------------------------------------------------------------------------------
# data


def synthetic(root: Path, **kw) -> Path:
    return ddpm_cli.make_synthetic(root, **{"n_classes": 2, "frames": 20, "size": 32, **kw})


def test_failed_reindex_from_replaced_zip_keeps_old_images(tmp_path):
    src = synthetic(tmp_path / "src")
    z = tmp_path / "fruits.zip"
    shutil.make_archive(str(z.with_suffix("")), "zip", src)
    out = tmp_path / "data"
    ddpm_cli.prepare_data(src=z, out=out)
    before = (out / "index.csv").read_bytes()
    with zipfile.ZipFile(z, "w") as f:                           # replaced: no Test/ folder
        f.writestr("Training/Fake 0 1/0_100.jpg", (src / "Training/Fake 0 1/0_100.jpg").read_bytes())
    os.utime(z, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(dl.DataError, match="no Training/ and Test/"):
        ddpm_cli.prepare_data(src=z, out=out)
    assert (out / "index.csv").read_bytes() == before
    index = pd.read_csv(out / "index.csv")
    assert all((out / "fruits-360" / p).is_file() for p in index.path)
    assert not list(out.glob(".unzip-*"))


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/fruits.zip", "not-a-url"])
def test_unreachable_url(tmp_path, url):
    with pytest.raises(dl.DataError, match="cannot download .*--from"):
        ddpm_cli.prepare_data(url=url, out=tmp_path / "data")


def write_index(tmp_path: Path, text: str) -> dl.Config:
    d = tmp_path / "data"
    d.mkdir()
    (d / "index.csv").write_text(text)
    return smoke_cfg(data_dir=str(d))


def test_index_without_fold_column(tmp_path):
    good = dl.load_index(smoke_cfg())
    cfg = write_index(tmp_path, good.drop(columns="fold").to_csv(index=False))
    with pytest.raises(dl.DataError, match=r"lacks the column\(s\) \['fold'\].*rebuild"):
        dl.load_index(cfg)


def test_index_cut_mid_row(tmp_path):
    text = dl.load_index(smoke_cfg()).to_csv(index=False)
    cfg = write_index(tmp_path, text[:len(text) // 2])
    with pytest.raises(dl.DataError, match="middle of a row"):
        dl.load_index(cfg)
    # cut at a line end but mid-record (fields missing): refused too
    lines = text.splitlines()
    cut = "\n".join(lines[:-1] + [",".join(lines[-1].split(",")[:3])]) + "\n"
    (tmp_path / "data" / "index.csv").write_text(cut)
    with pytest.raises(dl.DataError, match="incomplete or malformed row"):
        dl.load_index(cfg)


def test_non_square_image_is_resized_with_a_warning(tmp_path, capsys):
    from PIL import Image
    src = synthetic(tmp_path / "src")
    odd = src / "Training" / "Fake 0 1" / "r_99_100.jpg"
    Image.new("RGB", (80, 64), (200, 10, 10)).save(odd)
    index = ddpm_cli.prepare_data(src=src, out=tmp_path / "data")
    out = capsys.readouterr().out
    assert "1 images are not square" in out and "r_99_100.jpg (80×64)" in out
    row = index[index.path.str.endswith("r_99_100.jpg")]
    assert len(row) == 1
    assert dl.read_image(src / row.path.iloc[0], 16).shape == (3, 16, 16)


def test_file_name_outside_the_scheme(tmp_path, capsys):
    src = synthetic(tmp_path / "src")
    shutil.copy(src / "Training" / "Fake 0 1" / "0_100.jpg", src / "Training" / "Fake 0 1" / "photo.jpg")
    with pytest.raises(dl.DataError, match="photo.jpg is not named like a Fruits-360 frame"):
        ddpm_cli.build_index(src)
    index, bad = ddpm_cli.build_index(src, skip_bad=True)
    assert bad == [str(src / "Training" / "Fake 0 1" / "photo.jpg")]
    assert not index.path.str.contains("photo").any()
