"""``flix-kernels demo``: the synthetic benchmark's properties, the smoke run's outputs, determinism."""

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import flix_kernels.demo  # noqa: E402
from flix_kernels import cli  # noqa: E402
from flix_kernels.demo import DemoConfig, run  # noqa: E402
from flix_kernels.demo import report as demo_report  # noqa: E402
from flix_kernels.demo.data import BOS, EOS, IGNORE, SEP, TASKS, Benchmark, latin_square_holdout  # noqa: E402
from flix_kernels.demo.experiment import make_method  # noqa: E402


def test_languages_are_disjoint_permuted_vocabularies():
    b = Benchmark(0)
    ranges = [set(b.vocabulary(l)) for l in b.languages]
    specials = {BOS, SEP, EOS, *b.lang_tag.values(), *b.task_tag.values()}
    for i, r in enumerate(ranges):
        assert len(r) == b.num_symbols and not (r & specials) and max(r) < b.vocab_size
        assert {b.token(b.languages[i], s) for s in range(b.num_symbols)} == r  # a bijection onto its range
        for other in ranges[i + 1:]:
            assert not (r & other)
    assert len({tuple(p) for p in b.perms}) == len(b.languages)  # each language orders its symbols differently
    assert Benchmark(0).perms == b.perms and Benchmark(1).perms != b.perms  # fixed by the data seed


def test_task_transformations():
    s = [3, 0, 7, 1, 5]
    assert TASKS["copy"](s, 12) == s
    assert TASKS["reverse"](s, 12) == [5, 1, 7, 0, 3]
    assert TASKS["rotate"](s, 12) == [0, 7, 1, 5, 3]
    assert TASKS["sort"](s, 12) == [0, 1, 3, 5, 7]
    assert TASKS["swap"](s, 12) == [0, 3, 1, 7, 5]
    assert TASKS["shift"]([11, 0, 4], 12) == [0, 1, 5]


def test_rendered_example():
    b = Benchmark(0)
    toks, labels = b.render("L2", "sort", [3, 0, 7])
    tok = [b.token("L2", x) for x in (0, 3, 7)]
    assert toks == [BOS, b.lang_tag["L2"], b.task_tag["sort"]] + [b.token("L2", x) for x in (3, 0, 7)] + [SEP] + tok + [EOS]
    assert labels == [IGNORE] * 7 + tok + [EOS]  # loss on the target and EOS only


@pytest.mark.parametrize("shift", range(4))
def test_held_out_design(shift):
    b = Benchmark(0, holdout_shift=shift)
    assert len(b.held_out) == 4 and not set(b.held_out) & set(b.seen)
    assert set(b.held_out) | set(b.seen) == set(b.pairs)
    for group, idx in ((b.languages, 0), (b.tasks, 1)):
        assert {p[idx] for p in b.held_out} == set(group)  # every language and task held out once...
        assert {p[idx] for p in b.seen} == set(group)  # ...and still seen in other pairs


def test_every_pair_is_held_out_once_over_the_seeds():
    langs, tasks = ("a", "b", "c", "d"), ("w", "x", "y", "z")
    held = [p for s in range(4) for p in latin_square_holdout(langs, tasks, s)]
    assert sorted(held) == sorted((l, t) for l in langs for t in tasks)
    assert Benchmark(2).held_out == latin_square_holdout(Benchmark(2).languages, Benchmark(2).tasks, 2)


def test_training_data_has_no_held_out_pair_and_no_evaluation_source():
    b = Benchmark(1)
    ev = b.eval_sets(16)
    stream = b.train_stream(64, stream_seed=1, exclude=ev)
    banned = {(p, s) for p, srcs in ev.items() for s in srcs}
    held_tags = {(b.lang_tag[l], b.task_tag[t]) for l, t in b.held_out}
    for _ in range(30):
        items = next(stream)
        assert all(p in b.seen and (p, s) not in banned and len(set(s)) == len(s) for p, s in items)
        ids, _ = b.collate(items)
        assert not {(int(r[1]), int(r[2])) for r in ids} & held_tags


def test_pretraining_data_uses_no_fine_tuning_task():
    b = Benchmark(0)
    ids, labels = b.pretrain_batch(random.Random(0), 64, lm_len=16)
    fine_tuning_tags = {b.task_tag[t] for t in b.tasks}
    assert not set(ids.flatten().tolist()) & fine_tuning_tags
    assert {int(r[1]) for r in ids} == set(b.lang_tag.values())  # every language


