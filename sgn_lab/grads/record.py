"""The recording pass: one forward pass under vmap that states each parameter's per-sample
gradient as terms (:mod:`sgn_lab.grads.terms`), and one backward pass for the signals.

The model runs once over all n samples under ``torch.func.vmap``, each sample as a batch of
one, exactly as :func:`sgn_lab.per_sample_grads` runs it. A ``TorchFunctionMode`` sees every
torch function the forward pass calls. Where a trainable parameter is an operand:

- a rule of :mod:`sgn_lab.grads.rules` for that function takes it: the operands its formula
  needs are saved (samples first, as vmap knows the sample axis of every tensor) and the
  autograd edge of the output is kept;
- otherwise (no rule, an option the rule declines, an operand it cannot read) the call gets a
  per-sample copy of the parameter, an expanded view of it with a sample axis: each sample
  then uses its own copy, and the gradient at the copy is that parameter's per-sample
  gradient (the ``vmap`` route, exact for any operation vmap can batch).

The pass names no operation: it reads what to do from the registries of
:mod:`sgn_lab.grads.rules`. ``RULES`` gives the rule of a function (and, optionally, a fused
batched implementation of the calls it takes); ``BATCHED`` a fused batched implementation of
a parameter-free call (scaled dot-product attention); ``EXPANDED`` the plain operations that
replace a kernel vmap cannot batch (the recurrent layers). Python functions with a parameter
operand and no rule (``F.multi_head_attention_forward``) are entered, so that the operations
inside them are seen one by one. A cast, transpose, scaling or slice of a parameter
(:mod:`sgn_lab.grads.rules.aliases`) gives an alias: the rules treat it as the parameter
(transposed, scaled, or a box of it). One ``torch.autograd.grad`` call then asks for the
gradient of Σ_i loss_i at the kept edges only, so no parameter gradient is computed: each
sample's slice of that gradient is its own signal, since under vmap sample i's loss depends
on sample i's slice alone.

What is established rather than assumed: the sample axis of every saved operand and output
(read from vmap, not from the layout); that every saved operand holds the values the
operation read (one the operation writes itself, ``h.mul_(γ)``, is saved as a copy taken
before it runs; the version of every other is taken before it runs and compared after the
forward pass, else that parameter is recorded again through its copy); that a rule states
one use of one operand position (a tensor in two positions of one call takes the copy); and
that every use of every parameter was stated: each stated use reads the parameter through a
view of its own (``_Recorder._use``), and an autograd graph walk finds any other node that
reads a parameter or an alias of one (TorchScript, a C++ extension), whose parameter then
gets vmap per-sample gradients of its own, whole.

Hugging Face's mask code reads mask values to skip building a mask, which vmap refuses:
:func:`sgn_lab.grads.hf_masks.traceable_masks` makes it build the mask during the pass.
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from sgn_lab.grads.batched import (
    broadcast_to_samples,
    current_level,
    innermost,
    is_batched,
    physical,
    sample_first,
)
from sgn_lab.grads.common import LossFn, check_finite, one_sample_loss
from sgn_lab.grads.hf_masks import traceable_masks
from sgn_lab.grads.rng import rng_changed, rng_state, set_rng_state
from sgn_lab.grads.rules import BATCHED, EXPANDED, RULES, Op, Plan, Rule
from sgn_lab.grads.rules.aliases import (
    NO_GRADIENT,
    SLICES,
    Region,
    box,
    compose,
    factor,
    is_cast,
    is_transpose,
)
from sgn_lab.grads.terms import Dense, Term, scaled, transposed

# torch >= 2.11 can call a Python torch function's body with the mode still watching;
# without it such functions are a single operation (their parameters take the vmap route).
_REDISPATCH = getattr(torch.overrides, "redispatch_function", None)


@dataclass(frozen=True)
class _Ref:
    """A parameter, or an alias of it: cast, ``transposed`` (a matrix), a ``region`` of it (a
    box from split, chunk, narrow or slicing), or multiplied by a number ``scale``."""

    name: str
    transposed: bool = False
    region: Region | None = None
    scale: float = 1.0


@dataclass
class _Record:
    """One rule application: the output's edge and what the rule's terms need."""

    edge: GradientEdge
    output: Tensor  # the output's physical tensor
    version: int  # its version when recorded
    axis: int  # its sample axis
    plan: Plan
    refs: dict[str, _Ref]  # taken slot -> parameter
    shapes: dict[str, tuple[int, ...]]  # taken slot -> the operand's shape
    saved: dict[str, Any]
    versions: list[tuple[Tensor, int]]


@dataclass
class _Copy:
    """A parameter's per-sample copy: the batched tensor and the edge of its physical view."""

    batched: Tensor
    edge: GradientEdge
    ref: _Ref
    shape: tuple[int, ...]


