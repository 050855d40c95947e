"""The serving mode of ``flix-kernels bench`` (flix_kernels/bench/serving.py), on CPU at tiny sizes:
every variant is checked against float64 before it is timed, PEFT's mixed-adapter stack computes
the same function, a wrong variant is reported and not timed, the requests' feature sets follow
the zipf popularity, and the report has its table and target."""

import torch

from flix_kernels.backends import torch_backend
from flix_kernels.bench import serving
from flix_kernels.bench.timing import Timer


def _run(monkeypatch, batches=(1, 32)):
    monkeypatch.setattr(serving, "sizes", lambda device, quick: (2, 32, batches))
    device = torch.device("cpu")
    return serving.run_serving(device, torch.float32, ["torch"], quick=True, timer=Timer(device, 1.0))


def test_every_variant_is_checked_then_timed_per_batch(monkeypatch):
    record = _run(monkeypatch)
    assert not record["failures"], record["failures"]
    got = {(r["variant"], r["requests"]) for r in record["rows"]}
    assert got == {(v, b) for v in ("base", "ours: torch", "PEFT mixed adapters") for b in (1, 32)}
    for r in record["rows"]:
        assert r["error_vs_fp64"] <= serving.TOLERANCE[torch.float32]
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["tokens_per_s"] > 0
        assert 1 <= r["distinct_sets"] <= r["requests"]
        if r["variant"] == "base":
            assert r["x_base"] == 1.0
    (name, target), = record["targets"].items()
    assert "32 requests" in name and target["verdict"] in ("met", "not met", "inconclusive (noisy)")
    text = "\n".join(serving.markdown_lines(record))
    assert "| PEFT mixed adapters | 32 |" in text and target["goal"] in text


def test_a_wrong_variant_is_reported_and_not_timed(monkeypatch):
    original = torch_backend._call

    def off_by_a_little(*args, **kwargs):
        return original(*args, **kwargs) * 1.01

    monkeypatch.setattr(torch_backend, "_call", off_by_a_little)
    record = _run(monkeypatch, batches=(4,))
    assert record["failures"] and all("ours: torch" in f for f in record["failures"])
    assert not [r for r in record["rows"] if r["variant"] == "ours: torch"]
    assert {r["variant"] for r in record["rows"]} == {"base", "PEFT mixed adapters"}


def test_requests_draw_one_feature_per_group_with_zipf_popularity():
    ids = serving.draw_requests(20000, torch.Generator().manual_seed(0))
    assert ids.shape == (20000, serving.GROUPS)
    for g in range(serving.GROUPS):
        col = ids[:, g] - g * serving.PER_GROUP
        assert 0 <= col.min() and col.max() < serving.PER_GROUP
        counts = torch.bincount(col, minlength=serving.PER_GROUP).double()
        # p(0) / p(9) = 10 ** 1.1, about 12.6
        assert 8 < counts[0] / counts[9] < 18
        assert counts[0] > counts[50] > 0
