"""The environment has one source of truth per job (requirements.txt for the main job,
requirements-test.txt for what only the tests need, which `make test` adds), and the README, the
Makefile and CI agree on the commands."""
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN, TEST = "requirements.txt", "requirements-test.txt"
# what the test suite imports that the main job does not need
TEST_ONLY = {"pytest", "nbval", "playwright"}


def _requirements(file: str = MAIN) -> dict[str, str]:
    """name → specifier of a requirements file."""
    out = {}
    for line in (ROOT / file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line)
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_reads_requirements():
    """environment.yml installs the main job's requirements.txt (and the package) through pip,
    nothing else."""
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


def test_test_only_packages_apart_from_the_main_job():
    """The test-only packages are in requirements-test.txt and not in the main job's file (nor in
    pyproject's dependencies, a subset of it); no package is in both files."""
    main, test = _requirements(MAIN), _requirements(TEST)
    assert TEST_ONLY <= set(test), f"{TEST} lacks {TEST_ONLY - set(test)}"
    assert not set(main) & set(test), f"in both {MAIN} and {TEST}: {set(main) & set(test)}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("target, installs", [("figures", [MAIN]), ("book", [MAIN]),
                                              ("test", [MAIN, TEST])])
def test_make_installs_what_each_job_needs(target, installs, tmp_path):
    """On a fresh virtual environment, `make figures` and `make book` install requirements.txt
    only, `make test` requirements-test.txt too (make -n: printed, not run)."""
    run = subprocess.run(["make", "-n", target, f"VIRTUAL_ENV={tmp_path / 'venv'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    installed = [f for line in run.stdout.splitlines() if "pip install" in line
                 for f in re.findall(r"-r (\S+)", line)]
    assert installed == installs, f"make {target} installs {installed}:\n{run.stdout}"


@pytest.mark.parametrize("file, name", [(f, n) for f in (MAIN, TEST) for n in sorted(_requirements(f))])
def test_installed_versions_satisfy_requirements(file, name):
    """What the environment has is what the requirements files ask for (the pins exactly)."""
    from packaging.specifiers import SpecifierSet
    spec = _requirements(file)[name]
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
