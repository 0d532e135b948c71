"""Shared test set-up. The notebooks' kernels are separate processes: they get the repository on
PYTHONPATH and the smoke profile through the environment (a sys.path insert would not reach
them), every test runs on one CPU thread so that seeded numbers are reproducible, and in fp32
NCHW (DDPM_PRECISION, DDPM_MEMORY)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ.setdefault("DDPM_PROFILE", "smoke")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    # precision and memory layout fixed (fp32, NCHW), so no test spends time measuring them
    # (ddpm_lib.speed_choice; tests/test_speed.py unsets these)
    os.environ["DDPM_PRECISION"], os.environ["DDPM_MEMORY"] = "fp32", "nchw"
    smoke_data()


def smoke_data() -> Path:
    """The smoke profiles' synthetic set (runs/smoke/data), made through the command line's
    `data` when missing, as `make test` does: the library never makes data (load_index)."""
    out = ROOT / "runs" / "smoke" / "data"
    if not (out / "index.csv").exists():
        import ddpm_cli
        ddpm_cli.main(["data", "--synthetic", "--synthetic-size", "32", "--out", str(out)])
    return out


@pytest.fixture(scope="session", autouse=True)
def smoke_models():
    """Every smoke and smoke-native run the notebooks use, the smoke classifier, and the run-once
    tables (smoke-native's Figure 5, smoke's held-out seeds), made through the command line where
    missing (train-all skips finished runs), as `make test` does before pytest: the library's
    trained(), load_classifier and read_result never train or compute."""
    import ddpm_cli
    import ddpm_lib as dl
    for profile in ("smoke", "smoke-native"):
        if not all(dl.weights(dl.get_config(profile, generation=k == "all", **o), k).exists()
                   for o, k in dl.planned_runs(profile)):
            ddpm_cli.main(["train-all", "--profile", profile])
    if not dl.classifier_path(dl.get_config("smoke")).exists():
        ddpm_cli.main(["classifier", "--profile", "smoke"])
    native = dl.get_config("smoke-native")
    if not (native.fig_dir() / f"{dl.FIG5_NATIVE_TABLES[-1]}.csv").exists():
        ddpm_cli.main(["figure5", "--profile", "smoke-native", "--n", "1"])
    if not (dl.get_config("smoke").fig_dir() / f"{dl.SEED_FILES[-1]}.csv").exists():
        ddpm_cli.main(["seeds", "--profile", "smoke", "--seeds", "1", "2"])
    yield


def real_subset() -> Path:
    """The real Fruits-360 subset (FRUITS360_DIR, else ../shared/fruits-360-subset), as an
    absolute path: the Makefile's default is relative, and links made to it must not be."""
    return Path(os.environ.get("FRUITS360_DIR", ROOT.parent / "shared" / "fruits-360-subset")).resolve()


CHROMIUM = "/usr/bin/chromium"        # Debian's (make browser-tools); Playwright's own is never used


def need_chromium() -> None:
    """Skip, saying why, where Debian's Chromium or the playwright package is missing."""
    import importlib.util
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM} (Debian's chromium: `make browser-tools` installs it as root)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright package is not installed (requirements-test.txt)")


def launch_chromium(pw):
    """Headless Chromium through playwright (pw: sync_playwright()'s context), as root can run it."""
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
