"""Fine-tuning data: reading, filters (and the empty-set message), chat-template tokenization with the loss
on the response only, the batch plan (packing, resume position), and packed attention isolation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gen_ssd_ray.common.config import PromptConfig
from gen_ssd_ray.common.prompts import render_example
from gen_ssd_ray.train import data as D
from gen_ssd_ray.train.config import TrainDataConfig


def _rows(n, **extra):
    return [
        {
            "question": f"Tom has {i} apples and buys {i + 1} more. How many?",
            "response": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}",
            **{k: (v(i) if callable(v) else v) for k, v in extra.items()},
        }
        for i in range(n)
    ]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_filters_count_and_empty_message(tmp_path):
    rows = _rows(10, status=lambda i: "completed" if i < 6 else "truncated", correct=lambda i: i < 2)
    rows.append({"question": "", "response": "x", "status": "completed", "correct": True})
    cfg = TrainDataConfig(path=_jsonl(tmp_path / "g.jsonl", rows))
    df, steps = D.apply_filters(D.read_rows(cfg), cfg)
    assert len(df) == 2
    assert [(s.before, s.after) for s in steps] == [(11, 10), (10, 6), (6, 2)]

    none_correct = _rows(5, status="completed", correct=False)
    cfg = TrainDataConfig(path=_jsonl(tmp_path / "n.jsonl", none_correct))
    with pytest.raises(D.EmptyTrainingSetError) as e:
        D.apply_filters(D.read_rows(cfg), cfg)
    msg = str(e.value)
    assert "read 5 rows" in msg and "`correct == True` kept 0 of 5 (removed 5)" in msg
    assert "the filter `correct == True` removed the last rows" in msg


def test_missing_column_and_bad_filter_name_the_key(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", _rows(3))
    cfg = TrainDataConfig(path=path)  # default filters need status/correct columns
    with pytest.raises(D.TrainDataError, match=r"data.filters\[0\].*data.filters=\[\]"):
        D.apply_filters(D.read_rows(cfg), cfg)
    cfg = TrainDataConfig(path=path, response_field="solution", filters=[])
    with pytest.raises(D.TrainDataError, match="data.response_field='solution'"):
        D.apply_filters(D.read_rows(cfg), cfg)
    with pytest.raises(D.TrainDataError, match="no such file"):
        D.read_rows(TrainDataConfig(path=str(tmp_path / "missing.jsonl")))


def test_generation_folder_reads_manifest_shards_and_checks_fingerprint(tmp_path):
    from gen_ssd_ray.generate.output import ShardWriter

    out = tmp_path / "gen"
    base = {"status": "completed", "correct": True, "trajectory_index": 0, "config_fingerprint": "aaa"}
    with ShardWriter(out, fingerprint="aaa", config_yaml="x: 1\n", shard_size=2) as w:
        for i, r in enumerate(_rows(3)):
            w.add(f"p{i}", [{**base, **r, "problem_id": f"p{i}", "gold_answer": "1"}])
    (out / ".tmp-part-99999.parquet").write_bytes(b"half written")  # ignored: not in the manifest
    cfg = TrainDataConfig(path=str(out))
    df, _ = D.apply_filters(D.read_rows(cfg), cfg)
    assert sorted(df["problem_id"]) == ["p0", "p1", "p2"]
    with pytest.raises(D.TrainDataError, match="different generation config"):
        D.read_rows(TrainDataConfig(path=str(out), expect_fingerprint="bbb"))

    mixed = tmp_path / "mixed.jsonl"
    _jsonl(mixed, _rows(2, config_fingerprint=lambda i: f"fp{i}"))
    with pytest.raises(D.TrainDataError, match="mixes rows of 2 generation configs"):
        D.read_rows(TrainDataConfig(path=str(mixed), filters=[]))


def test_embedded_gsm8k_reads():
    cfg = TrainDataConfig(path="embedded:gsm8k/train", response_field="answer", filters=[], limit=5)
    df, steps = D.apply_filters(D.read_rows(cfg), cfg)
    assert len(df) == 5 and steps[0].before == 7473


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_loss_only_on_response_in_chat_template(tok):
    prompt = PromptConfig()
    p_ids, r_ids = render_example(tok, prompt, "What is 2+2?", "2 + 2 = 4\n#### 4")
    full = tok.apply_chat_template(
        [
            {"role": "user", "content": prompt.instruction.replace("{question}", "What is 2+2?")},
            {"role": "assistant", "content": "2 + 2 = 4\n#### 4"},
        ],
        tokenize=False,
    )
    assert tok.decode(p_ids + r_ids) == full
    assert tok.decode(p_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(r_ids).startswith("2 + 2 = 4") and tok.eos_token_id in r_ids  # learns to stop

    ex = D.Examples(
        tokens=np.asarray(p_ids + r_ids, np.int32),
        offsets=np.array([0, len(p_ids) + len(r_ids)]),
        prompt_lens=np.array([len(p_ids)], np.int32),
    )
    for packing in (True, False):
        b = D.collate(ex, [0], packing, pad_id=0)
        labels = b["labels"][0].tolist()
        assert labels[: len(p_ids)] == [D.IGNORE_INDEX] * len(p_ids)
        assert labels[len(p_ids) :] == r_ids


def test_tokenize_drops_too_long(tok):
    import pandas as pd

    df = pd.DataFrame(_rows(4))
    df.loc[3, "response"] = "word " * 400
    cfg = TrainDataConfig(path="x", filters=[])
    ex, rep = D.tokenize(df, tok, cfg, PromptConfig(), max_seq_len=256)
    assert rep.examples == 3 and rep.dropped_too_long == 1 and len(ex) == 3
    assert ex.response_tokens == int((ex.lengths - ex.prompt_lens).sum()) > 0


def test_packing_plan_is_deterministic_complete_and_dense():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=300)
    plan = D.plan_epoch(lengths, epoch=0, seed=7, micro_batch_tokens=1024, packing=True)
    assert plan == D.plan_epoch(lengths, epoch=0, seed=7, micro_batch_tokens=1024, packing=True)
    assert plan != D.plan_epoch(lengths, epoch=1, seed=7, micro_batch_tokens=1024, packing=True)
    assert sorted(i for mb in plan for i in mb) == list(range(300))  # every example exactly once
    assert all(sum(int(lengths[i]) for i in mb) <= 1024 for mb in plan)
    stats = D.batch_stats(lengths, plan, 1024, packing=True)
    assert stats["nonpad_frac"] == 1.0 and stats["fill_frac"] >= 0.95

    unpacked = D.plan_epoch(lengths, 0, 7, 1024, packing=False)
    assert sorted(i for mb in unpacked for i in mb) == list(range(300))
    assert all(len(mb) * max(int(lengths[i]) for i in mb) <= 1024 for mb in unpacked)
    assert D.batch_stats(lengths, unpacked, 1024, packing=False)["nonpad_frac"] >= 0.9  # length-grouped


def test_step_batches_cover_the_epoch_across_ranks():
    plan = [[i] for i in range(10)]
    world, accum = 2, 2
    spe = D.steps_per_epoch(len(plan), world, accum)
    assert spe == 3
    seen = [
        mb[0]
        for s in range(spe)
        for r in range(world)
        for mb in D.step_micro_batches(plan, s, r, world, accum)
    ]
    assert set(seen) == set(range(10)) and len(seen) == 12  # the last step wraps to the first two
    assert D.step_micro_batches(plan, 1, 1, world, accum) == [[6], [7]]


@pytest.mark.integration
def test_packed_rows_do_not_attend_across_examples(tiny_model, tok):
    """The packed loss equals the sum of each example's loss computed alone, and the padded batch's."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM

    cfg = TrainDataConfig(path="x", filters=[])
    ex, _ = D.tokenize(pd.DataFrame(_rows(5)), tok, cfg, PromptConfig(), 512)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    one = torch.tensor(1.0)
    with torch.no_grad():
        packed = model(
            **D.collate(ex, [0, 1, 2, 3, 4], True, 0), num_items_in_batch=one, use_cache=False
        ).loss
        alone = sum(
            model(**D.collate(ex, [i], True, 0), num_items_in_batch=one, use_cache=False).loss
            for i in range(5)
        )
        padded = model(
            **D.collate(ex, [0, 1, 2, 3, 4], False, tok.pad_token_id), num_items_in_batch=one, use_cache=False
        ).loss
    assert torch.allclose(packed, alone, rtol=1e-4) and torch.allclose(padded, alone, rtol=1e-4)


