"""Put OFA into a transformers model: a new vocabulary, factorised embeddings, a tied head."""

from __future__ import annotations

import torch
import torch.nn as nn

from .embedding import FactorizedEmbedding
from .init import copy_sources, initialize, subword_vectors

__all__ = ["FactorizedLMHead", "apply_to_model"]


class FactorizedLMHead(nn.Module):
    """The output head tied to a :class:`FactorizedEmbedding`: ``hidden -> hidden @ Q^T @ P^T (+ bias)``.

    Refers to the embedding module itself (not a copy), so the head and the input embeddings
    share coords and primitive, as OFA ties them. The embedding is not registered as a submodule
    of the head: the model already owns it, and a second registration would store its tensors
    twice in the state dict (which ``save_pretrained``'s safetensors refuses).
    """

    def __init__(self, embedding: FactorizedEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(hidden, self.bias)


@torch.no_grad()
def apply_to_model(model: nn.Module, source_tokenizer, target_tokenizer, word_vectors, *, k: int,
                   neighbors: int = 10, temperature: float = 0.1, seed: int = 0,
                   case_insensitive: bool = False) -> dict:
    """Switch a transformers model with tied input/output embeddings to ``target_tokenizer``'s
    vocabulary, OFA-initialised from its current embeddings and ``word_vectors`` (a dict word
    -> vector or ``(words, matrix)``, e.g. multilingual fastText/ColexNet vectors;
    ``None`` gives the usual baseline: shared tokens copied, every other row random).

    The input embeddings become a :class:`FactorizedEmbedding` (``k`` < D factorises, ``k ==
    D`` keeps full-size rows) and the output head a :class:`FactorizedLMHead` sharing it (the
    old head's bias, if any, is kept for copied tokens and zero elsewhere).
    ``config.vocab_size`` is updated and ``config.tie_word_embeddings`` set False, since the
    sharing now happens inside our modules and transformers must not re-tie weights by name.
    Returns :func:`initialize`'s report.
    """
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"apply_to_model expects nn.Embedding input embeddings, got {type(emb).__name__}")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is not emb.weight:
        raise NotImplementedError("apply_to_model supports models whose output head is tied to the input embeddings "
                                  "(OFA's setting); this model's head has its own weight")
    src_vocab = source_tokenizer.get_vocab()
    tgt_vocab = target_tokenizer.get_vocab()
    V_s = len(src_vocab)
    if max(src_vocab.values()) >= emb.num_embeddings:
        raise ValueError(f"the source tokenizer has ids up to {max(src_vocab.values())} but the model's embeddings "
                         f"have {emb.num_embeddings} rows; pass the tokenizer the model was trained with")
    if word_vectors is None:  # the baseline without vectors: shared rows copied, all others random
        sv, tv = torch.zeros(V_s, 1), torch.zeros(len(tgt_vocab), 1)
    else:
        sv, _ = subword_vectors(word_vectors, source_tokenizer, vocab_size=V_s)
        tv, _ = subword_vectors(word_vectors, target_tokenizer, vocab_size=len(tgt_vocab))
    coords, primitive, report = initialize(emb.weight[:V_s].float(), src_vocab, tgt_vocab, sv, tv, k=k,
                                           neighbors=neighbors, temperature=temperature, seed=seed,
                                           case_insensitive=case_insensitive)
    pad = getattr(target_tokenizer, "pad_token_id", None)
    new = FactorizedEmbedding.from_factors(coords.to(emb.weight.device), primitive.to(emb.weight.device),
                                           padding_idx=pad).to(emb.weight.dtype)
    bias = None
    if getattr(head, "bias", None) is not None:
        # Keep the bias of the tokens whose rows were copied (the same rule); new tokens start unbiased.
        src = copy_sources(src_vocab, tgt_vocab, case_insensitive).to(head.bias.device)
        bias = torch.zeros(len(tgt_vocab), dtype=head.bias.dtype, device=head.bias.device)
        bias[src >= 0] = head.bias[src[src >= 0]]
    model.set_input_embeddings(new)
    model.set_output_embeddings(FactorizedLMHead(new, bias))
    config = getattr(model, "config", None)
    if config is not None:
        config.vocab_size = len(tgt_vocab)
        config.tie_word_embeddings = False
    return report
