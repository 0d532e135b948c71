"""The committed notebooks are stored as JupyterLab keeps them and hold nothing machine-specific:
no papermill-injected parameters (the parameters cell's interactive defaults are what Run All
uses), no run metadata or widget state that a save would rewrite, no absolute path in an output."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import normalize_notebooks  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ABSOLUTE = re.compile(r"(?<![\w.~])/(?:work|home|root|tmp|Users|mnt|opt)/[\w.-]+")


def test_there_are_five_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_normalized(path):
    nb = json.loads(path.read_text())
    tags = [t for c in nb["cells"] for t in c.get("metadata", {}).get("tags", [])]
    assert "injected-parameters" not in tags
    assert tags.count("parameters") == 1
    assert normalize_notebooks.text(normalize_notebooks.normalized(nb)) == path.read_text(), \
        f"run `python tools/normalize_notebooks.py {path.relative_to(ROOT)}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_absolute_path_in_outputs(path):
    nb = json.loads(path.read_text())
    found = [m.group(0) for c in nb["cells"] for o in c.get("outputs", [])
             for m in ABSOLUTE.finditer(json.dumps(o))]
    assert not found, f"{path.name} prints machine paths: {sorted(set(found))[:5]}"


def test_normalize_drops_what_a_save_would_rewrite():
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["injected-parameters"]},
                     "source": "N = 500", "outputs": [], "execution_count": 1},
                    {"cell_type": "code", "metadata": {"papermill": {"duration": 1.0}, "tags": []},
                     "source": "x = 1", "outputs": [], "execution_count": 2}],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                      "name": "python3"},
                       "papermill": {"parameters": {"N": 500}}, "widgets": {"state": {}}},
          "nbformat": 4, "nbformat_minor": 4}
    out = normalize_notebooks.normalized(nb)
    assert [c["source"] for c in out["cells"]] == ["x = 1"]
    assert out["cells"][0]["metadata"] == {} and "id" in out["cells"][0]
    assert set(out["metadata"]) == {"kernelspec"}
    assert out["metadata"]["kernelspec"]["display_name"] == "Python 3 (ipykernel)"
    assert nb["metadata"]["widgets"] == {"state": {}}                 # the input is left alone
