"""OFA: factorisation, subword vectors, the initialisation rules (known answers on hand-made
vocabularies and vectors), and FactorizedEmbedding against nn.Embedding."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE
from flix_kernels import ofa


# -- factorize ------------------------------------------------------------------------------------
@pytest.mark.parametrize("V,D,k", [(50, 16, 4), (9, 12, 9), (30, 8, 1)])
def test_factorize_is_the_truncated_svd(V, D, k, seed):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, D, generator=g)
    P, Q = ofa.factorize(E, k)
    assert P.shape == (V, k) and Q.shape == (k, D) and P.dtype == E.dtype
    torch.testing.assert_close(P.T @ P, torch.eye(k), atol=1e-5, rtol=0)  # orthonormal coordinates
    # Eckart-Young: the error is exactly the energy of the dropped singular values.
    s = torch.linalg.svdvals(E.double())
    err = torch.linalg.matrix_norm((P @ Q).double() - E.double())
    assert err.item() == pytest.approx(s[k:].square().sum().sqrt().item(), rel=1e-4, abs=1e-5)


def test_factorize_full_rank_keeps_the_embeddings(seed):
    E = torch.randn(20, 6, generator=torch.Generator().manual_seed(seed))
    P, Q = ofa.factorize(E, 6)
    torch.testing.assert_close(P, E, rtol=0, atol=0)
    torch.testing.assert_close(Q, torch.eye(6), rtol=0, atol=0)


def test_factorize_rejects_bad_k():
    E = torch.randn(10, 4)
    for k in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int in \\[1, D=4\\]"):
            ofa.factorize(E, k)
    with pytest.raises(ValueError, match="exceeds the vocabulary size 3"):
        ofa.factorize(torch.randn(3, 8), 4)
    assert ofa.factorize(torch.randn(3, 8), 8)[1].shape == (8, 8)  # k = D needs no SVD, so no k <= V
    with pytest.raises(ValueError, match="2-D"):
        ofa.factorize(torch.randn(3), 1)


# -- subword_vectors ------------------------------------------------------------------------------
VOCAB = ["<unk>", "▁the", "▁cat", "s", "▁dog", "▁The", "ca", "t", "▁"]


def toy_tokenize(text: str) -> list[int]:
    """Greedy longest-match over VOCAB with "▁" for a leading space (a stand-in for a real tokenizer)."""
    s = text.replace(" ", "▁")
    ids, i = [], 0
    while i < len(s):
        for j in range(len(s), i, -1):
            if s[i:j] in VOCAB:
                ids.append(VOCAB.index(s[i:j]))
                i = j
                break
        else:
            ids.append(0)
            i += 1
    return ids


def test_subword_vectors_average_the_words_containing_each_subword():
    words = {"cats": [1.0, 0.0], "cat": [3.0, 2.0], "the": [0.0, 4.0]}
    M, covered = ofa.subword_vectors(words, toy_tokenize, vocab_size=len(VOCAB))
    assert M.shape == (len(VOCAB), 2) and covered.dtype == torch.bool
    # "cats" -> [ca, t, s] plain, [▁cat, s] with a space, "Cats" -> <unk>...; "cat" -> [ca, t] / [▁cat];
    # "the" -> <unk> pieces plain, [▁the] spaced, [▁The] capitalised with a space.
    torch.testing.assert_close(M[VOCAB.index("▁cat")], torch.tensor([2.0, 1.0]))  # mean of cats and cat
    torch.testing.assert_close(M[VOCAB.index("s")], torch.tensor([1.0, 0.0]))     # only cats
    torch.testing.assert_close(M[VOCAB.index("▁the")], torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(M[VOCAB.index("▁The")], torch.tensor([0.0, 4.0]))  # the capitalised form counts
    assert not covered[VOCAB.index("▁dog")] and M[VOCAB.index("▁dog")].abs().sum() == 0
    assert covered[VOCAB.index("ca")] and covered[VOCAB.index("t")]


def test_subword_vectors_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        ofa.subword_vectors({"a": [1.0]}, toy_tokenize)
    with pytest.raises(ValueError, match="outside the vocabulary of 3 tokens"):
        ofa.subword_vectors({"cat": [1.0]}, toy_tokenize, vocab_size=3)
    with pytest.raises(ValueError, match="2 words but a matrix of shape"):
        ofa.subword_vectors((["a", "b"], torch.zeros(3, 2)), toy_tokenize, vocab_size=len(VOCAB))


# -- initialize: the three rules -------------------------------------------------------------------
def toy_problem(seed, D=6, k=3, d=4):
    g = torch.Generator().manual_seed(seed)
    src = ["▁a", "▁b", "▁c", "▁d", "▁e", "x"]
    tgt = {"Ġa": 0, "▁new1": 1, "▁new2": 2, "▁C": 3, "x": 4, "▁zzz": 5}  # a dict token -> id, as tokenizers give
    E = torch.randn(len(src), D, generator=g)
    sv = torch.randn(len(src), d, generator=g)
    sv[5] = 0  # "x" uncovered in the source space
    tv = torch.randn(len(tgt), d, generator=g)
    tv[5] = 0  # "▁zzz" uncovered
    return E, src, tgt, sv, tv, k


def test_initialize_copies_shared_tokens_mixes_neighbours_and_draws_the_rest(seed):
    E, src, tgt, sv, tv, k = toy_problem(seed)
    coords, primitive, report = ofa.initialize(E, src, tgt, sv, tv, k=k, neighbors=2, temperature=0.5, seed=seed)
    P, Q = ofa.factorize(E, k)
    torch.testing.assert_close(primitive, Q)
    # Copy rule: "Ġa" matches "▁a" (word-start markers unified), "x" matches exactly.
    torch.testing.assert_close(coords[0], P[0])
    torch.testing.assert_close(coords[4], P[5])
    # Similarity rule, computed by hand: top-2 cosine neighbours among covered source rows.
    cov = torch.arange(5)  # source rows with a vector
    for t in (1, 2, 3):  # "▁C" does not match "▁c" without case_insensitive
        sim = torch.nn.functional.cosine_similarity(tv[t].double()[None], sv[cov].double(), dim=1)
        top, idx = sim.topk(2)
        w = torch.softmax(top / 0.5, 0)
        want = (w[:, None] * P[cov[idx]].double()).sum(0)
        torch.testing.assert_close(coords[t].double(), want, rtol=1e-5, atol=1e-6)
    assert report["copied"] == 2 and report["similarity"] == 3 and report["random"] == 1
    # Random rule: reproducible from the seed, different for another seed.
    again, _, _ = ofa.initialize(E, src, tgt, sv, tv, k=k, neighbors=2, temperature=0.5, seed=seed)
    other, _, _ = ofa.initialize(E, src, tgt, sv, tv, k=k, neighbors=2, temperature=0.5, seed=seed + 1)
    torch.testing.assert_close(again, coords, rtol=0, atol=0)
    assert not torch.equal(other[5], coords[5]) and torch.equal(other[:5], coords[:5])


def test_initialize_case_insensitive_copies_more(seed):
    E, src, tgt, sv, tv, k = toy_problem(seed)
    coords, _, report = ofa.initialize(E, src, tgt, sv, tv, k=k, case_insensitive=True)
    P, _ = ofa.factorize(E, k)
    assert report["copied"] == 3
    torch.testing.assert_close(coords[3], P[2])  # "▁C" -> "▁c"


def test_low_temperature_picks_the_nearest_neighbour(seed):
    E, src, tgt, sv, tv, k = toy_problem(seed)
    tv[1] = sv[3] * 2.5  # same direction as source "▁d"
    coords, _, _ = ofa.initialize(E, src, tgt, sv, tv, k=k, temperature=1e-4)
    P, _ = ofa.factorize(E, k)
    torch.testing.assert_close(coords[1], P[3], rtol=1e-5, atol=1e-6)


def test_random_rows_follow_the_source_coordinate_statistics(seed):
    g = torch.Generator().manual_seed(seed)
    V_s, V_t, D, k = 400, 4000, 16, 8
    src = [f"s{i}" for i in range(V_s)]
    tgt = ["s0"] + [f"t{i}" for i in range(V_t - 1)]
    E = torch.randn(V_s, D, generator=g) * torch.linspace(0.5, 3, D) + 0.3
    zeros_t = torch.zeros(V_t, 3)
    coords, _, report = ofa.initialize(E, src, tgt, torch.randn(V_s, 3, generator=g), zeros_t, k=k, seed=seed)
    assert report["random"] == V_t - 1
    P, _ = ofa.factorize(E, k)
    rand = coords[1:].double()
    # Per-dimension mean and std match the source coordinates' (sampling error ~ std / sqrt(n)).
    n = rand.shape[0]
    std = P.double().std(0, unbiased=False)
    assert ((rand.mean(0) - P.double().mean(0)).abs() < 5 * std / math.sqrt(n)).all()
    assert ((rand.std(0) / std - 1).abs() < 0.1).all()


def test_initialize_errors(seed):
    E, src, tgt, sv, tv, k = toy_problem(seed)
    with pytest.raises(ValueError, match="share no token"):
        ofa.initialize(E, src, ["▁q", "▁r"], sv, tv[:2], k=k)
    with pytest.raises(ValueError, match="dimension 4 but target_vectors 5"):
        ofa.initialize(E, src, tgt, sv, torch.randn(len(tgt), 5), k=k)
    with pytest.raises(ValueError, match="k must be an int in \\[1, D=6\\]"):
        ofa.initialize(E, src, tgt, sv, tv, k=7)
    with pytest.raises(ValueError, match="source_vectors must be a \\(6, d\\) matrix"):
        ofa.initialize(E, src, tgt, sv[:4], tv, k=k)
    with pytest.raises(ValueError, match="source_embeddings must be \\(6, D\\)"):
        ofa.initialize(E[:5], src, tgt, sv, tv, k=k)
    with pytest.raises(ValueError, match="id 1 is given to both"):
        ofa.initialize(E, src, {"▁a": 1, "▁b": 1}, sv, tv[:2], k=k)


def test_end_to_end_with_subword_vectors(seed):
    """subword_vectors feeds initialize: a target token covered by the same words as a source
    token gets (at low temperature) that token's coordinates."""
    g = torch.Generator().manual_seed(seed)
    words = {w: torch.randn(5, generator=g) for w in ("cat", "the", "dog")}
    src_vocab = VOCAB
    tgt_vocab = ["<unk>", "▁gato", "▁the"]

    def tgt_tokenize(text):
        return [1] if text.strip().lower() == "cat" else [2] if text.strip().lower() == "the" else [0]

    sv, _ = ofa.subword_vectors(words, toy_tokenize, vocab_size=len(src_vocab))
    tv, covered = ofa.subword_vectors({"cat": words["cat"]}, tgt_tokenize, vocab_size=3)
    assert covered.tolist() == [False, True, False]
    E = torch.randn(len(src_vocab), 6, generator=g)
    coords, _, report = ofa.initialize(E, src_vocab, tgt_vocab, sv, tv, k=6, temperature=1e-3)
    assert report == {**report, "copied": 2, "similarity": 1, "random": 0}
    # "▁gato" has exactly cat's vector, as do the source subwords only "cat" covers: "ca" and
    # "▁cat" ("t" is also in "the"). At low temperature the mix is the mean of those two rows'
    # coordinates (k = D: the embeddings themselves).
    tied = [VOCAB.index(t) for t in ("▁cat", "ca")]
    torch.testing.assert_close(sv[tied], words["cat"].float().expand(2, 5))
    torch.testing.assert_close(coords[1], E[tied].mean(0), rtol=1e-4, atol=1e-5)


