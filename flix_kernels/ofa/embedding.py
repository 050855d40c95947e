"""FactorizedEmbedding: a drop-in ``nn.Embedding`` whose table is coords (V x k) @ primitive (k x D)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .init import factorize
from .kernel import factorized_embedding, tied_logits

__all__ = ["FactorizedEmbedding"]


class FactorizedEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim, padding_idx)`` with the table factorised
    as ``coords @ primitive`` (OFA): ``num_embeddings * latent_dim + latent_dim * embedding_dim``
    parameters instead of ``num_embeddings * embedding_dim``.

    ``forward(ids)`` returns what ``nn.Embedding`` on the materialised table would, without
    materialising it (one fused gather-and-multiply on GPU). ``logits(hidden, bias=None)`` is
    the tied output head ``hidden @ table^T (+ bias)``. ``padding_idx`` works as in
    ``nn.Embedding``: that row of coords starts at zero and receives no gradient.

    A fresh layer draws coords ~ N(0, 1) and primitive ~ N(0, 1/latent_dim), so table entries
    have unit variance like ``nn.Embedding``'s.

    ``backend`` and ``check_ids`` are those of :func:`~flix_kernels.ofa.kernel.factorized_embedding`
    (``check_ids=False`` drops the per-call host sync of the id range check on a GPU).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, latent_dim: int, padding_idx: int | None = None, *,
                 backend: str = "auto", check_ids: bool = True, device=None, dtype=None):
        super().__init__()
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim), ("latent_dim", latent_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if latent_dim > embedding_dim:
            raise ValueError(f"latent_dim={latent_dim} must be <= embedding_dim={embedding_dim}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} out of range for {num_embeddings} embeddings")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.latent_dim = num_embeddings, embedding_dim, latent_dim
        self.padding_idx, self.backend, self.check_ids = padding_idx, backend, check_ids
        kw = dict(device=device, dtype=dtype)
        self.coords = nn.Parameter(torch.empty(num_embeddings, latent_dim, **kw))
        self.primitive = nn.Parameter(torch.empty(latent_dim, embedding_dim, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.coords)
        nn.init.normal_(self.primitive, std=self.latent_dim ** -0.5)
        if self.padding_idx is not None:
            self.coords[self.padding_idx].zero_()

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, k: int, *, backend: str = "auto") -> "FactorizedEmbedding":
        """The rank-``k`` truncated SVD of ``embedding.weight`` (exact at ``k == embedding_dim``)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        w = embedding.weight
        coords, primitive = factorize(w, k)
        self = cls(w.shape[0], w.shape[1], k, embedding.padding_idx, backend=backend, device=w.device, dtype=w.dtype)
        self.coords.copy_(coords)
        self.primitive.copy_(primitive)
        return self

    @classmethod
    @torch.no_grad()
    def from_factors(cls, coords: torch.Tensor, primitive: torch.Tensor, padding_idx: int | None = None, *,
                     backend: str = "auto") -> "FactorizedEmbedding":
        """A layer holding copies of ``coords`` (V, k) and ``primitive`` (k, D), e.g. from
        :func:`~flix_kernels.ofa.initialize`."""
        if coords.dim() != 2 or primitive.dim() != 2 or coords.shape[1] != primitive.shape[0]:
            raise ValueError(f"coords (V, k) and primitive (k, D) do not fit: {tuple(coords.shape)} and "
                             f"{tuple(primitive.shape)}")
        V, k = coords.shape
        self = cls(V, primitive.shape[1], k, padding_idx, backend=backend, device=coords.device, dtype=coords.dtype)
        self.coords.copy_(coords)
        self.primitive.copy_(primitive.to(coords.dtype))
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return factorized_embedding(ids, self.coords, self.primitive, padding_idx=self.padding_idx,
                                    backend=self.backend, check_ids=self.check_ids)

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The tied output head: ``hidden (..., D) -> (..., V)`` scores against every row of the table."""
        return tied_logits(hidden, self.coords, self.primitive, bias)

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """The materialised (V, D) table (a new tensor)."""
        return self.coords @ self.primitive

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        """An ``nn.Embedding`` with the materialised table."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                           device=self.coords.device, dtype=self.coords.dtype)
        emb.weight.copy_(self.table())
        return emb

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, latent_dim={self.latent_dim}{pad}"
