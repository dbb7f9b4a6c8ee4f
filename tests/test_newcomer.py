"""A newcomer's first hour: the traps met, each turned into a warning, a hint or a feature."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_trees_close
from torch import nn

import revtree
from revtree import RevtreeError, RevtreeWarning
from revtree.codecs import Split
from revtree.testing import MemoryReport, held_bytes, memory_report

ROOT = Path(__file__).parent.parent


class Conv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu()


# ------------------------------------------------------------------- images


def test_the_default_codec_on_an_image_warns_and_names_split_1():
    seq = revtree.ReversibleSequence([(Conv(4), Conv(4))])
    with pytest.warns(RevtreeWarning, match=r"codec=Split\(1\)") as caught:
        seq(torch.randn(2, 4, 8, 8))
    assert caught[0].filename == __file__  # pointed at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq(torch.randn(2, 4, 8, 8))  # once per input structure


@pytest.mark.parametrize("codec", [Split(1), Split(-1)], ids=["channels", "width, on purpose"])
def test_a_codec_given_silences_it(codec):
    seq = revtree.ReversibleSequence([(Conv(4 if codec.dim == 1 else 8), Conv(8))], codec=codec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            seq(torch.randn(2, 8, 8, 8))
        except RuntimeError:
            pass  # the width split feeds 8 channels to f: not the point here


def test_no_warning_for_a_sequence_of_tokens():
    seq = revtree.ReversibleSequence([(nn.Linear(4, 4), nn.Linear(4, 4))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq(torch.randn(2, 3, 8))


def test_a_function_built_for_half_the_channels_gets_a_hint_naming_split_1():
    seq = revtree.ReversibleSequence([(Conv(4), Conv(4))], codec=Split(-1))
    with pytest.raises(RuntimeError) as info:
        seq(torch.randn(2, 8, 8, 8))
    note = " ".join(getattr(info.value, "__notes__", []))
    assert "Split(1)" in note and "block 0: f" in note


def test_the_hint_names_the_leaf_that_failed_not_the_first_one():
    class NodeOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.node = nn.Linear(6, 6)  # built for the full width of x['node']

        def forward(self, x):
            return {"edge": x["edge"], "node": self.node(x["node"])}

    seq = revtree.ReversibleSequence([(NodeOnly(), NodeOnly())])
    with pytest.raises(RuntimeError) as info:
        seq({"edge": torch.randn(5, 4), "node": torch.randn(3, 6)})
    note = " ".join(getattr(info.value, "__notes__", []))
    assert "x['node']" in note and "x['edge'] has shape" not in note


# ------------------------------------------------------------------- hints


def test_a_keyword_argument_g_needs_gets_a_hint_naming_route():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, mask):
            return self.lin(x) * mask

    seq = revtree.ReversibleSequence([(Masked(), Masked())])
    with pytest.raises(TypeError) as info:
        seq(torch.randn(2, 8), mask=torch.ones(2, 4))
    note = " ".join(getattr(info.value, "__notes__", []))
    assert "route='both'" in note and "block 0: g" in note
    both = revtree.ReversibleSequence([(Masked(), Masked())], route="both")
    both(torch.randn(2, 8), mask=torch.ones(2, 4)).sum().backward()


def test_an_nn_sequential_as_blocks_gets_a_hint_naming_from_layers():
    with pytest.raises(RevtreeError, match="from_layers"):
        revtree.ReversibleSequence([nn.Sequential(nn.Linear(4, 4), nn.ReLU())])


# ------------------------------------------------------------ residual layers


class Residual(nn.Module):
    """A residual block as most code writes it: ``x + h(x)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.h = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh())

    def forward(self, x):
        return x + self.h(x)


def test_from_layers_residual_adds_each_branch_as_the_coupling_written_by_hand():
    torch.manual_seed(0)
    layers = [Residual(6).double() for _ in range(5)]
    seq = revtree.ReversibleSequence.from_layers(nn.Sequential(*layers), residual=True)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    # by hand: both streams start as x; y1 = x1 + h0(x2), y2 = x2 + h1(y1), ...; a lone
    # last layer updates x1 only; the output is the streams' mean (Duplicate)
    a = b = x
    pairs = [*zip(layers[::2], layers[1::2]), (layers[4], None)]
    for f, g in pairs:
        a = a + f.h(b)
        if g is not None:
            b = b + g.h(a)
    expected = (a + b) / 2
    got = seq(x)
    assert_trees_close(got, expected, tol=1e-12)
    params = list(seq.parameters())
    assert_trees_close(
        torch.autograd.grad(got.square().sum(), [x, *params]),
        torch.autograd.grad(expected.square().sum(), [x, *params]),
        tol=1e-10,
    )


