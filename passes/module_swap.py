"""Module mode: put rewritten blocks into (a copy of) the user's model.

For each FFN match, find how to put its MoE block into the model, using the captured graph's
``nn_module_stack``:

* **whole**: one module computes exactly the FFN (HF ``LlamaMLP``, GPT-2 ``GPT2MLP``):
  replace it by the new block.
* **split**: the up part (projections + activation) is one module whose output is the hidden
  activation and the down projection is a leaf module reading only it (HF BERT's
  ``intermediate`` / ``output.dense``): the up module becomes the new block and the down
  projection an ``nn.Identity``.
* **inline**: no module computes exactly the FFN (its linears, activation and product sit in a
  larger module's forward, F.linear on raw parameters, two FFN branches in one module, an FFN
  that is the model's whole forward). The smallest module that owns every op of the block is
  traced on its own (torch.fx, every child module that holds no op of the block kept as an
  opaque call, so attention and its KV cache stay as they are), the same graph pass as graph
  mode (:class:`~rewriter.passes.ffn_to_moe.FFNToMoE`) rewrites that graph, and the owner keeps
  its class, attributes and submodules but runs the rewritten graph as its forward. The trace
  runs alongside the recorded call, so Python that branches on a tensor's dtype, device or rank
  (BART's ``if h.dtype == torch.float16``) takes the recorded call's branch; tensors the
  forward makes (``torch.tensor(...)``) become non-persistent buffers of the owner. An FFN
  module the forward calls several times is rewritten once.

Checks (all before the model changes): the owner traces, its graph holds the same FFN (same
weights), and its arguments can be passed through. Emits: the swapped modules; an inline owner
gets a subclass of its own class (same name) whose ``forward`` is the rewritten graph's code.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from rewriter.capture import (
    buffers_kept,
    kv_cache_off,
    normalize_inputs,
    outputs_close,
    training_mode,
)
from rewriter.errors import InputError
from rewriter.graph_ops import (
    attach,
    common_module,
    drop_identity_views,
    fetch_attr,
    module_stack,
    owning_module,
    slice_split_views,
)
from rewriter.patterns import FFNMatch, analyze_ffns

from .cleanup import is_identity_op
from .ffn_to_moe import FFNToMoE

__all__ = [
    "ModuleSwap",
    "InlineRewrite",
    "plan_module_swap",
    "plan_module_swaps",
    "apply_module_swaps",
]


@dataclass(frozen=True)
class ModuleSwap:
    block: str  # module FQN that becomes the new block
    identity: str | None  # module FQN that becomes nn.Identity (split form), else None


@dataclass(frozen=True, eq=False)
class InlineRewrite:
    """Rewrite the graph of ``owner`` (an FQN, "" for the root) so that its forward calls the
    MoE block in place of the FFN whose down projection reads ``down_weight``."""

    owner: str
    down_weight: str  # FQN of the FFN's down-projection weight, relative to the owner
    graph: Graph = field(repr=False)  # the owner's traced forward (targets relative to it)
    signature: inspect.Signature = field(repr=False)  # the owner's forward, without self
    names: tuple[str, ...]  # graph placeholders, in order: forward parameters it receives
    baked: Mapping[str, Any] = field(default_factory=dict, repr=False)  # traced as constants
    # tensors the forward made while traced (torch.tensor(...)): become non-persistent buffers
    constants: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)


# ----------------------------------------------------------------------------- what it matches


def _compute_nodes(nodes) -> set[Node]:
    """Tensor-computing nodes, without parameter reads, size queries, identity ops and nodes
    whose value nobody uses (torch.export's ``_guards_fn`` carries the stack of the first
    module the model calls)."""
    out = set()
    for n in nodes:
        if n.op in ("get_attr", "placeholder", "output") or is_identity_op(n):
            continue
        if not n.users:
            continue
        val = n.meta.get("val")
        if val is not None and not isinstance(val, torch.Tensor):
            continue
        out.add(n)
    return out


def _nodes_in(gm: GraphModule, module: str) -> set[Node]:
    return _compute_nodes(n for n in gm.graph.nodes if module in module_stack(n))


def _exact_swap(gm: GraphModule, match: FFNMatch) -> ModuleSwap | None:
    block_nodes = _compute_nodes(match.nodes)
    owner = match.module
    if owner and _nodes_in(gm, owner) == block_nodes:
        return ModuleSwap(owner, None)
    down = match.projections["down"]
    down_nodes = _compute_nodes(down.nodes)
    up_nodes = block_nodes - down_nodes
    up_owner = common_module(sorted({owning_module(n) for n in up_nodes}))
    down_module = down.module
    if (
        up_owner
        and _nodes_in(gm, up_owner) == up_nodes
        and _nodes_in(gm, down_module) == down_nodes
        and not down_module.startswith(up_owner + ".")
    ):
        return ModuleSwap(up_owner, down_module)
    return None


def plan_module_swap(gm: GraphModule, match: FFNMatch) -> ModuleSwap:
    """The whole or split swap of ``match``; InputError when no module computes exactly the
    block (:func:`plan_module_swaps` then rewrites the owner's graph instead)."""
    swap = _exact_swap(gm, match)
    if swap is None:
        raise InputError(
            f"FFN {match.module or '<root>'}: no module computes exactly this block (its ops "
            "are mixed with others in the module's forward), so it cannot be swapped as a "
            "module; plan_module_swaps rewrites the graph of the module that owns it"
        )
    return swap


# ----------------------------------------------------------------------------- inline: tracing


def _owner_of(match: FFNMatch) -> str:
    """The innermost module that runs every op of the block ("" for the root)."""
    nodes = _compute_nodes(match.nodes)
    return common_module(sorted({owning_module(n) for n in nodes}))


def _relative(fqn: str, owner: str) -> str:
    return fqn[len(owner) + 1:] if owner else fqn


def _record_inputs(model: nn.Module, owners: Sequence[str],
                   example_inputs: Any) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each owner's forward receives on the example inputs (first call)."""
    args, kwargs = normalize_inputs(example_inputs)
    seen: dict[str, tuple[tuple, dict]] = {}
    if "" in owners:
        seen[""] = (args, dict(kwargs))
    handles = []
    for fqn in owners:
        if not fqn:
            continue

        def hook(_m, a, kw, _fqn=fqn):
            seen.setdefault(_fqn, (tuple(a), dict(kw)))

        handles.append(model.get_submodule(fqn).register_forward_pre_hook(hook,
                                                                          with_kwargs=True))
    try:
        with training_mode(model, False), kv_cache_off(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


# what a traced forward may ask of a tensor and get the recorded call's answer to (so Python
# decides on it at conversion time: ``if h.dtype == torch.float16``); shapes stay symbolic
_CONCRETE_METADATA = frozenset({"dtype", "device", "ndim", "dim", "is_cuda", "layout",
                                "is_floating_point", "is_complex"})


class _MetadataProxy(torch.fx.Proxy):
    """A proxy that answers :data:`_CONCRETE_METADATA` from the value its node had on the
    recorded call; everything else is recorded as usual."""

    def __getattr__(self, k: str) -> Any:
        value = self.tracer.values.get(self.node) if k in _CONCRETE_METADATA else None
        if isinstance(value, torch.Tensor):
            return getattr(value, k)
        return super().__getattr__(k)

    def __iter__(self):
        """A sequence whose length the recorded call knows (``*x.shape[:-1]``): one
        ``getitem`` proxy per element, so the sizes stay symbolic."""
        value = self.tracer.values.get(self.node)
        if isinstance(value, (tuple, list)):  # torch.Size too
            return iter([self[i] for i in range(len(value))])
        return super().__iter__()

    def __len__(self) -> int:
        value = self.tracer.values.get(self.node)
        if isinstance(value, (tuple, list)):
            return len(value)
        return super().__len__()


class _OwnerTracer(torch.fx.Tracer):
    """Trace a module's own forward: a child module is one opaque call unless it runs an op of
    an FFN being rewritten (then it is traced through); nn.Linear is always a call (the
    matcher reads it as a projection). Every node is also run on the recorded call's values
    (``inputs``: placeholder name -> value), so tensor metadata Python branches on is known."""

    def __init__(self, keep_open: set[str], inputs: Mapping[str, Any]):
        super().__init__()
        self.keep_open = keep_open  # FQNs (under the wrapper) of modules to trace through
        self.inputs = inputs
        self.values: dict[Node, Any] = {}
        self._evaluating = False  # running a node on values: module calls are plain calls

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if not module_qualified_name:
            return False
        if type(m) is nn.Linear:
            return True
        return module_qualified_name not in self.keep_open

    def proxy(self, node: Node) -> torch.fx.Proxy:
        return _MetadataProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:  # fx patches Module.__call__ while tracing: run it, record nothing
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:  # ... and Module.__getattr__: parameters are plain tensors
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if isinstance(proxy, torch.fx.Proxy):
            self._evaluate(proxy.node)
        return proxy

    def _evaluate(self, node: Node) -> None:
        """The node's value on the recorded call (absent when it cannot be computed)."""
        missing = object()

        def value(n: Node) -> Any:
            if n not in self.values and n.op == "get_attr":  # fx adds constants directly
                self._evaluate(n)
            return self.values.get(n, missing)

        args = torch.fx.node.map_arg(node.args, value)
        kwargs = torch.fx.node.map_arg(node.kwargs, value)
        if any(v is missing for v in torch.utils._pytree.tree_leaves((args, kwargs))):
            return
        self._evaluating = True
        try:
            with torch.no_grad():
                if node.op == "placeholder":
                    out = self.inputs.get(str(node.target), missing)
                    out = out.clone() if isinstance(out, torch.Tensor) else out
                elif node.op == "get_attr":
                    out = fetch_attr(self.root, str(node.target))
                elif node.op == "call_function":
                    out = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    out = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "call_module":
                    out = self.root.get_submodule(str(node.target))(*args, **kwargs)
                else:
                    return
        except Exception:
            return
        finally:
            self._evaluating = False
        if out is not missing:
            self.values[node] = out


_WRAPPED = "owner"


def _calling_wrapper(owner: nn.Module, names: Sequence[str], positional: int,
                     baked: Mapping[str, Any]) -> nn.Module:
    """A module whose forward(self, <names - baked>) calls ``owner.forward``: the first
    ``positional`` names by position, the rest by keyword (so a ``**kwargs`` parameter
    receives its recorded entries one by one); a ``baked`` name passes its recorded value."""

    def ref(n: str) -> str:
        return f"self._baked[{n!r}]" if n in baked else n

    params = ", ".join(n for n in names if n not in baked)
    call = ", ".join([*(ref(n) for n in names[:positional]),
                      *(f"{n}={ref(n)}" for n in names[positional:])])
    src = f"def forward(self, {params}):\n    return self.{_WRAPPED}.forward({call})\n"
    scope: dict[str, Any] = {}
    exec(compile(src, f"<rewriter inline {type(owner).__name__}>", "exec"), scope)  # noqa: S102
    wrapper = type("_CallOwner", (nn.Module,), {"forward": scope["forward"]})()
    setattr(wrapper, _WRAPPED, owner)
    wrapper._baked = dict(baked)
    return wrapper


def _same_output(a: Any, b: Any) -> bool:
    error = outputs_close(a, b)
    leaves = [x for x in torch.utils._pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    scale = max((float(x.double().abs().max()) for x in leaves if x.numel()), default=1.0)
    return error <= 1e-5 * max(scale, 1.0)


def _train_mode_code(owner: nn.Module, trace: Callable[[], Graph]) -> str | None:
    """The code of ``trace()`` run with ``owner`` in train mode (None if it fails). Tracing
    runs every node on the recorded values: the global RNG (dropout) and the buffers (batch
    norm's running statistics) are as they were afterwards."""
    try:
        with training_mode(owner, True), buffers_kept(owner), torch.random.fork_rng(), \
                torch.no_grad():
            return trace().python_code("self").src
    except Exception:
        return None


def _warn_if_mode_dependent(owner: nn.Module, eval_code: str, train_code: str | None) -> None:
    """The owner's graph is traced in eval mode. A forward that reads ``self.training`` itself
    (``F.dropout(x, p, training=self.training)``: OPT's decoder layer) traces to other code in
    train mode, and the rewritten forward keeps the eval behaviour in both; submodules such as
    ``nn.Dropout`` stay calls and keep their runtime mode."""
    if train_code != eval_code:
        warnings.warn(
            f"{type(owner).__name__}.forward reads self.training outside its submodules (e.g. "
            "F.dropout(..., training=self.training)); its FFN is rewritten from a graph traced "
            "in eval mode, so in train mode that op now behaves as in eval mode (no dropout). "
            "Make it a submodule (nn.Dropout) to keep it mode-dependent", stacklevel=4)


def _trace_owner(owner: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                 block_modules: set[str]) -> tuple[Graph, inspect.Signature, tuple[str, ...],
                                                   dict[str, Any], dict[str, torch.Tensor]]:
    """The owner's forward as a graph of its recorded call, with the tensors the trace made
    (their get_attr targets renamed ``_rewriter_constant<i>``). First every argument is a
    placeholder; if the graph then disagrees with the owner on the recorded call (Python
    decided something on an argument, ``if cache is not None``, which a placeholder cannot
    carry), the non-tensor arguments are baked in instead, and calls must pass the same."""
    signature = inspect.signature(owner.forward)
    params = list(signature.parameters.values())
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:len(args)]
    if len(positional) < len(args):
        raise InputError(f"{type(owner).__name__}.forward takes *args; cannot trace it")
    names = (*positional, *kwargs)
    if len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
        raise InputError(f"{type(owner).__name__}.forward: unusable argument names {names}")
    values = dict(zip(positional, args)) | dict(kwargs)
    keep_open = {_WRAPPED} | {f"{_WRAPPED}.{m}" if m else _WRAPPED for m in block_modules}
    with training_mode(owner, False), torch.no_grad():  # dropout off (a model in train mode)
        expected = owner(*args, **kwargs)

    def trace(wrapper: nn.Module, baked: dict[str, Any]) -> tuple[Graph, dict]:
        tracer = _OwnerTracer(keep_open, {n: v for n, v in values.items() if n not in baked})
        return tracer.trace(wrapper), tracer.values

    def attempt(baked: dict[str, Any]) -> tuple[Graph, nn.Module, str] | BaseException:
        wrapper = _calling_wrapper(owner, names, len(positional), baked)
        try:
            with training_mode(owner, False):
                graph, traced_values = trace(wrapper, baked)
            code = graph.python_code("self").src  # as traced, for the train-mode comparison
            for node, value in traced_values.items():  # shapes for the canonical spellings
                if isinstance(value, torch.Tensor):
                    node.meta.setdefault("val", torch.empty_like(value, device="meta"))
            traced_module = GraphModule(wrapper, graph)
            slice_split_views(traced_module)
            drop_identity_views(traced_module)
            with training_mode(owner, False), torch.no_grad():
                got = traced_module(*(values[n] for n in names if n not in baked))
        except Exception as exc:
            return exc
        if not _same_output(expected, got):
            return InputError(f"the traced forward of {type(owner).__name__} differs from it "
                              "on the recorded call")
        return graph, wrapper, code

    baked: dict[str, Any] = {}
    found = attempt(baked)
    if isinstance(found, BaseException):  # bake the non-tensor arguments, then free each we can
        baked = {n: v for n, v in values.items() if not isinstance(v, torch.Tensor)}
        found = attempt(baked)
        if isinstance(found, BaseException):
            raise found
        for name in list(baked):
            trial = {k: v for k, v in baked.items() if k != name}
            again = attempt(trial)
            if not isinstance(again, BaseException):
                baked, found = trial, again
    graph, wrapper, eval_code = found
    _warn_if_mode_dependent(owner, eval_code, _train_mode_code(
        owner, lambda: trace(_calling_wrapper(owner, names, len(positional), baked), baked)[0]))
    prefix = _WRAPPED + "."
    constants: dict[str, torch.Tensor] = {}
    for node in graph.nodes:  # targets relative to the owner
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            if target.startswith("_baked"):
                raise InputError(f"{type(owner).__name__}: a baked argument is read as a tensor")
            value = getattr(wrapper, target, None) if "." not in target else None
            if node.op == "get_attr" and isinstance(value, torch.Tensor):  # fx's constants
                node.target = f"_rewriter_constant{len(constants)}"
                constants[node.target] = value
                continue
            if not target.startswith(prefix):
                raise InputError(f"{type(owner).__name__}: traced graph reads {target!r} outside "
                                 "the module")
            node.target = target[len(prefix):]
    traced = tuple(n for n in names if n not in baked)
    return graph, signature.replace(parameters=params), traced, dict(baked), constants


def _with_constants(module: nn.Module, constants: Mapping[str, torch.Tensor]) -> nn.Module:
    """``module`` itself, or (when the traced graph made tensors) a shell whose children are
    the module's and whose buffers are the constants, for building a GraphModule to inspect."""
    if not constants:
        return module
    shell = nn.Module()
    shell._modules.update(module._modules)
    shell._parameters.update(module._parameters)
    shell._buffers.update(module._buffers)
    for name, value in constants.items():
        shell.register_buffer(name, value, persistent=False)
    return shell


def _ancestors(fqns: set[str]) -> set[str]:
    """Every module FQN on the path to each of ``fqns`` (the fqns included)."""
    out = set()
    for f in fqns:
        parts = f.split(".") if f else []
        out.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    return out


def _local_matches(gm: GraphModule, wanted: Sequence[str]) -> list[tuple[int, FFNMatch]]:
    """(index into ``wanted``, match) for every FFN of ``gm`` whose down-projection weight is
    wanted, in graph order (an FFN computed twice in the forward matches twice)."""
    index = {w: i for i, w in enumerate(wanted)}
    return [(index[m.projections["down"].weight.fqn], m) for m in analyze_ffns(gm).matches
            if m.projections["down"].weight.fqn in index]


def plan_module_swaps(model: nn.Module, gm: GraphModule, matches: Sequence[FFNMatch],
                      example_inputs: Any) -> list[ModuleSwap | InlineRewrite]:
    """One plan per match: a whole/split :class:`ModuleSwap` where a module computes exactly
    the block, else an :class:`InlineRewrite` of the graph of the module that owns it. Raises
    :class:`InputError` naming the FFN when neither works; nothing is changed."""
    plans: list[ModuleSwap | InlineRewrite | None] = [_exact_swap(gm, m) for m in matches]
    swapped = sorted({p.block for p in plans if p is not None})
    if swapped:  # a module called with more than its input (I-BERT's scaling factors) would
        calls = _record_inputs(model, swapped, example_inputs)  # lose the rest: rewrite its
        for i, plan in enumerate(plans):  # owner's graph instead
            args, kwargs = calls.get(plan.block, ((None,), {})) if plan else ((None,), {})
            if plan is not None and len(args) + len(kwargs) > 1:
                plans[i] = None
    inline = [(i, m, _owner_of(m)) for i, m in enumerate(matches) if plans[i] is None]
    if not inline:
        return plans  # type: ignore[return-value]
    owners = sorted({o for _, _, o in inline})
    recorded = _record_inputs(model, owners, example_inputs)
    for owner in owners:
        here = [(i, m) for i, m, o in inline if o == owner]
        where = f"FFN {here[0][1].module or '<root>'}"
        if owner not in recorded:
            raise InputError(f"{where}: its owner {owner or '<root>'} never runs on the example "
                             "inputs, so its graph cannot be traced")
        module = model.get_submodule(owner) if owner else model
        block_modules = {_relative(owning_module(n), owner) for _, m in here
                         for n in _compute_nodes(m.nodes)}
        block_modules = {b for b in _ancestors(block_modules) if b}
        args, kwargs = recorded[owner]
        try:
            graph, signature, names, baked, constants = _trace_owner(module, args, kwargs,
                                                                     block_modules)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"{where}: no module computes exactly this block and the forward of its owner "
                f"{owner or '<root>'} ({type(module).__name__}) cannot be traced to rewrite "
                f"it: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; use "
                "mode='graph'") from exc
        local = GraphModule(_with_constants(module, constants), graph)
        wanted = [_relative(m.projections["down"].weight.fqn, owner) for _, m in here]
        found = _local_matches(local, wanted)
        if {i for i, _ in found} != set(range(len(wanted))):
            missing = sorted(set(wanted) - {wanted[i] for i, _ in found})
            raise InputError(
                f"{where}: the traced forward of its owner {owner or '<root>'} does not hold "
                f"the FFN reading {missing[0]!r} as one block; use mode='graph'")
        for (i, _m), w in zip(here, wanted):
            plans[i] = InlineRewrite(owner, w, graph, signature, names, baked, constants)
    return plans  # type: ignore[return-value]


# ----------------------------------------------------------------------------- what it emits


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    try:
        model.set_submodule(fqn, module, strict=True)
    except AttributeError as e:
        raise InputError(f"module {fqn!r} does not exist in the model") from e


def _targets(graph: Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}


def _delete(root: nn.Module, fqn: str) -> None:
    parent, _, name = fqn.rpartition(".")
    holder = fetch_attr(root, parent) if parent else root
    if hasattr(holder, name):
        delattr(holder, name)


def _used(target: str, targets: set[str]) -> bool:
    """``target`` or something under it is among ``targets``."""
    return any(t == target or t.startswith(target + ".") for t in targets)


def _prefixes(fqn: str) -> list[str]:
    """The proper module prefixes of ``fqn``: "a.b.weight" -> ["a", "a.b"]."""
    parts = fqn.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _put(root: nn.Module, fqn: str, value: Any) -> None:
    parent, _, name = fqn.rpartition(".")
    holder = fetch_attr(root, parent) if parent else root
    attach(holder, name, value)


def _graph_forward(graph_fn: Callable[..., Any], signature: inspect.Signature,
                   names: tuple[str, ...], baked: Mapping[str, Any]) -> Callable[..., Any]:
    """forward(self, *args, **kwargs) with the owner's own signature: binds the call as the
    original forward would, passes the traced arguments to the graph's code, and refuses an
    argument the graph was not traced with (it would otherwise be dropped silently)."""
    params = signature.parameters
    var_kw = next((p.name for p in params.values() if p.kind is p.VAR_KEYWORD), None)
    traced = set(names)

    def default(name: str) -> Any:
        p = params.get(name)
        return None if p is None or p.default is inspect.Parameter.empty else p.default

    def forward(self, *args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        given = dict(bound.arguments)
        if var_kw:
            given.update(given.pop(var_kw, None) or {})
        for name, value in baked.items():
            now = given.pop(name, default(name))
            if not (now is value or (type(now) is type(value) and now == value)):
                raise InputError(
                    f"{type(self).__name__}: its FFN was rewritten from a graph traced with "
                    f"{name}={value!r}; this call passes {name}={now!r}. Convert with example "
                    "inputs that make the same call")
        extra = sorted(k for k, v in given.items() if k not in traced and v is not None)
        if extra:
            raise InputError(
                f"{type(self).__name__}: its FFN was rewritten from a graph traced without "
                f"argument(s) {', '.join(extra)}; convert with example inputs that pass them")
        call = {}
        for name in names:
            if name in given:
                call[name] = given[name]
            elif name in params and params[name].default is not inspect.Parameter.empty:
                call[name] = params[name].default
            else:
                call[name] = None
        return graph_fn(self, **call)

    forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                    *params.values()])
    return forward


