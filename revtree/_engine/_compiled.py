"""The compiled engine (``compile=True``): a block forward and in reverse as compiled functions.

Each is a pure function of the block's modules and tensors (the forward on the modules'
own parameters; the reverse through ``torch.func.functional_call`` and ``torch.func.vjp``),
compiled with ``torch.compile(fullgraph=True)`` once per layout and keyword structure (on
the CPU with inductor's C++ wrapper, which calls small kernels for less than its Python
one), and shared by every block: dynamo's guards decide whether a block's modules fit a
graph already compiled, so blocks of one structure share one graph, and no call or block
recompiles.

It serves the classic block, ``(f, g)`` under an elementwise coupling (``Additive``,
``Affine``). A block runs compiled once it has been trusted: its first forward and backward
run on the eager engine, which checks everything it checks on every call, and learns what
the compiled functions cannot do. What is learned is kept with the engine's other
knowledge (``_learned``), keyed by the walks of ``f`` and ``g`` (so a block whose ``f`` is
replaced, or that gains a submodule, is judged again) and by the input signature and
training flags. A block stays on the eager engine, with a warning naming it and the reason,
where its ``f`` or ``g``

- draws random numbers (compiled code cannot replay the forward's draws in the recompute):
  seen on its eager steps, and on every compiled forward after (the default generators are
  compared around it), so that dropout switched on later sends it back to the eager engine
  before its output is used;
- changes its buffers, has hooks of its own, or reads tensors beyond its modules;
- leaves a gradient ``None`` (a compiled gradient cannot tell ``None`` from zero): seen in
  its first eager reverse, before which no block on its walks runs compiled;
- or cannot be traced without a graph break.

A call that compiles a graph again for blocks that already ran compiled (something their
code reads, beyond what the key holds, changed: a flag read in ``forward``) drops its
result, and every block on those functions is judged again from the eager engine. A flag
switched to a value whose graph is already compiled is not seen (see the reliability page).

The recompute is the eager one's arithmetic on the same parameters, the forward's autocast
state around the recomputed calls only (inductor's fused kernels round as they do in any
compiled graph: float64 agrees to 1e-10, lower precisions to their rounding).

**Blocks as one graph** (``compile=n``): consecutive trusted blocks that would share one
graph (same structure, layout and keywords) wait in the call's pending group and run as
one graph of up to ``n`` blocks, forward and in reverse: one dynamo call (its wrapper and
guards) for ``n`` blocks. A group runs within one node (a block whose parameters carry
post-accumulate-grad hooks ends a node, so its gradients still leave block by block) and
not under ``check_drift`` (which samples every block's input). Whatever a group cannot do
its blocks do one by one, each judged as above: a group whose forward draws random
numbers, a graph that fails, a reverse with hooks watching, an output that reaches
nothing, or a module whose training flag changed since the forward.
"""

from __future__ import annotations

import types
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch.func import functional_call, vjp

from .. import _checks, _torch
from .._errors import RevtreeWarning
from .._replay._autocast import AutocastState
from .._replay._modes import modes_of, restore_modes, set_modes
from .._replay._protocol import Record
from .._replay._rng import same
from ..couplings import Additive, Elementwise
from ._run import BlockRun, Call
from ._sink import Backward

Leaves = list[torch.Tensor]
Verdict = str | None  # why a block stays eager (None: it may run compiled)
_EAGER_FIRST = "not yet seen on the eager engine"
# its forward was: trusted once a reverse on the eager engine has seen every gradient flow
# (blocks sharing their modules share the verdict: the first forward must not trust the rest)
_REVERSE_FIRST = "not yet seen in reverse on the eager engine"
_OPEN = (None, _EAGER_FIRST, _REVERSE_FIRST)  # verdicts a later judgement may replace


