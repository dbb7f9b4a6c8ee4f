"""Buffers as one call read them: kept for its recomputation, and the live ones left alone.

A module may read a buffer that it also updates: batch norm's running statistics, the
power-iteration vectors of spectral norm, a step counter. Its recomputation must read the
values the forward read, not those the forward left, and must not update them a second
time. So before each call of ``f`` or ``g`` the buffers of its modules are recorded: the
tensor in each slot, and, for a module that changes its buffers, a copy of their values.
The recomputation runs with those in the slots (fresh copies of the copies, so that it may
update them as it likes, as often as backward runs) and the live buffers are put back
after it: they end the step exactly where plain autograd leaves them.

Which modules change their buffers is learned from the first call of each (per training
mode): it is copied then, and compared with what the call left (the slot's tensor, its
version counter, its values). A module that changed nothing is recorded by reference
afterwards, with its version counters; one that starts changing its buffers in place later
is caught right after the call that does it (``Snapshot.changed``). Replaced buffers
(``self.count = self.count + 1``) need no copy: the old tensor is what the forward read.

The same snapshot, taken of every buffer with copies, is how ``revtree.testing`` and the
memory budget run a model and leave its buffers as they were (``kept``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from .._torch import buffer_slots, non_persistent_buffers
from .._torch import version as _version

# (a module's buffer dict, a name, the tensor in that slot, its version, a copy of its values)
Entry = tuple[dict[str, Any], str, torch.Tensor, int, "torch.Tensor | None"]


class Policy:
    """Which modules change their buffers when called, learned from their first call."""

    __slots__ = ("_changes",)

    def __init__(self) -> None:
        self._changes: WeakKeyDictionary[nn.Module, list[bool | None]] = WeakKeyDictionary()

    def __reduce__(self) -> tuple[type[Policy], tuple[()]]:
        """Pickled empty: what it learned is learned again (``torch.save`` of a model)."""
        return Policy, ()

    def changes(self, module: nn.Module) -> bool | None:
        """Whether calling ``module`` (in its training mode) changes its buffers (None: unknown)."""
        known = self._changes.get(module)
        return None if known is None else known[module.training]

    def learn(self, module: nn.Module, changed: bool) -> None:
        """Record whether a call of ``module`` changed its buffers in place."""
        self._changes.setdefault(module, [None, None])[module.training] = changed


class Snapshot:
    """The buffers of some modules as a call read them.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from revtree._replay._buffers import Snapshot
        >>> bn = nn.BatchNorm1d(2)
        >>> snapshot = Snapshot.take([bn], copy=True)
        >>> _ = bn(torch.randn(4, 2))  # the live statistics move
        >>> with snapshot.swapped():  # as they were, for a recomputation
        ...     bn.num_batches_tracked.item()
        0
        >>> bn.num_batches_tracked.item()
        1
    """

    __slots__ = ("entries", "learning", "modules")

    def __init__(
        self, entries: list[Entry], modules: list[nn.Module], learning: list[nn.Module]
    ) -> None:
        self.entries = entries
        self.modules = modules
        self.learning = learning  # the modules a policy does not know yet

    @classmethod
    def take(cls, modules: Iterable[nn.Module], copy: bool | Policy) -> Snapshot:
        """Record the buffers of ``modules`` (their own, not their children's).

        Args:
            modules: Modules holding buffers.
            copy: Copy every buffer's values (``True``), none (``False``), or as a
                [`Policy`][revtree._replay._buffers.Policy] says: those of the modules that change
                them, and of the modules it does not know yet (``settle`` teaches it).
        """
        entries: list[Entry] = []
        modules = list(modules)
        learning = []
        for module in modules:
            slots = buffer_slots(module)
            if isinstance(copy, bool):
                copied = copy
            else:
                changes = copy.changes(module)
                copied = changes is not False
                if changes is None:
                    learning.append(module)
            for name, b in slots.items():
                if b is None:
                    continue
                version = _version(b)
                if copied and version >= 0 and not nn.parameter.is_lazy(b):
                    entries.append((slots, name, b, version, b.detach().clone()))
                else:
                    entries.append((slots, name, b, version, None))
        return cls(entries, modules, learning)

    def settle(self, policy: Policy) -> str | None:
        """After the call: teach ``policy`` what it did not know; report a surprise.

        Returns the name of a buffer recorded without a copy (its module changed nothing on
        its first call) that this call changed in place: its recomputation would read other
        values. ``policy`` then knows to copy it from now on. A buffer replaced in its slot
        needs no copy: the recorded tensor is what the call read.
        """
        surprise = None
        changed = set()
        for slots, name, t, version, copy in self.entries:
            # a kernel may update a buffer in place and leave its version as it was (batch
            # norm's running statistics): the values tell, on the first call
            if _version(t) != version:
                changed.add(id(slots))
                if copy is None and surprise is None:
                    surprise = name
            elif copy is not None and self.learning and not torch.equal(t, copy):
                changed.add(id(slots))
        for module in self.modules:
            slots = buffer_slots(module)
            if id(slots) in changed or module in self.learning:
                policy.learn(module, id(slots) in changed)
        return surprise

    @contextmanager
    def swapped(self, fresh: bool = True) -> Iterator[None]:
        """Put the recorded buffers in their slots (copies afresh), and the live ones back after.

        Buffers registered in the meantime are removed on exit.
        """
        live: list[tuple[dict[str, Any], str, Any]] = [
            (slots, name, slots.get(name)) for slots, name, _, _, _ in self.entries
        ]
        names = [(buffer_slots(m), list(buffer_slots(m))) for m in self.modules]
        for slots, name, t, _, copy in self.entries:
            slots[name] = t if copy is None else copy.clone() if fresh else copy
        try:
            yield
        finally:
            for slots, keys in names:
                if len(slots) != len(keys):
                    for name in [n for n in slots if n not in keys]:
                        del slots[name]
            for slots, name, t in live:
                slots[name] = t


@contextmanager
def kept(module: nn.Module) -> Iterator[None]:
    """Run the context on copies of every buffer of ``module``; leave the live ones untouched.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from revtree._replay._buffers import kept
        >>> bn = nn.BatchNorm1d(2)
        >>> with kept(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.num_batches_tracked.item(), bn.running_mean.tolist()
        (0, [0.0, 0.0])
    """
    modules = [m for m in module.modules() if buffer_slots(m)]
    non_persistent = [(m, set(non_persistent_buffers(m))) for m in modules]
    try:
        with Snapshot.take(modules, copy=True).swapped(fresh=False):
            yield
    finally:
        for m, names in non_persistent:
            non_persistent_buffers(m).clear()
            non_persistent_buffers(m).update(names)
