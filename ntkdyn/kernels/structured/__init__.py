"""Structured empirical NTK: dense, convolution and bias layers without per-example gradients.

For a layer ``y = a W`` seen by one example (``a`` of shape (S, C) after
moving the contracted axes last, ``S`` the positions the weight is shared
over — 1 for a dense layer, the output pixels for a convolution), with
output cotangents ``δ_k = ∂f_k/∂y`` of shape (S, F), the weight's
contribution to the kernel is::

    Θ_W(x, x')[k, l] = ⟨aᵀ δ_k, a'ᵀ δ'_l⟩ = Σ_{s,s'} (a_s · a'_s') (δ_{k,s} · δ'_{l,s'})

so for a dense layer (S = 1) it is the product of two Gram matrices,
``(a·a')(δ_k·δ'_l)``, and no per-example gradient ``aᵀδ_k`` (size C·F) is
ever formed. Convolutions use the same identity over patches; when S² is
large the per-example weight gradient is cheaper and is contracted instead
(chosen per layer by FLOP count). A bias ``y = z + B(b)`` contributes
``⟨Bᵀδ_k, Bᵀδ'_l⟩``; one added right after a dense/conv layer is folded into
it as a constant input column. Every unrecognised leaf is handled by
per-example Jacobians taken in the same reverse passes; the sum over leaves is
exact either way.

Three steps, one module each: :mod:`.jaxpr` reads the per-example jaxpr into a
flat, replayable program; :mod:`.matching` finds the layers (and folds
biases); :mod:`.gram` evaluates the kernel and estimates its cost.

Assumption (as for every tiled method): row ``i`` of ``apply_fn(params, x)``
depends only on ``x[i]`` (no batch statistics, no attention across the
batch). The kernel is that of the per-example function;
:func:`rows_independent` probes this before ``method="auto"`` picks the method.
"""

from ntkdyn.kernels.structured.gram import rows_independent, structured_cost, structured_tile, uses_gram
from ntkdyn.kernels.structured.matching import Site, StructuredPlan, Unsupported, plan

__all__ = [
    "Site",
    "StructuredPlan",
    "Unsupported",
    "plan",
    "structured_tile",
    "structured_cost",
    "rows_independent",
    "uses_gram",
]