class Compiled:
    """The compiled engine of one sequence (see the module's docstring)."""

    __slots__ = ("_broken", "_signatures", "_warned", "learned", "ran", "size")

    def __init__(self, learned: Any, size: int = 1) -> None:
        self.learned = learned
        self.size = size  # blocks of one structure run as one graph, at most
        self._signatures: dict[tuple[Any, ...], int] = {}
        self._warned: set[tuple[int, str]] = set()
        self._broken: set[tuple[_Lookup, int]] = set()  # groups whose graph failed
        self.ran: set[int] = set()  # the blocks that ran compiled in the last call

    # ----------------------------------------------------------------- which blocks

    def takes(self, run: BlockRun) -> bool:
        """Whether the block is of the kind this engine compiles."""
        program = run.program
        return (
            run.block.two_stream
            and not run.unit
            and len(program) == 2
            and all(s.kind == "update" and not any(s.side) for s in program)
            and isinstance(program[0].coupling, Elementwise)
        )

    def _key(self, run: BlockRun, call_or_back: Any) -> tuple[Any, ...]:
        shared = run.shared
        spec_f, spec_g = run.program
        mine = (spec_f.coupling, spec_f.receives, spec_g.receives)
        number = shared.signatures.get(mine)  # the same for most blocks of a call
        if number is None:
            context = shared.context
            signature = (
                shared.layout.spec,  # the layout's structure; shapes below
                context.spec,
                tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in context.tensors),
                shared.autocast,
                *mine,
            )
            number = self._signatures.setdefault(signature, len(self._signatures))
            shared.signatures[mine] = number
        walks = tuple(w.serial for w in run.walks)
        return (walks, run.fns[0].training, run.fns[1].training, number, call_or_back)

    def _verdict(self, key: tuple[Any, ...]) -> Verdict:
        return self.learned.verdicts.get(key, _EAGER_FIRST)

    def _judge(self, run: BlockRun, key: tuple[Any, ...], verdict: Verdict) -> None:
        """Record whether the block may run compiled; warn once per block and reason."""
        if self.learned.verdicts.get(key, _EAGER_FIRST) not in _OPEN:
            return  # a reason to stay eager is kept
        self.learned.verdicts[key] = verdict
        if verdict not in _OPEN and (run.index, verdict) not in self._warned:
            self._warned.add((run.index, verdict))
            warnings.warn(
                f"block {run.index} runs on the eager engine under compile=True: {verdict}. "
                "Its gradients are exact either way; only its speed differs.",
                RevtreeWarning,
                stacklevel=_checks.caller_level(),
            )

    # ------------------------------------------------------------------------ forward

    def forward(self, run: BlockRun, call: Call, state: list[Leaves], eager: Any) -> None:
        """Block ``run`` forward: compiled if trusted, else ``eager(run, call, state)``, judged.

        With ``size`` above one, a trusted block joins the blocks of its structure before
        it, to run with them as one graph when the group is full or ``flush`` is called
        (before any other block runs, and at the end of a node's run).
        """
        key = self._key(run, x_signature(state))
        verdict = self._verdict(key)
        if verdict is None and run.hooks + _torch.has_global_module_hooks():
            self._judge(run, key, _HOOKS)  # hooks registered since it was judged
            verdict = _HOOKS
        if verdict is None and self.size > 1 and run.sample is None:
            self._defer(run, call, state, key, eager)
            return
        self.flush(call, state)
        self._forward_one(run, call, state, key, eager)

    def _forward_one(
        self,
        run: BlockRun,
        call: Call,
        state: list[Leaves],
        key: tuple[Any, ...],
        eager: Any,
        records: list[Record] | None = None,
    ) -> None:
        """One block forward: compiled if trusted, else ``eager``, judged."""
        if self._verdict(key) is None and self._run_forward(run, call, state, key, records):
            return
        verdict = self._verdict(key)  # (judged again where its graph was compiled again)
        generators = call.generators
        before = generators.capture() if generators is not None else ()
        eager(run, call, state)
        if verdict is _EAGER_FIRST:
            self._judge(run, key, _forward_verdict(run, call, before) or _REVERSE_FIRST)

    @staticmethod
    def _records(run: BlockRun) -> list[Record]:
        """Records of the block's compiled calls: its parameters (made sources) and modes."""
        tape = run.tape
        records = []
        for walk in run.walks:
            record = Record()
            record.params = [slots[name] for slots, name in walk.slots]
            record.modes = modes_of(walk.modules)
            tape.add_sources(record)
            records.append(record)
        return records

    def _run_forward(
        self,
        run: BlockRun,
        call: Call,
        state: list[Leaves],
        key: tuple[Any, ...],
        records: list[Record] | None = None,
    ) -> bool:
        records = records or self._records(run)
        kt, kother = _keywords(run, call.kwargs(True)[1])
        generators = call.generators
        before = generators.capture() if generators is not None else None
        graphs = _torch.compiled_graphs()
        try:
            lookup = self._lookup_for(run, key)
            y1, y2 = lookup.call(1, 0, [run.fns[0]], [run.fns[1]], *state, kt, kother)
        except Exception as e:  # dynamo could not trace it whole: eager from now on
            self._judge(run, key, _untraceable(e))
            return False
        if generators is not None and before is not None:
            after = generators.capture()
            if not same(before, after):
                # it draws random numbers now (dropout switched on since it was judged): its
                # output is dropped, the generators put back, and the block runs eagerly
                generators.set(before)
                self._judge(run, key, _DRAWS)
                return False
        if self._compiled_again(graphs, [key]):
            return False
        _ran(run, records)
        self.ran.add(run.index)
        self.learned.compiled.add(key)
        state[0], state[1] = y1, y2
        return True

    def _compiled_again(self, graphs: int, keys: list[tuple[Any, ...]]) -> bool:
        """Whether a call compiled a graph for blocks that had run compiled before.

        Something their code reads that no key holds changed since they were judged (a
        flag read in ``forward``, say): the call's result is dropped, and every block
        whose functions are these (the next would find the new graph compiled) is judged
        again, starting on the eager engine, whose reverse sees which gradients flow.
        """
        if _torch.compiled_graphs() == graphs:
            return False
        learned = self.learned
        if not any(key in learned.compiled for key in keys):
            return False  # their first compiled call: compiling is expected
        lookups = {id(learned.functions[key]) for key in keys}
        for key, lookup in list(learned.functions.items()):
            if id(lookup) in lookups:
                learned.verdicts.pop(key, None)
                learned.compiled.discard(key)
        return True

    # ------------------------------------------------------------------------ groups

    def _defer(
        self, run: BlockRun, call: Call, state: list[Leaves], key: tuple[Any, ...], eager: Any
    ) -> None:
        """Add a trusted block to the call's pending group (run first, if it cannot join)."""
        lookup = self._lookup_for(run, key)
        group = call.pending
        if group is not None and (group.lookup is not lookup or len(group.runs) == self.size):
            self.flush(call, state)
            group = None
        if group is None:
            group = call.pending = _Pending(lookup, eager)
        group.runs.append(run)
        group.keys.append(key)
        group.records.append(self._records(run))  # its sources known before it runs

    def flush(self, call: Call, state: list[Leaves]) -> None:
        """Run the call's pending group: one graph, or block by block if that fails."""
        group = call.pending
        if group is None:
            return
        call.pending = None
        n = len(group.runs)
        if n > 1 and (group.lookup, n) not in self._broken and self._run_group(group, call, state):
            return
        for run, key, records in zip(group.runs, group.keys, group.records):
            self._forward_one(run, call, state, key, group.eager, records)

    def _run_group(self, group: _Pending, call: Call, state: list[Leaves]) -> bool:
        runs = group.runs
        kt, kother = _keywords(runs[0], call.kwargs(True)[1])
        fs, gs = [r.fns[0] for r in runs], [r.fns[1] for r in runs]
        generators = call.generators
        before = generators.capture() if generators is not None else None
        graphs = _torch.compiled_graphs()
        try:
            y1, y2 = group.lookup.call(len(runs), 0, fs, gs, *state, kt, kother)
        except Exception:  # block by block from now on, each judged on its own
            self._broken.add((group.lookup, len(runs)))
            return False
        if generators is not None and before is not None and not same(before, generators.capture()):
            generators.set(before)  # one of them draws now: block by block finds which
            return False
        if self._compiled_again(graphs, group.keys):
            return False
        mark = (group.lookup, len(runs))  # one object: the reverse finds the group by it
        for run, records in zip(runs, group.records):
            _ran(run, records)
            run.group = mark
            self.ran.add(run.index)
        self.learned.compiled.update(group.keys)
        state[0], state[1] = y1, y2
        return True

    # ------------------------------------------------------------------------ reverse

    def reverse(
        self,
        run: BlockRun,
        back: Backward,
        state: list[Leaves],
        dstate: list[list[Any]],
        eager: Any,
        node: Sequence[BlockRun] = (),
        at: int = 0,
    ) -> int:
        """Block ``run`` in reverse: compiled if its forward ran so, else ``eager``, judged.

        ``run`` is ``node[at]``, of the node's blocks. Where it ends a group that ran as one
        graph, the group is reversed as one; returns how many blocks before it were
        reversed with it.
        """
        group = run.group
        if group is not None and at + 1 >= group[1]:
            runs = list(node[at + 1 - group[1] : at + 1])
            if all(r.group is group for r in runs) and self._run_group_reverse(
                runs, back, state, dstate
            ):
                return len(runs) - 1
        replayable, flipped = True, []
        if not _modes_as_found(run):  # the common case: nothing to set
            modules, modes = _forward_modes(run)
            replayable = len(modes) == len(modules)
            flipped = set_modes(modules, modes)
        try:
            key = self._key(run, x_signature(state))
            if run.compiled and replayable:
                if self._run_reverse(run, back, state, dstate, key):
                    return 0
        finally:
            restore_modes(flipped)
        eager(run, back, state, dstate)
        if self._verdict(key) in (None, _REVERSE_FIRST) and not (back.accumulate or run.compiled):
            # the compiled gradient cannot say None: trusted only where every one flowed
            self._judge(run, key, _NONE if _none_flowed(run, back, dstate) else None)
        return 0

    def _run_reverse(
        self,
        run: BlockRun,
        back: Backward,
        state: list[Leaves],
        dstate: list[list[Any]],
        key: tuple[Any, ...],
    ) -> bool:
        if not _reversible_compiled(back, dstate):
            return False
        try:
            _reverse_with(self._lookup_for(run, key), [run], back, state, dstate)
        except Exception as e:
            self._judge(run, key, _untraceable(e))
            return False
        return True

    def _run_group_reverse(
        self,
        runs: list[BlockRun],
        back: Backward,
        state: list[Leaves],
        dstate: list[list[Any]],
    ) -> bool:
        """The blocks of a group in reverse as one graph, where everything allows it."""
        if not _reversible_compiled(back, dstate):
            return False
        if not all(map(_modes_as_found, runs)):
            return False  # per block: each sets the modes its forward found
        lookup, n = runs[-1].group
        try:
            _reverse_with(lookup, runs, back, state, dstate)
        except Exception:
            self._broken.add((lookup, n))
            return False
        return True

    # ---------------------------------------------------------------------- functions

    def _lookup_for(self, run: BlockRun, key: tuple[Any, ...]) -> _Lookup:
        """What selects the block's compiled functions, found once per ``key``."""
        found = self.learned.functions.get(key)
        if found is None:
            signature = key[-1]  # the input's (``_key`` puts it last)
            found = self.learned.functions[key] = self._lookup(run, _on_host(run, signature))
        return found

    def _lookup(self, run: BlockRun, host: bool) -> _Lookup:
        shared = run.shared
        context = shared.context
        spec_f, spec_g = run.program
        coupling = spec_f.coupling
        assert isinstance(coupling, Elementwise)
        additive = isinstance(coupling, Additive) and type(coupling).combine is Additive.combine
        layout = shared.layout
        rest = (
            additive,
            layout.specs[0],
            _update_spec(layout, coupling.arity),
            context.spec,
            context.positions,
            tuple(context.receiving(spec_f.receives[0])),
            tuple(context.receiving(spec_g.receives[0])),
            None if context.empty else (spec_f.receives[0], spec_g.receives[0]),
            context.keys,
            tuple(t.requires_grad for t in context.tensors),
            shared.autocast,
        )
        # each block structure gets functions (code objects) of its own: dynamo counts
        # recompilations per code object, and many sequences may share one layout
        structure = (run.walks[0].structure, run.walks[1].structure)
        value = (_value(coupling), structure, host, *rest)
        lookup = _LOOKUPS.get(value)
        if lookup is None:
            lookup = _LOOKUPS[value] = _Lookup((coupling, *rest), _HOST_OPTIONS if host else None)
        return lookup


