"""The synthetic benchmark: languages are vocabularies, tasks are sequence transformations.

There are ``S`` abstract symbols. Each language owns a disjoint range of ``S`` token ids and
writes symbol ``s`` as ``offset + perm[s]``, with its own random permutation (fixed by the data
seed), so token-id order inside a language says nothing about symbol order. Tasks transform a
sequence of distinct symbols; some are purely positional (reverse, rotate), some depend on what
the symbols *are* (sort by symbol order, shift every symbol to its successor), so a model must
know a language's symbols to do them in that language.

One example is a (language, task) pair rendered as::

    prompt = [BOS, <lang>, <task>, src..., SEP]      target = task(src)... EOS

all in the language's vocabulary. Every method sees the language and task tags.

Pretraining data (for the frozen base model) is generic and covers every language: next-token
LM on symbol sequences from a grammar shared by all languages (the next symbol is the current
one's successor with probability ``succ_prob``, else uniform), which is how the base learns
that the languages share one symbol system and its order; and copying ``[BOS, <lang>, <copy>,
src, SEP, src, EOS]``, which teaches the prompt format. "copy" is never a fine-tuning task and
no fine-tuning task appears in pretraining.

Held-out design: languages x tasks with one pair per language and per task held out, a Latin
square "diagonal" ``(language i, task (i + shift) mod T)``. The experiment uses
``shift = seed``, so over ``T`` seeds every pair is held out once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

PAD, BOS, SEP, EOS = 0, 1, 2, 3
IGNORE = -100  # label of positions without loss (HF's ignore_index)


def _reverse(s, S):
    return s[::-1]


def _rotate(s, S):
    return s[1:] + s[:1]


def _sort(s, S):
    return sorted(s)


def _shift(s, S):
    return [(x + 1) % S for x in s]


def _swap(s, S):
    out = list(s)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _copy(s, S):
    return list(s)


# Transformations on symbol sequences (symbols 0..S-1); "copy" is the pretraining format task.
TASKS = {"copy": _copy, "reverse": _reverse, "rotate": _rotate, "sort": _sort, "shift": _shift, "swap": _swap}


def latin_square_holdout(languages, tasks, shift: int = 0) -> list[tuple[str, str]]:
    """One held-out pair per language and per task: ``(languages[i], tasks[(i + shift) % T])``
    for ``i < max(L, T)`` (indices mod L and T), so each language and each task is held out at
    least once and (with L, T >= 2) still seen in other pairs."""
    L, T = len(languages), len(tasks)
    return sorted({(languages[i % L], tasks[(i + shift) % T]) for i in range(max(L, T))})


@dataclass
class Benchmark:
    """Vocabulary, languages, tasks and the held-out split for one data seed."""

    seed: int
    num_symbols: int = 12
    languages: tuple[str, ...] = ("L0", "L1", "L2", "L3")
    tasks: tuple[str, ...] = ("reverse", "rotate", "sort", "shift")
    min_len: int = 4
    max_len: int = 8
    succ_prob: float = 0.6
    holdout_shift: int | None = None  # default: the seed
    perms: list[list[int]] = field(init=False)

    @classmethod
    def for_config(cls, cfg, seed: int) -> "Benchmark":
        """The benchmark of a :class:`~flix_kernels.demo.DemoConfig` for one data seed."""
        return cls(seed, num_symbols=cfg.num_symbols, languages=tuple(cfg.languages), tasks=tuple(cfg.tasks),
                   min_len=cfg.min_len, max_len=cfg.max_len)

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS or t == "copy"]
        if unknown:
            raise ValueError(f"unknown fine-tuning task(s) {unknown}; choose from {sorted(set(TASKS) - {'copy'})}")
        if len(self.languages) < 2 or len(self.tasks) < 2:
            raise ValueError("need at least 2 languages and 2 tasks, so every held-out feature is seen elsewhere")
        if not (2 <= self.min_len <= self.max_len <= self.num_symbols):
            raise ValueError("need 2 <= min_len <= max_len <= num_symbols (source symbols are distinct)")
        rng = random.Random(f"perm-{self.seed}")
        self.perms = [rng.sample(range(self.num_symbols), self.num_symbols) for _ in self.languages]
        # Token ids: 4 specials, one tag per language, one per task (copy first), then the languages.
        self.lang_tag = {l: 4 + i for i, l in enumerate(self.languages)}
        self.all_tasks = ("copy",) + tuple(self.tasks)
        first_task = 4 + len(self.languages)
        self.task_tag = {t: first_task + i for i, t in enumerate(self.all_tasks)}
        self.symbol_base = first_task + len(self.all_tasks)
        self.vocab_size = self.symbol_base + len(self.languages) * self.num_symbols
        shift = self.seed if self.holdout_shift is None else self.holdout_shift
        self.held_out = latin_square_holdout(self.languages, self.tasks, shift)
        self.seen = [(l, t) for l in self.languages for t in self.tasks if (l, t) not in self.held_out]
        self.pairs = [(l, t) for l in self.languages for t in self.tasks]

    @property
    def lm_len(self) -> int:
        """Tokens of a pretraining LM sequence."""
        return 2 * self.max_len

    # -- rendering ----------------------------------------------------------------------------
    def token(self, lang: str, symbol: int) -> int:
        i = self.languages.index(lang)
        return self.symbol_base + i * self.num_symbols + self.perms[i][symbol]

    def vocabulary(self, lang: str) -> range:
        i = self.languages.index(lang)
        lo = self.symbol_base + i * self.num_symbols
        return range(lo, lo + self.num_symbols)

    def render(self, lang: str, task: str, src: list[int]) -> tuple[list[int], list[int]]:
        """(tokens, labels) of one example; labels are IGNORE outside target + EOS."""
        tgt = TASKS[task](list(src), self.num_symbols)
        prompt = [BOS, self.lang_tag[lang], self.task_tag[task]] + [self.token(lang, s) for s in src] + [SEP]
        answer = [self.token(lang, s) for s in tgt] + [EOS]
        return prompt + answer, [IGNORE] * len(prompt) + answer

    def source(self, rng: random.Random) -> tuple[int, ...]:
        return tuple(rng.sample(range(self.num_symbols), rng.randint(self.min_len, self.max_len)))

    # -- fine-tuning data ---------------------------------------------------------------------
    def eval_sets(self, per_pair: int) -> dict[tuple[str, str], list[tuple[int, ...]]]:
        """A fixed list of distinct source sequences per pair (all 16 pairs, seen and held out)."""
        rng = random.Random(f"eval-{self.seed}")
        out = {}
        for pair in self.pairs:
            srcs: dict[tuple[int, ...], None] = {}
            while len(srcs) < per_pair:
                srcs[self.source(rng)] = None
            out[pair] = list(srcs)
        return out

    def train_stream(self, batch: int, stream_seed: int, exclude: dict | None = None,
                     language_weights: dict[str, float] | None = None):
        """Endless batches of (pair, source) over the seen pairs only, uniformly (or with the
        sampling weights of ``language_weights``, 1 for a language it does not name); sources
        used by the evaluation set of the same pair are skipped, so evaluation is on unseen inputs."""
        rng = random.Random(f"train-{self.seed}-{stream_seed}")
        banned = {(p, s) for p, srcs in (exclude or {}).items() for s in srcs}
        pick = pair_sampler(rng, self.seen, language_weights)
        while True:
            out = []
            while len(out) < batch:
                pair, src = pick(), self.source(rng)
                if (pair, src) not in banned:
                    out.append((pair, src))
            yield out

    def collate(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(B, T)`` input ids and labels for ``[(pair, src), ...]``. Right padding
        needs no attention mask in a causal model: real tokens never attend to later pads."""
        rows = [self.render(l, t, list(src)) for (l, t), src in items]
        return pad(rows)

    # -- pretraining data ---------------------------------------------------------------------
    def pretrain_batch(self, rng: random.Random, batch: int, lm_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Half LM sequences from the shared successor grammar, half copy examples, every language."""
        rows = []
        for b in range(batch):
            lang = rng.choice(self.languages)
            if b % 2 == 0:
                s = [rng.randrange(self.num_symbols)]
                while len(s) < lm_len:
                    nxt = s[-1] + 1
                    s.append(nxt if nxt < self.num_symbols and rng.random() < self.succ_prob
                             else rng.randrange(self.num_symbols))
                toks = [BOS, self.lang_tag[lang]] + [self.token(lang, x) for x in s] + [EOS]
                rows.append((toks, [IGNORE, IGNORE] + toks[2:]))
            else:
                rows.append(self.render(lang, "copy", list(self.source(rng))))
        return pad(rows)


def pair_sampler(rng: random.Random, pairs: list, language_weights: dict[str, float] | None):
    """A function drawing one of ``pairs`` ((language, task)) uniformly, or weighted per language."""
    if not language_weights:
        return lambda: rng.choice(pairs)
    weights = [language_weights.get(lang, 1.0) for lang, _ in pairs]
    return lambda: rng.choices(pairs, weights)[0]


def pad(rows) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(t) for t, _ in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (t, l) in enumerate(rows):
        ids[b, : len(t)] = torch.tensor(t)
        labels[b, : len(l)] = torch.tensor(l)
    return ids, labels
