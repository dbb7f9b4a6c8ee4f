"""The documentation site as a reader meets it: built with mkdocs, read as HTML."""

import html
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = ["revtree", "revtree.codecs", "revtree.couplings", "revtree.testing"]
ADAPTERS = {
    "revtree.adapters.equiformer": ["ReversibleSequence", "SequentialSequence", "patch"],
    "revtree.adapters.reformer": ["ReversibleSequence", "patch"],
    "revtree.adapters.se3_transformer": ["ReversibleSequence", "SequentialSequence", "patch"],
    "revtree.adapters.momentumnet": ["MomentumNet", "transform_to_momentumnet", "patch"],
    "revtree.adapters.pyg": ["GroupAddRev", "patch"],
    "revtree.adapters.freia": ["SequenceINN", "patch"],
    "revtree.adapters.transformers": ["convert", "patch", "ReformerEncoder", "LSHSelfAttention"],
    "revtree.adapters.toolkit": ["built", "Named", "swapped", "constructed_as", "require"],
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        check=True,
        env={"NO_MKDOCS_2_WARNING": "1", **__import__("os").environ},
    )
    return out


def api_pages(site: Path) -> dict[str, str]:
    pages = {p.parent.name: p.read_text() for p in (site / "api").glob("*/index.html")}
    assert len(pages) >= 5, sorted(pages)
    return pages


def test_every_example_renders_as_code(site: Path) -> None:
    for name, page in api_pages(site).items():
        titles = page.count('<span class="doc-section-title">Examples:</span>')
        highlighted = len(
            re.findall(
                r'doc-section-title">Examples:</span></p>\s*'
                r'<div class="(?:language-\w+ )?highlight"><pre>'
                r'<span></span><code><span class="gp">&gt;&gt;&gt;',
                page,
            )
        )
        assert titles > 0, name
        assert highlighted == titles, f"{name}: {titles - highlighted} examples not code"
        # griffe reads a section titled `Example:` as an admonition, its `>>>` lines as quotes
        assert "<blockquote>" not in page, name
        assert '<details class="example"' not in page, name
        assert page.count("&gt;&gt;&gt;") == page.count('<span class="gp">&gt;&gt;&gt;'), name


def test_every_exported_name_has_an_entry(site: Path) -> None:
    anchors = set()
    for page in api_pages(site).values():
        anchors |= {html.unescape(a) for a in re.findall(r'id="(revtree[\w.]*)"', page)}
    expected = {f"{module}.{name}" for module, names in ADAPTERS.items() for name in names}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if not isinstance(getattr(module, name), type(sys)):  # submodules have pages
                expected.add(f"{module_name}.{name}")
    assert expected - anchors == set()


def test_source_link_and_wide_content_scroll(site: Path) -> None:
    index = (site / "index.html").read_text()
    assert 'class="md-source"' in index
    css = (site / "stylesheets" / "extra.css").read_text()
    assert "overflow-x: auto" in css
