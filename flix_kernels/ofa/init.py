"""OFA initialisation of a target vocabulary's embeddings from a source model's (Liu et al., 2023).

1. :func:`factorize` the source embeddings E (V_s x D) by truncated SVD into coordinates
   P_s = U_k (V_s x k) and primitive embeddings Q = S_k V_k^T (k x D), so E ~ P_s Q.
2. :func:`subword_vectors` places every subword of a tokenizer in an external (multilingual)
   word-vector space: the mean vector of the words whose tokenisation contains it.
3. :func:`initialize` builds the target coordinates P_t: a token both vocabularies share copies
   its source row; any other target token with a vector mixes the coordinates of its most
   similar source tokens (softmax of cosine similarity / temperature over the top neighbours);
   the rest are drawn from a normal with the source coordinates' per-dimension mean and std.
   The target model's embeddings are then P_t Q.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

__all__ = ["copy_sources", "factorize", "initialize", "normalize_token", "subword_vectors"]

# Word-start markers of the common subword schemes (SentencePiece "▁", byte-level BPE "Ġ"),
# unified so that vocabularies of different tokenizer families can share tokens.
_WORD_START = ("\u2581", "\u0120")


def factorize(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coords, primitive)`` with ``coords @ primitive`` the best rank-``k`` approximation of
    ``weight`` (V x D): coords = U_k (V x k, orthonormal columns), primitive = S_k V_k^T (k x D).

    ``k == D`` does not factorise: coords is a copy of ``weight`` and primitive the identity,
    so OFA initialises full embeddings directly. Computed in float64, returned in the
    weight's dtype (float32 for half-precision weights).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (vocab, dim) tensor, got {getattr(weight, 'shape', type(weight))}")
    V, D = weight.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= D:
        raise ValueError(f"k must be an int in [1, D={D}], got {k!r}")
    out = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    if k == D:  # no factorisation, so no k <= V limit
        return weight.detach().to(out).clone(), torch.eye(D, dtype=out, device=weight.device)
    if k > V:
        raise ValueError(f"k={k} exceeds the vocabulary size {V}; a rank-k factorisation needs k <= V")
    U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return U[:, :k].to(out).contiguous(), (S[:k, None] * Vh[:k]).to(out).contiguous()


def normalize_token(token: str, case_insensitive: bool = False) -> str:
    """The form under which tokens of two vocabularies are matched: a leading word-start marker
    of any scheme becomes "▁"; lower-cased with ``case_insensitive``."""
    if token[:1] in _WORD_START:
        token = "\u2581" + token[1:]
    return token.lower() if case_insensitive else token


def _vocab_list(vocab, what: str) -> list[str]:
    """A vocabulary as a list of token strings in id order (from a list or a token -> id dict)."""
    if isinstance(vocab, Mapping):
        n = len(vocab)
        tokens: list[str | None] = [None] * n
        for tok, i in vocab.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"{what}: token {tok!r} has id {i!r}; ids must be 0..{n - 1} (one per token)")
            if tokens[i] is not None:
                raise ValueError(f"{what}: id {i} is given to both {tokens[i]!r} and {tok!r}")
            tokens[i] = tok
        return tokens  # type: ignore[return-value]
    if isinstance(vocab, (str, bytes)) or not isinstance(vocab, Sequence):
        raise TypeError(f"{what} must be a list of tokens in id order or a dict token -> id, got {type(vocab).__name__}")
    return list(vocab)


def _word_vectors(word_vectors) -> tuple[list[str], torch.Tensor]:
    if isinstance(word_vectors, Mapping):
        words = list(word_vectors)
        if not words:
            raise ValueError("word_vectors is empty")
        matrix = torch.stack([torch.as_tensor(word_vectors[w], dtype=torch.float64).reshape(-1) for w in words])
    else:
        try:
            words, matrix = word_vectors
        except (TypeError, ValueError):
            raise TypeError("word_vectors must be a dict word -> vector or a pair (words, (N, d) matrix)") from None
        words = list(words)
        matrix = torch.as_tensor(matrix, dtype=torch.float64)
        if matrix.dim() != 2 or matrix.shape[0] != len(words):
            raise ValueError(f"word_vectors: {len(words)} words but a matrix of shape {tuple(matrix.shape)}")
    return words, matrix


def subword_vectors(word_vectors, tokenize: Callable[[str], Sequence[int]] | object, *,
                    vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every subword's vector in the word-vector space: the mean of the vectors of the words
    whose tokenisation contains it. Returns ``(matrix (V, d) float32, covered (V,) bool)``;
    uncovered subwords have all-zero rows.

    Each word is tokenised plain, with a leading space (the word-start form) and capitalised
    (both ways), and counts once for every subword in any of those tokenisations.
    ``tokenize`` is a callable ``str -> list of ids`` (give ``vocab_size``) or a transformers
    tokenizer (its ``encode`` without special tokens and ``len(tokenizer)``).
    """
    words, vectors = _word_vectors(word_vectors)
    if hasattr(tokenize, "encode") and hasattr(tokenize, "__len__"):  # a transformers tokenizer
        tokenizer = tokenize
        vocab_size = len(tokenizer) if vocab_size is None else vocab_size
        tokenize = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    if vocab_size is None:
        raise ValueError("subword_vectors needs vocab_size= with a plain tokenize callable")
    V, d = int(vocab_size), vectors.shape[1]
    total = torch.zeros(V, d, dtype=torch.float64)
    count = torch.zeros(V, dtype=torch.float64)
    for w, vec in zip(words, vectors):
        ids: set[int] = set()
        cap = w[:1].upper() + w[1:]
        for form in dict.fromkeys((w, " " + w, cap, " " + cap)):
            for i in tokenize(form):
                i = int(i)
                if not 0 <= i < V:
                    raise ValueError(f"tokenize({form!r}) returned id {i}, outside the vocabulary of {V} tokens")
                ids.add(i)
        if ids:
            idx = torch.tensor(sorted(ids))
            total[idx] += vec
            count[idx] += 1
    covered = count > 0
    matrix = torch.where(covered[:, None], total / count.clamp(min=1)[:, None], 0.0)
    # A word vector of zeros would make a covered row look uncovered downstream; flag it here.
    zero = covered & (matrix.abs().sum(1) == 0)
    if bool(zero.any()):
        raise ValueError(f"subwords {zero.nonzero().flatten()[:5].tolist()} average to an all-zero vector; "
                         "remove all-zero word vectors")
    return matrix.float(), covered


