"""OFA (Liu et al., 2023): factorised multilingual embeddings and the OFA initialisation of
subwords a source model has never seen.

* :func:`factorize`, :func:`subword_vectors`, :func:`initialize` (:mod:`.init`): the
  algorithm, from a source model's embeddings and external multilingual word vectors to the
  target vocabulary's coordinates and the shared primitive embeddings.
* :class:`FactorizedEmbedding` (:mod:`.embedding`): a drop-in ``nn.Embedding`` over
  ``coords @ primitive`` with a tied output head, computed by the fused op of :mod:`.kernel`
  (:func:`factorized_embedding`, :func:`tied_logits`).
* :func:`apply_to_model` (:mod:`.model`): a transformers model switched to a new tokenizer's
  vocabulary, OFA-initialised, with factorised embeddings and a tied head.
"""

from .embedding import FactorizedEmbedding
from .init import copy_sources, factorize, initialize, normalize_token, subword_vectors
from .kernel import factorized_embedding, tied_logits
from .model import FactorizedLMHead, apply_to_model

__all__ = ["FactorizedEmbedding", "FactorizedLMHead", "apply_to_model", "copy_sources", "factorize", "factorized_embedding", "initialize", "normalize_token",
           "subword_vectors", "tied_logits"]
