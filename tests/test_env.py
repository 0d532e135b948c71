"""The environment has one source of truth (requirements.txt), and the README, the Makefile and CI
agree on the commands."""
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, str]:
    """name → specifier of requirements.txt."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line)
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_reads_requirements():
    """environment.yml installs requirements.txt (and the package) through pip, nothing else."""
    import yaml
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-r requirements.txt", "-e ."]
    assert all(isinstance(d, dict) or d.split("=")[0] in ("python", "pip") for d in deps)


def test_torch_pins():
    req = _requirements()
    assert req["torch"] == "==2.14.1" and req["torchvision"] == "==0.29.1"


def test_pyproject_dependencies_are_pinned_in_requirements():
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}
    assert names <= set(_requirements())


@pytest.mark.parametrize("name", sorted(_requirements()))
def test_installed_versions_satisfy_requirements(name):
    """What the environment has is what requirements.txt asks for (the pins exactly)."""
    from packaging.specifiers import SpecifierSet
    spec = _requirements()[name]
    version = metadata.version(name)
    assert SpecifierSet(spec).contains(version.split("+")[0], prereleases=True), (name, version, spec)


def test_readme_ci_and_makefile_agree():
    """.ci/run runs `make test`, the README shows `make figures` and `make test`, and the
    Makefile has both targets."""
    readme = (ROOT / "README.md").read_text()
    assert "make figures" in readme and "make test" in readme
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^figures:", mk, re.M) and re.search(r"^test:", mk, re.M)


def test_python_version():
    assert sys.version_info[:2] >= (3, 10)
