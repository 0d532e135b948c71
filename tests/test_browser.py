"""Notebook 02's slider in a real browser: JupyterLab is served here (127.0.0.1, a free port, a
token) on a copy of the notebook, Debian's Chromium (driven by Playwright) runs all its cells,
moves the slider of the "Explore t" cell with the keyboard and checks that the picture under it
changes with it.

Skips, saying why, without /usr/bin/chromium (Debian's `chromium`), the `playwright` package or
JupyterLab: `make test` installs them where it can (the browser-tools target). Playwright's own
browser download is never used. The server (and with it the kernel) is stopped at the end, also
on failure; its log is shown when the test fails."""
import importlib.util
import contextlib
import json
import os
import shutil
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


def installed_lab_settings(venv: Path) -> Path:
    """The JupyterLab application settings folder `make env` fills in venv (its settings rule,
    nothing else run): venv/share/jupyter/lab/settings, with overrides.d/ddpm-fruits.json."""
    r = subprocess.run(["make", "env", f"VIRTUAL_ENV={venv}", "-o", f"{venv}/.ddpm-installed"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return venv / "share" / "jupyter" / "lab" / "settings"


@contextlib.contextmanager
def serve_lab(tmp_path: Path, user_settings: dict, app_settings: Path | None = None):
    """A JupyterLab server on a copy of notebook 02 (prepared_copy) with these user settings
    (LAB_SETTINGS's form) and, where given, this application settings folder (default: this
    environment's): yields (url of the notebook, the notebook's path, log file)."""
    _requirements()
    work, home = tmp_path / "nb", tmp_path / "jupyter"
    work.mkdir()
    nb = prepared_copy(work)
    settings = home / "lab-settings"
    for rel, value in user_settings.items():
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
    cmd += [f"--LabApp.app_settings_dir={app_settings}"] if app_settings else []
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
        yield f"{base}/lab/tree/{nb.name}?token={TOKEN}", nb, log_path
    finally:
        stop(proc)


@pytest.fixture
def lab(tmp_path):
    """serve_lab with LAB_SETTINGS and this environment's application settings."""
    with serve_lab(tmp_path, LAB_SETTINGS) as served:
        yield served


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


@contextlib.contextmanager
def browser_page(log_path: Path):
    """A Chromium page (1400×1000, PAGE_TIMEOUT for each wait). When the block fails, a
    screenshot of the page is saved beside log_path and the server's log is shown."""
    from playwright.sync_api import sync_playwright
    page = None
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(PAGE_TIMEOUT * 1000)
                yield page
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


def open_notebook(page, url: str) -> None:
    """Open the notebook at url and wait until its kernel has started and is idle (Run All
    without a kernel is a no-op)."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached")
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.sessionContext")
    page.evaluate("async () => { const w = window.jupyterapp.shell.currentWidget;"
                  " await w.context.ready; await w.sessionContext.ready; }")
    poll(page, PAGE_TIMEOUT, "the kernel to be idle", lambda s: s["kernel"] == "idle")


def run_all(page, what: str, done=lambda s: True) -> dict:
    """Run > Run All Cells, and wait until every cell has run, the kernel is idle and done(state)
    holds; returns that state. Its promise settles when the last cell has run."""
    page.evaluate("""() => { window.__runAll = 'running';
        window.jupyterapp.commands.execute('notebook:run-all-cells').then(
            () => { window.__runAll = 'done'; },
            e => { window.__runAll = 'failed: ' + e; }); }""")
    state = poll(page, RUN_ALL_TIMEOUT, what,
                 lambda s: s["runAll"] != "running" and s["pending"] == 0
                 and s["kernel"] == "idle" and done(s))
    assert state["runAll"] == "done", state["runAll"]
    return state


def test_slider_changes_picture(lab):
    url, _, log_path = lab
    t0 = time.time()
    with browser_page(log_path) as page:
        open_notebook(page, url)
        first = run_all(page, "all cells and the slider's picture",
                        lambda s: s["slider"] and s["img"])
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
    print(f"browser test: {time.time() - t0:.1f} s after the server was up")


AUTOSAVE_EVERY = 3      # seconds: JupyterLab's autosaveInterval for the autosave test (default 120)


@pytest.mark.parametrize("overrides", ["installed", "absent"])
def test_autosave_off_run_all_and_close_without_saving_leaves_the_notebook_unchanged(tmp_path, overrides):
    """Issue 44: opening a notebook changes nothing. JupyterLab with the application settings
    `make env` installs (overrides.d: autosave off), autosaving every AUTOSAVE_EVERY s were it
    on: Run All, wait 4 intervals, close the tab and answer Discard to "Save your work"; the
    file keeps its bytes. The control, the same application settings folder without the
    override (JupyterLab's default, autosave on), shows the check can fail: there the file
    changes before the tab is closed."""
    _requirements()
    app = installed_lab_settings(tmp_path / "venv")
    if overrides == "absent":
        shutil.rmtree(app / "overrides.d")
    user = dict(LAB_SETTINGS, **{"@jupyterlab/docmanager-extension/plugin.jupyterlab-settings":
                                 {"autosaveInterval": AUTOSAVE_EVERY}})
    with serve_lab(tmp_path, user, app) as (url, nb, log_path), browser_page(log_path) as page:
        before = nb.read_bytes()
        open_notebook(page, url)
        run_all(page, "all cells")
        page.wait_for_timeout(4 * AUTOSAVE_EVERY * 1000)
        saved = nb.read_bytes() != before
        dirty = page.evaluate("() => window.jupyterapp.shell.currentWidget.context.model.dirty")
        page.locator(".lm-TabBar-tab.lm-mod-current .lm-TabBar-tabCloseIcon").first.click()
        if dirty:                                  # "Save your work": Cancel, Discard, Save
            page.locator(".jp-Dialog").get_by_role("button", name="Discard").click()
        page.wait_for_function("() => !window.jupyterapp.shell.currentWidget"
                               " || !window.jupyterapp.shell.currentWidget.context")
        page.wait_for_timeout(1000)
        after = nb.read_bytes()
    if overrides == "installed":
        assert dirty and not saved, "Run All left nothing unsaved to discard" if not dirty \
            else "JupyterLab autosaved the notebook"
        assert after == before, "the notebook changed after closing without saving"
    else:
        assert saved and after != before, "JupyterLab's default did not autosave: the check " \
                                          "above cannot fail"
