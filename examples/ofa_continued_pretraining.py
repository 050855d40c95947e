"""OFA against random initialisation of new subwords, in a small continued-pretraining run.

A synthetic world of "concepts" that every language names with its own words, and a sentence
grammar over concepts shared by all languages (a random Markov chain). A tiny Llama is
pretrained on the source language with a BPE tokenizer trained on it; then the vocabulary is
switched to a BPE tokenizer trained on three languages (the source and two new ones) and the
model continues pretraining on text in all three. External word vectors are the concepts'
vectors plus noise, the same for a concept's words in every language (what aligned
multilingual word vectors approximate). Compared, same steps and data, several seeds:

* ``random``: tokens shared with the source vocabulary copy their row, the others are drawn
  from the source embeddings' per-dimension normal (OFA's rule for uncovered subwords,
  applied to every new subword);
* ``ofa-full``: OFA with k = D (no factorisation);
* ``ofa-k``: OFA with a factorised embedding of latent dimension k.

Reports the held-out loss on each new language and the source language at several steps
(mean and spread over seeds) and the embedding parameter counts; writes results.json and
results.md. Minutes on a CPU:

    python examples/ofa_continued_pretraining.py --out examples/results/ofa_continued_pretraining

``--ablation`` tests why OFA trains slower here (``none``, the default, is the run above):

* ``untied``: for every method the output head becomes a separate copy of the initial input
  table (the same coords @ primitive form, its own parameters), so tokens whose input rows
  start as near-duplicates can be told apart at the output without moving their input rows;
* ``noise``: Gaussian noise of ``--noise-scale`` (default 0.3) times the per-dimension std of
  the source coordinates (the std OFA draws its random rows with) is added to every
  similarity-initialised row (OFA methods only; ``random`` has no such rows and is unchanged);
* ``untied-noise``: both.

    python examples/ofa_continued_pretraining.py --ablation untied --out examples/results/ofa_continued_pretraining/ablation-untied
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from flix_kernels import ofa

LANGS = ("src", "new1", "new2")
LETTERS = {"src": "abcdefghij", "new1": "klmnopqrst", "new2": "aeiouvwxyz"}


def make_world(seed: int, concepts: int = 120, dim: int = 16):
    rng = random.Random(seed)
    words = {}
    for lang in LANGS:
        seen = set()
        out = []
        while len(out) < concepts:  # every language names each concept with its own word
            w = "".join(rng.choice(LETTERS[lang]) for _ in range(rng.randint(3, 7)))
            if w not in seen:
                seen.add(w)
                out.append(w)
        words[lang] = out
    # Shared sentence grammar: each concept is followed by one of 4 likely successors.
    succ = [[rng.randrange(concepts) for _ in range(4)] for _ in range(concepts)]
    g = torch.Generator().manual_seed(seed)
    concept_vec = torch.randn(concepts, dim, generator=g)
    vectors = {}
    for lang in LANGS:
        for c, w in enumerate(words[lang]):
            vectors[w] = concept_vec[c] + 0.3 * torch.randn(dim, generator=g)
    return words, succ, vectors


def sentences(words, succ, lang: str, n: int, rng: random.Random, length: int = 12) -> list[str]:
    out = []
    for _ in range(n):
        c = rng.randrange(len(succ))
        seq = []
        for _ in range(length):
            seq.append(words[lang][c])
            c = rng.choice(succ[c]) if rng.random() < 0.9 else rng.randrange(len(succ))
        out.append(" ".join(seq))
    return out


def train_tokenizer(texts: list[str], size: int) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=["<pad>", "<unk>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def batches(tok, texts: list[str], batch: int, length: int, rng: random.Random):
    ids = [tok.encode(t, add_special_tokens=False)[:length] for t in texts]
    ids = [x + [tok.pad_token_id] * (length - len(x)) for x in ids]
    while True:
        pick = rng.sample(range(len(ids)), batch)
        x = torch.tensor([ids[i] for i in pick])
        yield x, x.masked_fill(x == tok.pad_token_id, -100)


@torch.no_grad()
def eval_loss(model, tok, texts: list[str], length: int) -> float:
    model.eval()
    ids = [tok.encode(t, add_special_tokens=False)[:length] for t in texts]
    ids = [x + [tok.pad_token_id] * (length - len(x)) for x in ids]
    x = torch.tensor(ids)
    loss = model(x, labels=x.masked_fill(x == tok.pad_token_id, -100)).loss.item()
    model.train()
    return loss


@torch.no_grad()
def near_duplicate_rows(table: torch.Tensor, threshold: float = 0.99) -> dict:
    """How many rows of the embedding table have another row pointing the same way: with a tied
    output head such tokens cannot be told apart until training separates them."""
    t = torch.nn.functional.normalize(table.float(), dim=1)
    sim = t @ t.T
    sim.fill_diagonal_(-1.0)
    nearest = sim.max(1).values
    return {"rows": int(table.shape[0]), "near_duplicates": int((nearest > threshold).sum()),
            "mean_nearest_cosine": float(nearest.mean())}


@torch.no_grad()
def add_similarity_noise(emb, source_embeddings: torch.Tensor, src_tok, tgt_tok, vectors, k: int, scale: float,
                         seed: int, expected_rows: int) -> dict:
    """Add N(0, (scale * sigma_j)^2) to coordinate j of every similarity-initialised row of ``emb``
    (an OFA-initialised :class:`~flix_kernels.ofa.FactorizedEmbedding`), sigma_j the per-dimension
    std of the source coordinates ``factorize(source_embeddings, k)``: the distribution OFA draws
    its random rows from, scaled down. Similarity rows are found as :func:`ofa.initialize` finds
    them (not shared with the source vocabulary, covered by the word vectors)."""
    src = {ofa.normalize_token(t) for t in src_tok.get_vocab()}
    tgt_vocab = tgt_tok.get_vocab()
    _, covered = ofa.subword_vectors(vectors, tgt_tok, vocab_size=len(tgt_vocab))
    rows = torch.zeros(len(tgt_vocab), dtype=torch.bool)
    for tok, i in tgt_vocab.items():
        rows[i] = bool(covered[i]) and ofa.normalize_token(tok) not in src
    if int(rows.sum()) != expected_rows:
        raise RuntimeError(f"found {int(rows.sum())} similarity rows, apply_to_model reported {expected_rows}")
    coords_s, _ = ofa.factorize(source_embeddings.float(), k)
    sigma = coords_s.double().std(0, unbiased=False)
    g = torch.Generator().manual_seed(10_000 + seed)  # not the generator of OFA's random rows, nor the global one
    noise = scale * sigma * torch.randn(int(rows.sum()), k, generator=g, dtype=torch.float64)
    emb.coords[rows] += noise.to(emb.coords.dtype)
    return {"rows": int(rows.sum()), "scale": scale, "mean_source_coord_std": float(sigma.mean())}


def train(model, data, steps: int, lr: float, on_step=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        x, y = next(data)
        loss = model(x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step)


def run_seed(seed: int, args) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    words, succ, vectors = make_world(seed)
    src_text = sentences(words, succ, "src", 2000, rng)
    multi_text = [s for lang in LANGS for s in sentences(words, succ, lang, 1500, rng)]
    rng.shuffle(multi_text)
    held_out = {lang: sentences(words, succ, lang, 200, rng) for lang in LANGS}
    src_tok = train_tokenizer(src_text, 160)
    tgt_tok = train_tokenizer(multi_text, 420)

    config = transformers.LlamaConfig(vocab_size=len(src_tok), hidden_size=args.dim, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * args.dim,
                                      tie_word_embeddings=True, max_position_embeddings=128)
    source = transformers.LlamaForCausalLM(copy.deepcopy(config))
    train(source, batches(src_tok, src_text, 32, args.length, rng), args.pretrain_steps, 3e-3)
    src_loss = eval_loss(source, src_tok, held_out["src"], args.length)
    state = {n: p.detach().clone() for n, p in source.state_dict().items()}

    result = {"seed": seed, "source_vocab": len(src_tok), "target_vocab": len(tgt_tok),
              "source_model_loss_on_src": src_loss, "methods": {}}
    for name, k, vecs in (("random", args.dim, None), ("ofa-full", args.dim, vectors), (f"ofa-k{args.k}", args.k, vectors)):
        model = transformers.LlamaForCausalLM(copy.deepcopy(config))  # apply_to_model edits the config
        model.load_state_dict(state)
        # vecs None: shared tokens copied, every other row random (OFA's rule for uncovered subwords)
        report = ofa.apply_to_model(model, src_tok, tgt_tok, vecs, k=k, seed=seed)
        emb = model.get_input_embeddings()
        extra = {}
        if args.ablation in ("noise", "untied-noise") and vecs is not None:
            extra["noise"] = add_similarity_noise(emb, state["model.embed_tokens.weight"][:len(src_tok)], src_tok,
                                                  tgt_tok, vecs, k, args.noise_scale, seed, report["similarity"])
        if args.ablation in ("untied", "untied-noise"):  # the head: a copy of the initial table, own parameters
            head = model.get_output_embeddings()
            model.set_output_embeddings(ofa.FactorizedLMHead(copy.deepcopy(emb), head.bias))
            shared = {id(p) for p in emb.parameters()}
            extra["output_head_params"] = sum(p.numel() for p in model.get_output_embeddings().parameters()
                                              if id(p) not in shared)
        duplicates = near_duplicate_rows(emb.table())
        curve = {}

        def evaluate(step, model=model, curve=curve):
            if step in args.eval_at:
                curve[step] = {lang: eval_loss(model, tgt_tok, held_out[lang], args.length) for lang in LANGS}

        evaluate(0)
        t0 = time.perf_counter()
        train(model, batches(tgt_tok, multi_text, 32, args.length, rng), max(args.eval_at), 1e-3, evaluate)
        result["methods"][name] = {"report": report, "curve": curve, "seconds": time.perf_counter() - t0,
                                   "embedding_params": sum(p.numel() for p in emb.parameters()),
                                   "initial_rows": duplicates, **extra}
    return result


def ablation_lines(runs: list[dict], args) -> list[str]:
    if args.ablation == "none":
        return []
    out = [f"Ablation `{args.ablation}`:"]
    if "untied" in args.ablation:
        heads = {n: m.get("output_head_params") for n, m in runs[0]["methods"].items()}
        out.append("- untied output head, for every method: a separate copy of the initial input table (same "
                   "coords @ primitive form, own parameters; " + ", ".join(f"{n} +{p:,}" for n, p in heads.items())
                   + " head parameters, not counted under embedding params below).")
    if "noise" in args.ablation:
        rows = {n: m["noise"]["rows"] for n, m in runs[0]["methods"].items() if "noise" in m}
        out.append(f"- Gaussian noise of {args.noise_scale} x the per-dimension std of the source coordinates added to "
                   "the similarity-initialised rows (OFA methods only; random is unchanged; "
                   + ", ".join(f"{n}: {r} rows" for n, r in rows.items()) + " in seed 0).")
    return out + [""]


def summarize(runs: list[dict], args) -> str:
    names = list(runs[0]["methods"])
    lines = ["# OFA against random initialisation: continued pretraining on two new languages", "",
             f"seeds {[r['seed'] for r in runs]}; tiny Llama hidden {args.dim}, 2 layers, pretrained "
             f"{args.pretrain_steps} steps on the source language; continued pretraining on 3 languages at lr 1e-3, "
             f"batch 32 x {args.length} tokens; vocabularies {runs[0]['source_vocab']} -> {runs[0]['target_vocab']} "
             f"tokens; torch {torch.__version__}, transformers {transformers.__version__}, CPU.", "",
             *ablation_lines(runs, args),
             "Held-out loss on the new languages (mean of new1 and new2), mean ± std over seeds:", "",
             "| method | " + " | ".join(f"step {s}" for s in args.eval_at) + " | embedding params | copied / similarity / random |",
             "|---|" + "---|" * (len(args.eval_at) + 2)]
    for name in names:
        cells = []
        for s in args.eval_at:
            vals = [(r["methods"][name]["curve"][s]["new1"] + r["methods"][name]["curve"][s]["new2"]) / 2 for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        rep = runs[0]["methods"][name]["report"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {runs[0]['methods'][name]['embedding_params']:,} | "
                     f"{rep['copied']} / {rep['similarity']} / {rep['random']} |")
    lines += ["", "Rows of the initial table with a near-duplicate (cosine > 0.99; mean nearest-row cosine), per seed:", ""]
    for name in names:
        d = [r["methods"][name]["initial_rows"] for r in runs]
        lines.append(f"- {name}: " + ", ".join(f"{x['near_duplicates']} of {x['rows']} ({x['mean_nearest_cosine']:.2f})"
                                               for x in d))
    lines += ["", "Held-out loss on the source language:", "",
              "| method | " + " | ".join(f"step {s}" for s in args.eval_at) + " |", "|---|" + "---|" * len(args.eval_at)]
    for name in names:
        vals = [[r["methods"][name]["curve"][s]["src"] for r in runs] for s in args.eval_at]
        lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(v):.3f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[0, 25, 50, 100, 200, 400])
    parser.add_argument("--ablation", choices=["none", "untied", "noise", "untied-noise"], default="none",
                        help="untied: a separate output head, a copy of the initial table, for every method; noise: "
                             "Gaussian noise on the similarity-initialised rows (see the module docstring)")
    parser.add_argument("--noise-scale", type=float, default=0.3,
                        help="noise std as a fraction of the per-dimension std of the source coordinates")
    parser.add_argument("--out", default="ofa-continued-pretraining")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    t0 = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(seed, args))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    md = summarize(runs, args) + f"\nTotal wall time {time.perf_counter() - t0:.0f} s.\n"
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
