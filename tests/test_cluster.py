"""The real engines: a single-node SLURM cluster started here (munged, slurmctld, slurmd) runs the
smoke profile's runs as one job array, and torchrun runs one training on 2 processes (gloo).

The SLURM tests skip, saying why, when the daemons cannot be started (not root, Debian's
slurm-wlm/munge not installed: `make test` installs them where it can). Every daemon started is
stopped by its pid at the end."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import ddpm_lib as dl
import ddpm_cli as cli
import ddpm_train as dt

REPO = Path(__file__).resolve().parents[1]
# Max |Δweight| between 2 gloo processes and 1 process, same global batch and data order, after
# the smoke profile's 4 epochs × 3 steps (measured 1.8e-5: float sums in another order).
DDP_TOL = 1e-4


def env(**kw) -> dict:
    return dict(os.environ, DDPM_PROFILE="smoke", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **kw)


def weights(run: Path) -> dict:
    ck = dl.load_checkpoint(run / "checkpoint.pt")
    return {**{f"model.{k}": v for k, v in ck["model"].items()},
            **{f"ema.{k}": v for k, v in ck["ema"]["model"].items()}}


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def wait_for(cond, timeout: float, what: str, step: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(step)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


# -----------------------------------------------------------------------------------------------
# torchrun (DistributedDataParallel on the CPU, gloo)


def torchrun(out: Path, *args, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ddpm_cli", "train", "--profile", "smoke", "--fold", "0", "--out", str(out), *args]
    p = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    if wait:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err[-3000:]
    return p


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The smoke fold 0 for 4 epochs: one process, and 2 processes under torchrun."""
    base = tmp_path_factory.mktemp("ddp")
    one = base / "one"
    r = subprocess.run([sys.executable, "-m", "ddpm_cli", "train", "--profile", "smoke",
                        "--fold", "0", "--out", str(one), "--max-epochs", "4"], env=env(),
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun(base / "two", "--max-epochs", "4")
    return one, base / "two"


def test_ddp_matches_one_process(ddp_runs):
    one, two = ddp_runs
    d = max_diff(one, two)
    print(f"DDP (2 gloo processes) vs 1 process: max |Δw| = {d:.2e}")
    assert 0 <= d < DDP_TOL
    h1, h2 = (dl.load_checkpoint(r / "checkpoint.pt")["history"] for r in (one, two))
    assert [h["epoch"] for h in h2] == [1, 2, 3, 4] and h2[-1]["processes"] == 2
    for a, b in zip(h1, h2):                   # the global batch's loss, not one process's half
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 * a["train_loss"]
    assert not (two / "checkpoint.pt.rank1").exists()


def test_killed_ddp_run_resumes_to_the_same_weights(ddp_runs, tmp_path):
    """SIGTERM to torchrun mid-run, then torchrun --resume: the weights of the unbroken
    2-process run, exactly (gloo's sums are deterministic)."""
    _, two = ddp_runs
    out = tmp_path / "killed"
    p = torchrun(out, "--max-epochs", "4000", wait=False)
    wait_for(lambda: (out / "checkpoint.pt").exists(), 240, "the first DDP checkpoint")
    os.killpg(p.pid, signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode != 0 and "interrupted by SIGTERM" in err, err[-3000:]
    done = dl.load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert done < 4000
    if done >= 4:          # the signal came late: the unbroken run to compare with is shorter
        pytest.skip(f"the kill came after epoch {done}; rerun (the machine was slow)")
    torchrun(out, "--max-epochs", "4", "--resume")
    assert max_diff(out, two) == 0.0


def test_batch_must_divide_over_processes(tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=3", "-m", "ddpm_cli", "train", "--profile", "smoke",
                        "--out", str(tmp_path / "r")], env=env(), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "not divisible by the 3 processes" in p.stdout + p.stderr


# -----------------------------------------------------------------------------------------------
# SLURM


def _why_no_slurm() -> str | None:
    if os.geteuid() != 0:
        return "not root: munged must be started as the munge user"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
               if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"{missing} not installed (Debian: apt-get install slurm-wlm munge)"
    return None


def _conf(d: Path, host: str) -> str:
    keys = dict(ClusterName="ddpmtest", SlurmctldHost=host, SlurmUser="root", SlurmdUser="root",
                AuthType="auth/munge", AuthInfo=f"socket={d}/munge/munge.socket",
                StateSaveLocation=d / "state", SlurmdSpoolDir=d / "spool",
                SlurmctldLogFile=d / "slurmctld.log", SlurmdLogFile=d / "slurmd.log",
                SlurmctldPidFile=d / "slurmctld.pid", SlurmdPidFile=d / "slurmd.pid",
                SlurmctldPort=6917, SlurmdPort=6918,
                ProctrackType="proctrack/linuxproc", TaskPlugin="task/none",
                SchedulerType="sched/backfill", SelectType="select/cons_tres",
                SelectTypeParameters="CR_Core", ReturnToService=2, MpiDefault="none")
    cpus = os.cpu_count() or 2
    return "\n".join([f"{k}={v}" for k, v in keys.items()] + [
        f"NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


@pytest.fixture(scope="module")
def slurm():
    """A single-node cluster for this module: yields the environment that reaches it."""
    why = _why_no_slurm()
    if why:
        pytest.skip(f"SLURM tests skipped: {why}")
    d = Path(tempfile.mkdtemp(prefix="ddpm-slurm-", dir="/tmp"))
    d.chmod(0o755)
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir()
    shutil.chown(d / "munge", "munge", "munge")
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(_conf(d, host))
    e = env(SLURM_CONF=str(d / "slurm.conf"))
    pids = []
    try:
        sock = d / "munge" / "munge.socket"
        r = subprocess.run(["su", "-s", "/bin/sh", "munge", "-c",
                            f"/usr/sbin/munged --socket={sock} --pid-file={d}/munge/munged.pid "
                            f"--log-file={d}/munge/munged.log --seed-file={d}/munge/seed"],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"SLURM tests skipped: munged did not start: {r.stderr.strip()}")
        pids.append(d / "munge" / "munged.pid")
        for daemon in ("slurmctld", "slurmd"):
            r = subprocess.run([daemon], env=e, capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"SLURM tests skipped: {daemon} did not start: {r.stderr.strip()}")
            pids.append(d / f"{daemon}.pid")
        try:
            wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=e,
                                                      capture_output=True, text=True).stdout,
                     60, "the node to be idle", 1.0)
        except TimeoutError:
            log = (d / "slurmd.log").read_text()[-1500:] if (d / "slurmd.log").exists() else ""
            pytest.skip(f"SLURM tests skipped: the node never became idle. slurmd.log: {log}")
        yield e
    finally:
        for pid_file in reversed(pids):                          # by pid, never by name
            if pid_file.exists() and pid_file.read_text().strip():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except ProcessLookupError:
                    pass
        time.sleep(1)
        shutil.rmtree(d, ignore_errors=True)


def squeue(e: dict, job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], env=e, capture_output=True,
                          text=True).stdout


def test_array_matches_train_all(slurm, tmp_path, capsys):
    """`submit` runs every planned run of the smoke profile as one array; the runs end with the
    weights of the same runs made by `train-all` in one process (bit-identical on the CPU)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ddpm_cli", "train-all", "--profile", "smoke",
                        "--out", str(tmp_path / "local")], env=env(), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ddpm_cli", "submit", "--profile", "smoke",
                        "--cpus-per-task", "1", "--time", "10", "--out", str(tmp_path / "array"),
                        "--wait"], env=slurm, cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    t_array = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    with capsys.disabled():
        print(f"\n  smoke runs: train-all {t_local:.1f} s, SLURM array {t_array:.1f} s")
    runs = [dt.run_out(tmp_path, dl.get_config("smoke", fold == "all", **over), fold)
            for over, fold in dl.planned_runs()]
    assert len(runs) == len(dl.planned_runs()) == 9
    for run in runs:
        rel = run.relative_to(tmp_path)
        assert max_diff(tmp_path / "local" / rel, tmp_path / "array" / rel) == 0.0, rel


def test_killed_task_is_requeued_and_resumes(slurm, tmp_path):
    """SLURM's warning signal (here sent by scancel) makes a task stop with its checkpoint and ask
    to be requeued; resubmitted, it continues and ends as the unbroken run does."""
    base = tmp_path / "array"
    r = subprocess.run([sys.executable, "-m", "ddpm_cli", "submit", "--profile", "smoke",
                        "--cpus-per-task", "1", "--time", "10", "--out", str(base),
                        "--max-epochs", "100", "--tasks", "0"], env=slurm, cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[3]
    run0 = dt.run_out(base, dl.get_config("smoke"), 0)
    wait_for(lambda: (run0 / "checkpoint.pt").exists(), 300, "task 0's first checkpoint")
    subprocess.run(["scancel", "--signal=TERM", "--batch", f"{job}_0"], env=slurm, check=True)
    wait_for(lambda: "RUNNING" not in squeue(slurm, f"{job}_0"), 120, "task 0 to stop")
    first = dl.load_checkpoint(run0 / "checkpoint.pt")["epoch"]
    # The task requeues itself (its log says so), but a requeued job waits ~2 min for SLURM to
    # make it eligible, and here that did not always happen: resubmit it as a user would.
    subprocess.run(["scancel", job], env=slurm)
    wait_for(lambda: not squeue(slurm, job).strip(), 60, "the requeued task to be cancelled")
    r = subprocess.run([sys.executable, "-m", "ddpm_cli", "submit", "--profile", "smoke",
                        "--cpus-per-task", "1", "--time", "10", "--out", str(base),
                        "--max-epochs", "100", "--tasks", "0", "--wait"], env=slurm, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    log = _log(base, job)
    assert "interrupted by SIGTERM" in log and "requeued to continue" in log, log[-3000:]
    assert first < 100
    h = dl.load_checkpoint(run0 / "checkpoint.pt")["history"]
    assert [x["epoch"] for x in h] == list(range(1, 101))
    one = tmp_path / "one"
    dt.train(dl.get_config("smoke", max_epochs=100), 0, out=one, progress=False)
    assert max_diff(one, run0) == 0.0


def _log(base: Path, job: str) -> str:
    p = base / "slurm" / f"{job}_0.out"
    return p.read_text() if p.exists() else ""


def test_submit_without_sbatch(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        cli.main(["submit", "--profile", "smoke"])
    assert "sbatch not found" in str(e.value.code) and "train-all" in str(e.value.code)


def test_script_carries_the_settings():
    s = dt.slurm_script("smoke", dt.Slurm(partition="gpu", account="p123", time="07:30:00",
                                          cpus_per_task=8, gpus_per_task=4, mem="32G"))
    for line in ("--partition=gpu", "--account=p123", "--time=07:30:00", "--cpus-per-task=8",
                 "--gpus-per-task=4", "--mem=32G", "--signal=B:TERM@180", "--requeue",
                 f"--array=0-{len(dl.planned_runs()) - 1}"):
        assert f"#SBATCH {line}" in s
    assert "--nproc_per_node=4" in s and "\"${args[@]}\" --resume &" in s
    assert "#SBATCH --partition" not in dt.slurm_script("smoke", dt.Slurm())