_DRAWS = "it draws random numbers (dropout)"
_HOOKS = "it has hooks of its own"
_NONE = (
    "a gradient it passes on is None (an output, a parameter or a keyword tensor that does "
    "not reach the loss)"
)


def _reversible_compiled(back: Backward, dstate: list[list[Any]]) -> bool:
    """Whether a compiled reverse may serve this backward.

    Not where hooks watch the recomputation, nor where an output's gradient is ``None``
    (a compiled one cannot be).
    """
    return not back.accumulate and not any(g is None for part in dstate for g in part)


def _none_flowed(run: BlockRun, back: Backward, dstate: list[list[Any]]) -> bool:
    """Whether a gradient the block's eager reverse passed on was ``None``.

    Its input's, its parameters' (totals so far: blocks after it were reversed first, so a
    ``None`` total is ``None`` from it too), and those of the keyword tensors it receives.
    """
    if any(g is None for part in dstate for g in part):
        return True
    totals = back.totals
    if any(totals[p] is None for j in range(2) for p in run.used(j)):
        return True
    if back.kw_wanted:
        context = run.shared.context
        received = {k for spec in run.program for k in context.receiving(spec.receives[0])}
        return any(back.kw_totals[k] is None for k in back.kw_wanted if k in received)
    return False


class _Lookup:
    """One coupling, block structure, layout and keyword structure: its compiled functions.

    One object per value (``_LOOKUPS``): blocks that share it may run as one graph, and it
    is a key hashed by identity, whatever the size of the structure it stands for.
    """

    __slots__ = ("build", "functions", "options")

    def __init__(self, build: tuple[Any, ...], options: dict[str, Any] | None) -> None:
        self.build = build  # what ``_build`` makes the functions from
        self.options = options  # inductor's
        self.functions: dict[int, tuple[Any, Any]] = {}  # by how many blocks they run

    def call(self, size: int, which: int, *args: Any) -> Any:
        """Call the compiled forward (``which`` 0) or reverse (1) of ``size`` blocks."""
        try:
            return self._functions(size)[which](*args)
        except torch._dynamo.exc.BackendCompilerFailed:
            if self.options is None:
                raise
        # inductor could not build with these options (its C++ wrapper needs Python's
        # headers): its defaults from now on
        self.options = None
        self.functions.clear()
        return self._functions(size)[which](*args)

    def _functions(self, size: int) -> tuple[Any, Any]:
        functions = self.functions.get(size)
        if functions is None:
            functions = self.functions[size] = _build(self.build, size, self.options)
        return functions


