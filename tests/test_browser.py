"""The course as a learner uses it: JupyterLab in a real (headless) Chromium, every notebook run
top to bottom, under Binder's limits (one thread, at most 1.5 GB per notebook).

For each notebook: no cell shows an error, every plotly figure renders (an SVG plot exists),
at least one ipywidget renders and reacts (a slider or dropdown changes, the view changes),
and the kernel's peak memory stays under 1.5 GB with one thread. Screenshots go to
$MINILLAMA4_ARTIFACTS (default build/screenshots/).

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (both installed by
`make test`); skipped, saying why, when either is missing. The notebooks are copied to a
temporary folder, so the committed ones are never modified. The server is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
CHROMIUM = os.environ.get("MINILLAMA4_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("MINILLAMA4_ARTIFACTS", ROOT / "build" / "screenshots"))
PEAK_LIMIT = 1.5e9  # Binder gives 1-2 GB

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test does)")
psutil = pytest.importorskip("psutil")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install chromium")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on loopback with a token, serving a copy of notebooks/, one thread per kernel."""
    root = tmp_path_factory.mktemp("course")
    shutil.copytree(ROOT / "notebooks", root, dirs_exist_ok=True)
    port, token = _free_port(), secrets.token_hex(16)
    state = tmp_path_factory.mktemp("jupyter-state")  # config, runtime, settings: outside the served folder
    settings = state / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    # JupyterLab 4 virtualises long notebooks: cells far from the viewport are hidden, and a widget
    # there is "not visible" to the browser. Render every cell, as the classic notebook did.
    notebook_settings = state / "settings" / "@jupyterlab" / "notebook-extension"
    notebook_settings.mkdir(parents=True)
    (notebook_settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(state / "settings")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI runs as root
        cmd.append("--allow-root")
    log_path = state / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("JupyterLab did not start:\n" + log_path.read_text()[-3000:])
        yield {"url": url, "token": token, "pid": server.pid}
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its kernels
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield b
        b.close()


def _kernel_peak_bytes(server_pid: int) -> int:
    """Largest peak RSS (VmHWM) among the server's kernel processes."""
    peaks = [0]
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if "ipykernel" in " ".join(child.cmdline()):
                status = Path(f"/proc/{child.pid}/status").read_text()
                peaks.append(int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024)
        except (psutil.Error, OSError, StopIteration):
            pass
    return max(peaks)


def _panel(name: str) -> str:
    """JS expression for the notebook panel showing `name` (not the "current widget": JupyterLab
    may restore other tabs from its workspace, and focus can move between them)."""
    return f"[...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === {json.dumps(name)})"


def _code_cells(name: str) -> str:
    """JS expression: the notebook's code-cell models (JupyterLab 4 API)."""
    return f"[...{_panel(name)}.content.model.cells].filter(c => c.type === 'code')"


def _wait_for(page, js: str, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if page.evaluate(js):
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _poke_widget(page, root) -> bool:
    """Change the first slider or dropdown; True if the widget area's content changed."""
    area = page.locator(f"{root} .jp-OutputArea-output .jupyter-widgets").first
    container = page.locator(f"{root} .jp-OutputArea-output:has(.jupyter-widgets)").first
    before = container.inner_html()
    select = container.locator("select")
    if select.count():
        current = select.first.input_value()
        values = select.first.locator("option").evaluate_all("els => els.map(e => e.value)")
        target = next(v for v in values if v != current) if len(values) > 1 else None
        if target is not None:
            select.first.select_option(target)
    else:
        handle = area.locator(".noUi-handle, .slider-container .ui-slider-handle").first
        handle.focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")
    deadline = time.time() + 60
    while time.time() < deadline:
        if container.inner_html() != before:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_in_jupyterlab(lab, browser, name):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    panel, cells = _panel(name), _code_cells(name)
    try:
        # ?reset: start from an empty workspace, not with the previous test's notebook restored
        page.goto(f"{lab['url']}/lab/tree/{name}?reset&token={lab['token']}", timeout=60_000)
        _wait_for(page, f"() => window.jupyterapp && {panel} && {panel}.content.model", 90, "the notebook")
        _wait_for(page, f"""() => {{ const s = {panel}.sessionContext.session;
                   return s && s.kernel && s.kernel.status === 'idle'; }}""", 90, "an idle kernel")
        page.evaluate(f"() => window.jupyterapp.shell.activateById({panel}.id)")  # the commands act on it
        root = "#" + page.evaluate(f"() => {panel}.id")  # every locator below is scoped to this panel
        mode = page.evaluate(f"() => {panel}.content.notebookConfig.windowingMode")
        assert mode == "none", f"the lab did not take the test's settings (windowingMode {mode!r})"
        # The committed notebook carries outputs and execution counts: clear them first, so that
        # "every code cell has a count" below means this run executed it, not the saved file.
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
        _wait_for(page, f"() => {cells}.every(c => !c.executionCount && c.outputs.length === 0)", 30,
                  "cleared outputs")
        started = time.time()
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        _wait_for(page, f"""() => {cells}.every(c => c.executionCount)
                   && {panel}.sessionContext.session.kernel.status === 'idle'""", 240, "all cells to run")
        elapsed = time.time() - started
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        errors = page.locator(f"{root} [data-mime-type='application/vnd.jupyter.error']")
        assert errors.count() == 0, f"{name}: error output: {errors.first.inner_text()[:2000]}"
        source = json.loads((ROOT / "notebooks" / name).read_text())
        n_figures = sum(1 for c in source["cells"] for o in c.get("outputs", [])
                        if "application/vnd.plotly.v1+json" in o.get("data", {}))
        if n_figures:
            _wait_for(page, f"() => document.querySelectorAll('{root} .js-plotly-plot svg.main-svg').length >= {n_figures}",
                      60, f"{n_figures} plotly figures")
        has_widgets = any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                          for c in source["cells"] for o in c.get("outputs", []))
        if has_widgets:
            _wait_for(page, f"() => document.querySelector('{root} .jp-OutputArea-output .jupyter-widgets')", 60, "a widget")
            page.locator(f"{root} .jp-OutputArea-output .jupyter-widgets").first.scroll_into_view_if_needed()
            assert _poke_widget(page, root), f"{name}: changing the first widget control changed nothing"
            # let the redraw finish before the screenshot (the slider moved several steps)
            _wait_for(page, f"() => {panel}.sessionContext.session.kernel.status === 'idle'", 60, "the redraw")
            time.sleep(1.0)
        page.screenshot(path=str(ARTIFACTS / f"{Path(name).stem}.png"), full_page=False)
        peak = _kernel_peak_bytes(lab["pid"])
        print(f"{name}: ran in {elapsed:.0f} s with 1 thread, kernel peak memory {peak / 1e9:.2f} GB")
        assert peak < PEAK_LIMIT, f"{name}: kernel peak memory {peak / 1e9:.2f} GB exceeds Binder's 1.5 GB"
    finally:
        if not page.is_closed():  # stop this notebook's kernel, so the next one's peak memory is its own
            page.evaluate(f"async () => {{ const p = window.jupyterapp && {panel}; if (p) await p.sessionContext.shutdown(); }}")
        page.close()
