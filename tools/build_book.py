"""`make book`: the five notebooks (with their committed outputs; nothing is run) and
report/report.md as static HTML with navigation, through nbconvert's lab template.

Layout of the site (paths as in the repository, so that the report's ../figures/… resolve):
  index.html                  every page, in reading order
  report/report.html          report/report.md (one markdown cell, the notebooks' template)
  notebooks/<name>.html       each notebook
  figures/                    a copy of figures/ (the report's images and tables)
  mathjax/                    MathJax 2.7 from the jupyter-server-mathjax package: formulas are
                              typeset offline (no CDN)
Each page has a bar: contents, previous, next. Relative links to a page's source (.ipynb, .md)
are pointed at its .html. A widget (a slider, a menu) cannot run in a static page: its output
is a note pointing at the still figure the notebook draws beside it.

    python tools/build_book.py [--out site]
"""
import argparse
import os
import re
import shutil
import sys
import time
from html import escape
from pathlib import Path

import jinja2
import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".ddpm-book"  # written into the output folder: only a folder holding it is replaced

# the lab template with the navigation bar above and below each page
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{% block extra_css %}<style>
nav.book { font: 14px/1.6 system-ui, sans-serif; padding: 8px 16px; background: #f3f3f3;
           border-bottom: 1px solid #ddd; display: flex; gap: 24px; }
nav.book.bottom { border-top: 1px solid #ddd; border-bottom: none; margin-top: 24px; }
nav.book a { color: #0b57d0; text-decoration: none; }
</style>{% endblock extra_css %}
{%- block body_header -%}{{ super() }}{{ resources.book_nav }}{%- endblock body_header -%}
{#- offline: no require.js or Mermaid from a CDN (no widget or diagram runs in these pages) -#}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{#- the package ships MathJax's STIX web fonts (not its TeX fonts): use those -#}
{%- block html_head_js_mathjax -%}
<script type="text/x-mathjax-config">MathJax.Hub.Config({"HTML-CSS": {availableFonts: [],
  preferredFont: null, webFont: "STIX-Web", imageFont: null}});</script>
{{ super() }}
{%- endblock html_head_js_mathjax -%}
{% block body_footer %}{{ resources.book_nav | replace('class="book"', 'class="book bottom"') }}{{ super() }}{% endblock body_footer %}
"""


def sources() -> list[Path]:
    """The book's pages in reading order: the report, then the notebooks by number."""
    return [ROOT / "report" / "report.md"] + sorted((ROOT / "notebooks").glob("*.ipynb"))


def page_path(src: Path) -> str:
    """The page's path in the site, e.g. notebooks/01_data_exploration.html."""
    return src.relative_to(ROOT).with_suffix(".html").as_posix()


def read_notebook(src: Path) -> nbformat.NotebookNode:
    if src.suffix == ".ipynb":
        return nbformat.read(src, as_version=4)
    return markdown_notebook(src.read_text())


def markdown_notebook(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text)])


MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"     # a configuration the package ships
WIDGET = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ('<p class="widget-note"><em>An interactive control here (it runs in JupyterLab, '
               'not in this static page); the figure beside it shows one of its settings.</em></p>')


def mathjax_dir() -> Path:
    """MathJax's files (MathJax.js and its folders) from the jupyter-server-mathjax package."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        sys.exit("build_book: the jupyter-server-mathjax package (MathJax for offline formulas) "
                 "is not installed: run `make env` (requirements.txt)")
    d = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (d / "MathJax.js").exists():
        sys.exit(f"build_book: {d / 'MathJax.js'} is missing (a broken jupyter-server-mathjax "
                 f"install): reinstall it with `pip install --force-reinstall jupyter-server-mathjax`")
    return d


def widgets_as_notes(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Each widget output (its text fallback reads `interactive(children=(Dropdown(…`) replaced
    by WIDGET_NOTE; the committed notebook is not touched (a copy is changed)."""
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if WIDGET in out.get("data", {}):
                out["data"] = {"text/html": WIDGET_NOTE}
    return nb


def title_of(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The first level-1 heading of the first markdown cell, else `fallback`."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            m = re.search(r"^#\s+(.+?)\s*$", cell.source, re.M)
            return m.group(1) if m else fallback
    return fallback


def nav(here: str, prev: tuple[str, str] | None, nxt: tuple[str, str] | None) -> str:
    """The bar of the page at `here`; prev and nxt are (page path, title) or None."""
    def link(path, text):
        return f'<a href="{escape(os.path.relpath(path, os.path.dirname(here) or "."))}">{escape(text)}</a>'
    items = [link("index.html", "Contents")]
    if prev:
        items.append(link(prev[0], "← " + prev[1]))
    if nxt:
        items.append(link(nxt[0], nxt[1] + " →"))
    return '<nav class="book">' + "".join(items) + "</nav>"


def point_links_at_pages(html: str, here: str, pages: set[str]) -> str:
    """Relative href to a page's source (x.ipynb, x.md) → that page (x.html)."""
    def sub(m):
        target = os.path.normpath(os.path.join(os.path.dirname(here), m.group(1) + ".html"))
        return f'href="{m.group(1)}.html{m.group(3) or ""}"' if target in pages else m.group(0)
    return re.sub(r'href="(?![a-z]+:)([^"#]+)\.(ipynb|md)(#[^"]*)?"', sub, html)


def prepare_out(out: Path):
    """An empty `out`; an existing one is replaced only if a previous build made it."""
    if out.exists():
        if any(out.iterdir()) and not (out / MARKER).exists():
            sys.exit(f"build_book: {out} exists and was not made by this script (no {MARKER}); "
                     "choose another --out or remove it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by tools/build_book.py; replaced by the next build\n")


def build(out: Path) -> list[str]:
    """Writes the site into `out`; returns its pages (index first)."""
    mathjax = mathjax_dir()
    prepare_out(out)
    exporter = HTMLExporter(template_name="lab", template_file="book.html.j2",
                            extra_loaders=[jinja2.DictLoader({"book.html.j2": TEMPLATE})])
    books = [(page_path(src), read_notebook(src)) for src in sources()]
    titles = [title_of(nb, Path(path).stem) for path, nb in books]
    index = "\n".join(["# DDPM on Fruits-360", "",
                       "The notebooks with their committed outputs (nothing is run to build these "
                       "pages) and the report.", ""]
                      + [f"{i + 1}. [{t}]({p})" for i, (t, (p, _)) in enumerate(zip(titles, books))])
    pages = [("index.html", "Contents", markdown_notebook(index))] + [
        (path, title, nb) for (path, nb), title in zip(books, titles)]
    names = {path for path, _, _ in pages}
    for i, (path, title, nb) in enumerate(pages):
        prev = pages[i - 1][:2] if i > 1 else None  # the index is reached through "Contents"
        nxt = pages[i + 1][:2] if i + 1 < len(pages) else None
        exporter.mathjax_url = (Path(os.path.relpath("mathjax", os.path.dirname(path) or "."))
                                / "MathJax.js").as_posix() + f"?config={MATHJAX_CONFIG}"
        html, _ = exporter.from_notebook_node(
            widgets_as_notes(nb), resources={"metadata": {"name": title}, "book_nav": nav(path, prev, nxt)})
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(point_links_at_pages(html, path, names), encoding="utf-8")
    shutil.copytree(ROOT / "figures", out / "figures")
    shutil.copytree(mathjax, out / "mathjax")
    return [path for path, _, _ in pages]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "site",
                    help="output folder, replaced if a previous build made it (default: site/)")
    args = ap.parse_args()
    t0 = time.time()
    pages = build(args.out)
    print(f"book: {len(pages)} pages in {args.out} ({time.time() - t0:.1f} s); "
          f"open {args.out / 'index.html'}")


if __name__ == "__main__":
    main()
