"""Opening a notebook changes nothing (issue 44): `make env` installs an overrides.d file into the
environment's JupyterLab application settings that turns autosave off (JupyterLab's own defaults
mechanism). Checked against a real JupyterLab server (127.0.0.1, a token) through its settings
REST API: with the installed file autosave is off, without it on (so the check can fail). No
browser is needed; skips without jupyterlab."""
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_browser import free_port, installed_lab_settings as installed, stop

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "@jupyterlab/docmanager-extension:plugin"
TOKEN = "ddpm-settings-test"


def test_make_env_installs_autosave_off(tmp_path):
    settings = installed(tmp_path / "venv")
    files = list((settings / "overrides.d").glob("*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text()) == {PLUGIN: {"autosave": False}}
    assert not (settings / "overrides.json").exists()     # a user's own file is theirs


def lab_autosave(tmp_path: Path, app_settings: Path) -> bool:
    """The autosave setting a JupyterLab server with these application settings gives a browser:
    the (empty) user settings' value, else the schema's default, which overrides replace."""
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.skip("jupyterlab is not installed (requirements.txt)")
    home = tmp_path / f"home-{app_settings.name}"
    (home / "work").mkdir(parents=True)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    port = free_port()
    log_path = home / "lab.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
           f"--ServerApp.root_dir={home / 'work'}", "--ServerApp.allow_root=True",
           f"--LabApp.app_settings_dir={app_settings}", "--ServerApp.terminals_enabled=False",
           "--LabApp.extension_manager=readonly"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/lab/api/settings/{PLUGIN}?token={TOKEN}"
        end = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    got = json.load(r)              # the user's value, else the schema's default
                    return got["settings"].get("autosave",
                                               got["schema"]["properties"]["autosave"]["default"])
            except OSError:
                if time.time() > end:
                    pytest.fail(f"no settings from jupyter lab in 90 s:\n{log_path.read_text()}")
                time.sleep(0.5)
    finally:
        stop(proc)


def test_jupyterlab_with_the_installed_settings_does_not_autosave(tmp_path):
    settings = installed(tmp_path / "venv")
    empty = tmp_path / "no-settings"
    empty.mkdir()
    assert lab_autosave(tmp_path, empty) is True           # JupyterLab's default: the check bites
    assert lab_autosave(tmp_path, settings) is False


def test_make_lab_serves_the_repository_with_the_notebooks_shown(tmp_path):
    """`make lab` (the README's first command; its env and data steps left out) starts JupyterLab
    where ddpm_lib.py can be opened (JupyterLab in notebooks/ answered 404) and opens on
    notebooks/."""
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.skip("jupyterlab is not installed (requirements.txt)")
    home, port = tmp_path / "home", free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    args = (f"--no-browser --ip=127.0.0.1 --port={port} --ServerApp.port_retries=0 "
            f"--IdentityProvider.token={TOKEN} --ServerApp.allow_root=True "
            "--ServerApp.terminals_enabled=False --LabApp.extension_manager=readonly")
    log_path = tmp_path / "lab.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "-o", "env", "-o", "data", "lab",
                                 f"VIRTUAL_ENV={sys.prefix}", f"LAB_ARGS={args}"], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"make lab exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/contents/ddpm_lib.py?content=0&"
                                            f"token={TOKEN}", timeout=5) as r:
                    assert json.load(r)["path"] == "ddpm_lib.py"
                    break
            except OSError:
                if time.time() > end:
                    pytest.fail(f"no answer from make lab in 90 s:\n{log_path.read_text()}")
                time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/api/contents/notebooks?token={TOKEN}") as r:
            names = {c["name"] for c in json.load(r)["content"]}
        assert "05_generation.ipynb" in names
        req = urllib.request.Request(f"{base}/?token={TOKEN}")
        opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                  {"redirect_request": lambda *a, **k: None}))
        try:
            opener.open(req, timeout=10)
            location = None
        except urllib.error.HTTPError as e:             # the redirect to the default url
            location = e.headers.get("Location")
        assert location and location.split("?")[0].endswith("/lab/tree/notebooks"), location
    finally:
        stop(proc)