@dataclass
class Recording:
    """Terms of each parameter and why some took the vmap route."""

    terms: dict[str, list[tuple[Region | None, Term]]]  # parameter -> (region, term) of uses
    reasons: dict[str, list[str]]  # parameter -> why its copy was used
    unseen: list[str]  # parameters with a use the pass did not see (they take vmap whole)
    randomness: bool  # whether the forward pass drew random numbers


class _Recorder(TorchFunctionMode):
    def __init__(self, params: dict[str, Tensor], n: int, force_copy: dict[str, str]) -> None:
        super().__init__()
        self.refs: dict[int, _Ref] = {id(p): _Ref(name) for name, p in params.items()}
        self.n, self.level = n, -1
        self.force_copy = force_copy
        self.records: list[_Record] = []
        self.copies: dict[int, _Copy] = {}
        self.reasons: dict[str, list[str]] = defaultdict(list)
        self.failed: dict[str, str] = {}
        self.aliases: list[Tensor] = []  # kept alive, so that their ids stay theirs
        self.entered: list[Callable] = []
        # Every use the pass sees reads the parameter (or alias) through a view of its own
        # (``_use``): any other autograd node that reads one is a use no rule saw.
        self.markers: set = set()
        self.tracked: dict = {}  # autograd node of a parameter or alias -> parameter name

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in EXPANDED:  # written out in plain operations, each one recorded
            with self:
                return EXPANDED[func](*args, **kwargs)
        found = [t for t in _tensors(args, kwargs) if id(t) in self.refs]
        if func in BATCHED and not found:
            out = BATCHED[func](args, kwargs, self.level)
            return func(*args, **kwargs) if out is None else out
        if not found or not torch.is_grad_enabled() or _name(func) in NO_GRADIENT:
            return func(*args, **kwargs)
        aliased = self._aliased(func, args, kwargs, found)
        if aliased is not None:
            return aliased
        rule = RULES.get(func)
        if len({id(t) for t in found}) < len(found):
            # One tensor in two operand positions (F.linear(W, W)): a rule would state one
            # position's use while the copy carried both; the copy alone states both.
            rule = None
        if rule is not None:
            return self._by_rule(rule, func, args, kwargs)
        if _REDISPATCH is not None and isinstance(func, types.FunctionType) and (
                func not in self.entered):
            self.entered.append(func)  # a Python function: watch the operations inside it
            try:
                with self:
                    return _REDISPATCH(func, types_, args, kwargs)
            finally:
                self.entered.pop()
        replace = {id(t): self._copy(t, f"{_name(func)} (no rule)") for t in found}
        return func(*_substitute(args, replace), **_substitute(kwargs, replace))

    def _aliased(self, func, args, kwargs, found) -> Any:
        """The output of a cast, transpose or slice of one parameter, registered as aliases;
        None when the call is none of these (nothing has run then)."""
        if len(found) != 1 or not args or args[0] is not found[0]:
            return None
        source, name = args[0], _name(func)
        ref = self.refs[id(source)]

        def run() -> Any:
            return func(self._use(source), *args[1:], **kwargs)

        rest = args[1:]
        if is_cast(name, rest, kwargs):
            out = run()
            return self._register(out, ref) if isinstance(out, Tensor) else None
        if source.dim() == 2 and ref.region is None and is_transpose(name, rest, kwargs):
            return self._register(run(), replace(ref, transposed=not ref.transposed))
        scale = factor(name, rest, kwargs)
        if scale is not None:
            return self._register(run(), replace(ref, scale=ref.scale * scale))
        if name in SLICES and not ref.transposed:
            out = run()
            parts = list(out) if isinstance(out, list | tuple) else [out]
            boxes = [box(part, source) for part in parts]
            if any(b is None for b in boxes):
                return None  # not a box of the parameter: it takes the vmap route instead
            for part, b in zip(parts, boxes, strict=True):
                self._register(part, replace(ref, region=compose(ref.region, b)))
            return out
        return None

    def _register(self, out: Tensor, ref: _Ref) -> Tensor:
        self.refs[id(out)] = ref
        self.aliases.append(out)
        if out.grad_fn is not None:
            self.tracked[out.grad_fn] = ref.name
        return out

    def _use(self, tensor: Tensor) -> Tensor:
        """``tensor`` (a parameter or an alias of one) through a view of its own for one use
        the pass states, so that the graph walk of :func:`record` can tell it from uses that
        no rule saw."""
        view = torch.ops.aten.alias.default(tensor)
        if view.grad_fn is not None:
            self.markers.add(view.grad_fn)
            self.aliases.append(view)
        return view

    def _by_rule(self, rule: Rule, func: Callable, args: tuple, kwargs: dict) -> Any:
        operands = rule.bind(args, kwargs)
        refs = {slot: self.refs[id(v)] for slot, v in operands.items()
                if isinstance(v, Tensor) and id(v) in self.refs}
        plan = rule.plan(Op(rule.name, operands, {s: r.name for s, r in refs.items()}))
        takes, replace = self._prepare(rule, plan, func, args, kwargs, operands, refs)
        args, kwargs = _substitute(args, replace), _substitute(kwargs, replace)
        operands = rule.bind(args, kwargs)
        before = self._read(plan.keep if takes else (), func, args, kwargs, operands)
        out = rule.batched(args, kwargs, self.level) if rule.batched is not None else None
        if out is None:
            out = func(*args, **kwargs)
        if takes:
            self._keep(rule, plan, takes, refs, operands, out, before)
        return out

    def _prepare(self, rule: Rule, plan: Plan, func: Callable, args: tuple, kwargs: dict,
                 operands: dict[str, Any], refs: dict[str, _Ref]
                 ) -> tuple[list[str], dict[int, Tensor]]:
        """The parameter slots the rule takes, and the operands to replace (by id) for the
        call: a per-sample copy of each parameter it does not take, a view of its own of each
        it takes, and a sample axis for the operands the formula reads that have none."""
        takes = [s for s in plan.takes if refs[s].name not in self.force_copy]
        replace: dict[int, Tensor] = {}
        for slot, ref in refs.items():
            if slot not in takes:
                why = (self.force_copy.get(ref.name) or plan.declined.get(slot)
                       or f"its {slot} operand")
                replace[id(operands[slot])] = self._copy(operands[slot], f"{rule.name}: {why}")
        # The formula reads the kept operands with their sample axis; an operand without one
        # (a position-id table, a buffer) gets it as an expanded view.
        in_place = _name(func).endswith("_")
        for slot in (*plan.keep, plan.sample):
            value = operands.get(slot) if slot else None
            if (takes and isinstance(value, Tensor) and id(value) not in self.refs
                    and id(value) not in replace and not is_batched(value, self.level)):
                if in_place and value is args[0]:
                    takes = self._give_up(takes, refs, operands, replace, rule.name,
                                          "the operation writes into an operand without samples")
                else:
                    replace[id(value)] = broadcast_to_samples(value, self.n, self.level)
        if takes and not any(is_batched(v, self.level) or id(v) in replace
                             for v in _tensors(args, kwargs)):
            takes = self._give_up(takes, refs, operands, replace, rule.name,
                                  "no operand carries the samples")
        for slot in takes:
            replace[id(operands[slot])] = self._use(operands[slot])
        return takes, replace

    def _read(self, keep: tuple[str, ...], func: Callable, args: tuple, kwargs: dict,
              operands: dict[str, Any]) -> dict[str, tuple[Any, int | None]]:
        """Each kept operand, samples first, as the operation will read it, with its version.

        The formula must read the values the operation reads: an operand that the operation
        itself writes (h.mul_(γ) keeps h) is saved as a copy taken before it runs, and the
        version of every other is taken before it runs too, so that any write after that,
        this operation's own included, is caught by record(). None: a copy or not a tensor.
        """
        written = _written(func, args, kwargs)
        before: dict[str, tuple[Any, int | None]] = {}
        for slot in keep:
            value = operands[slot]
            if not isinstance(value, Tensor):
                before[slot] = (value, None)
            elif any(_shares_memory(value, w) for w in written):
                before[slot] = (_samples_first(value, self.level).clone(), None)
            else:
                value = _samples_first(value, self.level)
                before[slot] = (value, value._version)
        return before

    def _give_up(self, takes, refs, operands, replace, op, why) -> list[str]:
        for slot in takes:
            replace[id(operands[slot])] = self._copy(operands[slot], f"{op}: {why}")
        return []

    def _keep(self, rule: Rule, plan: Plan, takes: list[str], refs: dict[str, _Ref],
              operands: dict[str, Any], out: Any, before: dict[str, tuple[Any, int | None]]
              ) -> None:
        """Record the call; ``before`` holds each kept operand, samples first, as the
        operation read it, with its version then (None: a copy or not a tensor)."""
        if not is_batched(out, self.level) or not physical(out)[0].requires_grad:
            for slot in takes:  # recorded again, through the copy
                self.failed[refs[slot].name] = f"{rule.name}: its output has no sample axis"
            return
        saved, versions = {}, []
        for slot in plan.keep:
            value, version = before[slot]
            if version is not None:  # the physical tensor's version counter
                versions.append((value, version))
            saved[slot] = value
        tensor, axis = physical(out)
        self.records.append(_Record(
            output_edge(tensor), tensor, tensor._version, axis, plan, {s: refs[s] for s in takes},
            {s: tuple(operands[s].shape) for s in takes}, saved, versions))

    def _copy(self, tensor: Tensor, why: str) -> Tensor:
        ref = self.refs[id(tensor)]
        self.reasons[ref.name].append(why)
        copy = self.copies.get(id(tensor))
        if copy is None:
            batched = broadcast_to_samples(self._use(tensor), self.n, self.level)
            copy = _Copy(batched, get_gradient_edge(physical(batched)[0]), ref,
                         tuple(tensor.shape))
            self.copies[id(tensor)] = copy
            self.aliases.append(tensor)
        return copy.batched