def test_from_layers_without_residual_would_add_the_input_twice():
    """The trap: residual layers taken as branches compute another, exploding, network."""
    torch.manual_seed(0)
    net = nn.Sequential(*(Residual(8) for _ in range(12)))
    x = torch.randn(64, 8)
    as_branches = revtree.ReversibleSequence.from_layers(net)(x).std()
    as_residual = revtree.ReversibleSequence.from_layers(net, residual=True)(x).std()
    assert as_branches > 20 * as_residual


# ---------------------------------------------------------------- memory


def test_memory_report_compares_with_plain_autograd_in_one_call():
    torch.manual_seed(0)
    seq = revtree.ReversibleSequence.from_factory(lambda: nn.Linear(32, 32), 8)
    x = torch.randn(16, 64)
    report = memory_report(seq, x)
    assert isinstance(report, MemoryReport)
    assert report.reversible == held_bytes(seq, x) == 16 * 64 * 4  # the output
    assert report.plain > 8 * report.reversible
    assert seq.reversible == (True,) * 8  # put back
    assert re.fullmatch(
        r"kept for backward: plain autograd \d+\.\d\d MiB, reversible \d+\.\d\d MiB "
        r"\(\d\.\d{3}x\)",
        str(report),
    )


def test_plan_labels_its_figures_mib():
    seq = revtree.ReversibleSequence.from_factory(lambda: nn.Linear(8, 8), 3, memory_budget=1)
    text = str(seq.plan(torch.randn(4, 16)))
    assert "MiB" in text and " MB" not in text


# ----------------------------------------------------------------- docs


def test_no_example_builds_blocks_by_repeating_one_pair():
    """``[(f, g)] * 3`` puts the same modules in every block: not in any example."""
    pattern = re.compile(
        r"\[\((nn\.|torch\.nn\.)\w+\([^)]*\), *(nn\.|torch\.nn\.)\w+\([^)]*\)\)\] *\*"
    )
    files = [*ROOT.glob("revtree/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]
    found = [str(p) for p in files if pattern.search(p.read_text())]
    assert found == []


def test_every_link_in_the_docs_stays_inside_the_repository():
    link = re.compile(r"\]\(([^)#\s]+)")
    pages = [ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "benchmarks" / "README.md"]
    outside = []
    for page in pages:
        text = page.read_text()
        for target in link.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (page.parent / target).resolve().is_relative_to(ROOT.resolve()):
                outside.append((page.name, target))
            elif not (page.parent / target).exists():
                outside.append((page.name, target))
        assert "shared/" not in text and "PEERS.md" not in text, page
    assert outside == []


def test_every_example_is_on_the_examples_page_and_linked_from_the_readme():
    listed = (ROOT / "docs" / "examples.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for script in ROOT.glob("examples/[!_]*.py"):
        assert f"`{script.name}`" in listed, script.name
        assert script.name in readme, script.name
    assert "docs/examples.md" in readme


def test_the_install_line_works_today_and_says_install_torch_first():
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        text = page.read_text()
        assert "git+https://github.com/revtree/revtree" in text
        assert "not on PyPI yet" in text
        first = text.index("git+https://")
        assert text.index("torch you want first") < first, page.name


def test_the_changelog_dates_every_release_and_links_each_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", text, re.M)
    assert headings[0][0] == "Unreleased"
    for version, rest in headings[1:]:
        assert re.fullmatch(r" - \d{4}-\d\d-\d\d", rest), version
    for version, _ in headings:
        assert re.search(rf"^\[{re.escape(version)}\]: https://", text, re.M), version


# ------------------------------------------------------- settings after construction


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("on_drift", "loud", "on_drift='loud'"),
        ("preserve_rng_state", 1, "preserve_rng_state=1"),
        ("compile", True, "compile=True when building it"),
    ],
)
def test_a_setting_changed_after_construction_is_checked_as_at_construction(name, value, match):
    seq = revtree.ReversibleSequence([(nn.Linear(2, 2), nn.Linear(2, 2))])
    with pytest.raises(RevtreeError, match=re.escape(match)):
        setattr(seq, name, value)
    seq.on_drift = "raise"
    seq.preserve_rng_state = False
    assert seq.on_drift == "raise" and seq.preserve_rng_state is False
    assert callable(seq.compile)  # nn.Module's method, untouched
