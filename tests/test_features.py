import json

import pytest
import torch

from flix_kernels import FeatureSpace


def make_space():
    return FeatureSpace({"language": ["en", "fr", "sw"], "task": ["qa", "mt"]}, {"language": 4, "task": 2})


def test_ids_ranks_and_offsets_follow_group_order():
    s = make_space()
    assert s.num_features == 5 and s.num_groups == 2
    assert s.ranks == [4, 4, 4, 2, 2]
    assert s.rank_offsets == [0, 4, 8, 12, 14, 16]
    assert s.total_rank == 16
    assert [s.index("language", v) for v in ["en", "fr", "sw"]] == [0, 1, 2]
    assert [s.index("task", v) for v in ["qa", "mt"]] == [3, 4]
    assert s.group_offsets == [0, 3, 5]


def test_single_int_rank_applies_to_every_group():
    s = FeatureSpace({"a": ["x"], "b": ["y", "z"]}, 3)
    assert s.ranks == [3, 3, 3] and s.total_rank == 9


def test_encode_decode_round_trip_with_missing_groups():
    s = make_space()
    examples = [{"language": "fr", "task": "mt"}, {"task": "qa"}, {}, {"language": "sw"}]
    ids = s.encode(examples)
    assert ids.dtype == torch.long and ids.shape == (4, 2)
    assert ids.tolist() == [[1, 4], [-1, 3], [-1, -1], [2, -1]]
    assert s.decode(ids) == examples


def test_unknown_group_or_value_names_it_and_lists_known():
    s = make_space()
    with pytest.raises(ValueError, match=r"unknown feature group 'domain'.*language.*task"):
        s.index("domain", "x")
    with pytest.raises(ValueError, match=r"unknown feature 'de' in group 'language'.*'en', 'fr', 'sw'"):
        s.index("language", "de")
    with pytest.raises(ValueError, match=r"example 1: unknown feature 'xx'"):
        s.encode([{"language": "en"}, {"task": "xx"}])
    with pytest.raises(ValueError, match=r"example 0: unknown feature group 'domain'"):
        s.encode([{"domain": "web"}])


def test_to_dict_is_json_and_round_trips():
    s = make_space()
    d = json.loads(json.dumps(s.to_dict()))
    s2 = FeatureSpace.from_dict(d)
    assert s2 == s and hash(s2) == hash(s)
    assert s2.rank_offsets == s.rank_offsets


def test_equality_depends_on_group_order_values_and_ranks():
    s = make_space()
    assert s != FeatureSpace({"task": ["qa", "mt"], "language": ["en", "fr", "sw"]}, {"language": 4, "task": 2})
    assert s != FeatureSpace({"language": ["en", "fr", "sw"], "task": ["qa", "mt"]}, 4)
    other = FeatureSpace({"language": ["en", "fr"], "task": ["qa", "mt"]}, {"language": 4, "task": 2})
    assert "language" in s.describe_difference(other)


@pytest.mark.parametrize(
    "groups, rank, match",
    [
        ({}, 4, "at least one group"),
        ({"a": []}, 4, "no features"),
        ({"a": ["x", "x"]}, 4, "more than once"),
        ({"a": "xyz"}, 4, "list of feature names"),
        ({"a": ["x"]}, 0, "positive int"),
        ({"a": ["x"]}, {"b": 2}, "unknown group"),
        ({"a": ["x"], "b": ["y"]}, {"a": 2}, "missing for group"),
        ({"a": [1]}, 2, "must be strings"),
    ],
)
def test_invalid_spaces_raise(groups, rank, match):
    with pytest.raises(ValueError, match=match):
        FeatureSpace(groups, rank)


def test_from_dict_rejects_garbage():
    with pytest.raises(ValueError, match="groups"):
        FeatureSpace.from_dict({"rank": 2})
