"""`make book` in a real browser: the site is built (tools/build_book.py) into a temporary folder,
served on 127.0.0.1, and every page is opened in Debian's Chromium (driven by Playwright): each
loads (HTTP 200) with a title and the navigation bar, every image is there (naturalWidth > 0),
and every internal link leads to a page or file that exists (HTTP 200). The index links every
page. Requests that leave 127.0.0.1 are refused (MathJax comes with the site: formulas are typeset),
so the book is checked as read offline.

Skips, saying why, without /usr/bin/chromium or the `playwright` package (`make test` installs
them where it can). Playwright's own browser download is never used."""
import functools
import http.server
import importlib.util
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import pytest

from conftest import launch_chromium, need_chromium

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 300  # seconds; the build takes a few seconds on an idle 2-core machine

# per page: its title, the bar's links, every image (src, drawn?) and every link's target
PAGE_JS = """() => ({
  title: document.title,
  nav: Array.from(document.querySelectorAll('nav.book a')).map(a => a.getAttribute('href')),
  images: Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 80),
                                                  i.complete && i.naturalWidth > 0]),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
})"""


def _requirements():
    need_chromium()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The book, built by `make book`'s script into a temporary folder."""
    _requirements()
    out = tmp_path_factory.mktemp("book") / "site"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "build_book.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert run.returncode == 0, f"the book did not build:\n{run.stdout}\n{run.stderr}"
    print(run.stdout.strip())
    return out


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A request the browser dropped (it moved on to the next page) is no error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(root: Path) -> Server:
    """`root` over HTTP on 127.0.0.1 (a free port), in a daemon thread, logging only errors."""
    server = Server(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def problems(root: Path) -> list[str]:
    """Everything wrong with the site in `root`, as read in Chromium: [] when all is well."""
    from playwright.sync_api import sync_playwright

    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html"))
    found, targets = [], {}  # targets: internal link → the first page that has it
    server = serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page()
                page.route("**/*", lambda route: route.continue_()
                           if route.request.url.startswith(base) else route.abort())
                for rel in pages:
                    url = urljoin(base, rel)
                    response = page.goto(url, wait_until="load", timeout=120_000)
                    if response is None or response.status != 200:
                        found.append(f"{rel}: HTTP {response and response.status}")
                        continue
                    state = page.evaluate(PAGE_JS)
                    if not state["title"].strip():
                        found.append(f"{rel}: no title")
                    if "index.html" not in {urljoin(url, h)[len(base):] for h in state["nav"]}:
                        found.append(f"{rel}: no navigation bar leading to the contents")
                    found += [f"{rel}: image not shown: {src}" for src, ok in state["images"]
                              if not ok]
                    if rel == "index.html":
                        linked = {urldefrag(urljoin(url, h))[0][len(base):] for h in state["links"]}
                        found += [f"index.html does not link {p}" for p in pages
                                  if p != "index.html" and p not in linked]
                    if rel == "report/report.html":
                        expected = len(re.findall(r"!\[", (REPO / "report" / "report.md").read_text()))
                        if len(state["images"]) != expected:
                            found.append(f"{rel}: {len(state['images'])} images, "
                                         f"report.md has {expected}")
                    for href in state["links"]:
                        if not re.match(r"(https?:|mailto:|#)", href):
                            targets.setdefault(urldefrag(urljoin(url, href))[0], rel)
            finally:
                browser.close()
        found += [f"{rel}: broken link to {target[len(base):] if target.startswith(base) else target}"
                  for target, rel in sorted(targets.items())
                  if urlsplit(target).netloc != urlsplit(base).netloc or status(target) != 200]
    finally:
        server.shutdown()
        server.server_close()
    return found


def test_links_to_sources_point_at_pages():
    """A link to a notebook or to the report (as written in a markdown cell) leads to its page;
    other links stay as they are."""
    spec = importlib.util.spec_from_file_location("build_book", REPO / "tools" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    pages = {"report/report.html", "notebooks/02_forward_process.html"}
    html = ('<a href="../notebooks/02_forward_process.ipynb#The-slider">'
            '<a href="../figures/leakage.md"><a href="https://example.org/x.ipynb">')
    assert build_book.point_links_at_pages(html, "report/report.html", pages) == (
        '<a href="../notebooks/02_forward_process.html#The-slider">'
        '<a href="../figures/leakage.md"><a href="https://example.org/x.ipynb">')
    assert build_book.point_links_at_pages('<a href="../report/report.md">',
                                           "notebooks/02_forward_process.html", pages) == (
        '<a href="../report/report.html">')


def test_book_pages_images_and_links(site):
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    notebooks = sorted(f"notebooks/{p.stem}.html" for p in (REPO / "notebooks").glob("*.ipynb"))
    assert pages == sorted(["index.html", "report/report.html"] + notebooks), pages
    found = problems(site)
    assert not found, f"{len(found)} problem(s) in the book:\n" + "\n".join(found)


# MathJax 2's typeset output, and the TeX it has parsed (it replaces each $…$ by such a script)
MATH_JS = """() => ({
  typeset: document.querySelectorAll('.MathJax, .MathJax_Display, .MathJax_CHTML, mjx-container').length,
  parsed: document.querySelectorAll('script[type^="math/tex"]').length,
  errors: document.querySelectorAll('.MathJax_Error, merror').length,
  widgetText: document.body.innerText.includes('interactive(children='),
  widgetNote: document.querySelectorAll('.widget-note').length,
})"""


@pytest.mark.parametrize("rel", ["notebooks/02_forward_process.html",
                                 "notebooks/05_generation.html"])
def test_formulas_are_typeset_offline(site, rel):
    """With every request that leaves 127.0.0.1 refused (the network unplugged), the formulas of
    notebooks 02 and 05 are typeset by the MathJax copied into the site, no page asks for
    anything outside it, and widgets read as a note, not as `interactive(children=(…`."""
    from playwright.sync_api import sync_playwright

    assert (site / "mathjax" / "MathJax.js").exists()
    outside, server = [], serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"

    def route(r):
        if r.request.url.startswith(base):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page()
                page.route("**/*", route)
                page.goto(urljoin(base, rel), wait_until="load", timeout=120_000)
                page.wait_for_function(
                    "() => window.MathJax && MathJax.Hub && MathJax.Hub.queue && "
                    "MathJax.Hub.queue.pending === 0 && !MathJax.Hub.queue.running && "
                    "document.querySelectorAll('script[type^=\"math/tex\"]').length > 0",
                    timeout=120_000)
                state = page.evaluate(MATH_JS)
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert not outside, f"requests outside the site: {outside}"
    assert state["parsed"] > 0 and state["typeset"] >= state["parsed"] // 2, state
    assert state["errors"] == 0, state
    assert not state["widgetText"], state
    assert state["widgetNote"] >= 1, state                # both have a widget


def test_the_book_needs_no_network_and_shows_widgets_as_a_note(tmp_path):
    """Without a browser: every page loads MathJax from the site's own copy (a relative path),
    no script comes from outside, and no widget's text fallback is left."""
    spec = importlib.util.spec_from_file_location("build_book", REPO / "tools" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    pages = build_book.build(tmp_path / "site")
    for rel in pages:
        html = (tmp_path / "site" / rel).read_text()
        scripts = re.findall(r'<script[^>]*\bsrc="([^"]+)"', html)
        assert all(not re.match(r"[a-z]+:", s) for s in scripts), (rel, scripts)
        depth = "../" * rel.count("/")
        assert f'src="{depth}mathjax/MathJax.js?config=' in html, rel
        assert "interactive(children=" not in html, rel
    assert "widget-note" in (tmp_path / "site" / "notebooks" / "02_forward_process.html").read_text()
    assert (tmp_path / "site" / "mathjax" / "MathJax.js").exists()
