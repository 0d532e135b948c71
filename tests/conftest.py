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


@pytest.fixture(autouse=True)
def _one_thread():
    import torch
    torch.set_num_threads(1)
    yield


def real_subset() -> Path:
    """The real Fruits-360 subset (FRUITS360_DIR, else ../shared/fruits-360-subset)."""
    return Path(os.environ.get("FRUITS360_DIR", ROOT.parent / "shared" / "fruits-360-subset"))


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