def test_per_pair_fallback_uses_the_same_task_in_a_seen_language():
    b = Benchmark(0)
    m = make_method("per_pair", b, DemoConfig())
    for l, t in b.held_out:
        pl, pt = m.features((l, t))["pair"].split("/")
        assert pt == t and pl != l and (pl, pt) in b.seen
    assert m.features(b.seen[0]) == {"pair": "/".join(b.seen[0])}


def test_smoke_run_writes_sane_results(tmp_path):
    assert cli.main(["demo", "--smoke", "--data", "synthetic", "--out", str(tmp_path), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "results.json").read_text())
    cfg = rec["config"]
    assert cfg["preset"] == "smoke" and cfg["methods"] == ["lora", "per_pair", "flix", "flix_dropout"]
    assert cfg["data"] == "synthetic" and cfg["languages"] == ["L0", "L1", "L2", "L3"] and cfg["method_lr"] == []
    assert {r["lr"] for r in rec["seeds"][0]["methods"].values()} == {cfg["lr"]}  # one rate, as recorded
    methods = rec["summary"]["methods"]
    assert set(methods) == set(cfg["methods"])
    for s in methods.values():
        for key in ("seen", "held_out"):
            assert 0.0 <= s[key]["min"] <= s[key]["mean"] <= s[key]["max"] <= 1.0 and s[key]["std"] >= 0
        assert s["trainable_params"] > 0 and s["seconds"] > 0
        assert [c["step"] for c in s["curve"]] == list(range(cfg["eval_every"], cfg["steps"] + 1, cfg["eval_every"]))
    p = {m: s["trainable_params"] for m, s in methods.items()}
    assert p["lora"] < p["flix"] == p["flix_dropout"] < p["per_pair"]
    seed = rec["seeds"][0]
    assert len(seed["held_out_pairs"]) == 4 and set(seed["methods"]["lora"]["final"]["per_pair"]) >= set(seed["held_out_pairs"])
    assert rec["provenance"]["versions"]["torch"] and rec["provenance"]["versions"]["transformers"]
    assert "same information" in rec["design"]["tags"]
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# flix-kernels demo") and "held-out pairs (zero-shot)" in md
    assert "the numbers mean nothing" in rec["caveat"] and f"**{rec['caveat']}**" in md
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_the_per_feature_optimizer_method_shares_flix_init_and_trains_through_it(tmp_path, monkeypatch):
    """--methods flix flix_fair: the same adapter init and data; flix_fair trains through
    per_feature_optimizer (checked by recording which optimizer class each method built)."""
    from flix_kernels.demo import experiment

    built = {}
    real = experiment.per_feature_optimizer

    def spy(cls, model, **kw):
        opt = real(cls, model, **kw)
        built["flix_fair"] = type(opt).__name__
        return opt

    monkeypatch.setattr(experiment, "per_feature_optimizer", spy)
    assert cli.main(["demo", "--smoke", "--methods", "flix", "flix_fair", "--out", str(tmp_path), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "results.json").read_text())
    assert rec["config"]["methods"] == ["flix", "flix_fair"] and built == {"flix_fair": "PerFeatureAdamW"}
    flix, fair = (rec["seeds"][0]["methods"][m] for m in ("flix", "flix_fair"))
    assert flix["space"] == fair["space"] and flix["trainable_params"] == fair["trainable_params"]
    assert "FLix + per-feature optimizer" in (tmp_path / "results.md").read_text()


def test_a_seed_reproduces_in_process_and_in_parallel_workers():
    cfg = DemoConfig.smoke(seeds=(0, 1), pretrain_steps=8, steps=4, eval_every=2, methods=("flix_dropout",))
    cfg.workers = 1
    a = run(cfg)
    cfg.workers = 2  # one spawned process per seed
    b = run(cfg)
    for sa, sb in zip(a["seeds"], b["seeds"]):
        ra, rb = sa["methods"]["flix_dropout"], sb["methods"]["flix_dropout"]
        assert ra["curve"] == rb["curve"] and ra["final"] == rb["final"]
        assert sa["base"]["final_loss"] == sb["base"]["final_loss"]
    assert a["provenance"]["workers"] == 1 and b["provenance"]["workers"] == 2


