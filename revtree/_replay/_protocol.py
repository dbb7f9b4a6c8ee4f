"""What a recomputed call must see again, one class per kind of state, in one list.

Each forward call of a function records (``capture`` before it runs, ``settle`` after) what
it read; its recomputation puts it back (``restore``) and leaves the live state as it
found it (``undo``). The kinds, in the order they are restored:

- ``ParameterSlots``: the tensors in the parameter slots (``functional_call`` may have put
  others there), with a detached alias where the engine computes a gradient;
- ``TrainingModes``: each module's training flag;
- ``Buffers``: the buffers' values as the call read them (copies only for the modules that
  change them), the live ones untouched by the recomputation;
- ``RandomState``: the default generators, for the call's own duration only;
- ``Autocast``: the forward's autocast state, around the call only;
- ``Parametrizations``: parametrized tensors computed from their originals even under
  ``parametrize.cached()`` (a cached value from a ``no_grad`` forward carries no graph);
- ``Memo``: the values ``revtree.memo`` kept.

The eager engine, the compiled engine, the memory budget's measurement and
``revtree.testing`` all go through ``capture``/``restore`` here.
"""

from __future__ import annotations

from typing import Any

from .. import _torch
from ._buffers import Snapshot
from ._memo import MemoRecord
from ._modes import modes_of, restore_modes, set_modes
from ._rng import LOCK


class Record:
    """One forward call of a function: what its recomputation replays, and what it returned."""

    __slots__ = ("buffers", "memo", "modes", "params", "positions", "rng", "shapes", "used")

    def __init__(self) -> None:
        self.params: list[Any] = []  # the tensors in the walk's slots
        self.positions: list[int] = []  # each one's source position (-1: needs no gradient)
        self.used: list[int] = []  # the sources it read, each once (externals too)
        self.modes: list[bool] = []
        self.buffers: Snapshot | None = None
        self.rng: Any = None
        self.memo: MemoRecord | None = None
        self.shapes: list[Any] | None = None  # what it returned, for the recomputation's check


class Kind:
    """One kind of state (see the module's docstring)."""

    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        """Before a forward call: note what it reads."""

    def settle(self, record: Record, walk: Any, call: Any) -> None:
        """After the forward call."""

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        """Before its recomputation: put it back; return what ``undo`` needs."""

    def undo(self, token: Any) -> None:
        """After the recomputation: the live state as it was."""


class ParameterSlots(Kind):
    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        record.params = [slots[name] for slots, name in walk.slots]

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        handles = back.handles
        swapped = []  # the slots whose live tensor is not what the recomputation needs
        for (slots, name), t, position in zip(walk.slots, record.params, record.positions):
            needed = handles[position] if position >= 0 else t
            live = slots[name]
            if live is not needed:
                swapped.append((slots, name, live))
                slots[name] = needed
        return swapped

    def undo(self, token: Any) -> None:
        for slots, name, live in token:
            slots[name] = live


class TrainingModes(Kind):
    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        record.modes = modes_of(walk.modules)

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        return set_modes(walk.modules, record.modes)

    def undo(self, token: Any) -> None:
        restore_modes(token)


class Buffers(Kind):
    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        if walk.buffered:
            record.buffers = Snapshot.take(walk.buffered, call.policy)

    def settle(self, record: Record, walk: Any, call: Any) -> None:
        if record.buffers is not None:
            surprise = record.buffers.settle(call.policy)
            if surprise is not None:
                call.buffer_surprise(surprise)

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        if record.buffers is None:
            return None
        swapped = record.buffers.swapped()
        swapped.__enter__()
        return swapped

    def undo(self, token: Any) -> None:
        if token is not None:
            token.__exit__(None, None, None)


class RandomState(Kind):
    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        if call.tracker is not None:
            call.tracker.before(record)

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        if record.rng is None:
            return None
        LOCK.acquire()
        generators = back.generators
        found = generators.capture()
        generators.set(record.rng)
        return generators, found

    def undo(self, token: Any) -> None:
        if token is not None:  # the generators back where this recomputation found them
            generators, found = token
            generators.set(found)
            LOCK.release()


class Autocast(Kind):
    __slots__ = ()

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        replay = back.autocast
        replay.__enter__()
        return replay

    def undo(self, token: Any) -> None:
        token.__exit__(None, None, None)


class Parametrizations(Kind):
    __slots__ = ()

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        if not _torch.parametrizations_cached():
            return None
        uncached = _torch.parametrizations_uncached()
        uncached.__enter__()
        return uncached

    def undo(self, token: Any) -> None:
        if token is not None:
            token.__exit__(None, None, None)


class Memo(Kind):
    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        record.memo = MemoRecord(call.generators)

    def settle(self, record: Record, walk: Any, call: Any) -> None:
        if record.memo is not None and not record.memo.values:
            record.memo = None  # nothing kept: nothing to hold

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        return record.memo.replay() if record.memo is not None else None


KINDS: tuple[Kind, ...] = (
    ParameterSlots(),
    TrainingModes(),
    Buffers(),
    RandomState(),
    Autocast(),
    Parametrizations(),
    Memo(),
)


def capture(record: Record, walk: Any, call: Any) -> None:
    """Before a forward call: every kind notes what it reads."""
    for kind in KINDS:
        kind.capture(record, walk, call)


def settle(record: Record, walk: Any, call: Any) -> None:
    """After the forward call."""
    for kind in KINDS:
        kind.settle(record, walk, call)


def restore(record: Record, walk: Any, back: Any) -> list[Any]:
    """Before the recomputation: everything back as the forward call read it."""
    tokens = []
    try:
        for kind in KINDS:
            tokens.append(kind.restore(record, walk, back))
    except BaseException:
        undo(tokens)
        raise
    return tokens


def undo(tokens: list[Any]) -> None:
    """After the recomputation: the live state as it was, last kind first."""
    for kind, token in reversed(list(zip(KINDS, tokens))):
        kind.undo(token)


def memo_of(tokens: list[Any]) -> MemoRecord | None:
    """The memo a recomputation replays (the token ``restore`` gave for ``Memo``)."""
    return tokens[-1]
