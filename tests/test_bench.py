"""``flix-kernels bench`` on CPU: the suite checks every variant before timing it, writes its
outputs and refuses a wrong variant; the report flags noise (synthetic records); the progress
line; the command line's help and its answers to bad arguments."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flix_kernels.bench
from flix_kernels import cli, flix_linear
from flix_kernels._progress import Progress, duration
from flix_kernels.bench import Case, Config, bench, report
from flix_kernels.bench import suite as bench_suite
from flix_kernels.bench.cases import SCALING
from flix_kernels.bench.variants import Variant

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

TINY = [Case("headline", tokens=64, seq_len=16, d_in=32, d_out=24), Case("decode T=8", tokens=8, seq_len=1, d_in=32,
                                                                          d_out=24)]


def test_suite_checks_times_and_writes_outputs(tmp_path):
    cfg = Config(device=torch.device("cpu"), cases=TINY, rep_ms=5, e2e=False, backends=["torch"])
    rec = bench(cfg, tmp_path, show_progress=False)
    assert rec["failures"] == []
    saved = json.loads((tmp_path / "results.json").read_text())
    timed = [r for r in saved["rows"] if "median_ms" in r]
    assert {r["variant"] for r in timed} >= {"base F.linear", "torch loop", "torch dense-masked", "ours: torch"}
    for r in timed:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["repeat_median_ms"] > 0
        assert all(e < 2e-3 for e in r["rel_err"].values())
    assert saved["peaks"]["matmul_tflops"] > 0 and saved["commit"]
    assert "headline forward / base" in saved["summary"]["targets"]
    assert (tmp_path / "results.md").read_text().startswith("# flix-kernels bench")


def test_a_wrong_variant_is_reported_and_not_timed(monkeypatch):
    def wrong(ctx, s):  # the FLix layer with twice the scale
        return (lambda: flix_linear(s.x, s.weight, None, s.lora_A, s.lora_B, ctx.routing, scaling=2 * SCALING,
                                    backend="torch")), [s.x, s.lora_A, s.lora_B]

    real = bench_suite.variants

    def with_wrong(*a, **k):
        vs, skipped = real(*a, **k)
        return vs + [Variant("wrong", "flix", wrong, ours=True)], skipped

    monkeypatch.setattr(bench_suite, "variants", with_wrong)
    rec = bench_suite.run(Config(device=torch.device("cpu"), cases=TINY[:1], rep_ms=5, e2e=False, backends=["torch"]))
    assert any("wrong" in f and "relative error" in f for f in rec["failures"])
    assert not [r for r in rec["rows"] if r["variant"] == "wrong" and "median_ms" in r]


def test_a_triton_run_records_which_paths_it_measured(monkeypatch):
    """A record with backend "triton" says whether the fused base GEMM was on, by TMA or by
    pointers, and what autotuning chose; the markdown says it in one line."""
    from flix_kernels.backends import triton_backend
    from flix_kernels.triton import tuning

    if triton_backend.unavailable_reason("cpu") is not None:
        pytest.skip(triton_backend.unavailable_reason("cpu"))
    monkeypatch.setattr(triton_backend, "FUSE_BASE", True)
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    monkeypatch.setattr(tuning, "_TUNED", {})
    rec = bench_suite.run(Config(device=torch.device("cpu"), cases=TINY[1:], rep_ms=1, e2e=False, backends=["triton"]))
    assert rec["failures"] == []
    t = rec["triton"]
    assert t["fuse_base"] is True and t["tma"] is False and t["autotune"] is True
    assert {c["kind"] for c in t["tuned"]} >= {"shrink", "expand"} and json.dumps(t)
    assert t["dy_pass"] is True
    assert "Triton paths: fused base GEMM on by default, by pointers where fused; g and dB from one pass over dy " \
        "above decode sizes; autotuning on (" in \
        report.markdown({**rec, "summary": {}})


def test_a_cuda_record_says_whether_its_decode_path_was_on(monkeypatch):
    from flix_kernels.backends import cuda_backend

    if cuda_backend.launch is None:
        pytest.skip("the CUDA extension is not built")
    assert cuda_backend.settings() == {"decode_path": True}
    rec = bench_suite.run(Config(device=torch.device("cpu"), cases=TINY[1:], rep_ms=1, e2e=False, backends=["torch"]))
    monkeypatch.setenv("FLIX_CUDA_DECODE", "0")
    rec["cuda"] = cuda_backend.settings()
    assert "CUDA paths: the decode path (csrc/decode.cu, at most 64 tokens) off (FLIX_CUDA_DECODE=0)." in \
        report.markdown({**rec, "summary": {}})




@pytest.mark.skipif(pytest.importorskip("transformers") is None, reason="needs transformers")
@pytest.mark.parametrize("size", ["110M", "slice"])
def test_e2e_step_runs_on_cpu(size):
    from flix_kernels.bench.e2e import run_e2e

    out = run_e2e(torch.device("cpu"), torch.float32, ["torch"], quick=True, size=size)
    assert out["failures"] == [] and out["rows"]["ours: torch"]["tokens_per_s"] > 0 and out["size"] == size
    assert "PEFT LoRA (r=active rank)" in out["rows"] and "torch loop" in out["rows"]


def test_quantized_mode_runs_on_cpu_and_checks_the_nf4_step_first(monkeypatch):
    """The NF4 base stores fewer bytes than the full-precision one, PEFT over NF4 is beside it, the
    results.md section shows them; an NF4 step that disagrees with the loop is a failure, untimed."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from flix_kernels.bench import quantized

    out = quantized.run_quantized(torch.device("cpu"), torch.float32, quick=True)
    assert out["failures"] == []
    rows = out["models"]["e2e"]["rows"]
    full, nf4 = rows["FLix over float32 base"], rows["FLix over NF4 base"]
    assert nf4["base_mib"] < 0.5 * full["base_mib"] and nf4["adapters_mib"] == full["adapters_mib"] > 0
    assert rows["PEFT LoRA over NF4 base (r=active rank)"]["base_mib"] == pytest.approx(nf4["base_mib"])
    assert all(r["step_ms"] > 0 for r in rows.values())
    text = "\n".join(quantized.markdown_lines(out))
    assert "| FLix over NF4 base |" in text and "PEFT LoRA over NF4" in text

    wrong = quantized._loop_forward
    monkeypatch.setattr(quantized, "_loop_forward", lambda self, x, routing=None: wrong(self, x, routing) * 1.5)
    out = quantized.run_quantized(torch.device("cpu"), torch.float32, quick=True)
    assert out["failures"] and "vs the loop's" in out["failures"][0] and "rows" not in out["models"]["e2e"]


