"""Checks a library author runs on their own model: gradients, drift, memory kept."""

from .._saved import held_bytes as held_bytes
from .._saved import saved_bytes as saved_bytes
from ._gradients import GradientReport as GradientReport
from ._gradients import compare_gradients as compare_gradients
from ._memory import MemoryReport as MemoryReport
from ._memory import memory_report as memory_report
from ._reconstruction import BlockDrift as BlockDrift
from ._reconstruction import reconstruction_errors as reconstruction_errors

__all__ = [
    "BlockDrift",
    "GradientReport",
    "MemoryReport",
    "compare_gradients",
    "held_bytes",
    "memory_report",
    "reconstruction_errors",
    "saved_bytes",
]