def record(model: nn.Module, loss_fn: LossFn, xs: tuple[Tensor, ...], targets: Tensor,
           params: dict[str, Tensor]) -> Recording:
    """Run the recording pass (again for parameters whose records turned out invalid)."""
    n = targets.shape[0]
    force_copy: dict[str, str] = {}
    state = rng_state(targets.device)
    for _ in range(len(params) + 1):
        recorder, losses = _forward(model, loss_fn, xs, targets, params, n, force_copy)
        nodes, unmarked = _graph(losses, recorder, params)
        invalid = dict(recorder.failed)
        for rec in recorder.records:
            why = ""
            if any(t._version != v for t, v in rec.versions):
                why = "an operand was modified in place after the operation read it"
            elif rec.edge.node not in nodes and rec.output._version != rec.version:
                # An in-place op on a view of the output rebuilt its history: the recorded
                # edge no longer receives the gradient.
                why = "its output was modified in place through a view"
            for ref in rec.refs.values() if why else ():
                invalid[ref.name] = why
        if not invalid:
            break
        force_copy.update(invalid)
        set_rng_state(state, targets.device)  # the same random draws as the first time
    randomness = rng_changed(state, targets.device)
    unseen = [name for name in params if name in unmarked]
    terms = _signals(recorder, losses)
    return Recording(terms, dict(recorder.reasons), unseen, randomness)


