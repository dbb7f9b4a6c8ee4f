"""The benchmarks' quick runs are smoke tests a user can read: figures, no verdicts, no noise.

``benchmarks/_measure.py`` counts held memory exactly in ``--quick`` runs; its count is
checked here on forwards whose held bytes are known by hand, and one quick benchmark runs
end to end (CI runs the others).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _measure  # noqa: E402

import revtree  # noqa: E402


def test_held_memory_counts_what_autograd_saves_each_storage_once():
    x = torch.randn(256, requires_grad=True)
    held, out = _measure.held_after_forward(lambda: x.exp(), exempt=[x])
    assert held == out.nbytes  # exp saves its output, which is also what it returns
    held, out = _measure.held_after_forward(lambda: (x * 2).sin(), exempt=[x])
    assert held == 2 * x.nbytes  # sin saves its input (x * 2), and the output


def test_held_memory_counts_what_a_custom_function_keeps_out_of_the_hooks_sight():
    class KeepsACopy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.kept = t.clone()  # as RevTorch and MemCNN keep their outputs
            return t * 3

        @staticmethod
        def backward(ctx, grad):
            return grad * 3

    x = torch.randn(128, requires_grad=True)
    held, out = _measure.held_after_forward(lambda: KeepsACopy.apply(x), exempt=[x])
    assert held == 2 * x.nbytes  # the copy on ctx, and the output
    del out


def test_held_memory_of_a_reversible_stack_is_flat_in_depth():
    x = torch.randn(4, 16, requires_grad=True)
    held = {}
    for depth in (2, 8):
        seq = revtree.ReversibleSequence([(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(depth)])
        held[depth], _ = _measure.held_after_forward(
            lambda seq=seq: seq(x), exempt=_measure.tensors_of(seq, x)
        )
    assert held[2] == held[8]


def test_quick_runs_judge_nothing():
    assert _measure.against("target <= 1.25", False, quick=True) == ""
    assert _measure.against("target <= 1.25", False, quick=False) == " (target <= 1.25) MISSED"
    assert _measure.summary_title(quick=True) == "Summary"


@pytest.mark.slow
def test_a_quick_benchmark_prints_a_clean_summary_and_plots_where_asked(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "budget.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "\nSummary\n" in out
    for word in ("MISSED", "target", "n/a", "goal"):
        assert word not in out, f"{word!r} in a quick run's output"
    table = out[out.index("system") : out.index("\nSummary")]
    assert not re.search(r"\s-\d", table), "a negative figure"
    assert (tmp_path / "budget-quick.png").stat().st_size > 0


def test_no_script_imports_another_script():
    """Shared systems and measuring live in the registry modules (``_systems``, ``_measure``)."""
    scripts = {p.stem for p in BENCHMARKS.glob("[!_]*.py")}
    for path in BENCHMARKS.glob("*.py"):
        imported = set(re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.M))
        assert imported & scripts == set(), path.name
