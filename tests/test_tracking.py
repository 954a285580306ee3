"""Experiment tracking (gen_ssd_ray.common.tracking): the `logging` section of every job refuses bad
values before anything starts; each backend writes what it should (TensorBoard event files read back
with TensorBoard's EventAccumulator, an MLflow run in the local file store read with MLflow's client, a
W&B offline run file whose history records are read back); generation and evaluation log their series
through the real job code with fake engines. Fine-tuning's per-step series are checked on a real run in
tests/test_finetune.py."""

from __future__ import annotations

import glob
import json
import logging
import struct
import types
from pathlib import Path

import pytest

from gen_ssd_ray.common.config import ConfigError, load_config
from gen_ssd_ray.common.tracking import LoggingConfig, format_duration, open_tracker, tracking_dir

# ---- config -----------------------------------------------------------------------------------------


def _schemas():
    from gen_ssd_ray.evaluate.config import EvaluateConfig
    from gen_ssd_ray.generate.config import GenerateConfig
    from gen_ssd_ray.pipeline.config import PipelineConfig
    from gen_ssd_ray.train.config import FinetuneConfig

    return [GenerateConfig, FinetuneConfig, EvaluateConfig, PipelineConfig]


@pytest.mark.parametrize("schema", _schemas(), ids=lambda s: s.__name__)
def test_every_job_has_a_logging_section_off_by_default_that_refuses_unknown_backends(schema):
    cfg = load_config(None, [], schema)
    assert cfg.logging.backends == []  # nothing changes for existing users
    with pytest.raises(ConfigError) as e:
        load_config(None, ["logging.backends=[tensorboard,neptune]"], schema)
    msg = str(e.value)
    assert msg.startswith("logging.backends:") and "'neptune'" in msg
    assert "mlflow, tensorboard, wandb" in msg
    ok = load_config(None, ["logging.backends=[tensorboard,mlflow,wandb]"], schema)
    assert ok.logging.backends == ["tensorboard", "mlflow", "wandb"]


def test_bad_logging_values_name_the_key_and_the_fix(monkeypatch):
    from gen_ssd_ray.common import tracking
    from gen_ssd_ray.train.config import FinetuneConfig

    cases = {
        "logging.backends=[wandb,wandb]": "logging.backends: lists a backend twice",
        "logging.dir=s3://bucket/tb": "logging.dir: must be a local folder",
        "logging.wandb_mode=cloud": "logging.wandb_mode: must be one of offline, online, disabled",
        "logging.run_name=a/b": "logging.run_name:",
        "logging.every_steps=-1": "logging.every_steps: must be >= 0",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
            load_config(None, [override], FinetuneConfig)
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ConfigError) as e:
        load_config(None, ["logging.backends=[tensorboard,wandb]"], FinetuneConfig)
    assert "wandb not installed" in str(e.value) and "pip install -e '.[tracking]'" in str(e.value)


def test_pipeline_logging_applies_to_every_stage_each_its_own_run(tmp_path):
    from gen_ssd_ray.pipeline.config import PipelineConfig, stage_config

    cfg = load_config(
        None,
        [f"output_dir={tmp_path}/exp", "logging.backends=[tensorboard]", "logging.run_name=x"],
        PipelineConfig,
    )
    distill = stage_config(cfg, "distill", {"output.dir": f"{tmp_path}/exp/distill/gen_ssd"})
    ev = stage_config(cfg, "evaluate", {"output.dir": f"{tmp_path}/exp/eval/gen_ssd"})
    for stage in (distill, ev):
        assert stage.logging.backends == ["tensorboard"] and stage.logging.dir == f"{tmp_path}/exp/tracking"
    assert (distill.logging.run_name, ev.logging.run_name) == ("x-distill-gen_ssd", "x-evaluate-gen_ssd")
    assert distill.logging.every_steps == 10  # the fine-tuning stages keep their own progress line
    with pytest.raises(ConfigError, match="distill.logging.backends: .* set logging.backends instead"):
        load_config(None, ["distill.logging.backends=[tensorboard]"], PipelineConfig)
    load_config(None, ["distill.logging.every_steps=5"], PipelineConfig)


def test_no_backend_is_a_no_op_that_writes_nothing(tmp_path):
    with open_tracker(LoggingConfig(), "finetune", str(tmp_path / "out"), config={"a": 1}) as t:
        assert not t.enabled
        t.log({"train/loss": 1.0}, 1)
    assert not (tmp_path / "out").exists()


