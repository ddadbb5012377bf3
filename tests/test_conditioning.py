"""Conditioning tags (cedm.conditioning): one grammar, one place that maps a tag to its labels."""
import pytest

from cedm import conditioning as cnd
from cedm.io import CedmError


@pytest.mark.parametrize("tag,parsed", [
    ("uncond", ("uncond", None, None)), ("labels", ("labels", None, None)),
    ("temi-C20", ("clusters", "temi", 20)), ("kmeans-C5", ("clusters", "kmeans", 5)),
    ("ap-K10", ("subclasses", "ap", 10)),
])
def test_parse_and_print_round_trip(tag, parsed):
    t = cnd.parse_tag(tag)
    assert tuple(t) == parsed and str(t) == tag
    kind, method, count = t                                       # unpacks like a 3-tuple
    assert (kind, method, count) == parsed


@pytest.mark.parametrize("bad", ["temi_C5", "temi-C", "TEMI-C5", "temi-X5", "labels:fine", "", "c5"])
def test_bad_tags_are_clear_errors(bad):
    with pytest.raises(CedmError, match="unknown --cond"):
        cnd.parse_tag(bad)
    assert not cnd.is_tag(bad)


def test_paths_and_helpers(tmp_path):
    assert cnd.cluster_dir(tmp_path, "temi-C5") == tmp_path / "cluster/temi-C5"
    assert cnd.cluster_dir(tmp_path, "ap-K3") == tmp_path / "cluster/ap-K3"
    assert cnd.cluster_dir(tmp_path, "labels") is None
    assert cnd.cluster_of("temi-C20") == ("temi", 20) and cnd.cluster_of("ap-K3") is None
    assert cnd.cluster_tag("temi", 7) == "temi-C7" and cnd.subclass_tag("ap", 4) == "ap-K4"
    order = sorted(["uncond", "temi-C100", "labels", "temi-C20", "kmeans-C50", "ap-K3"], key=cnd.sort_key)
    assert order == ["kmeans-C50", "temi-C20", "temi-C100", "ap-K3", "labels", "uncond"]
    assert [cnd.telemetry_label(t) for t in ("temi-C20", "ap-K3", "uncond")] == ["20", "ap-K3", "uncond"]


def test_train_still_exports_parse_tag():
    from cedm import train

    assert train.parse_tag is cnd.parse_tag and train.conditioning is cnd.conditioning
