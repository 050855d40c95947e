"""``flix-kernels demo --vary`` / ``--seen-only``: variants of every method on the same frozen
bases, blind hyper-parameter runs, rare languages, per-group learning rates, FLix's diagnostics."""

from __future__ import annotations

import collections
import json
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("num2words")

import torch  # noqa: E402

from flix_kernels import cli, flix_layers  # noqa: E402
from flix_kernels.demo import DemoConfig, check_variants, parse_variant, run, split_variant  # noqa: E402
from flix_kernels.demo import experiment  # noqa: E402
from flix_kernels.demo.data import Benchmark, pair_sampler  # noqa: E402
from flix_kernels.demo.numbers import NumbersBenchmark  # noqa: E402


def test_a_variant_is_parsed_into_typed_fields():
    assert parse_variant("lr=1e-3") == {"lr": 0.001}
    assert parse_variant(" rank_language=2 , rank_task=6") == {"rank_language": 2, "rank_task": 6}
    assert parse_variant("rare_languages=pl+id,rare_weight=0.02") == {"rare_languages": ("pl", "id"),
                                                                      "rare_weight": 0.02}


BAD_VARIANTS = [("hidden=128", "'hidden' cannot vary (the base is shared"), ("nope=1", "'nope' cannot vary"),
                ("lr", "expected field=value"), ("lr=", "expected field=value"), ("lr=1,lr=2", "'lr' given twice"),
                ("rank_task=1.5", "rank_task='1.5' is not a valid int"), ("lr=fast", "lr='fast' is not a valid float")]


@pytest.mark.parametrize("spec,message", BAD_VARIANTS, ids=[s for s, _ in BAD_VARIANTS])
def test_bad_variants_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_variant(spec)


@pytest.mark.parametrize("spec,message", [
    ("lr=0", "variant 'lr=0': lr must be > 0"), ("rare_languages=xx", r"rare_languages \['xx'\] are not languages"),
    ("rare_languages=en+de+fr+es+pl+id", "names every language"), ("feature_dropout=1.0", "feature_dropout"),
    ("language_lr_scale=0.5", "only method flix_fair"), ("rank_task=0", "batch and ranks must be at least 1"),
    ("batch=0", "batch and ranks must be at least 1"), ("weight_decay=-0.1", "weight_decay >= 0")])
def test_bad_variant_values_are_refused_before_training(spec, message):
    cfg = DemoConfig.smoke(data="numbers", vary=(spec,))
    with pytest.raises(ValueError, match=message):
        check_variants(cfg)
    with pytest.raises(ValueError, match=message):
        run(cfg)  # before any seed starts


