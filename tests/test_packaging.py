"""What an installer and a type checker meet: metadata, extras, version checks, types."""

import re
import subprocess
import sys
from importlib.metadata import metadata, version
from pathlib import Path

import pytest

import revtree
from revtree import RevtreeError, RevtreeWarning
from revtree.adapters import _versions

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_written_once() -> None:
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert version("revtree") == revtree.__version__
    assert f"## [{revtree.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_license_urls_and_readme_ship() -> None:
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    meta = metadata("revtree")
    assert meta["License-Expression"] == "MIT"
    assert {u.split(",")[0] for u in meta.get_all("Project-URL")} >= {"Source", "Changelog"}


def test_extras_are_lower_bounds_and_ci_pins_them() -> None:
    pins = {
        re.split(r"==", line)[0].strip().lower()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        for req in requirements:
            assert "==" not in req, f"[{extra}] pins {req}: exact versions go in constraints.txt"
            name = re.split(r"[<>=!\[; ]", req)[0].lower()
            assert name == "revtree" or name in pins, f"{name} ([{extra}]) not in constraints"
    assert "torch" in pins


def test_adapter_version_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_versions, "version", lambda name: "0.4.9")
    with pytest.raises(RevtreeError, match=r"needs equiformer-pytorch 0\.5\.4 or newer"):
        _versions.require("equiformer-pytorch", "0.5.4", "equiformer")
    monkeypatch.setattr(_versions, "version", lambda name: "0.6.0")
    with pytest.warns(RevtreeWarning, match="was tested with equiformer-pytorch 0.5.4"):
        assert _versions.require("equiformer-pytorch", "0.5.4", "equiformer") == "0.6.0"
    with pytest.raises(RevtreeError, match="pip install 'not-a-package>=1.0'"):
        _versions.require("not-a-package", "1.0", "x")


def test_public_types() -> None:
    from revtree.codecs import KeyPath

    assert "Route" in revtree.__all__
    assert revtree.Route.__args__[1].__origin__ is tuple  # type: ignore[attr-defined]
    assert KeyPath == tuple[object, ...] or KeyPath.__origin__ is tuple  # type: ignore[attr-defined]


def test_mypy_is_clean() -> None:
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:]