# -- FactorizedEmbedding -------------------------------------------------------------------------
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_factorized_embedding_at_full_rank_equals_nn_embedding(padding_idx, seed):
    torch.manual_seed(seed)
    emb = nn.Embedding(37, 12, padding_idx=padding_idx)
    fe = ofa.FactorizedEmbedding.from_embedding(emb, 12, backend="torch")
    ids = torch.randint(0, 37, (4, 9))
    ids[0, :3] = 3
    out, want = fe(ids), emb(ids)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    # primitive is the identity, so coords' gradient is the embedding's own.
    torch.testing.assert_close(fe.coords.grad, emb.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fe.to_embedding().weight, emb.weight, rtol=1e-6, atol=1e-6)
    h = torch.randn(4, 9, 12)
    torch.testing.assert_close(fe.logits(h), h @ emb.weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_factorized_embedding_low_rank_matches_its_table(backend, seed):
    torch.manual_seed(seed)
    device = DEVICE
    fe = ofa.FactorizedEmbedding(50, 16, 4, padding_idx=0, backend=backend, device=device)
    assert fe.coords[0].abs().sum() == 0 and sum(p.numel() for p in fe.parameters()) == 50 * 4 + 4 * 16
    ids = torch.randint(0, 50, (33,), device=device)
    ids[0] = 0  # the padding row is used, so its zero gradient below is a real check
    table = fe.table().double()
    torch.testing.assert_close(fe(ids).double(), table[ids], rtol=1e-5, atol=1e-5)
    bias = torch.randn(50, device=device)
    h = torch.randn(5, 16, device=device)
    torch.testing.assert_close(fe.logits(h, bias).double(), h.double() @ table.T + bias.double(), rtol=1e-4, atol=1e-4)
    fe(ids).sum().backward()
    assert fe.coords.grad[0].abs().sum() == 0  # padding row learns nothing
    with pytest.raises(ValueError, match="latent_dim=17 must be <= embedding_dim=16"):
        ofa.FactorizedEmbedding(50, 16, 17)


# -- apply_to_model on a transformers model with two locally trained tokenizers ------------------
def train_tokenizer(words, size, seed):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    import random

    rng = random.Random(seed)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=size, special_tokens=["<pad>", "<unk>"])
    tok.train_from_iterator([" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


SOURCE_WORDS = ["cat", "dog", "house", "tree", "water", "the", "and", "green", "small"]
TARGET_WORDS = ["gato", "perro", "casa", "arbol", "agua", "el", "y", "verde", "cat", "dog"]


@pytest.mark.parametrize("k", [32, 8])
def test_apply_to_model_switches_the_vocabulary(k, seed, tmp_path):
    transformers = pytest.importorskip("transformers")
    src_tok, tgt_tok = train_tokenizer(SOURCE_WORDS, 60, seed), train_tokenizer(TARGET_WORDS, 80, seed + 1)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(src_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, tie_word_embeddings=True)).eval()
    old = model.get_input_embeddings().weight.detach().clone()
    g = torch.Generator().manual_seed(seed)
    # sorted: a set of strings iterates in another order in every process (hash randomisation)
    vectors = {w: torch.randn(6, generator=g) for w in sorted(set(SOURCE_WORDS) | set(TARGET_WORDS))}
    report = ofa.apply_to_model(model, src_tok, tgt_tok, vectors, k=k)
    V_t = len(tgt_tok)
    assert report["copied"] + report["similarity"] + report["random"] == V_t and report["copied"] > 0
    assert model.config.vocab_size == V_t and isinstance(model.get_input_embeddings(), ofa.FactorizedEmbedding)
    assert model.get_output_embeddings().embedding is model.get_input_embeddings()  # tied
    src_vocab, tgt_vocab = src_tok.get_vocab(), tgt_tok.get_vocab()
    shared = sorted(set(src_vocab) & set(tgt_vocab) - {"<pad>"})
    table = model.get_input_embeddings().table()
    P, Q = ofa.factorize(old, k)
    for tok in shared:  # copied rows: the source row's rank-k approximation (exact at k = D)
        torch.testing.assert_close(table[tgt_vocab[tok]], (P @ Q)[src_vocab[tok]], rtol=1e-4, atol=1e-5)
    # The same text of shared tokens gives the same hidden states, so at k = D the same scores for them.
    text_src = torch.tensor([[src_vocab[t] for t in shared]])
    text_tgt = torch.tensor([[tgt_vocab[t] for t in shared]])
    with torch.no_grad():
        out = model(text_tgt).logits
    assert out.shape == (1, len(shared), V_t)
    if k == 32:
        ref = transformers.LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "vocab_size": len(src_tok),
                                                                       "tie_word_embeddings": True}))
        ref.load_state_dict({n: p for n, p in model.state_dict().items() if "embed" not in n and "lm_head" not in n},
                            strict=False)
        ref.get_input_embeddings().weight.data.copy_(old)
        ref.eval()
        with torch.no_grad():
            want = ref(text_src).logits
        cols_t, cols_s = [tgt_vocab[t] for t in shared], [src_vocab[t] for t in shared]
        torch.testing.assert_close(out[..., cols_t], want[..., cols_s], rtol=1e-4, atol=1e-4)
    # save_pretrained stores the shared factors once, and they load back into a fresh copy
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any(n.startswith("lm_head.embedding") for n in saved)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_input_embeddings().coords.zero_()
    twin.load_state_dict(saved)
    assert twin.get_output_embeddings().embedding is twin.get_input_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(twin(text_tgt).logits, out, rtol=0, atol=0)
    model.train()
    loss = model(text_tgt, labels=text_tgt).loss
    loss.backward()
    emb = model.get_input_embeddings()
    assert emb.coords.grad.abs().sum() > 0 and emb.primitive.grad.abs().sum() > 0