def test_backend_libraries_are_imported_only_when_a_backend_opens():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from gen_ssd_ray.common.config import load_config\n"
        "from gen_ssd_ray.common.tracking import LoggingConfig, open_tracker\n"
        "from gen_ssd_ray.train.config import FinetuneConfig\n"
        "import gen_ssd_ray.generate.driver, gen_ssd_ray.evaluate.run, gen_ssd_ray.pipeline.config\n"
        "load_config(None, ['logging.backends=[tensorboard,mlflow,wandb]'], FinetuneConfig)\n"
        "open_tracker(LoggingConfig(), 'finetune', 'out').log({'train/loss': 1.0}, 1)\n"
        "print(sorted(m for m in ('torch', 'tensorboard', 'mlflow', 'wandb') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tracking_folder_defaults(tmp_path):
    cfg = LoggingConfig()
    assert tracking_dir(cfg, str(tmp_path / "ft"), "finetune") == tmp_path / "ft" / "tracking"
    assert tracking_dir(LoggingConfig(dir=str(tmp_path / "t")), "s3://b/x", "finetune") == tmp_path / "t"
    remote = tracking_dir(cfg, "s3://bucket/runs/ft", "finetune")  # a local folder, never the store
    assert remote.is_absolute() and remote.name == "tracking" and "staging" in remote.parts


