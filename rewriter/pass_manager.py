"""Pass contract and pass manager.

A pass is any callable ``GraphModule -> PassResult`` with a ``name`` (or ``__name__``). The
manager runs passes in order; after each it lints the graph, optionally checks the numerics
against the previous graph on seeded inputs, and records a :class:`PassRecord` (with a
structural snapshot of the graph before and after, for diffs) in its history. Any failure is a
:class:`PassError` naming the pass and the stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .capture import capture_info, outputs_close
from .errors import PassError
from .snapshot import GraphSnapshot, snapshot

__all__ = [
    "PassResult",
    "PassRecord",
    "PipelineResult",
    "PassManager",
    "pass_name",
    "HISTORY_META_KEY",
    "run_passes",
]

HISTORY_META_KEY = "rewriter.history"


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether it changed, a report."""

    graph_module: GraphModule
    modified: bool
    report: Mapping[str, Any] = field(default_factory=dict)


def pass_name(p: Callable[..., Any]) -> str:
    return str(getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__)


@dataclass(frozen=True)
class PassRecord:
    """One pass as it ran: inspection reads these."""

    name: str
    modified: bool
    report: Mapping[str, Any]
    seconds: float
    before: GraphSnapshot
    after: GraphSnapshot
    max_rel_error: float | None  # vs the previous graph, when numerics were checked


@dataclass(frozen=True)
class PipelineResult:
    graph_module: GraphModule
    history: tuple[PassRecord, ...]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.history)


InputFactory = Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]


def _relative_error(reference: Any, actual: Any) -> float:
    abs_err = outputs_close(reference, actual)
    leaves = [x for x in pytree.tree_leaves(reference) if isinstance(x, torch.Tensor)]
    scale = max((x.double().abs().max().item() for x in leaves if x.numel()), default=0.0)
    return abs_err / scale if scale > 0 else abs_err


class PassManager:
    """Run passes over a GraphModule with lint, optional numeric checks, and a history.

    ``check_numerics``: compare each pass's output graph with its input graph on
    ``num_checks`` seeded inputs, failing when the relative error exceeds ``rtol`` (a float, or a
    mapping pass-name -> rtol for passes that change numerics on purpose, e.g. FP8 lowering).
    Inputs come from ``input_factory(seed) -> (args, kwargs)`` or, by default, from the example
    inputs recorded at capture.
    """

    def __init__(
        self,
        passes: Iterable[Callable[[GraphModule], PassResult]],
        *,
        lint: bool = True,
        check_numerics: bool = False,
        rtol: float | Mapping[str, float] = 1e-5,
        num_checks: int = 1,
        input_factory: InputFactory | None = None,
    ):
        self.passes = tuple(passes)
        for p in self.passes:
            if not callable(p):
                raise TypeError(f"pass {p!r} is not callable")
        self.lint = lint
        self.check_numerics = check_numerics
        self.rtol = rtol
        self.num_checks = num_checks
        self.input_factory = input_factory

    def _inputs(self, gm: GraphModule, seed: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.input_factory is not None:
            return self.input_factory(seed)
        info = capture_info(gm)
        if info is None:
            raise ValueError(
                "check_numerics needs inputs: pass input_factory=, or capture the graph with "
                "rewriter.capture so its example inputs are recorded"
            )
        return info.example_args, dict(info.example_kwargs)

    def _rtol_for(self, name: str) -> float:
        if isinstance(self.rtol, Mapping):
            return float(self.rtol.get(name, 1e-5))
        return float(self.rtol)

    def run(self, gm: GraphModule) -> PipelineResult:
        history: list[PassRecord] = list(gm.meta.get(HISTORY_META_KEY, ()))
        for p in self.passes:
            name = pass_name(p)
            before = snapshot(gm)
            references = []
            if self.check_numerics:
                with torch.no_grad():
                    for seed in range(self.num_checks):
                        args, kwargs = self._inputs(gm, seed)
                        references.append((args, kwargs, gm(*args, **kwargs)))
            start = time.perf_counter()
            try:
                result = p(gm)
            except PassError:
                raise
            except Exception as exc:
                raise PassError(name, "run", f"{type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult) or not isinstance(
                result.graph_module, GraphModule
            ):
                raise PassError(
                    name, "contract",
                    f"returned {type(result).__name__}; a pass must return "
                    "PassResult(graph_module, modified, report)",
                )
            new_gm = result.graph_module
            if self.lint:
                try:
                    new_gm.graph.lint()
                    new_gm.recompile()
                except Exception as exc:
                    raise PassError(name, "lint", f"{type(exc).__name__}: {exc}") from exc
            worst = None
            if self.check_numerics:
                worst = 0.0
                with torch.no_grad():
                    for args, kwargs, ref in references:
                        try:
                            out = new_gm(*args, **kwargs)
                        except Exception as exc:
                            raise PassError(
                                name, "numerics",
                                f"rewritten graph fails to run: {type(exc).__name__}: {exc}",
                            ) from exc
                        worst = max(worst, _relative_error(ref, out))
                tol = self._rtol_for(name)
                if not worst <= tol:
                    raise PassError(
                        name, "numerics",
                        f"output changed: max relative error {worst:.3g} > rtol {tol:.3g}",
                    )
            for key in ("rewriter.capture",):
                if key in gm.meta and key not in new_gm.meta:
                    new_gm.meta[key] = gm.meta[key]
            history.append(
                PassRecord(
                    name=name,
                    modified=bool(result.modified),
                    report=MappingProxyType(dict(result.report)),
                    seconds=seconds,
                    before=before,
                    after=snapshot(new_gm),
                    max_rel_error=worst,
                )
            )
            new_gm.meta[HISTORY_META_KEY] = tuple(history)
            gm = new_gm
        return PipelineResult(gm, tuple(history))

    def __call__(self, gm: GraphModule) -> PipelineResult:
        return self.run(gm)


def run_passes(gm: GraphModule, passes: Sequence[Callable[[GraphModule], PassResult]],
               **options: Any) -> PipelineResult:
    """Shorthand for ``PassManager(passes, **options).run(gm)``."""
    return PassManager(passes, **options).run(gm)

