"""The versions of the client packages the adapters were tested against, checked at use."""

from __future__ import annotations

import re
import warnings
from importlib.metadata import PackageNotFoundError, version

from .._errors import RevtreeError, RevtreeWarning


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])


def require(distribution: str, tested: str, adapter: str) -> str:
    """Check that ``distribution`` is installed; warn if it is not the ``tested`` minor release.

    Args:
        distribution: The package's name on PyPI.
        tested: The version the adapter was tested with.
        adapter: The adapter's module name, for the messages.

    Returns:
        The installed version.

    Raises:
        RevtreeError: The package is not installed, or is older than ``tested``.

    Examples:
        >>> from revtree import RevtreeError
        >>> from revtree.adapters.toolkit import require
        >>> try:
        ...     require("no-such-package", "1.0", "mine")
        ... except RevtreeError as e:
        ...     print(str(e)[:58])
        revtree.adapters.mine drives no-such-package, which is not
    """
    try:
        found = version(distribution)
    except PackageNotFoundError:
        raise RevtreeError(
            f"revtree.adapters.{adapter} drives {distribution}, which is not installed. Hint: "
            f"pip install '{distribution}>={tested}' (tested with {tested}), or "
            "pip install 'revtree[adapters]'."
        ) from None
    if _numbers(found) < _numbers(tested):
        raise RevtreeError(
            f"revtree.adapters.{adapter} needs {distribution} {tested} or newer, found {found}. "
            f"Hint: pip install '{distribution}>={tested}'."
        )
    if _numbers(found)[:2] != _numbers(tested)[:2]:
        warnings.warn(
            f"revtree.adapters.{adapter} was tested with {distribution} {tested}; {found} is "
            "installed, whose classes may have changed. Hint: compare with "
            f"revtree.testing.compare_gradients, or pin '{distribution}=={tested}'.",
            RevtreeWarning,
            stacklevel=3,
        )
    return found