def _forward(model, loss_fn, xs, targets, params, n, force_copy):
    recorder = _Recorder(params, n, force_copy)

    def sample_loss(*args: Tensor) -> Tensor:
        *inputs, target = args
        recorder.level = current_level()
        with recorder:
            outputs = model(*(x.unsqueeze(0) for x in inputs))
            loss = loss_fn(outputs, target.unsqueeze(0))
        return one_sample_loss(loss)

    with traceable_masks():
        losses = vmap(sample_loss, randomness="different")(*xs, targets)
    check_finite(losses.detach(), {})
    return recorder, losses


def _signals(recorder: _Recorder, losses: Tensor) -> dict[str, list[tuple[Region | None, Term]]]:
    """One backward pass to the kept edges; each record's and copy's (region, term)."""
    copies = list(recorder.copies.values())
    edges = [r.edge for r in recorder.records] + [c.edge for c in copies]
    signals = (torch.autograd.grad(losses.sum(), edges, allow_unused=True)
               if edges and losses.requires_grad else [None] * len(edges))
    terms: dict[str, list[tuple[Region | None, Term]]] = defaultdict(list)

    def add(ref: _Ref, term: Term, shape: tuple[int, ...]) -> None:
        term = scaled(term, ref.scale) if ref.scale != 1.0 else term
        terms[ref.name].append((ref.region, transposed(term, shape) if ref.transposed else term))

    for rec, signal in zip(recorder.records, signals, strict=False):
        if signal is None:  # the output does not reach the loss: no gradient
            continue
        signal = signal.detach().reshape(rec.output.shape)  # the edge may be the view's base
        made = rec.plan.terms(rec.saved, signal.movedim(rec.axis, 0))
        for slot, term in made.items():
            add(rec.refs[slot], term, rec.shapes[slot])
    for copy, signal in zip(copies, signals[len(recorder.records):], strict=True):
        if signal is not None:
            add(copy.ref, Dense(signal.detach().reshape(signal.shape[0], -1), "copy",
                                "vmap"), copy.shape)
    return dict(terms)