def test_cpu_bf16_detection_reads_the_flags():
    from gen_ssd_ray.train.run import cpu_has_native_bf16

    assert not cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert cpu_has_native_bf16("flags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_tile amx_bf16\n")
    assert cpu_has_native_bf16("Processor\t: AArch64\n")  # no flags line: nothing claimed


@pytest.mark.parametrize(
    "attack",
    [
        "@Path({target!r}).write_text('x') > 0",
        "status.map(lambda s: open({target!r}, 'w').write('x')) == 1",
        "__import__('pathlib').Path({target!r}).write_text('x') > 0",
    ],
)
def test_filter_attacks_never_run(tmp_path, attack):
    """A filter that would write a file (pandas `query` ran it, in this module's scope) is refused, and
    the file is not written."""
    target = str(tmp_path / "pwned")
    expr = attack.format(target=target)
    cfg = TrainDataConfig(path=_jsonl(tmp_path / "g.jsonl", _rows(3, status="completed")), filters=[expr])
    with pytest.raises(D.TrainDataError, match=r"data.filters\[0\].*not allowed"):
        D.apply_filters(D.read_rows(cfg), cfg)
    assert not (tmp_path / "pwned").exists()


def test_generation_folder_reads_only_the_needed_columns(tmp_path):
    """The nested `chunks`, token ids and prompts are never loaded: only the question, the response, the
    columns the filters use, the fingerprint and the ids (at 1M rows, every column took ~31 GB)."""
    from gen_ssd_ray.generate.output import ShardWriter

    out = tmp_path / "gen"
    base = {"status": "completed", "correct": True, "trajectory_index": 0, "config_fingerprint": "aaa"}
    chunk = {
        "candidates": [{"text": "x", "num_tokens": 1, "finish_reason": "length", "ppl": 1.0}],
        "chosen": 0,
    }
    with ShardWriter(out, fingerprint="aaa", config_yaml="x: 1\n", shard_size=2) as w:
        for i, r in enumerate(_rows(3)):
            row = {
                **base,
                **r,
                "problem_id": f"p{i}",
                "prompt_text": "p",
                "chunks": [chunk],
                "selected": i != 1,
            }
            w.add(f"p{i}", [{**row, "response_token_ids": [1, 2, 3], "student_ppl": 1.5}])
    for filters, extra in (
        [["selected == True"], {"selected"}],
        [[], set()],
        [["len(prompt_text) > 0"], {"prompt_text"}],
    ):
        cfg = TrainDataConfig(path=str(out), filters=filters)
        df = D.read_rows(cfg)
        ids = {"problem_id", "trajectory_index", "config_fingerprint"}
        assert set(df.columns) == {"question", "response"} | ids | extra
        assert "chunks" in df.attrs["source_columns"]
    # A filter over a column the source lacks names the source's columns.
    cfg = TrainDataConfig(path=str(out), filters=["style != 'x'"])
    with pytest.raises(D.TrainDataError, match=r"data.filters\[0\].*no column 'style'.*'chunks'"):
        D.apply_filters(D.read_rows(cfg), cfg)


def test_read_filtered_one_file_at_a_time_equals_read_then_filter(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "parts"
    folder.mkdir()
    rows = _rows(30, status=lambda i: "completed" if i % 3 else "pruned", correct=lambda i: i % 2 == 0)
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(rows[10 * k : 10 * (k + 1)]), folder / f"part-{k}.parquet")
    for limit in (None, 7):
        cfg = TrainDataConfig(path=str(folder), limit=limit)
        want_df, want_steps = D.apply_filters(D.read_rows(cfg), cfg)
        df, steps, read = D.read_filtered(cfg)
        assert read == 30 and steps == want_steps
        assert df["question"].tolist() == want_df["question"].tolist()
    cfg = TrainDataConfig(path=str(folder), filters=["status == 'nope'"])
    with pytest.raises(D.EmptyTrainingSetError, match="read 30 rows"):
        D.read_filtered(cfg)
