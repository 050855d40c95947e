"""The test oracle: FLix computed the obvious way, one feature at a time.

``y[t] = W x[t] + b + sum_{k in S(example(t))} s_k B_k (A_k drop(x[t]))``

It is written straight from the definition, independent of :class:`~flix_kernels.Routing`'s
slot metadata, so that the routing and every backend are checked against it. Run it in
float64 for a tight oracle. It is also what a user would write in plain PyTorch (PEFT's
mixed-batch style: index_select the tokens of a feature, matmul, index_add back), which the
benchmarks compare against.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["flix_delta_reference", "flix_linear_reference", "token_example_index"]


def token_example_index(num_examples: int, token_shape: Sequence[int], cu_seqlens=None) -> torch.Tensor:
    """(T,) example of each token, from the input's token dims and optional cu_seqlens."""
    if cu_seqlens is not None and not (len(token_shape) == 2 and token_shape[0] == num_examples):
        cu = torch.as_tensor(cu_seqlens).long().cpu()
        return torch.repeat_interleave(torch.arange(num_examples), cu[1:] - cu[:-1])
    per_example = token_shape[1] if len(token_shape) == 2 else 1
    return torch.arange(num_examples).repeat_interleave(per_example)


def flix_delta_reference(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    feature_ids: torch.Tensor,
    rank_offsets: Sequence[int],
    scaling,
    *,
    cu_seqlens=None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Low-rank FLix update, looping over features.

    ``feature_ids`` is ``(B, G)`` (-1 = absent), ``rank_offsets`` the FeatureSpace's. With
    ``dropout_mask`` (same shape as x, 0/1) the low-rank input is ``x * mask / (1 - p)``.
    Differentiable in x, lora_A, lora_B.
    """
    in_f = x.shape[-1]
    out_f = lora_B.shape[0]
    token_shape = tuple(x.shape[:-1])
    ids = torch.as_tensor(feature_ids).long().cpu()
    num_features = len(rank_offsets) - 1
    tok_ex = token_example_index(ids.shape[0], token_shape, cu_seqlens).to(x.device)
    xs = x.reshape(-1, in_f).to(lora_A.dtype)
    if dropout_mask is not None:
        xs = xs * dropout_mask.reshape(-1, in_f).to(xs.dtype) / (1.0 - dropout_p)
    delta = xs.new_zeros(xs.shape[0], out_f)
    if torch.is_tensor(scaling):
        scales = scaling.to(xs.dtype)
    else:
        scales = torch.full((num_features,), float(scaling), dtype=xs.dtype)
    for k in range(num_features):
        has_k = (ids == k).any(1).to(x.device)  # (B,) examples using feature k
        tokens = has_k[tok_ex].nonzero().flatten()
        if tokens.numel() == 0:
            continue
        a_k = lora_A[rank_offsets[k] : rank_offsets[k + 1]]
        b_k = lora_B[:, rank_offsets[k] : rank_offsets[k + 1]]
        h = xs.index_select(0, tokens) @ a_k.t()
        delta = delta.index_add(0, tokens, (h @ b_k.t()) * scales[k].to(x.device))
    return delta.reshape(*token_shape, out_f)


def flix_linear_reference(x, weight, bias, lora_A, lora_B, feature_ids, rank_offsets, scaling, **kw):
    """``F.linear(x, weight, bias) + flix_delta_reference(...)``."""
    delta = flix_delta_reference(x, lora_A, lora_B, feature_ids, rank_offsets, scaling, **kw)
    return F.linear(x, weight, bias) + delta.to(x.dtype)