# on the CPU, inductor's C++ wrapper calls the kernels: its Python wrapper (allocations, views,
# size checks, one Python line each) costs more than the tiny kernels it calls
_HOST_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}


# the compiled functions of every sequence, by coupling, layout and keyword structure: two
# sequences of one layout (or one rebuilt, copied or loaded) share them, and their graphs
_LOOKUPS: dict[tuple[Any, ...], _Lookup] = {}


class _Pending:
    """Trusted blocks of one structure, one after another, to run as one graph."""

    __slots__ = ("eager", "keys", "lookup", "records", "runs")

    def __init__(self, lookup: _Lookup, eager: Any) -> None:
        self.lookup, self.eager = lookup, eager
        self.runs: list[BlockRun] = []
        self.keys: list[tuple[Any, ...]] = []
        self.records: list[list[Record]] = []


def _ran(run: BlockRun, records: list[Record]) -> None:
    """Note the block's compiled forward calls."""
    for j, record in enumerate(records):
        run.records[j].append(record)
    run.compiled = True


def _reverse_with(
    lookup: _Lookup,
    runs: list[BlockRun],
    back: Backward,
    state: list[Leaves],
    dstate: list[list[Any]],
) -> None:
    """``runs`` (one block, or a group) in reverse, compiled; gradients to ``back``."""
    handles = back.handles
    pfs, ffs, pgs, fgs = [], [], [], []
    for run in runs:
        pf, ff = _handles(run.walks[0], run.records[0][0], handles)
        pg, fg = _handles(run.walks[1], run.records[1][0], handles)
        pfs.append(pf)
        ffs.append(ff)
        pgs.append(pg)
        fgs.append(fg)
    kt, kother = _keywords(runs[0], back.keywords)
    fs, gs = [r.fns[0] for r in runs], [r.fns[1] for r in runs]
    y1, y2 = [t.detach() for t in state[0]], [t.detach() for t in state[1]]
    out = lookup.call(len(runs), 1, fs, gs, pfs, ffs, pgs, fgs, y1, y2, *dstate, kt, kother)
    x1, x2, dx1, dx2, dpfs, dpgs, dkt = out
    for run, dpf, dpg in zip(runs, dpfs, dpgs):
        for j, grads in enumerate((dpf, dpg)):
            found = zip(run.records[j][0].positions, run.walks[j].names)
            wanted = [(p, name) for p, name in found if p >= 0]
            back.add([p for p, _ in wanted], [grads[name] for _, name in wanted])
    back.add_keywords(back.kw_wanted, dkt)
    state[0], state[1] = list(x1), list(x2)
    dstate[0], dstate[1] = list(dx1), list(dx2)