def test_an_e2e_failure_is_a_failure_of_the_run(monkeypatch):
    from flix_kernels.bench import e2e

    monkeypatch.setattr(e2e, "run_e2e", lambda *a, **k: {"rows": {}, "failures": ["e2e ours: torch: wrong loss"]})
    record = bench_suite.run(Config(device=torch.device("cpu"), cases=TINY[1:], rep_ms=1, backends=["torch"]))
    assert "e2e ours: torch: wrong loss" in record["failures"]


def test_every_timing_is_repeated_after_the_other_variants_of_its_case(monkeypatch):
    # Back-to-back repeats share a burst of load; the repeat pass comes after every first timing.
    events = []
    real_first, real_repeat = bench_suite.Timer.first, bench_suite.Timer.repeat

    def first(self, fn, graph=False):
        events.append("first")
        return real_first(self, fn, graph)

    def repeat(self, fn, row, graph=False):
        events.append(("repeat", row.get("case"), row.get("variant"), row.get("mode")))
        return real_repeat(self, fn, row, graph)

    monkeypatch.setattr(bench_suite.Timer, "first", first)
    monkeypatch.setattr(bench_suite.Timer, "repeat", repeat)
    rec = bench_suite.run(Config(device=torch.device("cpu"), cases=TINY[:1], rep_ms=1, e2e=False, backends=["torch"]))
    timed = [r for r in rec["rows"] if "median_ms" in r]
    assert events[:4] == ["first", "first"] + [("repeat", None, None, None)] * 2  # the peaks: matmul, copy
    case_events = events[4:]
    assert [e for e in case_events if e == "first"] == ["first"] * len(timed)
    assert case_events[:len(timed)] == ["first"] * len(timed)  # every first timing, then every repeat
    assert sorted(case_events[len(timed):]) == sorted(("repeat", r["case"], r["variant"], r["mode"]) for r in timed)
    for r in timed:
        assert r["spread"] == abs(r["median_ms"] - r["repeat_median_ms"]) / min(r["median_ms"], r["repeat_median_ms"])
    assert rec["peaks"]["matmul_spread"] >= 0 and rec["peaks"]["copy_spread"] >= 0


