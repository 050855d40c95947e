"""The GPU verify run (benchmarks/gpu_verify.py) and its import (benchmarks/gpu_import.py), on
CPU: the dry run finds every command, collects every test selection and parses every bench
command, and writes outputs that come back from the device tool; the import files them under
the results layout; the budgets cut a slow step without starving the parts after it."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


verify = _load("gpu_verify")
gpu_import = _load("gpu_import")


@pytest.fixture(scope="module")
def dry_run_out(tmp_path_factory):
    """``gpu_run.sh verify --dry-run``'s output folder (the way the GPU run is started)."""
    out = tmp_path_factory.mktemp("verify_out")
    proc = subprocess.run(["bash", "benchmarks/gpu_run.sh", "verify", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_dry_run_checks_every_step_and_stays_within_the_tools_limits(dry_run_out):
    files = verify.check_limits(dry_run_out)
    assert sorted(p.name for p in files) == sorted([verify.ARCHIVE, verify.SUMMARY_JSON, verify.SUMMARY_MD, verify.LOG])
    summary = json.loads((dry_run_out / verify.SUMMARY_JSON).read_text())
    assert summary["dry_run"] is True
    steps = [s for p in summary["parts"] for s in p["steps"]]
    assert {s["status"] for s in steps} == {"ok"}, steps
    planned = {s.name for p in verify.plan(0, "90") for s in p.steps}
    assert {s["step"] for s in steps} == planned
    for s in steps:
        if s.get("tests"):
            assert int(s["tests"].split()[0]) > 0, s
    with tarfile.open(dry_run_out / verify.ARCHIVE) as tar:
        names = set(tar.getnames())
    assert {"summary.json", "summary.md", "logs/tests_triton.log", "logs/headline.log"} <= names


def test_the_plan_fits_the_tools_limit():
    parts = verify.plan(8, "90")
    assert sum(p.budget_s for p in parts) + verify.PACK_S <= verify.TOTAL_S <= 9 * 60
    assert [p.name for p in parts][:2] == ["build", "tests_triton"]  # build first, then in order of value
    install = parts[0].steps[0]
    assert install.env == {"FLIX_CUDA": "1", "FLIX_CUDA_ARCHS": "90"}  # the card's architecture only


def test_a_dry_run_fails_on_a_selection_that_collects_nothing(tmp_path):
    step = verify.pytest_step("nothing", "tests/test_kernel_backends.py", "-k", "no_test_is_named_like_this")
    (tmp_path / "logs").mkdir()
    assert verify.dry_check(step, tmp_path)["status"] == "fails"
    bad = verify.bench_step("bad", "--shapes", "no-such-shape")
    assert verify.dry_check(bad, tmp_path)["status"] == "fails"


def test_import_files_a_run_under_device_and_commit(dry_run_out, tmp_path):
    results = tmp_path / "results"
    dest = gpu_import.import_run(dry_run_out, results, commit="0123456789abcdef")
    assert dest == results / "dry-run" / "0123456789ab"
    record = json.loads((dest / "results.json").read_text())
    assert {"device", "versions", "commit", "date", "parts", "targets", "decisions"} <= set(record)
    assert record["commit"] == "0123456789abcdef" and record["dry_run"] is True
    assert (dest / "results.md").read_text().startswith("# GPU verify")
    assert (dest / "logs" / "tests_triton.log").exists()
    with pytest.raises(gpu_import.ImportRefused, match="exists"):
        gpu_import.import_run(dry_run_out, results, commit="0123456789abcdef")
    gpu_import.import_run(dry_run_out / verify.ARCHIVE, results, commit="0123456789abcdef", force=True)
    assert sorted(p.name for p in (results / "dry-run").iterdir()) == ["0123456789ab"]  # no staging left


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("members,match", [
    ({"../escape.txt": b"x", "summary.json": b"{}"}, "relative path"),
    ({"/abs.txt": b"x"}, "relative path"),
    ({"logs/a.log": b"x"}, "no readable summary.json"),
    ({"summary.json": b'{"dry_run": false}'}, "has no 'provenance'"),
])
def test_import_refuses_a_bad_archive_and_writes_nothing(tmp_path, members, match):
    src = _archive(tmp_path / "verify.tar.gz", members)
    results = tmp_path / "results"
    with pytest.raises(gpu_import.ImportRefused, match=match):
        gpu_import.import_run(src, results, commit="abcdef0")
    assert not results.exists()


def test_import_needs_the_commit(dry_run_out, tmp_path):
    summary = json.loads((dry_run_out / verify.SUMMARY_JSON).read_text())
    summary["provenance"]["commit"] = "unknown"
    src = _archive(tmp_path / "verify.tar.gz", {"summary.json": json.dumps(summary).encode()})
    with pytest.raises(gpu_import.ImportRefused, match="pass --commit"):
        gpu_import.import_run(src, tmp_path / "results")
    assert gpu_import.main([str(src), "--results", str(tmp_path / "r"), "--commit", "abc1234"]) == 0


def test_device_names():
    assert gpu_import.device_slug("NVIDIA H100 80GB HBM3", False) == "h100"
    assert gpu_import.device_slug("NVIDIA H200", False) == "h200"
    assert gpu_import.device_slug("NVIDIA A100-SXM4-80GB", False) == "a100"
    assert gpu_import.device_slug("NVIDIA H200", True) == "dry-run"


def test_a_slow_step_is_cut_at_its_deadline_and_the_next_part_still_runs(tmp_path):
    """Each part ends by the sum of its budget and those before it: a slow step is cut there,
    the next part still gets its own budget, and time a part leaves unused goes to the next."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "results").mkdir()
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    budget = verify.MIN_STEP_S + 1
    parts = [verify.Part("slow", budget, "a step that outlives its part", [verify.Step("sleeper", sleep)]),
             verify.Part("next", budget, "runs on its own budget",
                         [verify.Step("quick", [sys.executable, "-c", "pass"])]),
             verify.Part("late", 0.1, "gets what 'next' left", [verify.Step("heir", sleep)]),
             verify.Part("starved", 0.1, "nothing is left for it", [verify.Step("never", sleep)])]
    records = verify.run_plan(parts, tmp_path, lambda msg: None, total_s=100)
    (slow,), (quick,), (heir,), (never,) = (r["steps"] for r in records)
    assert slow["status"] == "cut" and budget - 1 < slow["seconds"] < budget + 3
    assert quick["status"] == "passed" and quick["rc"] == 0
    assert heir["status"] == "cut" and heir["seconds"] > budget - 2
    assert never["status"].startswith("not started")


def _row(case, variant, mode, ms, graph=False, ours=True):
    return {"case": case, "variant": variant, "mode": mode, "graph": graph, "ours": ours, "median_ms": ms,
            "p20_ms": ms * 0.99, "p80_ms": ms * 1.01, "spread": 0.01}


def test_decisions_follow_the_measurements_beyond_their_noise():
    fb = "forward+backward"

    def step(name, rows, auto=None):
        return {"step": name, "headline_ms": verify.headline_ms({"rows": rows}), "auto_order": auto or {}}

    parts = [{"steps": [
        step("headline", [_row("headline", "ours: triton", fb, 2.0), _row("headline", "ours: triton", "backward", 1.5)],
             {"prefill": ["triton", "torch"]}),
        step("fused_tma", [_row("headline", "ours: triton", fb, 1.5)]),
        step("fused_pointers", [_row("headline", "ours: triton", fb, 1.505)]),
        step("two_pass_dy", [_row("headline", "ours: triton", "backward", 1.0)]),
    ]}]
    d = verify.decide(parts)
    assert d["AUTO_TABLE"]["prefill"] == ["triton", "torch", "cuda"] and d["AUTO_TABLE"]["decode"] is None
    paths = d["paths"]
    assert paths["FLIX_FUSE_BASE=1 (fused base GEMM, TMA on Hopper) beats cuBLAS + expand"] == "yes"
    assert paths["FLIX_TRITON_TMA=1 (TMA) beats the pointer kernel for the fused base GEMM"] == "inconclusive"
    assert paths["FLIX_TRITON_DY_PASS=1 (one pass over dy) beats two passes"] == "no"
    assert "not measured" in paths.values()


def test_the_readme_shows_the_plan():
    text = (ROOT / "README.md").read_text()
    for part in verify.plan(0, "90"):
        assert f"| {part.name} | {part.budget_s:g} s |" in text, part.name


def test_a_cut_bench_run_still_gives_its_targets(tmp_path):
    """A bench step cut at its deadline leaves the checkpoint of its finished cases: the verify
    summary reads the targets and timings from it."""
    rows = [_row("headline", "base F.linear", m, 1.0, ours=False) for m in ("forward", "forward+backward")]
    rows += [_row("headline", "ours: triton", m, 1.05) for m in ("forward", "forward+backward")]
    rec = {"device": {"type": "cuda", "name": "NVIDIA H100"}, "rows": rows,
           "cases": [{"label": "headline", "floors_ms": {}}], "failures": []}
    (tmp_path / "results" / "headline").mkdir(parents=True)
    (tmp_path / "results" / "headline" / "results.json").write_text(json.dumps(rec))
    got = verify.outcome(verify.bench_step("headline"), tmp_path)
    assert got["targets"]["headline forward+backward / base"]["verdict"] == "met"
    assert got["headline_ms"]["headline | forward"]["ours: triton"]["ms"] == 1.05


@pytest.mark.parametrize("log,tests,failed", [
    ("tests/a.py::t[1] PASSED [ 50%]\ntests/a.py::t[2] FAILED [100%]\nFAILED tests/a.py::t[2] - boom\n"
     "1 failed, 1 passed in 3.2s\n", "1 failed, 1 passed", ["tests/a.py::t[2]"]),
    ("[gw0] [ 50%] PASSED tests/a.py::t[1]\n[gw1] [100%] FAILED tests/a.py::t[2]\n"
     "[verify] cut at its deadline after 70 s\n", "1 passed, 1 failed before the cut", ["tests/a.py::t[2]"]),
    ("tests/a.py::t[1] SKIPPED (no GPU) [ 50%]\ntests/a.py::t[2] ERROR [100%]\n",
     "1 skipped, 1 error before the cut", ["tests/a.py::t[2]"]),
])
def test_test_counts_come_from_the_log_even_when_cut(tmp_path, log, tests, failed):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "t.log").write_text(log)
    got = verify.outcome(verify.pytest_step("t", "tests"), tmp_path)
    assert got == {"tests": tests, "failed_tests": failed}


def test_real_steps_are_run_and_read_back(tmp_path):
    """The glue on real outputs: a pytest step and a bench step (decode shapes on this CPU, base and
    the torch backend alone) run through run_plan, and their counts, targets and timings are read."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "results").mkdir()
    parts = [verify.Part("tests", 120, "one real test selection", [
                 verify.pytest_step("names", "tests/test_gpu_verify.py", "-k", "device_names or plan_fits")]),
             verify.Part("bench", 300, "a real bench run", [
                 verify.bench_step("decode", "--shapes", "decode", "--no-e2e", "--device", "cpu", "--backends", "torch",
                                   "--rep-ms", "5", "--compare")])]
    records = verify.run_plan(parts, tmp_path, lambda msg: None, total_s=1000)
    (tests,), (bench,) = (r["steps"] for r in records)
    assert tests["status"] == "passed" and tests["tests"].startswith("2 passed"), tests
    assert bench["status"] == "passed", (tmp_path / "logs" / "decode.log").read_text()[-3000:]
    assert bench["cases"] == ["decode T=1", "decode T=8", "decode T=64"]
    assert "decode T=8 forward / base" in bench["targets"]
    assert set(bench["headline_ms"]["decode T=8 | forward"]) == {"base F.linear", "ours: torch"}
    assert verify.decide(records)["AUTO_TABLE"]["decode"][0] == "torch"


def test_a_failed_extension_build_installs_without_it_and_says_so(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "results").mkdir()
    install = [sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ.get('FLIX_CUDA') == '0' else 1)"]
    planned = verify.plan(0, "90")[0].steps[0]  # the plan's own install step, with this program instead of pip
    step = verify.Step("install", install, env=planned.env, fallback=planned.fallback,
                       fallback_note=planned.fallback_note)
    records = verify.run_plan([verify.Part("build", 60, "install", [step])], tmp_path, lambda msg: None, total_s=100)
    (step,) = records[0]["steps"]
    assert step["status"] == "failed" and step["fallback"]["rc"] == 0
    assert "CUDA backend was not verified" in records[0]["note"]
    summary = {"dry_run": False, "provenance": verify.provenance(), "seconds": 1.0, "parts": records,
               "decisions": verify.decide(records)}
    assert "**build**: the CUDA extension did not build" in verify.markdown(summary)


def test_outputs_that_would_not_come_back_are_refused(tmp_path):
    for i in range(verify.MAX_FILES + 1):
        (tmp_path / f"f{i}.txt").write_text("x")
    with pytest.raises(SystemExit, match="9 files"):
        verify.check_limits(tmp_path)
    with pytest.raises(SystemExit, match="is not empty"):
        verify.main(["--dry-run", "--out", str(tmp_path)])
    bad = tmp_path / "sub"
    bad.mkdir()
    (bad / "a name.txt").write_text("x")
    for p in tmp_path.glob("f*.txt"):
        p.unlink()
    with pytest.raises(SystemExit, match="a name the tool does not return"):
        verify.check_limits(tmp_path)
