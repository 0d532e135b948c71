"""Notebook 02's slider in a real browser: JupyterLab is served here (127.0.0.1, a free port, a
token) on a copy of the notebook, Debian's Chromium (driven by Playwright) runs all its cells,
moves the slider of the "Explore t" cell with the keyboard and checks that the picture under it
changes with it.

Skips, saying why, without /usr/bin/chromium (Debian's `chromium`), the `playwright` package or
JupyterLab: `make test` installs them where it can (the browser-tools target). Playwright's own
browser download is never used. The server (and with it the kernel) is stopped at the end, also
on failure; its log is shown when the test fails."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import launch_chromium, need_chromium

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "02_forward_process.ipynb"
TOKEN = "ddpm-browser-test"
# generous waits: the machine may be busy (2 cores); a normal run takes well under a minute
SERVER_TIMEOUT = 60      # jupyter lab answering /api/status
PAGE_TIMEOUT = 90        # JupyterLab's page loaded, the notebook open, its kernel idle
RUN_ALL_TIMEOUT = 150    # every cell run (smoke profile) and the slider's first picture drawn
UPDATE_TIMEOUT = 60      # the picture redrawn after the slider moved

# JupyterLab's user settings for this run only: every cell attached to the DOM (no windowing),
# no news or update checks (no internet)
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
}


def _requirements():
    need_chromium()
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.skip("jupyterlab is not installed (requirements.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepared_copy(dst: Path) -> Path:
    """The notebook without its outputs and saved widget state, so that whatever the browser
    shows comes from this run; the committed file is only read."""
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"].pop("widgets", None)
    path = dst / NOTEBOOK.name
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of notebook 02: yields (url of the notebook, log file)."""
    _requirements()
    work, home = tmp_path / "nb", tmp_path / "jupyter"
    work.mkdir()
    nb = prepared_copy(work)
    settings = home / "lab-settings"
    for rel, value in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value))
    env = dict(os.environ, DDPM_PROFILE="smoke", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(
                   [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    env.pop("MPLBACKEND", None)  # conftest's Agg would leave the kernel without inline figures
    port = free_port()
    log_path = tmp_path / "jupyter-lab.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
           f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.allow_root=True",  # CI runs as root
           "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        end = time.time() + SERVER_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > end:
                raise TimeoutError(f"jupyter lab did not answer in {SERVER_TIMEOUT} s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield f"{base}/lab/tree/{nb.name}?token={TOKEN}", log_path
    finally:
        stop(proc)


def stop(proc: subprocess.Popen):
    """SIGTERM to the server (it shuts its kernels down), SIGKILL to its process group if it
    hangs; the group is the server's own (start_new_session), nothing else is signalled."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (a kernel), if any
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


# The open notebook's state, read through JupyterLab's application object (expose_app_in_browser):
# the kernel's status, error outputs, and the slider's readout and picture.
STATE_JS = """() => {
  const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.sessionContext || !nb.content || !nb.content.model) return null;
  const errors = [];
  let pending = 0;  // code cells not run yet, queued or running
  const cells = nb.content.model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    if (cell.executionCount === null || cell.executionState === 'running') pending++;
    for (const o of cell.outputs.toJSON())
      if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
  }
  const slider = document.querySelector('.jp-Notebook .widget-slider');
  const box = slider && slider.closest('.jp-OutputArea');
  const img = box && box.querySelector('.widget-output img');
  const readout = slider && slider.querySelector('.widget-readout');
  return {kernel: nb.sessionContext.kernelDisplayStatus, errors, pending,
          runAll: window.__runAll || null,
          slider: !!slider, readout: readout ? readout.textContent.trim() : null,
          img: img && img.complete && img.naturalWidth > 0 ? img.src : null};
}"""


def poll(page, timeout: float, what: str, done):
    """Poll STATE_JS until done(state); fail at once on an error output."""
    end, state = time.time() + timeout, None
    while time.time() < end:
        state = page.evaluate(STATE_JS)
        if state and state["errors"]:
            pytest.fail(f"a cell raised while waiting for {what}: {state['errors']}")
        if state and done(state):
            return state
        page.wait_for_timeout(250)
    shown = dict(state or {}, img=(state or {}).get("img") and (state["img"][:60] + "…"))
    pytest.fail(f"waited {timeout} s for {what}; last state: {shown}")


def test_slider_changes_picture(lab):
    from playwright.sync_api import sync_playwright

    url, log_path = lab
    t0, page = time.time(), None
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(PAGE_TIMEOUT * 1000)
                page.goto(url, wait_until="domcontentloaded")
                page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached")
                # the kernel started and idle before running: run-all without a kernel is a no-op
                page.wait_for_function(
                    "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                    " && window.jupyterapp.shell.currentWidget.sessionContext")
                page.evaluate("async () => { const w = window.jupyterapp.shell.currentWidget;"
                              " await w.context.ready; await w.sessionContext.ready; }")
                poll(page, PAGE_TIMEOUT, "the kernel to be idle", lambda s: s["kernel"] == "idle")

                # Run > Run All Cells; its promise settles when the last cell has run
                page.evaluate("""() => { window.__runAll = 'running';
                    window.jupyterapp.commands.execute('notebook:run-all-cells').then(
                        () => { window.__runAll = 'done'; },
                        e => { window.__runAll = 'failed: ' + e; }); }""")
                first = poll(page, RUN_ALL_TIMEOUT, "all cells and the slider's picture",
                             lambda s: s["runAll"] != "running" and s["pending"] == 0
                             and s["slider"] and s["img"] and s["kernel"] == "idle")
                assert first["runAll"] == "done", first["runAll"]
                assert first["readout"] == "100", first["readout"]  # IntSlider(value=100)

                # keyboard on the slider's handle: noUiSlider moves by one step (10) per key and
                # sends the value at once ("change": continuous_update=False is not in the way)
                handle = page.locator(".jp-Notebook .widget-slider .noUi-handle").first
                handle.scroll_into_view_if_needed()
                handle.focus()
                for _ in range(5):
                    handle.press("ArrowRight")
                moved = poll(page, UPDATE_TIMEOUT, "the picture after moving the slider",
                             lambda s: s["readout"] == "150" and s["img"]
                             and s["img"] != first["img"] and s["kernel"] == "idle")
                # the kernel may still have been drawing an intermediate t: let the last one land
                page.wait_for_timeout(1000)
                moved = poll(page, UPDATE_TIMEOUT, "the last picture", lambda s: s["img"]
                             and s["kernel"] == "idle")
                assert moved["readout"] == "150"
                assert moved["img"].startswith("data:image/png;base64,"), moved["img"][:60]
                assert moved["img"] != first["img"], "moving the slider did not change the picture"
            except BaseException:
                shot = log_path.with_name("failure.png")
                try:
                    page.screenshot(path=str(shot), full_page=True)
                    sys.stderr.write(f"\nscreenshot of the page: {shot}\n")
                except Exception as e:  # the page may be gone
                    sys.stderr.write(f"\nno screenshot: {e}\n")
                raise
            finally:
                browser.close()
    except BaseException:
        sys.stderr.write(f"\n--- jupyter lab log ({log_path}) ---\n{log_path.read_text()}\n")
        raise
    print(f"browser test: {time.time() - t0:.1f} s after the server was up")