# -- noise flags, on synthetic records ---------------------------------------------------------
def _record(device: str, timings: dict, floors: dict | None = None) -> dict:
    """A results record with ``timings[(case, variant, mode)] = (median_ms, spread[, p20..p80 width])``
    (the width relative to the median, default a tenth of the spread)."""
    rows, cases = [], {}
    for (case, variant, mode), (ms, spread, *width) in timings.items():
        w = width[0] if width else spread / 10
        rows.append({"case": case, "variant": variant, "ours": variant.startswith("ours"), "mode": mode,
                     "graph": False, "median_ms": ms, "p20_ms": ms * (1 - w / 2), "p80_ms": ms * (1 + w / 2),
                     "repeat_median_ms": ms * (1 + spread), "spread": spread, "cuda_graph": False})
        cases.setdefault(case, {"label": case, "floors_ms": {}})
    for case, f in (floors or {}).items():
        cases[case]["floors_ms"] = f
        cases[case]["floor_bound"] = {m: "matmul" for m in f}
    return {"device": {"type": device, "name": "test device"}, "versions": {"torch": "x"}, "commit": "0" * 12,
            "date": "today", "dtype": "float32", "method": "synthetic", "rows": rows, "cases": list(cases.values()),
            "peaks": {"matmul_dtype": "float32", "matmul_tflops": 1.0, "copy_GBps": 1.0, "matmul_spread": 0.01,
                      "copy_spread": 0.01}, "skipped": {}, "failures": []}


def _headline(ours_ms, base_ms, ours_spread=0.01, base_spread=0.01, device="cuda", more=None):
    t = {("headline", "base F.linear", "forward"): (base_ms, base_spread),
         ("headline", "ours: torch", "forward"): (ours_ms, ours_spread), **(more or {})}
    return report.annotate(_record(device, t))


def test_ratio_noise_rule():
    assert report.combined_spread(0.1, 0.2) == pytest.approx(0.32)
    assert report.effect(2.0) == pytest.approx(1.0) and report.effect(0.5) == pytest.approx(1.0)
    assert report.ratio_flag(1.5, 0.2) is None  # a 50% difference measured to 20%
    assert report.ratio_flag(1.1, 0.2) == report.NOISY  # 10% difference, 20% uncertainty
    assert report.ratio_flag(0.11, 100.0) == report.NOISY  # the 0.11x at a 10,000% spread
    assert report.ratio_flag(float("nan"), 0.0) == report.NOISY and report.ratio_flag(2.0, float("nan")) == report.NOISY
    assert report.ratio_flag(0.26, 0.0, floor=True) == report.BELOW_FLOOR
    assert report.ratio_flag(0.98, 0.01, floor=True) == report.BELOW_FLOOR  # 2% under the floor, 1% noise
    assert report.ratio_flag(0.98, 0.17, floor=True) == report.NOISY  # at the floor within its noise
    assert report.ratio_flag(3.0, 0.01, floor=True) is None


def test_a_clean_measurement_meets_or_misses_its_target():
    rec = _headline(1.02, 1.0)
    met = rec["summary"]["targets"]["headline forward / base"]
    assert met["met"] is True and met["verdict"] == "met" and met["flag"] is None
    assert met["uncertainty"] == pytest.approx(report.combined_spread(0.01, 0.01))
    # 2% above base at a 2% uncertainty: no measured difference from base, but clearly under 1.06x
    assert rec["summary"]["ratios"]["headline | forward"]["flags"]["ours / base"] == report.NOISY
    missed = _headline(1.5, 1.0)["summary"]["targets"]["headline forward / base"]
    assert missed["met"] is False and missed["verdict"] == "not met"


