import time

import pytest
import torch

import flix_kernels as fk
from conftest import random_feature_ids, random_space


def space():
    return fk.FeatureSpace({"language": ["en", "fr", "sw"], "task": ["qa", "mt"], "domain": ["web"]},
                           {"language": 4, "task": 2, "domain": 3})


def random_routings(seed, count=20):
    """``count`` (space, B, ids, routing) with random spaces, 0..8 examples, absent features."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        s = random_space(gen)
        B = int(torch.randint(0, 9, (), generator=gen))
        ids = random_feature_ids(s, B, gen)
        yield s, B, ids, fk.Routing(ids, s)


def test_slots_are_the_concatenated_rank_rows_of_each_examples_features(seed):
    for s, B, ids, r in random_routings(seed):
        for b in range(B):
            feats = r.features_of(b)
            rows = [i for k in feats for i in range(s.rank_offsets[k], s.rank_offsets[k + 1])]
            owners = [k for k in feats for _ in range(s.ranks[k])]
            n = len(rows)
            assert r.slot_valid[b].tolist() == [True] * n + [False] * (r.max_active_rank - n)
            assert r.slot_rank_index[b, :n].tolist() == rows
            assert r.slot_feature[b, :n].tolist() == owners
        assert r.max_active_rank == max([sum(s.ranks[k] for k in r.features_of(b)) for b in range(B)], default=0)


def test_invalid_ids_name_the_example():
    s = space()
    with pytest.raises(ValueError, match=r"example 1: feature id 6 .*invalid"):
        fk.Routing([[0, 3, 5], [0, 3, 6]], s)
    with pytest.raises(ValueError, match=r"example 0: feature id -2"):
        fk.Routing([[-2, 3, 5]], s)
    with pytest.raises(ValueError, match=r"example 2: column 1 is group 'task' but holds feature 1 .*'fr'"):
        fk.Routing([[0, 3, -1], [1, 4, -1], [2, 1, -1]], s)
    with pytest.raises(ValueError, match=r"example 0: .*feature 0 is repeated"):
        fk.Routing([[0, 0, -1]], s)
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        fk.Routing([[0, 3]], s)
    with pytest.raises(ValueError, match="integer"):
        fk.Routing(torch.zeros(2, 3), s)
    with pytest.raises(TypeError, match="FeatureSpace"):
        fk.Routing([[0, 3, 5]], {"language": ["en"]})


def test_layouts_batched_single_token_and_packed():
    s = space()
    r = fk.Routing(s.encode([{"language": "fr"}, {"task": "qa"}, {}]), s, cu_seqlens=[0, 2, 2, 7])
    lay = fk.Routing(r.feature_ids, s).layout((3, 5))
    assert lay.kind == "batched" and lay.num_tokens == 15 and lay.lengths.tolist() == [5, 5, 5]
    decode = r.layout((3, 1))  # decode after prefill, same routing
    assert decode.kind == "batched" and decode.num_tokens == 3 and decode.lengths.tolist() == [1, 1, 1]
    packed = r.layout((7,))
    assert packed.kind == "packed" and packed.lengths.tolist() == [2, 0, 5]
    assert packed.token_example().tolist() == [0, 0, 2, 2, 2, 2, 2]
    assert r.layout((1, 7)).key == packed.key
    assert r.layout((3, 1)) is decode  # cached
    with pytest.raises(ValueError, match=r"token dimensions \(4, 5\) .* 3 examples"):
        r.layout((4, 5))
    with pytest.raises(ValueError, match=r"packed \(T=7, in\)"):
        r.layout((8,))
    r2 = fk.Routing(s.encode([{"language": "fr"}, {}]), s)
    assert r2.layout((2,)).lengths.tolist() == [1, 1]
    with pytest.raises(ValueError, match="with cu_seqlens given"):
        r2.layout((5,))


@pytest.mark.parametrize("cu, match", [([0, 3], "B \\+ 1 = 3"), ([1, 2, 3], "start at 0"), ([0, 4, 2], "example 1 has negative"),
                                       ([[0, 1, 2]], "1-D"), ([0.0, 1.0, 2.0], "integer")])
def test_bad_cu_seqlens(cu, match):
    s = space()
    with pytest.raises(ValueError, match=match):
        fk.Routing([[0, 3, 5], [1, -1, -1]], s, cu_seqlens=cu)


def test_empty_batch_and_featureless_examples():
    s = space()
    r = fk.Routing(torch.zeros(0, 3, dtype=torch.long), s)
    assert r.num_examples == 0 and r.max_active_rank == 0 and r.uniform_features is None
    assert r.layout((0, 4)).num_tokens == 0
    r = fk.Routing(s.encode([{}, {}]), s)
    assert r.max_active_rank == 0 and r.uniform_features == ()


def test_uniform_features():
    s = space()
    same = fk.Routing(s.encode([{"language": "sw", "task": "mt"}] * 3), s)
    assert same.uniform_features == (2, 4)
    assert fk.Routing(s.encode([{"language": "sw"}, {"language": "en"}]), s).uniform_features is None


def test_feature_dropout_statistics_and_determinism():
    s = fk.FeatureSpace({"a": [str(i) for i in range(10)], "b": ["x", "y"]}, 2)
    gen = torch.Generator().manual_seed(0)
    ids = random_feature_ids(s, 20000, gen, p_absent=0.3)
    p = 0.3
    r = fk.Routing(ids, s, feature_dropout=p, generator=torch.Generator().manual_seed(1))
    active_before = (ids >= 0).sum().item()
    dropped = ((ids >= 0) & (r.feature_ids < 0)).sum().item()
    # Binomial(n, p): the drop rate is p within 5 standard deviations.
    sd = (p * (1 - p) / active_before) ** 0.5
    assert abs(dropped / active_before - p) < 5 * sd
    assert bool(((r.feature_ids == ids) | (r.feature_ids == -1)).all())  # only drops, never invents
    assert torch.equal(r.requested_feature_ids, ids)
    r2 = fk.Routing(ids, s, feature_dropout=p, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r.feature_ids, r2.feature_ids)
    # Independence across groups: P(both dropped | both present) = p^2.
    both = (ids >= 0).all(1)
    both_dropped = (r.feature_ids[both] < 0).all(1).float().mean().item()
    assert abs(both_dropped - p * p) < 5 * (p * p * (1 - p * p) / both.sum().item()) ** 0.5
    with pytest.raises(ValueError, match="feature_dropout"):
        fk.Routing(ids, s, feature_dropout=1.0)
    with pytest.raises(TypeError, match=r"generator must be a CPU torch.Generator or None, got str 'cuda'"):
        fk.Routing(ids, s, feature_dropout=p, generator="cuda")


def test_device_metadata_is_built_once_per_routing():
    s = space()
    r = fk.Routing(s.encode([{"language": "fr"}, {"task": "qa"}]), s)
    calls = []
    first = r.cached("k", lambda: calls.append(1) or object())
    assert r.cached("k", lambda: calls.append(1) or object()) is first and calls == [1]


def test_kernel_metadata_lists_every_example_feature_pair_by_feature(seed):
    for s, B, ids, r in random_routings(seed):
        m = r.kernel_metadata(torch.device("cpu"))
        pairs = list(zip(m.pair_feature.tolist(), m.pair_example.tolist(), m.pair_slot.tolist()))
        assert pairs == sorted(pairs)  # by feature, then example
        expected = set()
        for b in range(B):
            offset = 0
            for k in ids[b].tolist():
                if k >= 0:
                    expected.add((k, b, offset))
                    # the pair's slots are the feature's rank rows, in order
                    rows = m.slot_rank[b, offset:offset + s.ranks[k]].tolist()
                    assert rows == list(range(s.rank_offsets[k], s.rank_offsets[k + 1]))
                    assert set(m.slot_feature[b, offset:offset + s.ranks[k]].tolist()) == {k}
                    offset += s.ranks[k]
            assert (m.slot_feature[b, offset:] == -1).all()
        assert set(pairs) == expected
        start = m.feature_pair_start.tolist()
        for k in range(s.num_features):
            assert all(f == k for f, _, _ in pairs[start[k]:start[k + 1]])
        assert m.present_features.tolist() == sorted({k for k, _, _ in expected})
        assert m.max_pair_rank == max((s.ranks[k] for k, _, _ in expected), default=0)


def test_kernel_metadata_is_built_once_per_device_and_packed_length_bucketed():
    r = fk.Routing([[0, 3, 5], [1, -1, 5]], space(), cu_seqlens=[0, 5, 12])
    assert r.to("cpu") is r
    cpu = r.kernel_metadata(torch.device("cpu"))
    meta = r.kernel_metadata(torch.device("meta"))
    assert meta.device.type == "meta" and r.kernel_metadata(torch.device("cpu")) is cpu
    assert cpu.max_length == 8  # longest example 7, rounded up to a power of two
    assert cpu.cu_seqlens.tolist() == [0, 5, 12] and cpu.cu_seqlens.dtype == torch.int32


def test_routing_accepts_a_list_of_feature_dicts():
    s = space()
    examples = [{"language": "fr", "task": "mt"}, {}, {"domain": "web", "language": "sw"}]
    r = fk.Routing(examples, s)
    assert torch.equal(r.feature_ids, s.encode(examples)) and r.features_of(2) == [2, 5]
    assert torch.equal(fk.Routing(tuple(examples), s).feature_ids, r.feature_ids)
    with pytest.raises(ValueError, match=r"single \{group: value\} dict; pass a list of one dict per example"):
        fk.Routing({"language": "fr"}, s)
    with pytest.raises(ValueError, match=r"example 1: expected a dict group -> value, got list"):
        fk.Routing([{"language": "fr"}, [0, 3, 5]], s)
    with pytest.raises(ValueError, match=r"example 0: unknown feature 'de' in group 'language'"):
        fk.Routing([{"language": "de"}], s)
    with pytest.raises(ValueError, match=r"feature_ids must be \(B, 3\) integer ids .* could not read list"):
        fk.Routing(["fr", "qa"], s)


def test_packed_routing_refuses_inputs_of_several_tokens_per_example():
    s = space()
    r = fk.Routing(s.encode([{"language": "fr"}, {"task": "qa"}, {}]), s, cu_seqlens=[0, 2, 2, 7])
    for shape in [(3, 5), (3, 7), (3, 2)]:  # (B, L): L tokens per example would override cu_seqlens
        with pytest.raises(ValueError, match=r"is batched \(B=3, L=\d\) but the routing is packed \(cu_seqlens, T=7"):
            r.classify(shape)
    assert r.classify((7,)) == ("packed", 7, 0) and r.classify((1, 7)) == ("packed", 7, 0)
    assert r.classify((3,)) == ("batched", 3, 1) and r.classify((3, 1)) == ("batched", 3, 1)  # decode
    assert r.classify((3, 0)) == ("batched", 0, 0)  # no tokens: nothing to misread
    one = fk.Routing([[0, 3, 5]], s, cu_seqlens=[0, 4])
    assert one.classify((1, 4)) == ("batched", 4, 4)  # B == 1, L == T: both readings agree
    assert one.classify((1, 1)) == ("batched", 1, 1) and one.classify((4,)) == ("packed", 4, 0)
    with pytest.raises(ValueError, match=r"\(1, 3\) is batched \(B=1, L=3\) but the routing is packed"):
        one.classify((1, 3))
    empty = fk.Routing(torch.zeros(0, 3, dtype=torch.long), s, cu_seqlens=[0])
    assert empty.classify((0, 5)) == ("batched", 0, 5)  # no examples, no tokens: nothing to misread
    # An unpacked routing still takes (B, L).
    assert fk.Routing(r.feature_ids, s).classify((3, 5)) == ("batched", 15, 5)


def test_routing_on_a_million_feature_space_is_cheap(monkeypatch):
    n = 1_000_000
    s = fk.FeatureSpace({"user": [f"u{i}" for i in range(n)], "lang": ["en", "fr"]}, {"user": 2, "lang": 4})
    examples = [{"user": "u3", "lang": "fr"}, {"user": f"u{n - 1}"}, {"lang": "en"}, {}]
    fk.Routing(examples, s)  # the space's tensors are built here, once
    built = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda data, *a, **k: built.append(len(data)) or real(data, *a, **k))
    start = time.perf_counter()
    for _ in range(20):
        r = fk.Routing(examples, s)
    elapsed = time.perf_counter() - start
    assert max(built, default=0) < 1000  # was torch.tensor of the space's million-long lists, per routing
    assert elapsed < 2.0, elapsed  # generous (about 1 ms each on an idle machine; 0.4 s each before)
    fr = list(range(2 * n + 4, 2 * n + 8))
    assert r.slot_rank_index.tolist() == [[6, 7, *fr], [2 * n - 2, 2 * n - 1, 0, 0, 0, 0],
                                          [2 * n, 2 * n + 1, 2 * n + 2, 2 * n + 3, 0, 0], [0] * 6]
    with pytest.raises(ValueError, match=rf"example 0: column 1 is group 'lang' but holds feature 7 \(user='u7'\)"):
        fk.Routing([[0, 7]], s)
    meta = r.kernel_metadata(torch.device("cpu"))
    assert meta.max_feature_rank == 4 and meta.rank_offsets[-1] == 2 * n + 8 and meta.feature_rank.numel() == n + 2
    assert meta.present_features.tolist() == [3, n - 1, n, n + 1]


def test_per_shape_caches_are_lrus():
    s = space()
    r = fk.Routing(s.encode([{"language": "fr"}, {"task": "qa"}]), s)
    r.cache_limit = 3
    built = []
    for k in "abc":
        r.cached(k, lambda k=k: built.append(k) or k.upper())
    assert r.cached("a", lambda: built.append("a!")) == "A"  # a hit: "a" is now the most recent
    r.cached("d", lambda: built.append("d") or "D")  # evicts the least recently used: "b", not "a"
    assert "a" in r._cache and "b" not in r._cache and len(r._cache) == 3 and built == ["a", "b", "c", "d"]
    assert r.cached("b", lambda: built.append("b") or "B2") == "B2"  # dropped entries are built again
    first = r.layout((2, 1))
    r.layout((2, 2)), r.layout((2, 3))
    assert r.layout((2, 1)) is first  # a hit refreshes it
    r.layout((2, 4))
    assert list(r._layouts) == [(2, 3), (2, 1), (2, 4)] and r.layout((2, 1)) is first
    assert fk.Routing(s.encode([{}]), s).cache_limit == fk.Routing.cache_limit == 64