def test_apply_to_model_without_vectors_copies_shared_rows_and_draws_the_rest(seed):
    transformers = pytest.importorskip("transformers")
    src_tok, tgt_tok = train_tokenizer(SOURCE_WORDS, 60, seed), train_tokenizer(TARGET_WORDS, 80, seed + 1)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(src_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, tie_word_embeddings=True))
    old = model.get_input_embeddings().weight.detach().clone()
    report = ofa.apply_to_model(model, src_tok, tgt_tok, None, k=32, seed=seed)
    shared = set(src_tok.get_vocab()) & set(tgt_tok.get_vocab())
    assert report["similarity"] == 0 and report["copied"] == len(shared) and report["random"] == len(tgt_tok) - len(shared)
    table = model.get_input_embeddings().table()
    tok = sorted(shared - {"<pad>"})[0]
    torch.testing.assert_close(table[tgt_tok.get_vocab()[tok]], old[src_tok.get_vocab()[tok]], rtol=1e-5, atol=1e-6)


def test_apply_to_model_refuses_an_untied_head(seed):
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(SOURCE_WORDS, 60, seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, tie_word_embeddings=False))
    with pytest.raises(NotImplementedError, match="tied"):
        ofa.apply_to_model(model, tok, tok, {"cat": [1.0, 2.0]}, k=4)