def test_a_noisy_measurement_never_meets_a_target():
    # base 16 ms with a 10,000% repeat spread: ours at 0.11x base is noise, not a met target
    rec = _headline(1.76, 16.0, base_spread=100.0)
    t = rec["summary"]["targets"]["headline forward / base"]
    assert t["measured"] == pytest.approx(0.11) and t["met"] is False
    assert t["verdict"] == report.INCONCLUSIVE and t["flag"] == report.NOISY and "uncertainty 10101%" in t["why"]
    ours = next(r for r in rec["rows"] if r["variant"] == "ours: torch")
    assert ours["x_base_flag"] == report.NOISY and ours["x_base"] == pytest.approx(0.11)
    assert rec["summary"]["ratios"]["headline | forward"]["flags"]["ours / base"] == report.NOISY
    # a ratio whose distance to the goal is within its uncertainty decides nothing either
    near = _headline(1.07, 1.0, ours_spread=0.05, base_spread=0.05)["summary"]["targets"]["headline forward / base"]
    assert near["flag"] == report.NOISY and near["verdict"] == report.INCONCLUSIVE and near["met"] is False
    # ours faster than the base GEMM it contains, beyond the noise: the base timing is wrong
    below = _headline(0.03, 1.0)["summary"]["targets"]["headline forward / base"]
    assert below["flag"] == report.BELOW_BASE and below["verdict"] == report.INCONCLUSIVE_BASE and not below["met"]


def test_scattered_samples_are_noise_even_when_two_runs_agree():
    # a busy machine's time slicing: the two medians agree, the samples between p20 and p80 do not
    peft = ("headline", "PEFT LoRA (r=active rank)", "forward")
    rec = _headline(8.0, 4.0, ours_spread=0.02, more={peft: (0.8, 0.05, 60.0)})  # p20..p80 60x its median
    row = next(r for r in rec["rows"] if r["variant"] == peft[1])
    assert row["noise"] == pytest.approx(60.0) and row["spread"] == 0.05
    e = rec["summary"]["ratios"]["headline | forward"]
    assert e["flags"]["peft / ours"] == report.NOISY and "ours / base" not in e["flags"]
    assert rec["summary"]["targets"]["never slower than PEFT LoRA"]["verdict"] == report.INCONCLUSIVE
    tight = _headline(8.0, 4.0, ours_spread=0.02, more={peft: (0.8, 0.05, 0.05)})
    assert tight["summary"]["targets"]["never slower than PEFT LoRA"]["verdict"] == "not met"


def test_a_busy_machine_is_named_in_the_report():
    rec = _record("cpu", {("headline", "base F.linear", "forward"): (1.0, 0.01)})
    rec["host_load"] = {"cores": 2, "start": 1.2, "end": 10.7}
    note = report.busy_note(rec)
    assert note.startswith("The machine was busy during this run (1-minute load average up to 10.7 on 2 cores)")
    report.annotate(rec)
    assert note in rec["summary"]["notes"] and note in report.markdown(rec)
    rec["host_load"] = {"cores": 2, "start": 1.2, "end": 2.5}  # our own two threads, nothing else
    assert report.busy_note(rec) is None and report.busy_note({"host_load": {"cores": 2, "start": None}}) is None


def test_noise_and_impossible_floors_are_marked_in_the_tables_with_a_legend():
    rec = _headline(1.76, 16.0, base_spread=100.0)
    rec["cases"][0]["floors_ms"] = {"forward": 4.0}  # ours at 1.76 ms is 0.44x its floor: impossible
    report.annotate(rec)
    ours = next(r for r in rec["rows"] if r["variant"] == "ours: torch")
    assert ours["x_floor"] == pytest.approx(0.44) and ours["x_floor_flag"] == report.BELOW_FLOOR
    md = report.markdown(rec)
    row = next(line for line in md.splitlines() if line.startswith("| headline | ours: torch"))
    assert "| 0.11 ~ |" in row and "| 0.44 ! |" in row
    assert report.LEGEND[report.NOISY] in md and report.LEGEND[report.BELOW_FLOOR] in md
    assert "| headline forward / base | 1.06 | 0.110 ±" in md and f"| {report.INCONCLUSIVE} |" in md
    # base: x base is 1 by definition, x floor 4.0 at a 10,000% spread is noisy; ours: 0.11 ~, 0.44 !
    assert rec["summary"]["flagged"] == {report.NOISY: 2, report.BELOW_FLOOR: 1, "ratios": 4}
    clean = _headline(1.5, 1.0)
    md = report.markdown(clean)
    assert "~" not in md and report.LEGEND[report.NOISY] not in md and report.LEGEND[report.BELOW_FLOOR] not in md
    assert "| 1.50 |" in md


