"""Hugging Face's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``: GPT-2's and GPT's projections).

Despite its name it is a linear map, ``y = x W + b``, with the weight stored ``(in, out)``: the transpose
of :class:`torch.nn.Linear`'s. Its per-sample weight gradient ``Σ_t a_{b,t} g_{b,t}ᵀ`` is the Linear
factors with the two roles swapped (:class:`~lightning_dp.grad_sample.linear.LinearFactors` with
``transposed=True``), so it takes the fast clipping path (book-keeping, ghost norms) and, in
``clipping_mode="materialize"``, gets the materialised gradient of the same parts.

Registered by qualified name: ``transformers`` is never imported by this package.
"""
from __future__ import annotations

from .linear import LinearFactors
from .registry import register_factored

register_factored("transformers.pytorch_utils.Conv1D")(LinearFactors(transposed=True))