REPO = Path(__file__).resolve().parent.parent


def test_the_quick_run_says_it_is_an_undertrained_smoke_run(tmp_path, capsys):
    # the quick preset's caveat, on a run small enough for a test
    cfg = DemoConfig.smoke(preset="quick", seeds=(0,), pretrain_steps=8, steps=4, eval_every=2, methods=("lora",))
    rec = run(cfg, tmp_path, console=True)
    seen = rec["summary"]["methods"]["lora"]["seen"]["mean"]
    caveat = rec["caveat"]
    default = DemoConfig.default()
    assert caveat.startswith("This quick run is a short smoke run of the pipeline (1 seed, 8 pretraining and 4 adapter "
                             f"steps against {len(default.seeds)} seeds, {default.pretrain_steps} and {default.steps} "
                             "in the default run), undertrained")
    assert f"the shared LoRA fits only {100 * seen:.0f}% of the seen pairs" in caveat
    assert "its accuracies are not the experiment's result" in caveat and "`flix-kernels demo`" in caveat
    assert demo_report.RECORDED_RESULTS in caveat
    assert (REPO / demo_report.RECORDED_RESULTS.split(" ")[0] / "results.md").is_file()  # where it points exists
    assert json.loads((tmp_path / "results.json").read_text())["caveat"] == caveat
    assert f"**{caveat}**" in (tmp_path / "results.md").read_text()
    assert " ".join(caveat.split()) in " ".join(capsys.readouterr().out.split())
    assert demo_report.caveat({"config": {"preset": "default"}}) is None  # the default run is the result


def test_bad_device_and_seeds_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown device 'gpu'; use cpu, cuda or cuda:N"):
        run(DemoConfig.smoke(device="gpu"))
    with pytest.raises(ValueError, match="at least one seed"):
        run(DemoConfig.smoke(seeds=()))
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"the number of seeds must be an integer of at least 1, got {n!r}"):
            DemoConfig.smoke().with_seeds(n)


@pytest.fixture
def no_run(monkeypatch):
    def started(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(flix_kernels.demo, "run", started)


BAD_DEMO = [
    (["--device", "gpu"], "argument --device: unknown device 'gpu'; use cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "argument --device: unknown device 'cuda:x'; use cpu, cuda or cuda:N"),
    (["--seeds", "0"], "argument --seeds: expected a positive integer, got '0'"),
    (["--seeds", "two"], "argument --seeds: expected a positive integer, got 'two'"),
    (["--quick", "--smoke"], "argument --smoke: not allowed with argument --quick"),
]


@pytest.mark.parametrize("args,message", BAD_DEMO, ids=[" ".join(a) for a, _ in BAD_DEMO])
def test_demo_refuses_bad_arguments_in_one_line(args, message, capsys, no_run, tmp_path):
    assert cli.main(["demo", "--no-progress", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("flix-kernels demo: error: ") and message in line


def test_demo_refuses_an_output_folder_it_cannot_create_before_running(tmp_path, capsys, no_run):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "demo"
    assert cli.main(["demo", "--smoke", "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("flix-kernels demo: error: argument --out: ") and "cannot be created" in line


def test_a_log_gets_one_line_per_finished_pretraining_and_run(tmp_path):
    """``flix-kernels demo > log`` (here a pipe: not a terminal) prints no progress bar, which a
    file would only get at the end, but one line per finished part: the seed's pretraining and
    each run, with its time and exact match, before the tables."""
    import re
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "flix_kernels", "demo", "--smoke", "--data", "synthetic",
                           "--seeds", "1", "--methods", "lora", "flix", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    took = r" in \d+\.\d s: "
    assert re.fullmatch(r"done seed 0: pretraining the base model" + took
                        + r"copy exact match \d+\.\d%, final loss \d+\.\d{3}", lines[0]), proc.stdout[:500]
    for line, label in zip(lines[1:3], ("LoRA (one shared adapter)", "FLix (language + task)")):
        assert re.fullmatch(rf"done seed 0: {re.escape(label)}{took}exact match seen \d+\.\d%, held-out \d+\.\d%",
                            line), line
    assert not [line for line in lines[3:] if line.startswith("done ")], proc.stdout
    assert not re.search(r"\d+/\d+ steps, ", proc.stdout), "a progress bar in the log"
