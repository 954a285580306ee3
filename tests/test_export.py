"""TRL-ready data: generation rows carry the conversation (messages, prompt, completion) built by the beam
manager; `python -m jobs.export` writes the chosen rows of generation folders as a Hugging Face dataset
(Parquet shards + dataset card) that `datasets` loads and TRL's `SFTTrainer` trains on as is; folders
written before the conversation columns read on (upgraded) and are refused by the export with the fix."""

from __future__ import annotations

import asyncio
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gen_ssd_ray.common.config import PromptConfig
from gen_ssd_ray.core import SearchParams
from gen_ssd_ray.engines.fake import FakeScorer, FakeTeacher, InProcessActor
from gen_ssd_ray.generate.rows import OUTPUT_SCHEMA, rows_to_table

SYSTEM = "You are a careful math tutor."
QUESTIONS = {"p1": ("What is 2 + 3?", "5"), "p2": ("Tom has 3 apples and buys 4. How many?", "7")}


def _manager(prompt: PromptConfig):
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.generate.manager import BeamManager, ManagerSpec

    path = resolve_model("embedded:teacher")
    spec = ManagerSpec(
        teacher_path=path,
        student_path=path,
        teacher_name="embedded:teacher",
        student_name="embedded:student",
        params=SearchParams(chunk_tokens=4, num_candidates=2, max_new_tokens=12),
        prompt=prompt,
        trajectories=2,
        seed=5,
        teacher_max_len=4096,
        call_timeout_s=30.0,
        fingerprint="fp",
    )
    return BeamManager(spec, [InProcessActor(FakeTeacher(vocab=200))], [InProcessActor(FakeScorer())])


def _rows(prompt: PromptConfig) -> dict[str, list[dict]]:
    """Each problem's rows as the beam manager builds them; trajectory 0 selected, problem p1 correct."""
    from gen_ssd_ray.common.data import Problem

    manager = _manager(prompt)
    out = {}
    for pid, (q, a) in QUESTIONS.items():
        rows = asyncio.run(manager.solve(Problem(pid, q, a), 0))
        for r in rows:
            r.update(selected=r["trajectory_index"] == 0, correct=pid == "p1")
        out[pid] = rows
    return out


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return _rows(PromptConfig(system=SYSTEM))


def _write(folder, rows_by_problem: dict[str, list[dict]]) -> None:
    from gen_ssd_ray.generate.output import ShardWriter

    with ShardWriter(folder, fingerprint="fp", config_yaml="x: 1\n", shard_size=1) as w:
        for pid, rows in rows_by_problem.items():
            w.add(pid, rows)