def test_the_cli_refuses_a_bad_variant_in_one_line(tmp_path, capsys):
    assert cli.main(["demo", "--smoke", "--vary", "hidden=8", "--out", str(tmp_path), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("flix-kernels demo: error: argument --vary: variant 'hidden=8': 'hidden' cannot vary")


def test_variants_run_every_method_on_the_same_base_with_their_fields(tmp_path):
    assert cli.main(["demo", "--smoke", "--data", "numbers", "--methods", "lora", "flix", "--vary", "lr=0.01",
                     "--vary", "rank_language=2,rank_task=6", "--out", str(tmp_path), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "results.json").read_text())
    runs = rec["seeds"][0]["methods"]
    assert list(runs) == ["lora", "lora[lr=0.01]", "lora[rank_language=2,rank_task=6]",
                          "flix", "flix[lr=0.01]", "flix[rank_language=2,rank_task=6]"]
    assert runs["flix[rank_language=2,rank_task=6]"]["space"]["rank"] == {"language": 2, "task": 6}
    assert runs["flix[lr=0.01]"]["space"] == runs["flix"]["space"]
    assert runs["flix[lr=0.01]"]["final"] != runs["flix"]["final"] or runs["flix[lr=0.01]"]["curve"] != runs["flix"]["curve"]
    summ = rec["summary"]["methods"]
    # paired with the shared LoRA of the same variant
    d = summ["flix[lr=0.01]"]["held_out_vs_lora"]["mean"]
    assert d == pytest.approx(runs["flix[lr=0.01]"]["final"]["held_out"] - runs["lora[lr=0.01]"]["final"]["held_out"])
    assert summ["flix[lr=0.01]"]["label"] == "FLix (language + task) [lr=0.01]"
    assert "lr=0.01" in rec["design"]["variants"]
    md = (tmp_path / "results.md").read_text()
    assert "FLix (language + task) [rank_language=2,rank_task=6]" in md and "by language" in md


def test_seen_only_never_evaluates_a_held_out_pair(tmp_path, monkeypatch):
    evaluated = set()
    real = experiment.evaluate

    def spy(model, bench, method, eval_sets, device, **kw):
        evaluated.update(eval_sets)
        return real(model, bench, method, eval_sets, device, **kw)

    monkeypatch.setattr(experiment, "evaluate", spy)
    rec = run(DemoConfig.smoke(data="numbers", methods=("lora", "flix"), held_out_eval=False, vary=("lr=0.01",),
                               workers=1), tmp_path)
    held = {tuple(p.split("/")) for p in rec["seeds"][0]["held_out_pairs"]}
    assert evaluated and not evaluated & held
    for r in rec["seeds"][0]["methods"].values():
        assert r["final"]["held_out"] is None and not {tuple(p.split("/")) for p in r["final"]["per_pair"]} & held
        assert "held_out_task_only" not in r["final"]
    for s in rec["summary"]["methods"].values():
        assert set(s) >= {"seen", "curve"} and "held_out" not in s
    md = (tmp_path / "results.md").read_text()
    assert "held-out pairs (zero-shot)" not in md and "seen pairs only" in md
    assert rec["summary"]["findings"][0].startswith("Held-out pairs were not evaluated")
    # the command line's --seen-only is the same switch
    out = tmp_path / "cli"
    assert cli.main(["demo", "--smoke", "--seen-only", "--methods", "lora", "--out", str(out), "--no-progress"]) == 0
    cli_rec = json.loads((out / "results.json").read_text())
    assert cli_rec["config"]["held_out_eval"] is False
    assert cli_rec["seeds"][0]["methods"]["lora"]["final"]["held_out"] is None


@pytest.mark.parametrize("bench", [NumbersBenchmark(0), Benchmark(0)], ids=["numbers", "synthetic"])
def test_rare_languages_are_sampled_at_their_weight(bench):
    rare = bench.languages[-1]
    stream = bench.train_stream(64, stream_seed=0, language_weights={rare: 0.1})
    counts = collections.Counter(pair[0] for _ in range(60) for pair, _ in next(stream))
    common = [counts[l] for l in bench.languages if l != rare]
    # each language has the same number of seen pairs, so the expected ratio is the weight
    assert 0.05 < counts[rare] / (sum(common) / len(common)) < 0.16
    # no weights: the uniform stream of before (rng.choice)
    rng = random.Random(f"train-{bench.seed}-3")
    first = next(bench.train_stream(4, stream_seed=3))
    assert first[0][0] == rng.choice(bench.seen)
    assert pair_sampler(random.Random(0), bench.seen, None)() == random.Random(0).choice(bench.seen)


def test_the_language_groups_lr_scale_reaches_the_optimizer(monkeypatch):
    seen = []
    real = experiment._set_lr

    def spy(opt, lr):
        real(opt, lr)
        if "feature_group" in opt.param_groups[0]:  # not pretraining's optimizer
            seen.append({g["feature_group"]: g["lr"] / lr for g in opt.param_groups})

    monkeypatch.setattr(experiment, "_set_lr", spy)
    run(DemoConfig.smoke(data="numbers", methods=("flix_fair",), vary=("language_lr_scale=0.25",), pretrain_steps=4,
                         steps=2, eval_every=2, workers=1))
    assert seen[0] == {"language": pytest.approx(1.0), "task": pytest.approx(1.0)}
    assert seen[-1] == {"language": pytest.approx(0.25), "task": pytest.approx(1.0)}


def test_diagnostics_leave_the_scaling_as_trained_and_halve_only_the_language_adapters(monkeypatch):
    cfg = DemoConfig.smoke(data="numbers")
    bench = NumbersBenchmark(0)
    method = experiment.make_method("flix", bench, cfg)
    model = experiment.build_model(cfg, bench.vocab_size)
    from flix_kernels import inject

    inject(model, method.space, target_modules="all-linear", alpha=8.0)
    for _, layer in flix_layers(model):
        torch.nn.init.normal_(layer.lora_B)  # a nonzero update, so the scale matters
    before = [layer.scaling.clone() for _, layer in flix_layers(model)]
    scales = []
    real = experiment.evaluate

    def spy(model, bench, m, sets, device, **kw):
        scales.append(next(iter(flix_layers(model)))[1].scaling.clone())
        return real(model, bench, m, sets, device, **kw)

    monkeypatch.setattr(experiment, "evaluate", spy)
    held = {p: bench.eval_sets(4)[p] for p in bench.held_out}
    out = experiment._diagnostics(model, bench, method, held, torch.device("cpu"))
    assert set(out) == {"held_out_task_only", "task_only_per_pair", "held_out_language_only",
                        "language_only_per_pair", "held_out_language_half"}
    for (_, layer), b in zip(flix_layers(model), before):
        assert torch.equal(layer.scaling, b)
    n_lang = len(bench.languages)
    half = scales[-1]
    assert torch.equal(half[:n_lang], before[0][:n_lang] * 0.5) and torch.equal(half[n_lang:], before[0][n_lang:])


def test_run_keys_split_back_into_method_and_variant():
    for method, spec in (("flix", ""), ("flix_fair", "lr=0.001,rare_languages=pl+id")):
        assert experiment.split_key(experiment.run_key(method, spec)) == (method, spec)
    assert experiment.run_label("flix[lr=0.01]") == "FLix (language + task) [lr=0.01]"


def test_a_variant_may_name_its_one_method_and_runs_are_grouped_by_method():
    assert split_variant("flix_dropout:feature_dropout=0.5") == ("flix_dropout", "feature_dropout=0.5")
    assert split_variant("lr=0.1") == (None, "lr=0.1")
    with pytest.raises(ValueError, match="unknown method 'flax'"):
        split_variant("flax:lr=0.1")
    cfg = DemoConfig.smoke(methods=("lora", "flix"), vary=("flix_dropout:feature_dropout=0.5", "lr=0.01"))
    assert [(m, s) for m, s, _ in cfg.runs()] == [("lora", ""), ("flix", ""), ("flix_dropout", "feature_dropout=0.5"),
                                                  ("lora", "lr=0.01"), ("flix", "lr=0.01")]
    with pytest.raises(ValueError, match=r"runs asked for more than once: flix\[lr=0.01\]"):
        check_variants(DemoConfig.smoke(methods=("flix",), vary=("lr=0.01", "flix:lr=0.01")))


def test_each_method_has_its_learning_rate_and_a_variant_setting_lr_sets_it_for_all():
    cfg = DemoConfig.default()
    assert cfg.lr_for("lora") == 0.012 and cfg.lr_for("flix") == cfg.lr == cfg.lr_for("flix_fair")
    runs = {(m, s): c for m, s, c in DemoConfig.default(vary=("lr=0.005", "rank_task=6")).runs()}
    assert runs[("lora", "lr=0.005")].lr_for("lora") == 0.005 == runs[("per_pair", "lr=0.005")].lr_for("per_pair")
    assert runs[("lora", "rank_task=6")].lr_for("lora") == 0.012  # other fields keep each method's rate
    assert DemoConfig.default(data="synthetic").lr_for("lora") == DemoConfig.default(data="synthetic").lr
    with pytest.raises(ValueError, match="method_lr"):
        check_variants(DemoConfig.smoke(method_lr=(("lora", 0.0),)))
    with pytest.raises(ValueError, match="method_lr"):
        check_variants(DemoConfig.smoke(method_lr=(("nope", 0.1),)))


def test_any_field_parses_where_allowed_with_its_type():
    from dataclasses import fields

    every = tuple(f.name for f in fields(DemoConfig))
    assert parse_variant("pretrain_ordinals=false,seeds=0+2,hidden=32,methods=lora+flix", allowed=every) == {
        "pretrain_ordinals": False, "seeds": (0, 2), "hidden": 32, "methods": ("lora", "flix")}
    assert parse_variant("pretrain_ordinals=1", allowed=every) == {"pretrain_ordinals": True}
    with pytest.raises(ValueError, match="pretrain_ordinals='maybe' is not a valid bool"):
        parse_variant("pretrain_ordinals=maybe", allowed=every)
    with pytest.raises(ValueError, match="'workers' cannot vary; choose from hidden"):
        parse_variant("workers=2", allowed=("hidden",))


def test_the_example_script_refuses_a_bad_setting_in_one_line(capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "zero_shot_composition.py"
    spec = importlib.util.spec_from_file_location("zero_shot_composition", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("the run started")))
    monkeypatch.setattr(sys, "argv", ["zero_shot_composition.py", "--smoke", "--set", "hidden=big"])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    assert "argument --set: variant 'hidden=big': hidden='big' is not a valid int" in capsys.readouterr().err


def test_the_per_example_loss_weighs_every_example_alike_and_the_token_loss_is_transformers():
    cfg = DemoConfig.smoke()
    bench = NumbersBenchmark(0)
    torch.manual_seed(0)
    model = experiment.build_model(cfg, bench.vocab_size)
    items = [(("en", "spell"), 77), (("de", "read"), 21), (("pl", "next"), 5)]
    ids, labels = bench.collate(items)
    assert experiment._loss(model, ids, labels, "token") == model(input_ids=ids, labels=labels).loss
    logits = model(input_ids=ids).logits.double()
    per_example = []
    for b in range(len(items)):  # the oracle: one example at a time, its target positions only
        pos = [t for t in range(1, ids.shape[1]) if labels[b, t] != -100]
        nll = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in pos]
        per_example.append(sum(nll) / len(nll))
    want = sum(per_example) / len(per_example)
    got = experiment._loss(model, ids, labels, "example")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(got.item() - experiment._loss(model, ids, labels, "token").item()) > 1e-4  # the two differ here
    with pytest.raises(ValueError, match="loss must be 'token' or 'example'"):
        check_variants(DemoConfig.smoke(vary=("loss=mean",)))