def _rewrite_owner(model: nn.Module, rewrites: Sequence[InlineRewrite],
                   blocks: Sequence[nn.Module], reports: Sequence[dict]) -> None:
    first = rewrites[0]
    owner = model.get_submodule(first.owner) if first.owner else model
    graph = copy.deepcopy(first.graph)  # fresh nodes: a plan can be applied to several copies
    for name, value in first.constants.items():
        owner.register_buffer(name, value.clone(), persistent=False)
    local = GraphModule(owner, graph)
    found = _local_matches(local, [r.down_weight for r in rewrites])
    result = FFNToMoE([m for _, m in found], [blocks[i] for i, _ in found],
                      [reports[i] for i, _ in found])(local)
    new = result.graph_module
    before, after = _targets(first.graph), _targets(new.graph)
    for target in sorted(after - before):  # the MoE blocks (and any constants fx made)
        _put(owner, target, fetch_attr(new, target))
    gone = [t for t in before - after if not _used(t, after)]
    for target in sorted(gone, key=len, reverse=True):  # the dense FFN's modules and tensors
        _delete(owner, target)
    emptied = {p for t in gone for p in _prefixes(t)} - {p for t in after for p in _prefixes(t)}
    for prefix in sorted(emptied, key=len, reverse=True):  # a module whose weights the FFN
        try:  # read as tensors (x @ fc1.weight.T) is left holding nothing: drop it too
            module = owner.get_submodule(prefix)
        except AttributeError:
            continue
        if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
            _delete(owner, prefix)
    cls = type(owner)
    base = getattr(cls, "_rewriter_base", cls)
    forward = _graph_forward(type(new).forward, first.signature, first.names, first.baked)
    owner.__class__ = type(base.__name__, (base,), {
        "forward": forward, "_rewriter_base": base, "__module__": base.__module__,
        "__qualname__": base.__qualname__, "_rewriter_code": new.code,
    })


def apply_module_swaps(model: nn.Module, swaps: Sequence[ModuleSwap | InlineRewrite],
                       blocks: Sequence[nn.Module],
                       reports: Sequence[dict] | None = None) -> nn.Module:
    """Put ``blocks`` into ``model`` as planned (whole / split swaps, then inline rewrites,
    one per owner)."""
    reports = list(reports) if reports is not None else [{} for _ in blocks]
    inline: dict[str, list[int]] = {}
    for i, (swap, block) in enumerate(zip(swaps, blocks)):
        if isinstance(swap, InlineRewrite):
            inline.setdefault(swap.owner, []).append(i)
            continue
        _set(model, swap.block, block)
        if swap.identity is not None:
            _set(model, swap.identity, nn.Identity())
    for owner in sorted(inline, key=lambda o: -len(o.split("."))):  # innermost first
        idx = inline[owner]
        _rewrite_owner(model, [swaps[i] for i in idx], [blocks[i] for i in idx],
                       [reports[i] for i in idx])
    return model
