"""Store executed notebooks the way JupyterLab keeps them, so that opening one changes nothing.

    python tools/normalize_notebooks.py notebooks/*.ipynb          # rewrite in place
    python tools/normalize_notebooks.py --check notebooks/*.ipynb  # exit 1 if one would change

`make figures` runs it after executing the notebooks. For each notebook it
  * drops papermill's `injected-parameters` cell (make's larger counts stay out of the committed
    notebook: its parameters cell keeps the interactive defaults) and papermill's run metadata;
  * drops saved widget state (JupyterLab rewrites its model ids on every save) and per-cell
    execution timings;
  * writes the kernelspec JupyterLab writes for this environment's kernel and gives every cell
    the id nbformat 4.5 requires (nbformat.validator.normalize).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def normalized(nb: dict) -> dict:
    """The notebook as it is committed (see the module docstring); nb is left as it is."""
    nb = json.loads(json.dumps(nb))
    nb["cells"] = [c for c in nb["cells"]
                   if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    for c in nb["cells"]:
        for key in ("papermill", "execution"):
            c.get("metadata", {}).pop(key, None)
        if c.get("metadata", {}).get("tags") == []:
            del c["metadata"]["tags"]
    for key in ("papermill", "widgets"):
        nb["metadata"].pop(key, None)
    nb["metadata"]["kernelspec"] = dict(KERNELSPEC)
    nb["nbformat"], nb["nbformat_minor"] = 4, max(nb.get("nbformat_minor", 5), 5)
    return nbformat.validator.normalize(nb)[1]


def text(nb: dict) -> str:
    """The bytes nbformat writes (JupyterLab's layout: indent 1, keys sorted, a final newline)."""
    return nbformat.writes(nbformat.from_dict(nb)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if any would change")
    a = ap.parse_args(argv)
    changed = []
    for path in a.notebooks:
        try:
            old = path.read_text()
            new = text(normalized(json.loads(old)))
        except (OSError, ValueError) as e:
            print(f"error: cannot read {path} as a notebook ({e}): restore it with git checkout",
                  file=sys.stderr)
            return 2
        if new != old:
            changed.append(path)
            if not a.check:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(new)
                tmp.replace(path)
    verb = "would change" if a.check else "normalized"
    print(f"{verb}: {', '.join(map(str, changed))}" if changed else "all notebooks normalized")
    return 1 if a.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
