"""Every job's output folder has one writer: a second generation, fine-tune, evaluation or pipeline on
a folder another job holds is refused at once (FolderLockedError, exit 2) naming the folder, the holder
and the fix, and nothing of the holder's is touched. (gen_ssd_ray.common.joblock; the pipeline and the
lock module itself are tested in tests/test_joblock.py.)"""

from __future__ import annotations

import pytest

from gen_ssd_ray.common.config import derive
from gen_ssd_ray.common.joblock import FolderLockedError, hold_job_folder


def test_evaluation_on_a_held_folder_is_refused(chat_models, one_problem, tmp_path):
    from gen_ssd_ray.evaluate.config import EvaluateConfig
    from gen_ssd_ray.evaluate.run import prepare

    out = tmp_path / "eval"
    cfg = derive(
        EvaluateConfig(),
        {"model.model": str(chat_models["good"]), "data.path": str(one_problem), "output.dir": str(out)},
    )
    with hold_job_folder(out, "finetune"):
        (out / "keep.txt").write_text("the holder's")
        with pytest.raises(FolderLockedError, match=r"in use by job finetune .*output\.dir"):
            prepare(cfg)
        assert (out / "keep.txt").read_text() == "the holder's"
    first = prepare(cfg)  # free now: taken, and held until evaluate() returns
    with pytest.raises(FolderLockedError, match="in use by job evaluate"):
        prepare(cfg)
    first.lock.release()
    prepare(cfg).lock.release()


def test_generation_on_a_held_folder_is_refused(tmp_path):
    from gen_ssd_ray.generate.driver import prepare
    from gen_ssd_ray.sim.harness import sim_config, write_problems

    out = tmp_path / "gen"
    cfg = sim_config([f"data.path={write_problems(tmp_path / 'p.jsonl', 3)}", f"output.dir={out}"])
    with hold_job_folder(out, "evaluate"):
        with pytest.raises(FolderLockedError, match=r"in use by job evaluate .*_lock"):
            prepare(cfg)
        assert not (out / "_manifest.json").exists()
    p = prepare(cfg)  # the writer holds it until closed
    with pytest.raises(FolderLockedError, match="in use by job generate"):
        prepare(cfg)
    p.writer.close()


def test_finetune_on_a_held_folder_is_refused(chat_models, one_problem, tmp_path):
    from gen_ssd_ray.train.config import FinetuneConfig
    from gen_ssd_ray.train.run import prepare

    out = tmp_path / "ft"
    base = {"model.path": str(chat_models["good"]), "data.path": str(one_problem), "output.dir": str(out)}
    cfg = derive(FinetuneConfig(), {**base, "data.response_field": "answer", "data.filters": []})
    with hold_job_folder(out, "pipeline"):
        with pytest.raises(FolderLockedError, match=r"in use by job pipeline .*output\.dir"):
            prepare(cfg)
    first = prepare(cfg)  # held until run_finetune returns
    with pytest.raises(FolderLockedError, match="in use by job finetune"):
        prepare(cfg)
    first.lock.release()
