"""The numbers benchmark (flix_kernels.demo.numbers): real languages' number words from num2words."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("num2words")
from flix_kernels import cli  # noqa: E402
from flix_kernels.demo.data import BOS, EOS, IGNORE, SEP  # noqa: E402
from flix_kernels.demo.numbers import NUMBER_TASKS, NumbersBenchmark, number_words  # noqa: E402


def test_words_are_num2words_split_into_words_and_german_morphemes():
    assert number_words(21, "en") == ["twenty", "one"]
    assert number_words(21, "de") == ["ein", "und", "zwanzig"]
    assert number_words(342, "de") == ["drei", "hundert", "zwei", "und", "vierzig"]
    assert number_words(71, "fr") == ["soixante", "et", "onze"]
    assert number_words(7, "es", ordinal=True) == ["séptimo"]
    assert number_words(21, "id") == ["dua", "puluh", "satu"]


def test_vocabularies_are_disjoint_per_language_and_digits_are_shared():
    b = NumbersBenchmark(0)
    ids = {}
    for (lang, word), tok in b.vocab.items():
        assert tok >= b.digit_base + 10 and tok < b.vocab_size
        ids.setdefault(tok, set()).add(lang)
    assert all(len(langs) == 1 for langs in ids.values())
    assert b.digit_tokens(407) == [b.digit_base + 4, b.digit_base + 0, b.digit_base + 7]
    # "one" in en and "ein" in de are different tokens; the same string in two languages is too
    assert b.vocab[("en", "one")] != b.vocab[("de", "ein")]


@pytest.mark.parametrize("task", NUMBER_TASKS)
def test_rendered_examples(task):
    b = NumbersBenchmark(0)
    n = 41
    toks, labels = b.render("pl", task, n)
    sep = toks.index(SEP)
    assert toks[:3] == [BOS, b.lang_tag["pl"], b.task_tag[task]] and toks[-1] == EOS
    src, tgt = toks[3:sep], toks[sep + 1:-1]
    words = {"spell": (b.digit_tokens(n), b.word_tokens("pl", n)), "read": (b.word_tokens("pl", n), b.digit_tokens(n)),
             "next": (b.word_tokens("pl", n), b.word_tokens("pl", n + 1)),
             "ordinal": (b.digit_tokens(n), b.word_tokens("pl", n, ordinal=True))}[task]
    assert (src, tgt) == words
    assert labels[:sep + 1] == [IGNORE] * (sep + 1) and labels[sep + 1:] == toks[sep + 1:]


def test_held_out_design_covers_every_language_and_task_and_training_never_sees_it():
    for seed in range(4):
        b = NumbersBenchmark(seed)
        held = set(b.held_out)
        assert {l for l, _ in held} == set(b.languages) and {t for _, t in held} == set(b.tasks)
        evals = b.eval_sets(32)
        stream = b.train_stream(64, stream_seed=seed, exclude=evals)
        for _ in range(20):
            for pair, n in next(stream):
                assert pair not in held and n not in evals[pair] and n in b.numbers_for(pair[1])
    # over len(tasks) seeds every pair is held out exactly once
    counts = {}
    for seed in range(len(NUMBER_TASKS)):
        for pair in NumbersBenchmark(seed).held_out:
            counts[pair] = counts.get(pair, 0) + 1
    assert len(counts) == 24 and set(counts.values()) == {1}


def test_pretraining_is_counting_and_copying_in_every_language():
    b = NumbersBenchmark(0)
    ids, labels = b.pretrain_batch(random.Random(0), 16, lm_len=b.lm_len)
    task_tags = {b.task_tag[t] for t in NUMBER_TASKS}
    assert not task_tags & set(ids.flatten().tolist())  # no fine-tuning task
    assert ids.shape[1] <= 64


def test_unknown_tasks_and_languages_are_refused():
    with pytest.raises(ValueError, match="unknown numbers task"):
        NumbersBenchmark(0, tasks=("spell", "sort"))
    with pytest.raises(ValueError, match="cannot write language 'xx'|xx"):
        NumbersBenchmark(0, languages=("en", "xx"))


def test_numbers_is_the_default_benchmark_and_its_smoke_run_works(tmp_path):
    assert cli.main(["demo", "--smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "results.json").read_text())
    cfg = rec["config"]
    assert cfg["data"] == "numbers" and cfg["languages"] == ["en", "de", "fr", "es", "pl", "id"]
    assert cfg["pretrain_aligned"] == 0.25 and cfg["pretrain_ordinals"] is True
    assert rec["design"]["data"] == "numbers (num2words)" and "aligned text" in rec["design"]["pretraining"]
    assert len(rec["seeds"][0]["held_out_pairs"]) == 6
    # each method trained at its own learning rate (chosen on seen pairs), recorded per run
    lrs = {m: r["lr"] for m, r in rec["seeds"][0]["methods"].items()}
    assert lrs == {m: dict(map(tuple, cfg["method_lr"])).get(m, cfg["lr"]) for m in cfg["methods"]}
    assert len(set(lrs.values())) > 1 and "lora 0.012" in rec["design"]["budget"]
    summ = rec["summary"]["methods"]
    assert set(summ["flix"]["held_out_by_language"]) == set(cfg["languages"])
    assert set(summ["flix"]["held_out_by_task_task_only"]) == set(cfg["tasks"])
    for k in ("held_out_task_only", "held_out_language_only", "held_out_language_half"):
        assert 0 <= summ["flix"][k]["mean"] <= 1


def test_the_cli_names_the_missing_num2words(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "num2words", None)  # import fails
    assert cli.main(["demo", "--smoke", "--out", str(tmp_path), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs num2words: pip install 'flix_kernels[demo]' (or run --data synthetic)" in line


def test_aligned_and_ordinal_pretraining_options():
    b = NumbersBenchmark(0, aligned=1.0)
    ids, _ = b.pretrain_batch(random.Random(0), 8, lm_len=b.lm_len)
    digits = set(range(b.digit_base, b.digit_base + 10))
    for row in ids.tolist():
        assert digits & set(row) and SEP in row  # every row pairs a number's digits with its words
    b = NumbersBenchmark(0, ordinals=True)
    ordinal_words = {b.vocab[(lang, w)] for lang in b.languages for n in range(1, 100)
                     for w in number_words(n, lang, ordinal=True)} - {b.vocab[(lang, w)] for lang in b.languages
                                                                       for n in range(100) for w in number_words(n, lang)}
    ids, _ = b.pretrain_batch(random.Random(0), 64, lm_len=b.lm_len)
    assert ordinal_words & set(ids.flatten().tolist())
    assert not ordinal_words & set(NumbersBenchmark(0).pretrain_batch(random.Random(0), 64, 48)[0].flatten().tolist())
    with pytest.raises(ValueError, match="pretrain_aligned"):
        NumbersBenchmark(0, aligned=1.5)