# ---- backends ---------------------------------------------------------------------------------------


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every scalar in the event files of `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_writes_the_series_and_a_resumed_run_replaces_replayed_steps(tmp_path, caplog):
    out = tmp_path / "ft"
    cfg = LoggingConfig(backends=["tensorboard"])
    with open_tracker(cfg, "finetune", str(out), config={"optim": {"lr": 0.1}}) as t:
        for step in (1, 2, 3):
            t.log({"train/loss": 1.0 / step, "train/lr": 0.1, "train/grad_norm": None, "x": "text"}, step)
    # a resumed run (checkpoint at step 2) logs steps 3 and 4 again: the first run's step 3 is dropped
    with open_tracker(cfg, "finetune", str(out), start_step=3) as t:
        for step in (3, 4):
            t.log({"train/loss": 10.0 / step, "train/lr": 0.2, "train/grad_norm": float("nan")}, step)
    run = out / "tracking" / "tensorboard" / "finetune-ft"
    with caplog.at_level(logging.WARNING):  # (TensorBoard's own note about the purged steps)
        scalars = tensorboard_scalars(run)
    assert set(scalars) == {"train/loss", "train/lr"}  # None, NaN and text are left out
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert scalars["train/loss"][2][1] == pytest.approx(10 / 3) and scalars["train/lr"][-1][
        1
    ] == pytest.approx(0.2)


def test_mlflow_run_in_the_local_file_store_continued_by_a_rerun(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "gen"
    cfg = LoggingConfig(backends=["mlflow"], project="proj")
    with open_tracker(
        cfg, "generate", str(out), config={"search": {"beam_width": 2}, "method": "gen_ssd"}
    ) as t:
        t.log({"search/pruned_frac": 0.5, "teacher/tokens_per_s": 100.0}, 1)
    with open_tracker(
        cfg, "generate", str(out), config={"search": {"beam_width": 2}, "method": "gen_ssd"}
    ) as t:
        t.log({"search/pruned_frac": 0.25, "teacher/tokens_per_s": 120.0}, 2)
    client = MlflowClient(tracking_uri=(out / "tracking" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("proj")
    [run] = client.search_runs([exp.experiment_id])  # the re-run continued the same run
    assert run.info.run_name == "generate-gen" and run.info.status == "FINISHED"
    assert run.data.params == {"search.beam_width": "2", "method": "gen_ssd"}
    history = client.get_metric_history(run.info.run_id, "search/pruned_frac")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    assert set(run.data.metrics) == {"search/pruned_frac", "teacher/tokens_per_s"}


def wandb_records(run_file: Path):
    """The records of a W&B run file: its LevelDB-style log of protobuf `Record`s (7-byte file header,
    32 KiB blocks, each chunk a 7-byte header: checksum, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, buf = run_file.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # the rest of a block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        buf += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""
        elif kind == 0:
            break


def test_wandb_offline_run_has_the_history_and_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline unless configured
    out = tmp_path / "ev"
    cfg = LoggingConfig(backends=["wandb"], project="proj")
    with open_tracker(cfg, "evaluate", str(out), config={"sampling": {"n": 4}}) as t:
        t.log({"eval/accuracy": 0.75, "eval/correct": 3}, 0)
    [run_file] = glob.glob(str(out / "tracking" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = [], {}
    for rec in wandb_records(Path(run_file)):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    [row] = history
    assert row["eval/accuracy"] == 0.75 and row["eval/correct"] == 3 and row["_step"] == 0
    assert config["sampling.n"] == 4


def test_a_failing_backend_is_dropped_with_one_warning(caplog):
    from gen_ssd_ray.common.tracking import Tracker

    class Broken:
        name = "broken"
        closed = 0

        def log(self, metrics, step):
            raise OSError("disk full")

        def close(self):
            Broken.closed += 1

    seen = []
    ok = types.SimpleNamespace(name="ok", log=lambda m, s: seen.append((m, s)), close=lambda: None)
    t = Tracker([Broken(), ok])
    with caplog.at_level(logging.WARNING, logger="gen_ssd_ray"):
        t.log({"a": 1}, 1)
        t.log({"a": 2}, 2)
    assert seen == [({"a": 1.0}, 1), ({"a": 2.0}, 2)] and Broken.closed == 1
    assert [r.message for r in caplog.records if "broken" in r.message] == [
        "tracking: broken failed in log (disk full); it is not logged to any more"
    ]


def test_progress_line_and_eta():
    from gen_ssd_ray.train.worker import progress_line

    row = {"step": 40, "loss": 1.2341, "lr": 2e-5, "tokens_per_s": 812.4, "elapsed_s": 48.0}
    assert progress_line(row, 300, 40) == "[finetune] step 40/300 loss 1.234 lr 2.0e-05 tok/s 812 ETA 5m12s"
    resumed = {**row, "loss": None, "tokens_per_s": None}  # 10 steps run since a resume at step 30
    assert progress_line(resumed, 300, 10).endswith("loss skipped (not finite) lr 2.0e-05 tok/s ? ETA 20m48s")
    assert [format_duration(s) for s in (None, 5.4, 192, 3840, float("nan"))] == [
        "?",
        "5s",
        "3m12s",
        "1h04m",
        "?",
    ]


# ---- through the jobs ---------------------------------------------------------------------------------


def test_generation_logs_progress_and_rates_per_problem(tmp_path, monkeypatch):
    """The generation driver (the real run_generate: verification, selection, shards, progress) with the
    search replaced by fake results: 4 problems, 2 trajectories each (one completed and correct except
    for the last problem, one pruned)."""
    from gen_ssd_ray.generate import driver
    from gen_ssd_ray.sim.harness import sim_config, write_problems

    data = write_problems(tmp_path / "p.jsonl", 4)
    cfg = sim_config(
        [
            f"data.path={data}",
            f"output.dir={tmp_path / 'gen'}",
            "logging.backends=[tensorboard]",
            "runtime.journal_interval_s=0",
            "runtime.verify_workers=1",
        ]
    )

    def fake_solve_all(cfg, pools, todo, fingerprint, stats, stop, **kw):
        for i, q in enumerate(todo):
            gold = q.gold_answer.split("####")[-1].strip()
            base = {"problem_id": q.problem_id, "question": q.question, "gold_answer": q.gold_answer}
            cost = {
                "teacher_tokens_generated": 50,
                "teacher_prompt_tokens": 40,
                "teacher_cached_prompt_tokens": 30,
            }
            answer = gold if i < 3 else "-1"
            yield (
                q,
                [
                    {**base, **cost, "trajectory_index": 0, "status": "completed", "final_answer": answer},
                    {**base, **cost, "trajectory_index": 1, "status": "pruned"},
                ],
            )

    monkeypatch.setattr(driver, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(driver, "solve_all", fake_solve_all)
    summary = driver.run_generate(cfg, pools=types.SimpleNamespace(managers=[]))
    assert summary["problems_done_this_run"] == 4 and summary["correct"] == 3
    s = tensorboard_scalars(tmp_path / "gen" / "tracking" / "tensorboard" / "generate-gen")
    for tag in (
        "generate/progress",
        "teacher/tokens_per_s",
        "teacher/prefix_cache_hit_rate",
        "search/pruned_frac",
        "search/correct_frac",
    ):
        assert tag in s, sorted(s)
    assert [step for step, _ in s["generate/progress"]] == [1, 2, 3, 4, 4]  # per problem, then the end
    assert s["generate/progress"][-1][1] == 1.0 and s["search/pruned_frac"][-1][1] == 0.5
    assert s["teacher/prefix_cache_hit_rate"][-1][1] == pytest.approx(0.75)
    assert [round(v, 3) for _, v in s["search/correct_frac"]] == [1.0, 1.0, 1.0, 0.75, 0.75]


def test_evaluation_logs_accuracy_and_counts(tmp_path):
    from gen_ssd_ray.evaluate.run import evaluate
    from tests.test_evaluate import FakeEngines, cfg_with, eval_problems, fake_prepared

    cfg = cfg_with(
        f"output.dir={tmp_path / 'eval'}",
        "model.max_num_seqs=2",
        "runtime.progress=false",
        "logging.backends=[tensorboard]",
        "logging.run_name=student",
    )
    problems = eval_problems(4)
    summary = evaluate(cfg, fake_prepared(cfg, problems), generate_fn=FakeEngines(problems))
    assert summary["accuracy"] == 0.5
    s = tensorboard_scalars(tmp_path / "eval" / "tracking" / "tensorboard" / "student")
    assert (
        s["eval/accuracy"] == [(0, 0.5)]
        and s["eval/correct"] == [(0, 2.0)]
        and s["eval/problems"] == [(0, 4.0)]
    )