def _on_host(run: BlockRun, signature: tuple[Any, ...]) -> bool:
    """Whether the block's input and keyword tensors are all on the CPU."""
    tensors = run.shared.context.tensors
    return all(d.type == "cpu" for _, _, d in signature) and all(t.is_cpu for t in tensors)


def x_signature(state: list[Leaves]) -> tuple[Any, ...]:
    return tuple((t.shape, t.dtype, t.device) for t in state[0])


def _update_spec(layout: Any, arity: int) -> Any:
    from ._steps import _update_spec as update_spec

    return update_spec(layout, 0, arity)


def _value(coupling: Elementwise) -> Any:
    """A coupling as a key: its type and settings, else the object itself.

    Settings that are plain values make ``Affine(2.0)`` and a copy of it one key.
    """
    settings = vars(coupling)
    if all(isinstance(v, (bool, int, float, str, type(None))) for v in settings.values()):
        return type(coupling), tuple(sorted(settings.items()))
    return coupling


# ---------------------------------------------------------------------------- verdicts


def _forward_verdict(run: BlockRun, call: Call, before: tuple[torch.Tensor, ...]) -> Verdict:
    """Why the block's forward, just run eagerly, cannot run compiled (``None``: it can)."""
    generators = call.generators
    if generators is not None and not same(before, generators.capture()):
        return _DRAWS
    policy = call.policy
    if any(policy.changes(m) for walk in run.walks for m in walk.buffered):
        return "it changes its buffers (running statistics)"
    if run.hooks:
        return _HOOKS
    if any(walk.open for walk in run.walks):
        return "it reads tensors beyond its modules (a closure, a plain attribute)"
    return None


