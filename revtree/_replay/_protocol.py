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

from operator import is_
from typing import Any

from .. import _torch
from ._buffers import Snapshot
from ._memo import MemoRecord
from ._modes import _TRAINING, restore_modes, set_modes
from ._rng import LOCK


class Record:
    """One forward call of a function: what its recomputation replays, and what it returned."""

    __slots__ = (
        "buffers",
        "generators",
        "memo",
        "modes",
        "params",
        "positions",
        "rng",
        "shapes",
        "substates",
        "used",
    )

    def __init__(self) -> None:
        self.generators: Any = None  # for a memo made during the call
        self.params: list[Any] = []  # the tensors in the walk's slots
        self.positions: list[int] = []  # each one's source position (-1: needs no gradient)
        self.used: list[int] = []  # the sources it read, each once (externals too)
        self.modes: list[bool] = []
        self.buffers: Snapshot | None = None
        self.rng: Any = None
        self.memo: MemoRecord | None = None
        self.shapes: list[Any] | None = None  # what it returned, for the recomputation's check
        self.substates: Any = None  # random states per submodule call (invertible steps)


class Kind:
    """One kind of state (see the module's docstring).

    ``restore`` returns ``None`` when it had nothing to put back (then ``undo`` is not
    called): most recomputations find most of their state as the forward left it.
    """

    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        """Before a forward call: note what it reads."""

    def settle(self, record: Record, walk: Any, call: Any) -> None:
        """After the forward call."""

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        """Before its recomputation: put it back; what ``undo`` needs, or ``None``."""

    def undo(self, token: Any) -> None:
        """After the recomputation: the live state as it was."""


class ParameterSlots(Kind):
    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        record.params = [slots[name] for slots, name in walk.slots]

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        params = record.params
        live = [slots[name] for slots, name in walk.slots]
        if back.identity and all(map(is_, live, params)):
            return None  # the slots hold what the recomputation differentiates
        handles = back.handles
        swapped = []  # the slots whose live tensor is not what the recomputation needs
        for (slots, name), t, position, now in zip(walk.slots, params, record.positions, live):
            needed = handles[position] if position >= 0 else t
            if now is not needed:
                swapped.append((slots, name, now))
                slots[name] = needed
        return swapped or None

    def undo(self, token: Any) -> None:
        for slots, name, live in token:
            slots[name] = live


class TrainingModes(Kind):
    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        record.modes = list(map(_TRAINING, walk.modules))

    def restore(self, record: Record, walk: Any, back: Any) -> Any:
        if list(map(_TRAINING, walk.modules)) == record.modes:
            return None
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
        generators, found = token  # back where this recomputation found them
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
        uncached = _torch.parametrizations_uncached()
        uncached.__enter__()
        return uncached

    def undo(self, token: Any) -> None:
        token.__exit__(None, None, None)


class Memo(Kind):
    __slots__ = ()

    def capture(self, record: Record, walk: Any, call: Any) -> None:
        record.generators = call.generators  # a memo is made on its first use (_memo)

    # restored through ``memo_of``: the recomputation's thread-local state hands it to memo


_SLOTS, _MODES, _BUFFERS, _RANDOM = ParameterSlots(), TrainingModes(), Buffers(), RandomState()
_AUTOCAST, _PARAMETRIZATIONS = Autocast(), Parametrizations()
KINDS: tuple[Kind, ...] = (
    _SLOTS,
    _MODES,
    _BUFFERS,
    _RANDOM,
    _AUTOCAST,
    _PARAMETRIZATIONS,
    Memo(),
)
_CAPTURING = tuple(k for k in KINDS if type(k).capture is not Kind.capture)
_SETTLING = tuple(k for k in KINDS if type(k).settle is not Kind.settle)


def capture(record: Record, walk: Any, call: Any) -> None:
    """Before a forward call: every kind notes what it reads."""
    for kind in _CAPTURING:
        kind.capture(record, walk, call)


def settle(record: Record, walk: Any, call: Any) -> None:
    """After the forward call."""
    for kind in _SETTLING:
        kind.settle(record, walk, call)


def restoring(autocast: bool) -> tuple[Kind, ...]:
    """The kinds one backward restores.

    Autocast only where it differs from the forward's; parametrizations only under
    ``parametrize.cached()``.
    """
    kinds = [_SLOTS, _MODES, _BUFFERS, _RANDOM]
    if autocast:
        kinds.append(_AUTOCAST)
    if _torch.parametrizations_cached():
        kinds.append(_PARAMETRIZATIONS)
    return tuple(kinds)


def restore(record: Record, walk: Any, back: Any) -> list[tuple[Kind, Any]]:
    """Before the recomputation: everything back as the forward call read it."""
    done: list[tuple[Kind, Any]] = []
    try:
        for kind in back.kinds:
            token = kind.restore(record, walk, back)
            if token is not None:
                done.append((kind, token))
    except BaseException:
        undo(done)
        raise
    return done


def undo(done: list[tuple[Kind, Any]]) -> None:
    """After the recomputation: the live state as it was, last kind first."""
    for kind, token in reversed(done):
        kind.undo(token)


def memo_of(record: Record) -> MemoRecord | None:
    """The memo a recomputation replays."""
    return record.memo.replay() if record.memo is not None else None
