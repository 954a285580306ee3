"""Each job's `prepare` (before any actor or worker starts) refuses a model whose tokenizer or chat
template would fail every row, with an InputError (exit 2) naming the key, instead of committing every
problem as an error row: a model folder without a chat template, and a prompt budget no question fits.
Tokenizer-only copies of the embedded teacher (config and tokenizer files; no weights are loaded)."""

from __future__ import annotations

import pytest

from gen_ssd_ray.common.config import derive, load_config
from gen_ssd_ray.common.errors import InputError


def test_generation_refuses_before_any_actor(chat_models, one_problem, tmp_path):
    from gen_ssd_ray.generate.config import GenerateConfig
    from gen_ssd_ray.generate.driver import prepare

    def cfg(**over):
        base = {"teacher.model": str(chat_models["good"]), "student.model": str(chat_models["good"])}
        base.update({"data.path": str(one_problem), "output.dir": str(tmp_path / "out"), **over})
        return derive(load_config(None, [], GenerateConfig), base)

    with pytest.raises(InputError, match=r"^teacher\.model=.*no chat template"):
        prepare(cfg(**{"teacher.model": str(chat_models["bare"])}))
    with pytest.raises(InputError, match=r"^student\.model=.*no chat template"):
        prepare(cfg(**{"student.model": str(chat_models["bare"])}))
    with pytest.raises(InputError, match=r"teacher\.max_model_len=64 - search\.max_new_tokens=32"):
        prepare(cfg(**{"teacher.max_model_len": 64, "search.max_new_tokens": 32}))
    assert not (tmp_path / "out").exists()


def test_evaluation_refuses_before_any_engine(chat_models, one_problem, tmp_path):
    from gen_ssd_ray.evaluate.config import EvaluateConfig
    from gen_ssd_ray.evaluate.run import prepare

    def cfg(**over):
        base = {
            "model.model": str(chat_models["good"]),
            "data.path": str(one_problem),
            "output.dir": str(tmp_path / "o"),
        }
        return derive(EvaluateConfig(), {**base, **over})

    with pytest.raises(InputError, match=r"^model\.model=.*no chat template"):
        prepare(cfg(**{"model.model": str(chat_models["bare"])}))
    with pytest.raises(InputError, match=r"model\.max_model_len=64 - sampling\.max_new_tokens=32"):
        prepare(cfg(**{"model.max_model_len": 64, "sampling.max_new_tokens": 32}))
    p = prepare(cfg())
    assert len(p.prompts) == 1
    p.lock.release()


def test_finetuning_refuses_before_any_worker(chat_models, one_problem, tmp_path):
    from gen_ssd_ray.train.config import FinetuneConfig
    from gen_ssd_ray.train.run import prepare

    def cfg(**over):
        base = {
            "model.path": str(chat_models["good"]),
            "data.path": str(one_problem),
            "data.response_field": "answer",
            "data.filters": [],
            "output.dir": str(tmp_path / "ft"),
        }
        return derive(FinetuneConfig(), {**base, **over})

    with pytest.raises(InputError, match=r"^model\.path=.*no chat template"):
        prepare(cfg(**{"model.path": str(chat_models["bare"])}))
    with pytest.raises(InputError, match=r"optim\.max_seq_len=16 \(less one response token\)"):
        prepare(cfg(**{"optim.max_seq_len": 16, "optim.micro_batch_tokens": 16}))
    p = prepare(cfg())
    assert len(p.examples) == 1
    p.lock.release()
