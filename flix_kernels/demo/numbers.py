"""A composition benchmark on real multilingual data: numbers and their words (``num2words``).

Languages are real ones, with their own morphology and word order: by default English and
German (Germanic), French and Spanish (Romance), Polish (Slavic) and Indonesian (Austronesian).
A number's words are split into tokens at spaces and hyphens, and German compounds at their
joints (``und``, ``hundert``), so tokens are words or morphemes ("einundzwanzig" -> "ein und
zwanzig"). Every language owns a disjoint range of word tokens; the ten digits are shared.

Tasks over a number n (0 <= n <= ``max_number``):

* ``spell``: digits of n -> its words;
* ``read``: words of n -> its digits;
* ``next``: words of n -> words of n + 1;
* ``ordinal``: digits of n -> its ordinal words (n >= 1).

One example is ``[BOS, <lang>, <task>, source..., SEP] target... EOS``, as in the synthetic
benchmark (:mod:`.data`), whose interface this class implements, so the same experiment runs
on it. Pretraining (the frozen base knows the languages, no task): counting text in every
language (the words of consecutive numbers, separated by SEP) and copying a number's words
(the prompt format; ``copy`` is no fine-tuning task); optionally aligned digits-and-words text
and counting in ordinals, which an LLM's pretraining text also shows (``DemoConfig``'s
``pretrain_aligned`` and ``pretrain_ordinals``). Held-out pairs: the Latin-square design of
:func:`.data.latin_square_holdout`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from .data import BOS, EOS, IGNORE, SEP, latin_square_holdout, pad, pair_sampler

__all__ = ["NUMBER_TASKS", "NumbersBenchmark", "number_words"]

NUMBER_TASKS = ("spell", "read", "next", "ordinal")
DIGITS = "0123456789"
# German writes a number below a million as one compound; its joints make the morphemes.
_GERMAN_JOINTS = re.compile(r"(und|hundert|tausend)")


def number_words(n: int, lang: str, ordinal: bool = False) -> list[str]:
    """The word (or morpheme) tokens of ``n`` in ``lang``, from num2words."""
    from num2words import num2words

    text = num2words(n, lang=lang, to="ordinal" if ordinal else "cardinal")
    if lang == "de":
        text = _GERMAN_JOINTS.sub(r" \1 ", text)
    return [w for w in re.split(r"[\s\-]+", text.lower()) if w]


@dataclass
class NumbersBenchmark:
    """Vocabulary, languages, tasks and held-out split for one data seed (see the module)."""

    seed: int
    languages: tuple[str, ...] = ("en", "de", "fr", "es", "pl", "id")
    tasks: tuple[str, ...] = NUMBER_TASKS
    max_number: int = 99
    holdout_shift: int | None = None  # default: the seed
    # Pretraining options (see pretrain_batch): the share of rows that align a number's digits
    # with its words, and whether counting text also counts in ordinals.
    aligned: float = 0.0
    ordinals: bool = False
    words: dict[str, dict[tuple[int, bool], list[str]]] = field(init=False, repr=False)

    @classmethod
    def for_config(cls, cfg, seed: int) -> "NumbersBenchmark":
        return cls(seed, languages=tuple(cfg.languages), tasks=tuple(cfg.tasks), max_number=cfg.max_number,
                   aligned=cfg.pretrain_aligned, ordinals=cfg.pretrain_ordinals)

    def __post_init__(self):
        try:
            import num2words  # noqa: F401
        except ImportError as e:
            raise ImportError("the numbers benchmark needs num2words (pip install num2words, or "
                              "pip install 'flix_kernels[demo]')") from e
        unknown = [t for t in self.tasks if t not in NUMBER_TASKS]
        if unknown:
            raise ValueError(f"unknown numbers task(s) {unknown}; choose from {NUMBER_TASKS}")
        if len(self.languages) < 2 or len(self.tasks) < 2:
            raise ValueError("need at least 2 languages and 2 tasks, so every held-out feature is seen elsewhere")
        if not 2 <= self.max_number <= 9999:
            raise ValueError(f"max_number must be in 2..9999, got {self.max_number}")
        if not 0.0 <= self.aligned <= 1.0:
            raise ValueError(f"pretrain_aligned must be in [0, 1], got {self.aligned}")
        self.words = {}
        for lang in self.languages:
            try:
                self.words[lang] = {(n, o): number_words(n, lang, o) for n in range(self.max_number + 1)
                                    for o in (False, True) if n or not o}
            except NotImplementedError as e:
                raise ValueError(f"num2words cannot write language {lang!r}: {e}") from None
        self.lang_tag = {l: 4 + i for i, l in enumerate(self.languages)}
        self.all_tasks = ("copy",) + tuple(self.tasks)
        first_task = 4 + len(self.languages)
        self.task_tag = {t: first_task + i for i, t in enumerate(self.all_tasks)}
        self.digit_base = first_task + len(self.all_tasks)
        self.vocab = {}  # (language, word) -> token id
        nxt = self.digit_base + len(DIGITS)
        for lang in self.languages:
            for w in sorted({w for ws in self.words[lang].values() for w in ws}):
                self.vocab[(lang, w)] = nxt
                nxt += 1
        self.vocab_size = nxt
        shift = self.seed if self.holdout_shift is None else self.holdout_shift
        self.held_out = latin_square_holdout(self.languages, self.tasks, shift)
        self.seen = [(l, t) for l in self.languages for t in self.tasks if (l, t) not in self.held_out]
        self.pairs = [(l, t) for l in self.languages for t in self.tasks]
        self.max_len = max(len(ws) for by_lang in self.words.values() for ws in by_lang.values())  # tokens
        self.lm_len = 48  # tokens of a pretraining counting sequence (the model has 64 positions)

    # -- rendering ----------------------------------------------------------------------------
    def word_tokens(self, lang: str, n: int, ordinal: bool = False) -> list[int]:
        return [self.vocab[(lang, w)] for w in self.words[lang][(n, ordinal)]]

    def digit_tokens(self, n: int) -> list[int]:
        return [self.digit_base + DIGITS.index(c) for c in str(n)]

    def _io(self, lang: str, task: str, n: int) -> tuple[list[int], list[int]]:
        if task == "spell":
            return self.digit_tokens(n), self.word_tokens(lang, n)
        if task == "read":
            return self.word_tokens(lang, n), self.digit_tokens(n)
        if task == "next":
            return self.word_tokens(lang, n), self.word_tokens(lang, n + 1)
        if task == "ordinal":
            return self.digit_tokens(n), self.word_tokens(lang, n, ordinal=True)
        if task == "copy":
            words = self.word_tokens(lang, n)
            return words, list(words)
        raise ValueError(f"unknown task {task!r}")

    def render(self, lang: str, task: str, n: int) -> tuple[list[int], list[int]]:
        """(tokens, labels) of one example; labels are IGNORE outside target + EOS."""
        src, tgt = self._io(lang, task, n)
        prompt = [BOS, self.lang_tag[lang], self.task_tag[task]] + src + [SEP]
        answer = tgt + [EOS]
        return prompt + answer, [IGNORE] * len(prompt) + answer

    def numbers_for(self, task: str) -> range:
        """The numbers a task is defined on."""
        if task == "next":
            return range(0, self.max_number)
        if task == "ordinal":
            return range(1, self.max_number + 1)
        return range(0, self.max_number + 1)

    def source(self, rng: random.Random, task: str = "copy") -> int:
        return rng.choice(self.numbers_for(task))

    # -- fine-tuning data ---------------------------------------------------------------------
    def eval_sets(self, per_pair: int) -> dict[tuple[str, str], list[int]]:
        """A fixed list of distinct numbers per pair (seen and held out), at most half of the
        numbers the task has, so that the rest are left to train on."""
        rng = random.Random(f"eval-{self.seed}")
        out = {}
        for pair in self.pairs:
            numbers = list(self.numbers_for(pair[1]))
            out[pair] = sorted(rng.sample(numbers, min(per_pair, len(numbers) // 2)))
        return out

    def train_stream(self, batch: int, stream_seed: int, exclude: dict | None = None,
                     language_weights: dict[str, float] | None = None):
        """Endless batches of (pair, number) over the seen pairs only, uniformly (or weighted per
        language, as :meth:`.data.Benchmark.train_stream`); numbers in the evaluation set of the
        same pair are never trained on."""
        rng = random.Random(f"train-{self.seed}-{stream_seed}")
        banned = {(p, n) for p, ns in (exclude or {}).items() for n in ns}
        allowed = {p: [n for n in self.numbers_for(p[1]) if (p, n) not in banned] for p in self.seen}
        pick = pair_sampler(rng, self.seen, language_weights)
        while True:
            out = []
            for _ in range(batch):
                pair = pick()
                out.append((pair, rng.choice(allowed[pair])))
            yield out

    def collate(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        return pad([self.render(l, t, n) for (l, t), n in items])

    # -- pretraining data ---------------------------------------------------------------------
    def pretrain_batch(self, rng: random.Random, batch: int, lm_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in every language, none with a fine-tuning task's tag: a share ``aligned`` of
        aligned text (a number's digits and its words, in either order: what web text shows an
        LLM, "21 (twenty-one)"), then half counting text (the words of consecutive numbers from
        a random start, SEP between them, up to ``lm_len`` tokens; in ordinals for half of the
        rows when ``ordinals``) and half copy examples."""
        rows = []
        for b in range(batch):
            lang = rng.choice(self.languages)
            if self.aligned and rng.random() < self.aligned:
                n = rng.randrange(self.max_number + 1)
                parts = [self.digit_tokens(n), self.word_tokens(lang, n)]
                if rng.random() < 0.5:
                    parts.reverse()
                toks = [BOS, self.lang_tag[lang]] + parts[0] + [SEP] + parts[1] + [EOS]
                rows.append((toks, [IGNORE, IGNORE] + toks[2:]))
            elif b % 2 == 0:
                ordinal = self.ordinals and rng.random() < 0.5
                n = rng.randrange(1 if ordinal else 0, self.max_number + 1)
                toks = [BOS, self.lang_tag[lang]]
                while n <= self.max_number and len(toks) < lm_len:
                    toks += self.word_tokens(lang, n, ordinal) + [SEP]
                    n += 1
                toks.append(EOS)
                rows.append((toks, [IGNORE, IGNORE] + toks[2:]))
            else:
                rows.append(self.render(lang, "copy", self.source(rng)))
        return pad(rows)
