"""The one owner of what the engine learns about the functions it runs, keyed by identity.

For each function module (an ``f``, a ``g``, a step's function) the engine needs its
*walk*: the parameter slots to read and replay, the modules holding buffers, every module
(for its training flag), whether FSDP manages part of it, and what it reads beyond its own
parameters (found on its first call, see ``_externals``). A walk is built once and kept:

- under the module's identity (a block, an ``f`` or a ``g`` replaced is a new key);
- while no module it holds registers a new submodule, parameter or buffer (a submodule
  added, a parametrization registered: torch's registration hooks tell, for any module;
  a tensor assigned to an existing name needs nothing, since slots are read per call);
- while a plain function it holds (a [`Fn`][revtree.Fn]) keeps its function and closure.

Compile verdicts and compiled functions are kept per block, keyed by the walks of its
functions and the input signature (see ``_compiled``). Nothing here is state of the model:
it pickles and copies empty, and is learned again.
"""

from __future__ import annotations

import itertools
import weakref
from operator import attrgetter
from typing import Any

from torch import nn

from .. import _torch
from .._replay._buffers import Policy
from ._fsdp import is_unit

# ------------------------------------------------------------------- what invalidates

# for each module some walk (or block knowledge) holds, what goes stale when it registers a
# new child, parameter or buffer
_watched: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[Any]]] = weakref.WeakKeyDictionary()


def _watch(module: nn.Module, dependent: Any) -> None:
    found = _watched.setdefault(module, [])
    if len(found) > 16:  # walks built again since (a plain function's closure changed)
        found[:] = [ref for ref in found if ref() is not None]
    found.append(weakref.ref(dependent))


def _stale(module: nn.Module) -> None:
    dependents = _watched.pop(module, None)
    for ref in dependents or ():
        found = ref()
        if found is not None:
            found.stale = True


def _child_registered(module: nn.Module, name: str, value: Any) -> None:
    if module in _watched:
        _stale(module)


def _tensor_registered(kind: str) -> Any:
    def hook(module: nn.Module, name: str, value: Any) -> None:
        # a tensor put in an existing slot is read per call; a new slot changes the walk
        if module in _watched and getattr(module, kind).get(name) is None:
            _stale(module)

    return hook


_torch.on_registration(_child_registered, "module")
_torch.on_registration(_tensor_registered("_parameters"), "parameter")
_torch.on_registration(_tensor_registered("_buffers"), "buffer")

_serials = itertools.count()
_STALE = attrgetter("stale")


def _fingerprint(plain: list[Any]) -> tuple[Any, ...]:
    """What a plain function reads that no module registers: itself and its closure."""
    out: list[Any] = []
    for fn in plain:
        inner = fn.fn
        out.append(id(inner))
        for cell in getattr(inner, "__closure__", None) or ():
            try:
                out.append(id(cell.cell_contents))
            except ValueError:  # an empty cell
                out.append(None)
    return tuple(out)


class Walk:
    """One function module, walked once: what every call of it reads and records.

    Attributes:
        slots: ``(parameter dict, name)`` of every parameter it holds (FSDP units' aside),
            read afresh at every call (``functional_call`` swaps tensors in).
        names: Each slot's dotted name in the module (for ``functional_call``).
        buffered: The modules holding buffers.
        modules: Every module, for its training flag.
        managed: Whether FSDP manages parameters of it (they get their gradients from it).
        discovered: Whether its first call looked for what it reads beyond its modules.
        open: Whether it reads tensors that need a gradient beyond its modules (closures,
            plain attributes): every call then looks for them again.
    """

    __slots__ = (
        "buffered",
        "__weakref__",
        "discovered",
        "fingerprint",
        "managed",
        "modules",
        "names",
        "open",
        "plain",
        "serial",
        "slots",
        "stale",
        "_structure",
    )

    def __init__(self, module: nn.Module, managed: bool = False) -> None:
        from .._block import Fn

        slots: list[tuple[dict[str, Any], str]] = []
        names: list[str] = []
        buffered: list[nn.Module] = []
        modules: list[nn.Module] = []
        plain: list[Any] = []
        stack: list[tuple[nn.Module, str, bool]] = [(module, "", managed)]
        self.managed = managed
        while stack:
            m, prefix, unit = stack.pop()
            modules.append(m)
            _watch(m, self)
            if isinstance(m, Fn):
                plain.append(m)
            if not unit and is_unit(m):
                unit = self.managed = True
            params = _torch.parameter_slots(m)
            if params and not unit:
                for name, p in params.items():
                    if p is not None:
                        slots.append((params, name))
                        names.append(prefix + name)
            if _torch.buffer_slots(m):
                buffered.append(m)
            kids = _torch.children(m)
            if kids:
                stack.extend((c, f"{prefix}{n}.", unit) for n, c in kids.items() if c is not None)
        self.slots, self.names = slots, names
        self.buffered, self.modules, self.plain = buffered, modules, plain
        self.stale = False  # set when a module it holds registers something new
        self.fingerprint = _fingerprint(plain) if plain else ()
        self.serial = next(_serials)
        self.discovered = False
        self.open = False
        self._structure: Any = None

    @property
    def structure(self) -> Any:
        """The modules' types and the slots' shapes and dtypes (the compiled engine's key)."""
        if self._structure is None:
            slots = zip(self.slots, self.names)
            self._structure = (
                tuple(type(m) for m in self.modules),
                tuple((name, tuple(s[n].shape), s[n].dtype) for (s, n), name in slots),
            )
        return self._structure

    def valid(self) -> bool:
        """Whether nothing it depends on has changed since it was built."""
        if self.stale:
            return False
        return not self.plain or _fingerprint(self.plain) == self.fingerprint