def _untraceable(error: Exception) -> str:
    reason = str(error).strip().split("\n", 1)[0][:200]
    return f"torch.compile cannot trace it whole ({type(error).__name__}: {reason})"


# ------------------------------------------------------------------------ tensors in


def _handles(
    walk: Any, record: Record, handles: Leaves
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The parameters to differentiate (by name) and the others, for the recompute.

    The compiled reverse runs without autograd (inside the node's backward): the
    transforms inside it differentiate, whatever ``requires_grad`` says.
    """
    wanted, fixed = {}, {}
    for t, p, name in zip(record.params, record.positions, walk.names):
        if p >= 0:
            wanted[name] = handles[p]
        else:
            fixed[name] = t
    return wanted, fixed


def _forward_modes(run: BlockRun) -> tuple[list[Any], list[bool]]:
    """The modules of ``f`` and ``g`` and the training flags their first calls found.

    The flags come back shorter than the modules where one module was found in two modes
    (``f`` switched it for ``g``): no single setting replays both calls then.
    """
    found: dict[int, tuple[Any, bool]] = {}
    for j, walk in enumerate(run.walks):
        if not run.records[j]:
            continue
        for m, mode in zip(walk.modules, run.records[j][0].modes):
            seen = found.setdefault(id(m), (m, mode))
            if seen[1] is not mode:
                return [m for m, _ in found.values()], []
    return [m for m, _ in found.values()], [mode for _, mode in found.values()]


def _modes_as_found(run: BlockRun) -> bool:
    """Whether every module of ``f`` and ``g`` is in the mode its forward call found."""
    return all(
        not records or modes_of(walk.modules) == records[0].modes
        for walk, records in zip(run.walks, run.records)
    )


def _keywords(run: BlockRun, tensors: Leaves) -> tuple[Leaves, list[Any]]:
    """The keyword tensors (detached) and every leaf of the keyword arguments."""
    context = run.shared.context
    return [t.detach() for t in tensors], list(context.leaves)


# ---------------------------------------------------------------------- the functions


def _build(key: tuple[Any, ...], size: int, options: dict[str, Any] | None) -> tuple[Any, Any]:
    """The compiled forward and reverse of ``size`` blocks, for one layout and keyword structure.

    They take lists of ``size`` functions and parameter dicts (one block: lists of one).
    """
    (
        coupling,
        additive,
        spec,
        update_spec,
        kw_spec,
        positions,
        recv_f,
        recv_g,
        receives,
        keys,
        needs,
        autocast,
    ) = key
    wanted = [i for i, need in enumerate(needs) if need]
    to_f, to_g = bool(recv_f), bool(recv_g)  # whether it receives keyword tensors
    # the keyword arguments each function is called with, tensors or not (None: all)
    names_f, names_g = (_names(r) for r in receives or (False, False))
    pass_f, pass_g = names_f != frozenset(), names_g != frozenset()

    # dynamo traces no optree structure built outside it: the trees are rebuilt and read
    # by plain Python along a template (supported: dicts, lists, tuples, named tuples)
    stream, updates = _template(spec), _template(update_spec)
    keywords = _template(kw_spec)

    def tree(leaves: Leaves) -> Any:
        return _unflatten(stream, leaves)

    def leaves_of(out: Any) -> Leaves:  # what f or g returned: arity trees like the stream
        found: list[Any] = [None] * update_spec.num_leaves
        _flatten_like(updates, out, found)
        return found

    def kwargs(tensors: Leaves, others: list[Any], names: frozenset | None) -> dict[str, Any]:
        leaves = list(others)
        for i, t in zip(positions, tensors):
            leaves[i] = t
        full = _unflatten(keywords, leaves)
        return full if names is None else {k: v for k, v in full.items() if k in names}

    def combine(x: Leaves, u: Leaves) -> Leaves:
        n = len(x)
        return [coupling.combine(a, *u[i::n]) for i, a in enumerate(x)]

    def uncombine(y: Leaves, u: Leaves) -> Leaves:
        n = len(y)
        return [coupling.uncombine(b, *u[i::n]) for i, b in enumerate(y)]

    def forward(fs, gs, x1, x2, kt, kother):
        # the modules' own parameters: those the forward reads (no gradient is taken)
        kw_f = kwargs(kt, kother, names_f) if pass_f else {}
        kw_g = kwargs(kt, kother, names_g) if pass_g else {}
        for i in range(size):
            x1 = combine(x1, leaves_of(fs[i](tree(x2), **kw_f)))
            x2 = combine(x2, leaves_of(gs[i](tree(x1), **kw_g)))
        return x1, x2

    def half(fn, wanted_p, fixed_p, x_in, y_self, dy_self, kt, kother, routed, names, passed):
        """One function of the block in reverse: rebuild its stream, back-propagate."""

        def call(p, xs, k):
            kw = kwargs(k, kother, names) if passed else {}
            return functional_call(fn, {**fixed_p, **p}, (tree(xs),), kw)

        def run(p, xs, ks):
            k = list(kt)
            for i, t in zip(wanted, ks):
                k[i] = t
            return leaves_of(_with_autocast(autocast, call, p, xs, k))

        ks = [kt[i] for i in wanted] if routed else []
        u, pull = vjp(run, wanted_p, x_in, ks)
        x_self = uncombine(y_self, u)
        if additive:
            du = [_like(d, v) for d, v in zip(dy_self, u)]
            dx_self = list(dy_self)
        else:
            _, pull_c = vjp(lambda xs, us: _with_autocast(autocast, combine, xs, us), x_self, u)
            dx_self, du = pull_c(list(dy_self))
        dp, dx_in, dks = pull(du)
        return x_self, dx_self, dx_in, dp, dks

    def reverse(fs, gs, pfs, ffs, pgs, fgs, y1, y2, dy1, dy2, kt, kother):
        dpfs = [None] * size
        dpgs = [None] * size
        dk = [None] * len(wanted)
        for i in reversed(range(size)):
            y2, dy2, dx1_g, dpgs[i], dk_g = half(
                gs[i], pgs[i], fgs[i], y1, y2, dy2, kt, kother, to_g, names_g, pass_g
            )
            dy1 = [a + b for a, b in zip(dy1, dx1_g)]
            y1, dy1, dx2_f, dpfs[i], dk_f = half(
                fs[i], pfs[i], ffs[i], y2, y1, dy1, kt, kother, to_f, names_f, pass_f
            )
            dy2 = [a + b for a, b in zip(dy2, dx2_f)]
            for n, k in enumerate(wanted):  # None where neither f nor g receives the keyword
                for d, recv in ((dk_f, recv_f), (dk_g, recv_g)):
                    if d and k in recv:
                        dk[n] = d[n] if dk[n] is None else dk[n] + d[n]
        return y1, y2, dy1, dy2, dpfs, dpgs, dk

    compile_ = torch.compile(fullgraph=True, dynamic=False, options=options)
    return compile_(_own_code(forward)), compile_(_own_code(reverse))


def _names(receives: Any) -> frozenset[str] | None:
    """The keyword names a function receives (``None``: every one)."""
    if receives is True:
        return None
    return frozenset(receives or ())


def _own_code(fn: Any) -> Any:
    """``fn`` with a code object of its own.

    Dynamo keeps its graphs, and counts recompilations against its limit, per code object:
    each layout's functions get their own, so that sequences of different layouts (and the
    block structures within each) do not share the limit.
    """
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


class _Leaf:
    """Where leaf ``i`` of a tree sits, in a template of the tree's structure."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


_NODES = (dict, list, tuple)


def _template(spec: Any) -> Any:
    """A tree of the structure ``spec`` with a ``_Leaf`` marker for each leaf.

    Raises ``TypeError`` for a node the plain-Python rebuild cannot make (a custom node).
    """
    template = spec.unflatten([_Leaf(i) for i in range(spec.num_leaves)])

    def check(node: Any) -> None:
        if isinstance(node, _Leaf) or node is None:
            return
        if type(node) not in (dict, OrderedDict, list, tuple) and not _is_namedtuple(node):
            raise TypeError(f"a {type(node).__name__} node")
        for child in node.values() if isinstance(node, dict) else node:
            check(child)

    check(template)
    return template


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _unflatten(template: Any, leaves: Leaves) -> Any:
    if isinstance(template, _Leaf):
        return leaves[template.i]
    if template is None:
        return None
    if isinstance(template, dict):
        return type(template)((k, _unflatten(v, leaves)) for k, v in template.items())
    children = [_unflatten(c, leaves) for c in template]
    if isinstance(template, list):
        return children
    if _is_namedtuple(template):
        return type(template)(*children)
    return tuple(children)


def _flatten_like(template: Any, tree: Any, found: Leaves) -> None:
    """The leaves of ``tree``, read along ``template`` (mappings by key, as optree reads them)."""
    if isinstance(template, _Leaf):
        found[template.i] = tree
    elif isinstance(template, dict):
        for k, v in template.items():
            _flatten_like(v, tree[k], found)
    elif template is not None:
        for i, v in enumerate(template):
            _flatten_like(v, tree[i], found)


def _like(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` reduced to ``out``'s shape and cast to its dtype, as autograd would."""
    if grad.shape != out.shape:
        grad = grad.sum_to_size(out.shape)
    return grad.to(out.dtype)


def _with_autocast(state: AutocastState | None, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a captured autocast state, with ``with`` statements dynamo can trace."""
    settings = () if state is None else state.settings
    cache = True if state is None else state.cache_enabled
    if not settings:
        return fn(*args)
    (t0, on0, dt0), rest = settings[0], settings[1:]
    with torch.autocast(t0, dtype=dt0, enabled=on0, cache_enabled=cache):
        if not rest:
            return fn(*args)
        (t1, on1, dt1), *more = rest
        if more:
            raise TypeError("autocast on more than two device types")
        with torch.autocast(t1, dtype=dt1, enabled=on1, cache_enabled=cache):
            return fn(*args)
