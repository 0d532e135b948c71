"""Imports run one way: ddpm_io < ddpm_lib < ddpm_train < ddpm_cli.

The graph is read with `ast` (every `import` and
`from … import`, at module level and inside functions,
`if __name__ == "__main__":` blocks included), not grep,
so a commented-out import does not count and a
function-level one does. A module may import only modules
below it; an import of its own level or above is an
upward import, and any cycle is reported too. There is no
exception: the command line is `python -m ddpm_cli`, the
top of the chain.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["ddpm_io", "ddpm_lib", "ddpm_train", "ddpm_cli"]   # lowest first


def imports_of(source: str, order=ORDER) -> list[tuple[str, int]]:
    """(project module, line) of every import in `source`, at any depth."""
    found = []
    for top in ast.parse(source).body:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            found += [(n, node.lineno) for n in names if n in order]
    return found


def graph(sources: dict[str, str], order=ORDER) -> dict[str, list[tuple[str, int]]]:
    """module → [(imported project module, line)]."""
    return {m: imports_of(src, order) for m, src in sources.items()}


def violations(sources: dict[str, str], order=ORDER) -> list[str]:
    """Every upward import (to a module of the same level or above) and every cycle."""
    g = graph(sources, order)
    rank = {m: i for i, m in enumerate(order)}
    bad = [f"{m}.py:{line} imports {n} (above it: the order is {' < '.join(order)})"
           for m, edges in g.items() for n, line in edges if rank[n] >= rank[m]]
    state = {}                                  # module → 1 visiting, 2 done

    def visit(m, path):
        state[m] = 1
        for n, _ in g.get(m, []):
            if state.get(n) == 1:
                bad.append("cycle: " + " → ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])
    return bad


def project_sources() -> dict[str, str]:
    return {m: (ROOT / f"{m}.py").read_text() for m in ORDER}


def test_imports_run_one_way():
    bad = violations(project_sources())
    assert not bad, "\n".join(bad)


def test_the_graph_is_the_expected_chain():
    """Each module imports only modules below it; ddpm_io imports none."""
    g = {m: sorted({n for n, _ in e}) for m, e in graph(project_sources()).items()}
    assert g == {"ddpm_io": [], "ddpm_lib": ["ddpm_io"], "ddpm_train": ["ddpm_lib"],
                 "ddpm_cli": ["ddpm_lib", "ddpm_train"]}


def test_an_entry_point_block_counts():
    """An import inside `if __name__ == "__main__":` is an edge like any other: planted in
    ddpm_lib, it is an upward import and closes a cycle."""
    sources = project_sources()
    sources["ddpm_lib"] += '\n\nif __name__ == "__main__":\n    import ddpm_cli\n    ddpm_cli.main()\n'
    bad = violations(sources)
    assert any(b.startswith("ddpm_lib.py:") and "imports ddpm_cli" in b for b in bad)
    assert any(b.startswith("cycle:") for b in bad)


@pytest.mark.parametrize("planted", [
    "def load_index(cfg):\n    from ddpm_cli import prepare_data\n",     # function level
    "import ddpm_train\n",                                                 # module level
    "def f():\n    if True:\n        import ddpm_cli.sub as c\n",          # nested, dotted
])
def test_a_planted_upward_import_fails(planted):
    sources = project_sources()
    sources["ddpm_lib"] += "\n\n" + planted
    bad = violations(sources)
    assert any(b.startswith("ddpm_lib.py:") and "above it" in b for b in bad)
    assert any(b.startswith("cycle:") for b in bad)        # ddpm_train/ddpm_cli import ddpm_lib


def test_a_commented_import_is_not_an_import():
    sources = project_sources()
    sources["ddpm_io"] += "\n# import ddpm_cli\nx = 'import ddpm_lib'\n"
    assert not violations(sources)