def test_manager_rows_carry_the_conversation(rows):
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.common.prompts import load_chat_tokenizer, render_prompt

    prompt = PromptConfig(system=SYSTEM)
    tok = load_chat_tokenizer(resolve_model("embedded:teacher"), "teacher.model")
    for pid, (question, _) in QUESTIONS.items():
        user = prompt.instruction.replace("{question}", question)
        for r in rows[pid]:
            assert r["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
            assert r["completion"] == [{"role": "assistant", "content": r["response"]}]
            assert r["messages"] == r["prompt"] + r["completion"] and r["response"]
            assert r["prompt_text"] == render_prompt(tok, prompt, question).text
    table = rows_to_table([r for rs in rows.values() for r in rs])
    assert table.schema == OUTPUT_SCHEMA and table.column("messages").null_count == 0
    # Without a system message the conversation starts at the user turn; an error row has no completion.
    plain = _manager(PromptConfig())._row(_problem("p3"), None, 0, "text", error="prompt too long")
    assert [m["role"] for m in plain["prompt"]] == ["user"]
    assert plain["messages"] is None and plain["completion"] is None and plain["prompt_text"] == "text"


def _problem(pid):
    from gen_ssd_ray.common.data import Problem

    return Problem(pid, "What is 1 + 1?", "2")


def test_export_loads_with_datasets_and_trains_with_trl(tmp_path, rows, tiny_model):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from jobs.export import main

    _write(tmp_path / "gen-a", {"p1": rows["p1"]})
    _write(tmp_path / "gen-b", {"p2": rows["p2"]})
    out = tmp_path / "export"
    args = [f"inputs=[{tmp_path / 'gen-a'},{tmp_path / 'gen-b'}]", f"output.dir={out}", "output.shard_rows=3"]
    assert main(["--config", "conf/export.yaml", *args, "rows=all"]) == 0
    names = sorted(p.name for p in (out / "data").iterdir())
    assert names == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n- config_name: default\n") and "path: data/train-*" in card
    assert str(tmp_path / "gen-a") in card and "rows: all" in card and "teacher generated" in card

    # A second export into the same folder is refused without output.force; with it, stale shards go.
    assert main([*args, "rows=selected"]) == 2
    assert main([*args, "rows=selected", "output.force=true"]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]

    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert len(ds) == 2 and sorted(ds["problem_id"]) == ["p1", "p2"] and set(ds["trajectory_index"]) == {0}
    assert ds[0]["messages"][0] == {"role": "system", "content": SYSTEM}
    assert [m["role"] for m in ds[0]["prompt"]] == ["system", "user"] and ds[0]["completion"][0]["content"]
    assert ds.features["source"].dtype == "string" and ds[0]["teacher_tokens_generated"] > 0
    assert len(datasets.load_dataset(str(out), split="train")) == 2  # the card names the data files

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=256,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert all(math.isfinite(x) and x > 0 for x in losses) and math.isfinite(result.training_loss)


def _to_layout_1(shard) -> None:
    """Rewrite a shard as the previous version wrote it: `prompt` the rendered text, no conversation."""
    table = pq.read_table(shard)
    meta = table.schema.metadata
    table = table.drop_columns(["messages", "prompt", "completion"])
    table = table.rename_columns(["prompt" if n == "prompt_text" else n for n in table.column_names])
    pq.write_table(table.replace_schema_metadata(meta), shard)


def test_folders_of_the_previous_layout_read_on_and_export_refuses_them(tmp_path, rows):
    from gen_ssd_ray.common.errors import InputError
    from gen_ssd_ray.export.config import ExportConfig, ExportOutputConfig
    from gen_ssd_ray.export.run import prepare
    from gen_ssd_ray.generate.manifest import read_output

    gen = tmp_path / "gen"
    _write(gen, rows)  # a shard per problem: p1's becomes layout 1, as if a newer job resumed an old folder
    first = sorted(gen.glob("part-*.parquet"))[0]
    _to_layout_1(first)
    assert pq.read_schema(first).field("prompt").type == pa.string()
    table = read_output(gen)
    assert table.schema == OUTPUT_SCHEMA and table.num_rows == 4
    old, new = (table.filter(pa.compute.equal(table["problem_id"], p)).to_pylist() for p in ("p1", "p2"))
    assert all(r["prompt_text"] == w["prompt_text"] for r, w in zip(old, rows["p1"], strict=True))
    assert all(r["messages"] is None and r["prompt"] is None and r["response"] for r in old)
    assert all(r["messages"] == w["messages"] for r, w in zip(new, rows["p2"], strict=True))
    # Projections read either layout: the old text under its new name.
    assert read_output(gen, columns=["prompt_text", "selected"]).column("prompt_text").null_count == 0

    # Fine-tuning reads a mixed folder too (it reads the question and response columns of each shard).
    from gen_ssd_ray.train import data as D
    from gen_ssd_ray.train.config import TrainDataConfig

    df = D.read_rows(TrainDataConfig(path=str(gen)))
    assert sorted(df["problem_id"]) == ["p1", "p1", "p2", "p2"] and df["response"].notna().all()

    cfg = ExportConfig(inputs=[str(gen)], output=ExportOutputConfig(dir=str(tmp_path / "x")))
    with pytest.raises(
        InputError,
        match=r"inputs\[0\]=.*1 of its rows to export \(rows=selected\).*regenerate them into a new output",
    ):
        prepare(cfg)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ([], "inputs"),
        (["inputs=[a]", "rows=best"], "rows"),
        (["inputs=[a,a]"], "inputs"),
        (["inputs=[a]", "output.dir=a"], "output.dir"),
        (["inputs=[a]", "output.shard_rows=0"], "output.shard_rows"),
        (["inputs=[http://h/a]"], r"inputs\[0\]"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.common.errors import InputError
    from gen_ssd_ray.export.config import ExportConfig

    with pytest.raises(InputError, match=key):  # a ConfigError, or a StorageError for a location
        load_config(None, overrides, schema_cls=ExportConfig)


def test_inputs_that_are_not_generation_folders_or_hold_no_row(tmp_path, rows, capsys):
    from jobs.export import main

    assert main([f"inputs=[{tmp_path / 'none'}]", f"output.dir={tmp_path / 'x'}"]) == 2
    assert "not a generation output folder" in capsys.readouterr().err
    gen = tmp_path / "gen"
    unselected = {pid: [{**r, "selected": False} for r in rs] for pid, rs in rows.items()}
    _write(gen, unselected)
    assert main([f"inputs=[{gen}]", f"output.dir={tmp_path / 'x'}"]) == 2
    assert "no row to export" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_export_to_an_object_store(tmp_path, rows, s3_bucket):
    from gen_ssd_ray.common.storage import Storage
    from jobs.export import main

    _write(tmp_path / "gen", rows)
    uri = f"{s3_bucket}/sft"
    assert main([f"inputs=[{tmp_path / 'gen'}]", f"output.dir={uri}", "rows=correct"]) == 0
    store = Storage(uri)
    assert store.list() == ["README.md", "data/train-00000-of-00001.parquet"]
    assert "config_name: default" in store.read_text("README.md")
    fs, root = store.arrow()
    table = pq.read_table(f"{root}/data/train-00000-of-00001.parquet", filesystem=fs)
    assert table.num_rows == 2 and set(table.column("problem_id").to_pylist()) == {"p1"}
    assert table.schema.field("messages").type == OUTPUT_SCHEMA.field("messages").type
