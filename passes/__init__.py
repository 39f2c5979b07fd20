"""Transformations of a captured model and the plans they carry out.

Graph passes (``GraphModule -> PassResult``, run by :class:`rewriter.PassManager`):
``ffn_to_moe.FFNToMoE`` and the clean-ups in ``cleanup``. Plans and module rewrites used by
``rewriter.convert``: ``calibration`` (per-neuron statistics), ``grouping`` (which neurons form
each expert), ``router_init``, ``allocation`` (top_k per block), ``module_swap`` (MoE blocks
into the user's model), ``lower_fp8`` (FP8 modules in place of projections), ``freeze_fp8``
(training-mode FP8 -> inference).
"""

from .cleanup import eliminate_dead_code, remove_identity_ops

__all__ = ["eliminate_dead_code", "remove_identity_ops"]