def test_the_console_shows_markers_legend_and_cpu_caveat(capsys):
    report.console(_headline(1.76, 16.0, base_spread=100.0, device="cpu"))
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "0.11 ~" in out and report.INCONCLUSIVE in out
    assert " ".join(report.LEGEND[report.NOISY].split()) in out and " ".join(report.CPU_CAVEAT.split()) in out


def test_cpu_timings_are_called_smoke_tests():
    cpu, gpu = _headline(1.5, 1.0, device="cpu"), _headline(1.5, 1.0, device="cuda")
    assert cpu["summary"]["caveat"] == report.CPU_CAVEAT and "smoke tests" in report.CPU_CAVEAT
    assert f"**{report.CPU_CAVEAT}**" in report.markdown(cpu)
    assert gpu["summary"]["caveat"] is None and report.CPU_CAVEAT not in report.markdown(gpu)


def test_never_slower_than_peft_counts_only_clean_ratios():
    peft = ("headline", "PEFT LoRA (r=active rank)", "forward")

    def verdict(peft_ms, spread):
        return _headline(1.0, 0.9, more={peft: (peft_ms, spread)})["summary"]["targets"]["never slower than PEFT LoRA"]

    assert verdict(0.5, 0.01)["verdict"] == "not met" and verdict(0.5, 0.01)["measured"] == ["headline | forward: 0.50x"]
    noisy = verdict(0.5, 5.0)
    assert noisy["verdict"] == report.INCONCLUSIVE and noisy["met"] is False and noisy["noisy"]
    assert verdict(2.0, 0.01)["verdict"] == "met" and verdict(2.0, 0.01)["met"] is True


def test_a_recorded_gpu_run_keeps_its_schema_and_verdicts():
    path = RESULTS / "h200" / "sweep" / "results.json"
    old = json.loads(path.read_text())
    rec = report.annotate(json.loads(path.read_text()))
    for name, t in old["summary"]["targets"].items():  # the old fields, unchanged in meaning (issue 31 set new goals)
        new = rec["summary"]["targets"][name]
        assert set(t) <= set(new) and new["target"] == report.TARGETS.get(name, t["target"])
        if not isinstance(t["measured"], list):
            assert new["measured"] == pytest.approx(t["measured"])
    assert {rec["summary"]["targets"][n]["verdict"] for n in old["summary"]["targets"]} == {"not met"}  # far beyond spreads
    # AUTO_TABLE was set from this run's measurements, and the bench confirms it.
    auto = {n: t for n, t in rec["summary"]["targets"].items() if n.startswith('"auto"')}
    assert len(auto) == 2 and {t["verdict"] for t in auto.values()} == {"met"}, auto
    for r_old, r_new in zip(old["rows"], rec["rows"]):
        assert {k: r_new[k] for k in r_old} == r_old
    assert set(old["summary"]["ratios"]) <= set(rec["summary"]["ratios"])  # and now backward's
    assert report.markdown(rec).startswith("# flix-kernels bench")


# -- progress ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_counts_cases_and_shows_time_left_once_one_is_done(capsys):
    clock = FakeClock()
    with Progress(True, total=4, unit="cases", clock=clock, use_rich=False) as p:
        clock.now += 5
        p.say("headline: base F.linear")
        assert p.text() == "0/4 cases, 5 s elapsed: headline: base F.linear"  # nothing done: no estimate
        clock.now += 25
        p.tick()
        assert p.text() == "1/4 cases, 30 s elapsed, about 1 min 30 s left: headline: base F.linear"
        clock.now += 10
        assert p.text() == "1/4 cases, 40 s elapsed, about 1 min 20 s left: headline: base F.linear"  # counts down
        clock.now += 20
        p.tick()
        assert p.text() == "2/4 cases, 1 min 00 s elapsed, about 1 min 00 s left: headline: base F.linear"
        clock.now += 60
        p.tick(2)
        assert p.text() == "4/4 cases, 2 min 00 s elapsed: headline: base F.linear"
    assert capsys.readouterr().out == "... 0/4 cases, 5 s elapsed: headline: base F.linear\n"
    with Progress(False, total=4, unit="cases", clock=clock, use_rich=False) as p:
        p.say("silent")
        p.tick()
    assert capsys.readouterr().out == ""
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3720)] == ["0 s", "59 s", "1 min 01 s", "59 min 59 s", "1 h 02 min"]


