"""Every script in examples/ runs to completion, checks its own claims and prints them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

# (modules named _*.py are shared by the examples, not run on their own)
EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("[!_]*.py"))
SCI = r"\d\.\d+e[-+]\d+"  # a number as the examples print them, e.g. 5.4e-16

# Lines each script must print (regular expressions, searched in its output). The scripts
# raise SystemExit when a claim fails; these make sure the claim was made and reported.
EXPECTED = {
    "custom_coupling.py": [
        r"output shapes: \{'atoms': \(64, 6\), 'ions': \(8, 6\)\}",
        rf"gradients vs plain autograd: worst relative gradient difference {SCI} at \S+ "
        r"\(256 sources compared\)",
        rf"worst reconstruction error over 16 blocks: {SCI}",
        rf"inverse\(forward\(x\)\) error: {SCI}",
    ],
    "digits.py": [
        r"activations kept for backward, batch of 256, depth 16: plain autograd \d+ KiB, "
        r"revtree \d+ KiB \(0\.\d\dx\)",
        r"final training loss \d\.\d+, test accuracy \d+\.\d%",
        r"saved .*loss\.png",
    ],
    "einops_codec.py": [
        r"images \(2, 4, 8, 8\) -> streams \(2, 4, 4, 4, 2\)",
        rf"inverse\(forward\(x\)\) error: {SCI}",
    ],
    "equiformer.py": [
        r"revtree's trunk computes the package's function: True",
        r"plain autograd: +\d+\.\d MB saved for backward",
        r"revtree reversible: +\d+\.\d MB saved for backward",
    ],
    "momentum_resnet.py": [
        r"ResNet-18, batch of 64: kept for backward \d+\.\d MiB as a ResNet, \d+\.\d MiB as a "
        r"Momentum ResNet \(0\.\d\dx\)",
        r"ResNet-34, batch of 64: kept for backward \d+\.\d MiB as a ResNet, \d+\.\d MiB as a "
        r"Momentum ResNet \(0\.\d\dx\)",
        r"mean loss of the first 3 steps \d\.\d+, of the last 3 \d\.\d+",
    ],
    "multimodal.py": [
        r"output shapes: \{'image': \{'patches': \(2, 49, 48\), 'global': \(2, 32\)\}, "
        r"'text': \(2, 7, 20\)\}",
        rf"gradients vs plain autograd: worst relative gradient difference {SCI} at \S+ "
        r"\(121 sources compared\)",
    ],
    "flow.py": [
        r" 4 blocks: nll \d\.\d+, \d+\.\d KiB kept for backward, samples torch\.Size\(\[4, 2\]\)",
        r"32 blocks: nll \d\.\d+, \d+\.\d KiB kept for backward, samples torch\.Size\(\[4, 2\]\)",
    ],
    "quickstart.py": [
        rf"loss \d\.\d+; worst relative gradient difference to plain autograd: {SCI}",
    ],
    "reformer.py": [r"step 0: loss \d\.\d+", r"step 7: loss \d\.\d+"],
    "revgnn.py": [
        r"depth   8: loss \d\.\d+, \d+ KiB kept for backward",
        r"depth  64: loss \d\.\d+, \d+ KiB kept for backward",
    ],
    "revnet_conv.py": [
        r"step 4: loss \d\.\d+",
        r"BatchNorm saw 5 batches in 5 steps \(once per step\)",
    ],
    "transformer_tuple.py": [
        r"tokens \(4, 10, 64\), cls \(4, 64\), loss \d\.\d+",
        r"gradient reaches the cls input: True",
    ],
}


def test_every_example_has_expectations():
    assert sorted(EXPECTED) == [p.name for p in EXAMPLES]


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_checks_its_claims(script):
    """An example that only prints could not fail on a wrong number: each checks and exits."""
    assert "raise SystemExit(" in script.read_text(), f"{script.name} checks nothing"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    png = tmp_path / "out" / "loss.png"
    png.parent.mkdir()
    args = [str(png)] if script.name == "digits.py" else []
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    for pattern in EXPECTED.get(script.name, []):
        assert re.search(pattern, done.stdout), f"no line matching {pattern!r} in\n{done.stdout}"
    if script.name == "digits.py":
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), "digits.py wrote no PNG"
        assert not (tmp_path / "digits_loss.png").exists()
