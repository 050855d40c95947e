"""Smoke tests of ``flix-kernels bench`` on CPU: the suite checks every variant before timing it,
writes its outputs, and refuses a wrong variant."""

import json

import pytest
import torch

from flix_kernels import cli, flix_linear
from flix_kernels.bench import Case, Config, bench
from flix_kernels.bench import suite as bench_suite
from flix_kernels.bench.cases import SCALING
from flix_kernels.bench.variants import Variant

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


def test_cli_rejects_an_unavailable_backend(capsys):
    assert cli.main(["bench", "--device", "cpu", "--backends", "cuda", "--no-progress"]) == 2
    assert "backend cuda is unavailable" in capsys.readouterr().err


@pytest.mark.skipif(pytest.importorskip("transformers") is None, reason="needs transformers")
def test_e2e_step_runs_on_cpu():
    from flix_kernels.bench.e2e import run_e2e

    out = run_e2e(torch.device("cpu"), torch.float32, ["torch"], quick=True)
    assert out["failures"] == [] and out["rows"]["ours: torch"]["tokens_per_s"] > 0
