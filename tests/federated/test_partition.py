import pytest

from zotune.errors import DataError
from zotune.federated.partition import dirichlet, label_skew, partition


def labels(n=400, classes=2):
    return [i % classes for i in range(n)]


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_are_disjoint_cover_the_split_and_are_seeded(kind):
    y = labels(401, 3)
    parts = partition(y, 8, kind, 0.5, seed=3, min_size=4)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(401))  # disjoint and covering
    assert min(len(p) for p in parts) >= 4
    assert parts == partition(y, 8, kind, 0.5, seed=3, min_size=4)
    assert parts != partition(y, 8, kind, 0.5, seed=4, min_size=4)


def test_label_skew_grows_as_alpha_falls():
    y = labels(1000)
    skew = {
        a: sum(label_skew(y, partition(y, 8, "dirichlet", a, seed=s)) for s in range(5)) / 5
        for a in (100.0, 1.0, 0.1)
    }
    iid = label_skew(y, partition(y, 8, "iid", 0.0, seed=0))
    assert iid < 0.05 and skew[100.0] < 0.1
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[0.1] > 0.3


def test_impossible_partitions_are_clear_errors():
    with pytest.raises(DataError, match="federated.partition"):
        partition([None] * 100, 4, "dirichlet", 0.5, seed=0)
    with pytest.raises(DataError, match="federated.clients"):
        partition(labels(10), 8, "iid", 0.5, seed=0, min_size=4)
    with pytest.raises(DataError, match="federated.alpha"):
        dirichlet(labels(40), 8, 0.01, seed=0, min_size=5, tries=5)