def _check_vectors(vectors, rows: int, what: str) -> torch.Tensor:
    v = torch.as_tensor(vectors)
    if v.dim() != 2 or v.shape[0] != rows:
        raise ValueError(f"{what} must be a ({rows}, d) matrix aligned with the vocabulary, got {tuple(v.shape)}")
    return v.double()


@torch.no_grad()
def copy_sources(source_vocab, target_vocab, case_insensitive: bool = False) -> torch.Tensor:
    """For each target token id, the source id whose token is the same after
    :func:`normalize_token` (the OFA copy rule), or -1; a LongTensor of the target's size."""
    src_tokens = _vocab_list(source_vocab, "source_vocab")
    tgt_tokens = _vocab_list(target_vocab, "target_vocab")
    src_index: dict[str, int] = {}
    for i, tok in enumerate(src_tokens):
        src_index.setdefault(normalize_token(tok, case_insensitive), i)
    return torch.tensor([src_index.get(normalize_token(t, case_insensitive), -1) for t in tgt_tokens],
                        dtype=torch.long)


def initialize(source_embeddings: torch.Tensor, source_vocab, target_vocab, source_vectors, target_vectors, *,
               k: int, neighbors: int = 10, temperature: float = 0.1, seed: int = 0,
               case_insensitive: bool = False, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """OFA: the target vocabulary's coordinates and the shared primitive embeddings.

    Args:
        source_embeddings: the source model's input embeddings (V_s, D).
        source_vocab / target_vocab: token strings in id order, or dicts token -> id.
        source_vectors / target_vectors: (V_s, d) / (V_t, d) subword vectors aligned with the
            vocabularies (:func:`subword_vectors`); an all-zero row means uncovered.
        k: latent dimension (k == D: no factorisation, full embeddings are initialised).
        neighbors: source subwords mixed per target subword; temperature: of the softmax over
            their cosine similarities; seed: of the random rows; case_insensitive: match
            shared tokens ignoring case.

    Returns ``(coords (V_t, k), primitive (k, D), report)``; the target embeddings are
    ``coords @ primitive``. ``report`` counts the rows "copied", "similarity" (mixed from
    neighbours) and "random", and records the settings.
    """
    src_tokens = _vocab_list(source_vocab, "source_vocab")
    tgt_tokens = _vocab_list(target_vocab, "target_vocab")
    E = torch.as_tensor(source_embeddings)
    if E.dim() != 2 or E.shape[0] != len(src_tokens):
        raise ValueError(f"source_embeddings must be ({len(src_tokens)}, D) for a source vocabulary of "
                         f"{len(src_tokens)} tokens, got {tuple(E.shape)}")
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or neighbors < 1:
        raise ValueError(f"neighbors must be a positive int, got {neighbors!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    sv = _check_vectors(source_vectors, len(src_tokens), "source_vectors")
    tv = _check_vectors(target_vectors, len(tgt_tokens), "target_vectors")
    if sv.shape[1] != tv.shape[1]:
        raise ValueError(f"source_vectors have dimension {sv.shape[1]} but target_vectors {tv.shape[1]}; "
                         "both must live in the same word-vector space")
    coords_s, primitive = factorize(E, k)  # raises for k > D
    P = coords_s.double().cpu()

    copy_from = copy_sources(src_tokens, tgt_tokens, case_insensitive)
    copied = copy_from >= 0
    if not bool(copied.any()):
        raise ValueError("the source and target vocabularies share no token (after normalising word-start markers"
                         + ("" if case_insensitive else "; try case_insensitive=True") + "); OFA needs an overlap")

    out = torch.empty(len(tgt_tokens), P.shape[1], dtype=torch.float64)
    out[copied] = P[copy_from[copied]]

    src_covered = sv.abs().sum(1) > 0
    tgt_covered = tv.abs().sum(1) > 0
    mixed = ~copied & tgt_covered
    if bool(mixed.any()) and bool(src_covered.any()):
        src_ids = src_covered.nonzero().flatten()
        S = torch.nn.functional.normalize(sv[src_ids], dim=1)
        n = min(neighbors, int(src_ids.numel()))
        rows = mixed.nonzero().flatten()
        for start in range(0, rows.numel(), chunk):  # bounded memory: chunk x V_s similarities at a time
            r = rows[start:start + chunk]
            sim = torch.nn.functional.normalize(tv[r], dim=1) @ S.T
            top, idx = sim.topk(n, dim=1)
            w = torch.softmax(top / temperature, dim=1)
            out[r] = torch.einsum("rn,rnk->rk", w, P[src_ids[idx]])
    else:
        mixed = torch.zeros_like(mixed)

    rand = ~copied & ~mixed
    if bool(rand.any()):
        g = torch.Generator().manual_seed(seed)
        mean, std = P.mean(0), P.std(0, unbiased=False)
        out[rand] = mean + std * torch.randn(int(rand.sum()), P.shape[1], generator=g, dtype=torch.float64)

    report = {"copied": int(copied.sum()), "similarity": int(mixed.sum()), "random": int(rand.sum()),
              "source_vocab": len(src_tokens), "target_vocab": len(tgt_tokens), "k": k, "dim": int(E.shape[1]),
              "neighbors": neighbors, "temperature": temperature, "seed": seed, "case_insensitive": case_insensitive}
    return out.to(coords_s.dtype).to(E.device), primitive, report
