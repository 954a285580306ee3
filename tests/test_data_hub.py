"""Hugging Face datasets by name: `data.subset`, `data.split` and `data.revision` reach `load_dataset`,
the subset names the ids, and a dataset that cannot be loaded offline fails naming the keys and the fix
(for real: the tests run with HF_HUB_OFFLINE=1, tests/conftest.py)."""

from __future__ import annotations

import sys
import types

import pytest

from gen_ssd_ray.common.config import DataConfig
from gen_ssd_ray.common.data import DataError, Problem, load_problems


class FakeDataset(list):
    column_names = ["question", "answer"]


def fake_datasets(monkeypatch, calls):
    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        if path == "openai/gsm8k" and name is None:  # as the library says for a dataset with subsets
            raise ValueError("Config name is missing. Please pick one among the available configs: ['main']")
        return FakeDataset([{"question": "q", "answer": "#### 4"}, {"question": "r", "answer": "5"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_subset_split_and_revision_reach_load_dataset(monkeypatch):
    calls: list = []
    fake_datasets(monkeypatch, calls)
    cfg = DataConfig(path="openai/gsm8k", subset="main", split="train", revision="e53f048", limit=1, offset=1)
    assert load_problems(cfg) == [Problem("gsm8k-main-train-1", "r", "5")]
    assert calls == [("openai/gsm8k", "main", "train", "e53f048")]
    # Without a subset or revision nothing extra is passed, and the ids keep their "<name>-<split>" form.
    assert load_problems(DataConfig(path="someone/math", limit=1))[0].problem_id == "math-test-0"
    assert calls[-1] == ("someone/math", None, "test", None)


def test_a_missing_subset_says_which_key_to_set(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    fake_datasets(monkeypatch, [])
    with pytest.raises(
        DataError, match=r"data.path='openai/gsm8k'.*Config name is missing.*data\.subset=main"
    ):
        load_problems(DataConfig(path="openai/gsm8k"))


def test_offline_and_not_cached_fails_clearly_with_the_real_library(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    cfg = DataConfig(path="gen-ssd-test/not-a-dataset", subset="main", split="test")
    with pytest.raises(DataError) as e:
        load_problems(cfg)
    msg = str(e.value)
    assert "data.path='gen-ssd-test/not-a-dataset', data.subset='main', data.split='test'" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "JSONL or Parquet" in msg