def test_apply_to_model_keeps_the_head_bias_of_copied_tokens(seed):
    """A tied head with a bias: copied tokens keep their source bias, every other token gets 0."""
    src_tok, tgt_tok = train_tokenizer(SOURCE_WORDS, 60, seed), train_tokenizer(TARGET_WORDS, 80, seed + 1)

    class TiedLM(nn.Module):
        def __init__(self, V, D):
            super().__init__()
            self.embed, self.head = nn.Embedding(V, D), nn.Linear(D, V)
            self.head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def set_input_embeddings(self, m):
            self.embed = m

        def get_output_embeddings(self):
            return self.head

        def set_output_embeddings(self, m):
            self.head = m

    torch.manual_seed(seed)
    model = TiedLM(len(src_tok), 8)
    old_bias = model.head.bias.detach().clone()
    report = ofa.apply_to_model(model, src_tok, tgt_tok, None, k=8)
    src_vocab, tgt_vocab = src_tok.get_vocab(), tgt_tok.get_vocab()
    bias = model.head.bias.detach()
    assert bias.shape == (len(tgt_vocab),) and int((bias != 0).sum()) == report["copied"]
    for tok in set(src_vocab) & set(tgt_vocab):  # identical strings are always copied
        assert bias[tgt_vocab[tok]] == old_bias[src_vocab[tok]]
    h = torch.randn(3, 8)
    torch.testing.assert_close(model.head(h), h @ model.embed.table().T + bias)