class Known:
    """One block, as the engine knows it: its functions, their names and walks."""

    __slots__ = ("__weakref__", "fns", "managed", "names", "plain", "stale", "walks")

    def __init__(self, block: Any, learned: Learned) -> None:
        self.stale = False
        _watch(block, self)  # a function replaced (block.f = ...) is a registration
        if "steps" in block._modules:
            _watch(block.steps, self)  # (a step replaced or added)
        self.fns: list[nn.Module] = block.functions()
        self.names: list[str] = block.names()
        managed = is_unit(block)
        self.walks = [learned.walk(fn, managed) for fn in self.fns]
        self.plain = any(w.plain for w in self.walks)
        self.managed = any(w.managed for w in self.walks)

    def valid(self) -> bool:
        """Whether nothing it depends on has changed since it was built."""
        if self.stale or any(map(_STALE, self.walks)):
            return False
        return not self.plain or all(w.valid() for w in self.walks)


class Learned:
    """What the engine learned about a sequence's functions (see the module's docstring)."""

    __slots__ = (
        "__weakref__",
        "blocks",
        "compiled",
        "functions",
        "grown",
        "policy",
        "programs",
        "verdicts",
        "walks",
    )

    def __init__(self) -> None:
        self.grown = False  # something new was learned: what is stale may be forgotten
        self.blocks: dict[nn.Module, Known] = {}
        self.walks: dict[nn.Module, Walk] = {}
        self.programs: dict[tuple[Any, ...], Any] = {}  # per block, coupling, route, parts
        self.policy = Policy()  # which modules change their buffers
        self.verdicts: dict[tuple[Any, ...], Any] = {}  # compiled engine: per block structure
        self.functions: dict[tuple[Any, ...], Any] = {}  # its compiled functions, keyed alike
        self.compiled: set[tuple[Any, ...]] = set()  # the keys whose blocks ran compiled

    def __reduce__(self) -> tuple[type[Learned], tuple[()]]:
        """Pickled (and copied) empty: what it learned is learned again."""
        return Learned, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> Learned:
        return Learned()

    def walk(self, module: nn.Module, managed: bool = False) -> Walk:
        """The walk of ``module``, built now if unknown or out of date."""
        walk = self.walks.get(module)
        if walk is not None and walk.valid():
            return walk
        self.walks[module] = walk = Walk(module, managed)
        return walk

    def block(self, block: nn.Module) -> Known:
        """What is known of ``block``, found again if it changed."""
        known = self.blocks.get(block)
        if known is None or not known.valid():
            known = self.blocks[block] = Known(block, self)
            self.grown = True
        return known

    def forget(self, module: nn.Module) -> None:
        """Drop the walk of ``module`` (a slot it recorded is gone), and what uses it."""
        self.walks.pop(module, None)
        self.blocks = {b: k for b, k in self.blocks.items() if module not in k.fns}

    def prune(self, live: set[nn.Module]) -> None:
        """Forget the walks (and verdicts) of modules no longer run (replaced since)."""
        self.grown = False
        self.walks = {m: w for m, w in self.walks.items() if m in live}
        self.blocks = {b: k for b, k in self.blocks.items() if b in live}
        self.programs = {k: v for k, v in self.programs.items() if k[0] in live}
        serials = {w.serial for w in self.walks.values()}
        self.verdicts = {k: v for k, v in self.verdicts.items() if set(k[0]) <= serials}
        self.functions = {k: v for k, v in self.functions.items() if set(k[0]) <= serials}
        self.compiled = {k for k in self.compiled if set(k[0]) <= serials}
