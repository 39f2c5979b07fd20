"""Named conversion recipes: ``rewriter.convert(model, recipe="deepseek-v3", ...)``.

A recipe is a frozen description that becomes a :class:`MoEConfig` and/or an
:class:`FP8Config` for a given model: expert counts are fitted to the model's FFN width, so one
recipe works on a 136-wide test model and on SmolLM2's 1536.

=============  ============================================================================
deepseek-v3    fine-grained routed + shared experts (a quarter of each FFN's neurons shared,
               ~16 routed experts, a quarter of them active: ~44% of the neurons per token),
               sigmoid gates normalised over the selected experts with DeepSeek-V3's
               auxiliary-loss-free bias balancing, FP8 E4M3 1x128 / 128x128 in training mode
               (all three GEMMs FP8, master weights kept: ready for continued training)
deepseek-v3-hf the same with one top_k for every block (no per-block allocation) and
               routers without bias (``MoEConfig.router_bias=False``), so
               ``rewriter.save(m, d, format="hf")`` writes a Glm4MoeForCausalLM checkpoint
moe-only       the same experts with hard gates (exact when every expert is active), no FP8
fp8-only       FP8 inference lowering only (weights stored FP8, W8A8)
=============  ============================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from rewriter.passes.ffn_to_moe import MoEConfig
from rewriter.passes.lower_fp8 import FP8Config

from .errors import InputError

__all__ = ["Recipe", "RECIPES", "get_recipe", "fit_experts"]


@dataclass(frozen=True)
class Recipe:
    """``num_experts``: target routed expert count (None: no MoE); ``shared_fraction`` of
    each FFN's neurons form the shared expert; ``active_fraction`` of the routed experts are
    chosen per token. ``fp8``: None, or the FP8Config field values."""

    name: str
    description: str
    num_experts: int | None = 16
    shared_fraction: float = 0.25
    active_fraction: float = 0.25
    gate: str = "hard"
    fp8_mode: str | None = None  # "training" | "inference" | None (no FP8)
    fp8_activations: str = "fp8"
    allocation: str = "auto"  # MoEConfig.allocation; "uniform" keeps a Hugging Face export
    router_bias: bool = True  # MoEConfig.router_bias; False keeps a Hugging Face export

    def with_active(self, active: float) -> Recipe:
        """This recipe with ``active`` (0.25 <= active < 1) of each FFN's neurons active per
        token: a quarter of the routed experts chosen per token, as every layout measured
        best off the calibration domain so far (BENCHMARKS.md, "Quality off the calibration
        domain"), and the shared expert taking the rest of the budget: shared fraction
        ``(4 * active - 1) / 3`` (0.25 at the default 44%, 1/3 at 50%, 2/3 at 75%). The
        expert count stays the recipe's. Raises InputError for a recipe without MoE or an
        ``active`` out of range."""
        if self.num_experts is None:
            raise InputError(f"recipe {self.name!r} converts no FFN to MoE: active= does not "
                             "apply")
        if isinstance(active, bool) or not isinstance(active, (int, float)) or \
                not 0.25 <= active < 1:
            raise InputError(f"active must be a fraction in [0.25, 1) of each FFN's neurons "
                             f"active per token, got {active!r}")
        return replace(self, shared_fraction=(4 * active - 1) / 3, active_fraction=0.25)

    def configs(self, d_ffs: Sequence[int]) -> tuple[object | None, object | None]:
        """(MoEConfig or None, FP8Config or None) for a model whose FFNs have widths
        ``d_ffs``. Raises InputError when the recipe needs FFNs and there are none."""

        moe = None
        if self.num_experts is not None:
            if not d_ffs:
                raise InputError(f"recipe {self.name!r} converts feed-forward blocks, and the "
                                 "model has none (try recipe='fp8-only')")
            experts, shared = fit_experts(sorted(set(d_ffs)), self.num_experts,
                                          self.shared_fraction)
            top_k = max(1, round(experts * self.active_fraction))
            # sigmoid weights are normalised over the selected experts: scale them back to a
            # mean of 1 per selected expert, the weight every neuron had in the dense FFN
            moe = MoEConfig(num_experts=experts, top_k=top_k, shared_width=shared,
                            gate=self.gate, allocation=self.allocation,
                            router_bias=self.router_bias,
                            route_scale=float(top_k) if self.gate == "sigmoid" else 1.0)
        return moe, self.fp8_config()

    def fp8_config(self) -> object | None:
        """The recipe's FP8Config, or None when it does not lower to FP8."""

        if self.fp8_mode is None:
            return None
        return FP8Config(mode=self.fp8_mode, activations=self.fp8_activations)


def fit_experts(d_ffs: Sequence[int], target: int, shared_fraction: float) -> tuple[int, int]:
    """(routed experts, shared width) valid for every width in ``d_ffs``: the expert count
    nearest ``target`` (4..64) for which a shared width within 15% of ``shared_fraction *
    d_ff`` leaves the routed neurons divisible, the shared width nearest its target."""
    low = min(d_ffs)
    want = shared_fraction * low
    widths = sorted(range(int(want * 0.85), int(want * 1.15) + 1), key=lambda s: abs(s - want))
    counts = sorted(range(4, 65), key=lambda n: (abs(n - target), -n))
    for n in counts:
        for s in widths:
            if all(d > s and (d - s) % n == 0 and (d - s) // n >= 1 for d in d_ffs):
                return n, s
    raise InputError(f"no expert count in 4..64 splits FFN widths {list(d_ffs)} with a shared "
                     f"width near {shared_fraction:.0%}: give moe=MoEConfig(...) explicitly")


RECIPES = MappingProxyType({
    r.name: r for r in (
        Recipe("deepseek-v3", "routed + shared experts, sigmoid gates with bias balancing, "
               "FP8 training (1x128 / 128x128)", gate="sigmoid", fp8_mode="training"),
        Recipe("deepseek-v3-hf", "deepseek-v3 with one top_k for every block (no per-block "
               "allocation) and routers without bias: saves as a standard Hugging Face "
               "Glm4Moe checkpoint",
               gate="sigmoid", fp8_mode="training", allocation="uniform", router_bias=False),
        Recipe("moe-only", "routed + shared experts with hard gates, no FP8"),
        Recipe("fp8-only", "FP8 inference lowering only (weights FP8, W8A8)",
               num_experts=None, fp8_mode="inference"),
    )
})


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe]