def test_the_suite_reports_done_and_total_cases(capsys):
    cfg = Config(device=torch.device("cpu"), cases=TINY, rep_ms=1, e2e=False, backends=["torch"])
    assert bench_suite.parts(cfg) == 2 and bench_suite.parts(Config(device=torch.device("cpu"), cases=TINY)) == 3
    clock = FakeClock()
    with Progress(True, total=bench_suite.parts(cfg), unit="cases", clock=clock, use_rich=False) as p:
        bench_suite.run(cfg, progress=p)
        assert p.done == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("... 0/2 cases") and "measuring" in lines[0]
    assert any(line.startswith("... 0/2 cases") and "headline: ours: torch" in line for line in lines)
    assert any(line.startswith("... 1/2 cases") and "about" in line and "decode T=8" in line for line in lines)


def test_no_progress_prints_no_progress_line(tmp_path, capsys):
    cfg = Config(device=torch.device("cpu"), cases=TINY[:1], rep_ms=1, e2e=False, backends=["torch"])
    bench(cfg, tmp_path, show_progress=False)
    out = capsys.readouterr().out
    assert "cases" not in out and "... " not in out


# -- the command line --------------------------------------------------------------------------
def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["info", "bench", "demo"])
def test_every_subcommand_has_a_description_and_described_options(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    sub = _subparsers(cli.build_parser())[command]
    assert sub.description and " ".join(sub.description.split()[:6]) in " ".join(out.split())
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.option_strings} has no help"


def test_quick_help_states_its_time():
    bench_quick = next(a for a in _subparsers(cli.build_parser())["bench"]._actions if "--quick" in a.option_strings)
    demo_quick = next(a for a in _subparsers(cli.build_parser())["demo"]._actions if "--quick" in a.option_strings)
    assert cli.BENCH_QUICK in bench_quick.help and "CPU cores" in cli.BENCH_QUICK
    assert cli.DEMO_QUICK in demo_quick.help and "undertrained" in demo_quick.help


