"""The one exception revtree raises for bad input."""


class RevtreeError(ValueError):
    """Raised when a pytree, codec or block does not fit the reversible coupling.

    Messages name the block index, the optree key path and the shapes involved,
    and end with a hint on how to fix the problem.

    Examples:
        >>> import torch, revtree
        >>> from revtree.codecs import Split
        >>> try:
        ...     Split(-1).encode(torch.zeros(3), ("x",))
        ... except revtree.RevtreeError as e:
        ...     print("odd" in str(e))
        True
    """


class RevtreeWarning(UserWarning):
    """Warned when a block's inputs are rebuilt with more error than ``check_drift`` allows.

    Examples:
        >>> import warnings, revtree
        >>> issubclass(revtree.RevtreeWarning, UserWarning)
        True
    """