def _graph(losses: Tensor, recorder: _Recorder, params: dict[str, Tensor]
           ) -> tuple[set, set[str]]:
    """The autograd nodes that ``losses`` reaches, and the parameters that one of them reads
    other than through a use the pass stated.

    Every stated use (a rule's operand, a per-sample copy, an alias) reads its parameter
    through a view of its own (``_Recorder._use``); any other node that reads a parameter or
    an alias of one is a use that no rule saw (a TorchScript function, a C++ extension, a
    tensor derived before the pass), and that parameter takes the exact vmap route whole.
    """
    tracked = dict(recorder.tracked)
    for name, p in params.items():
        tracked[get_gradient_edge(p).node] = name
    unmarked: set[str] = set()
    stack, seen = [losses.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            name = tracked.get(child)
            if name is not None and node not in recorder.markers:
                unmarked.add(name)
            stack.append(child)
    return seen, unmarked


def output_edge(tensor: Tensor) -> GradientEdge:
    """The gradient edge of ``tensor``, or of its base when it is a reshaped view of all of it.

    An in-place op on a view (an in-place activation after a linear layer of a 3-D input,
    whose output is a view of the matmul's) rebuilds the view's history, and the gradient no
    longer reaches its old edge; the base's edge still receives it.
    """
    base = tensor._base
    if (base is not None and base.grad_fn is not None and base.numel() == tensor.numel()
            and base.is_contiguous() and tensor.is_contiguous()
            and base.data_ptr() == tensor.data_ptr()):
        return get_gradient_edge(base)
    return get_gradient_edge(tensor)


def _samples_first(value: Tensor, level: int) -> Tensor:
    return sample_first(value) if is_batched(value, level) else value


def _written(func: Callable, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors a call writes into: its first operand for an in-place method
    (``mul_``, ``__imul__``) and its ``out=`` tensors."""
    name = _name(func)
    in_place = (name.endswith("_") and not name.startswith("__")) or (
        name.startswith("__i") and name.endswith("__"))
    out = kwargs.get("out")
    written = [out] if isinstance(out, Tensor) else [t for t in out or () if
                                                      isinstance(t, Tensor)]
    if in_place and args and isinstance(args[0], Tensor):
        written.append(args[0])
    return written


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors (batched or not) are views of one storage."""
    a, b = innermost(a), innermost(b)
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """Tensor operands, one level into lists and tuples (torch.cat takes a list)."""
    out = []
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, Tensor):
                out.append(item)
    return out


def _substitute(values: Any, replace: dict[int, Tensor]) -> Any:
    """``values`` (args tuple or kwargs dict) with tensors replaced by identity."""
    if not replace:
        return values

    def swap(value: Any) -> Any:
        if isinstance(value, list | tuple):
            return type(value)(swap(item) for item in value)
        return replace.get(id(value), value) if isinstance(value, Tensor) else value

    if isinstance(values, dict):
        return {key: swap(value) for key, value in values.items()}
    return tuple(swap(value) for value in values)


def _name(func: Callable) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property such as .shape or .T: named by its descriptor
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name or str(func)