@pytest.fixture
def no_run(monkeypatch):
    """Bad arguments must be refused before the long run starts."""
    def started(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(flix_kernels.bench, "bench", started)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


BAD_BENCH = [
    (["--device", "gpu"], "argument --device: unknown device 'gpu'; use cpu, cuda or cuda:N"),
    (["--device", "mps"], "argument --device: device 'mps' is not supported here; use cpu, cuda or cuda:N"),
    (["--rep-ms", "0"], "argument --rep-ms: expected a positive number, got '0'"),
    (["--rep-ms", "nan"], "argument --rep-ms: expected a positive number, got 'nan'"),
    (["--rep-ms", "fast"], "argument --rep-ms: expected a positive number, got 'fast'"),
    (["--shapes", "huge"], "argument --shapes: invalid choice: 'huge'"),
    (["--backends", "numpy"], "argument --backends: invalid choice: 'numpy'"),
]


@pytest.mark.parametrize("args,message", BAD_BENCH, ids=[" ".join(a) for a, _ in BAD_BENCH])
def test_bench_refuses_bad_arguments_in_one_line(args, message, capsys, no_run, tmp_path):
    assert cli.main(["bench", "--no-progress", "--out", str(tmp_path), *args]) == 2
    line = _error(capsys)
    assert line.startswith("flix-kernels bench: error: ") and message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
@pytest.mark.parametrize("command", ["bench", "demo"])
def test_cuda_without_a_gpu_is_refused(command, capsys, no_run, tmp_path):
    assert cli.main([command, "--device", "cuda", "--out", str(tmp_path)]) == 2
    line = _error(capsys)
    assert f"flix-kernels {command}: error: argument --device: device 'cuda'" in line
    assert "sees no CUDA device; use cpu" in line


@pytest.mark.skipif(flix_kernels.backends.unavailable_reason("cuda", "cpu") is None, reason="the extension is built")
def test_bench_refuses_an_unavailable_backend(capsys, no_run, tmp_path):
    assert cli.main(["bench", "--device", "cpu", "--backends", "cuda", "--out", str(tmp_path)]) == 2
    line = _error(capsys)
    assert "argument --backends: backend 'cuda' is unavailable on cpu" in line and "available here: torch" in line


def test_bench_refuses_an_output_folder_it_cannot_write_before_running(tmp_path, capsys, monkeypatch, no_run):
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, why in ((afile, "exists and is not a folder"), (afile / "sub", "cannot be created")):
        assert cli.main(["bench", "--no-progress", "--out", str(out)]) == 2
        line = _error(capsys)
        assert line.startswith("flix-kernels bench: error: argument --out: ") and repr(str(out)) in line and why in line

    def read_only(*a, **k):  # what a read-only folder answers (root writes through permission bits)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", read_only)
    assert cli.main(["bench", "--no-progress", "--out", str(tmp_path / "new")]) == 2
    assert "is not writable (Permission denied)" in _error(capsys)


def test_a_closed_output_pipe_ends_quietly():
    # `flix-kernels info | head -1`: the reader is gone before the output is written
    proc = subprocess.Popen([sys.executable, "-m", "flix_kernels", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1 and "Traceback" not in err and "BrokenPipeError" not in err


def test_importing_the_package_does_not_import_the_cli():
    """Imports point down: the public API (flix_kernels.info included) never loads the CLI."""
    import subprocess
    import sys

    code = ("import sys, flix_kernels as fk; fk.info(); "
            "bad = sorted(m for m in sys.modules if m.startswith(('flix_kernels.cli', 'flix_kernels.bench', "
            "'flix_kernels.demo'))); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


_LOG_CHILD = """
import sys, time
from pathlib import Path
from flix_kernels import cli
from flix_kernels.bench import Case, suite

cases = [Case("headline", tokens=64, seq_len=16, d_in=32, d_out=24), Case("decode T=8", tokens=8, seq_len=1, d_in=32,
                                                                          d_out=24)]
suite.plan = lambda cfg: cases  # two tiny cases instead of the CPU shape sets
started, ack = [], Path(sys.argv[2])
make_routing = suite.make_routing

def waiting_make_routing(case, *args, **kwargs):  # called as each case starts
    if started:  # the second case starts once the reader has seen the first case's line
        deadline = time.monotonic() + 60
        while not ack.exists():
            if time.monotonic() > deadline:  # (cli.main would swallow a SystemExit's message)
                raise RuntimeError("the reader never saw the first case's line")
            time.sleep(0.02)
    started.append(case.label)
    return make_routing(case, *args, **kwargs)

suite.make_routing = waiting_make_routing
args = ["--device", "cpu", "--backends", "torch", "--rep-ms", "1", "--no-e2e", "--out", sys.argv[1]]
sys.exit(cli.main(["bench", *args]))
"""


def test_a_log_gets_one_flushed_line_per_finished_case(tmp_path):
    """``flix-kernels bench > log``: a live progress line shows nothing in a file until the run
    ends, so stdout that is not a terminal gets one line per finished case (name, time, our
    fastest forward+backward against the base layer) as each case ends, flushed: the child waits
    before its second case until this reader has seen the first case's line."""
    import re

    ack = tmp_path / "seen"
    proc = subprocess.Popen([sys.executable, "-c", _LOG_CHILD, str(tmp_path / "out"), str(ack)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = []
        for line in proc.stdout:  # a pipe: not a terminal
            before.append(line)
            if line.startswith("done headline"):
                break
        ack.touch()
        rest = proc.stdout.read()
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 0, err[-3000:]
    finally:
        proc.kill()
    first = before[-1]
    assert first.startswith("done headline"), "no line for the first case while the run went on:\n" + "".join(before)
    assert re.fullmatch(r"done headline in \d+\.\d s: ours: torch fastest of ours, forward\+backward \d+\.\d{3} ms "
                        r"\(\d+\.\d\dx base F\.linear\)\n", first), first
    lines = rest.splitlines()
    assert len([x for x in lines if x.startswith("done decode T=8 in ")]) == 1, rest
    assert not [x for x in before + lines if re.search(r"\d+/\d+ cases, ", x)], "a progress line in the log"
    assert lines[-1].startswith("wrote ")  # the tables and outputs follow, as on a terminal


def test_case_lines_name_each_part_and_its_key_number(capsys):
    """Progress(lines=True): no progress line even when enabled, one line per finished case;
    a finished mode says skipped and why, or our fastest step, or its failures."""
    clock = FakeClock()
    with Progress(True, total=2, unit="cases", clock=clock, lines=True) as p:
        p.say("headline: base F.linear")
        p.finished("headline", 1.25, "result")
        p.tick()
        p.finished("end-to-end training step", 75, bench_suite.part_result({"rows": {
            "ours: torch": {"step_ms": 12.34}, "ours: triton": {"error": "x"}, "torch loop": {"step_ms": 1.0}},
            "failures": []}))
        p.tick()
    assert capsys.readouterr().out.splitlines() == [
        "done headline in 1.2 s: result", "done end-to-end training step in 1 min 15 s: ours: torch step 12.3 ms"]
    assert bench_suite.part_result({"skipped": "peft is not installed"}) == "skipped (peft is not installed)"
    assert bench_suite.part_result({"rows": [], "failures": ["a", "b"]}) == "2 failure(s)"
    assert bench_suite.part_result({"rows": [], "failures": []}) == "ok"
    row = {"case": "c", "mode": "forward", "graph": False}
    rows = [{**row, "variant": "base F.linear", "ours": False, "median_ms": 2.0},
            {**row, "variant": "ours: torch", "ours": True, "median_ms": 1.0},
            {**row, "variant": "ours: triton", "ours": True, "graph": True, "median_ms": 0.1},  # graphs: not eager
            {**row, "variant": "ours: cuda", "ours": True, "mode": "check", "error": "x"}]
    assert bench_suite.case_result(rows, "c", 1) == ("ours: torch fastest of ours, forward 1.000 ms "
                                                     "(0.50x base F.linear); 1 failure(s)")
    assert bench_suite.case_result(rows[:1], "c") == "no variant of ours timed"


def test_training_step_target_against_peft_lora():
    """The training-step target: our fastest step over PEFT LoRA's, decided only outside the
    steps' own noise (median against fastest step)."""
    def e2e(ours_ms, peft_ms, spread=0.01):
        row = lambda ms: {"step_ms": ms, "step_ms_min": ms * (1 - spread)}  # noqa: E731
        return {"rows": {"ours: torch": row(ours_ms * 1.5), "ours: triton": row(ours_ms),
                         "PEFT LoRA (r=active rank)": row(peft_ms)}}

    met = report._training_step_target(e2e(9.0, 10.0))
    assert met["verdict"] == "met" and met["ours"] == "ours: triton" and met["measured"] == pytest.approx(0.9)
    assert report._training_step_target(e2e(12.0, 10.0))["verdict"] == "not met"
    assert report._training_step_target(e2e(10.1, 10.0, spread=0.2))["verdict"] == report.INCONCLUSIVE
    assert report._training_step_target({"rows": {"ours: torch": {"step_ms": 1.0}}}) is None


def test_compare_keeps_base_and_ours_and_the_named_variants():
    from flix_kernels.bench.variants import COMPARED_VARIANTS, variants

    vs, skipped = variants(torch.device("cpu"), torch.float32, TINY[0], compile_torch=True, backends=["torch"],
                           compare=("peft",))
    assert [v.name for v in vs] == ["base F.linear", COMPARED_VARIANTS["peft"], "ours: torch"]
    assert COMPARED_VARIANTS["compile"] not in skipped  # not asked for, so not reported as skipped either
    every, _ = variants(torch.device("cpu"), torch.float32, TINY[0], compile_torch=False, backends=["torch"])
    assert {COMPARED_VARIANTS[k] for k in ("loop", "dense", "peft")} <= {v.name for v in every}
    args = cli.build_parser().parse_args(["bench", "--e2e-only", "--compare", "peft", "loop"])
    assert args.e2e_only and args.compare == ["peft", "loop"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--compare", "nothing-like-this"])


def test_the_readme_states_every_target():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, goal in report.TARGETS.items():
        sign = ">=" if name.startswith("torch loop") else "<="
        assert f"| {name} | {sign} {goal:g} |" in text, name
