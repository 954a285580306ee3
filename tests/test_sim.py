"""The simulated engines (gen_ssd_ray.sim) without Ray: profiles, the sim teacher (determinism, finish
reasons, prefix cache, slots and KV admission, time, faults) and the sim scorer (group cache, LRU,
memory, scores, faults). Clocks run 10^4 times faster than simulated time, so each test takes
milliseconds; expected numbers are computed by hand from the module docstrings."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
import time

import pytest
import yaml

from gen_ssd_ray.common.config import EngineConfig, FaultSpec, SimConfig
from gen_ssd_ray.core.types import Candidate, ExpandRequest, ScoreRequest
from gen_ssd_ray.engines.base import EngineContext, EngineDead, Generation, ScorerSpec
from gen_ssd_ray.generate.config import StudentConfig
from gen_ssd_ray.sim.profile import load_profile
from gen_ssd_ray.sim.scorer import SimOutOfMemory, SimScorer
from gen_ssd_ray.sim.teacher import SimTeacher

EOS = 2
COMPRESSION = 1e4
BLOCK = 16

TEACHER = {
    "step_base_s": 0.01,
    "step_per_seq_s": 0.001,
    "step_per_ctx_token_s": 1e-5,
    "prefill_per_token_s": 1e-4,
    "kv_capacity_tokens": 100_000,
    "block_size": BLOCK,
    "eos_prob": 0.0,
    "load_s": 60.0,
}
SCORER = {
    "call_base_s": 0.001,
    "per_token_s": 1e-5,
    "memory_tokens": 1_000_000,
    "nll_mean": 0.7,
    "nll_spread": 0.3,
    "load_s": 20.0,
}


def arun(fn):
    """Run an async test body in a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


@pytest.fixture
def model(tmp_path) -> str:
    """A model folder with only the config.json the sim engines read (EOS id and vocabulary)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"eos_token_id": EOS, "vocab_size": 1000}))
    return str(path)


def write_profile(
    tmp_path, name: str = "test", teacher: dict | None = None, scorer: dict | None = None
) -> str:
    path = tmp_path / f"{name}.yaml"
    data = {"source": "hand-written for tests", "teacher": {**TEACHER, **(teacher or {})}}
    data["scorer"] = {**SCORER, **(scorer or {})}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def sim(profile: str = "h100", faults=(), epoch=None) -> SimConfig:
    return SimConfig(
        profile=profile, time_compression=COMPRESSION, model_load=False, epoch=epoch, faults=list(faults)
    )


def teacher(model: str, profile: str = "h100", *, faults=(), restarted=False, **cfg) -> SimTeacher:
    cfg = {"max_num_seqs": 128, "max_model_len": 2048, **cfg}
    engine_cfg = EngineConfig(model=model, backend="sim", **cfg)
    return SimTeacher(engine_cfg, EngineContext(0, sim(profile, faults), restarted=restarted))


def request(key: str, prompt, n: int = 1, max_tokens: int = 16, seed: int | None = 0) -> ExpandRequest:
    return ExpandRequest(key, tuple(prompt), n, max_tokens, seed, temperature=1.0, top_p=1.0)


def tokens(start: int, count: int) -> tuple[int, ...]:
    """`count` distinct ordinary token ids (never EOS), from `start` on."""
    return tuple(range(start, start + count))


def assert_nothing_held(engine: SimTeacher) -> None:
    """Idle: no running request holds a block, and the free cache fits the KV capacity."""
    assert engine.used_blocks == 0 and not engine.in_use and not engine.running
    assert len(engine.cache) <= engine.total_blocks


async def settle(engine: SimTeacher, timeout_s: float = 1.0) -> None:
    """Wait until the engine has nothing running or waiting (cancelled requests are dropped by its
    loop at the end of a macro-step)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (engine.running or engine.waiting) and loop.time() < deadline:
        await asyncio.sleep(0.001)


# ---- profiles --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["h100", "cpu"])
def test_named_profiles_load_with_their_source(name):
    p = load_profile(name)
    assert p.name == name and p.source
    assert p.teacher.kv_capacity_tokens > 0 and p.teacher.block_size > 0
    assert 0 < p.teacher.eos_prob < 1 and p.scorer.memory_tokens > 0


def test_profile_from_a_path(tmp_path):
    p = load_profile(write_profile(tmp_path, "mine", teacher={"eos_prob": 0.25}))
    assert p.name == "mine" and p.teacher.eos_prob == 0.25 and p.scorer.nll_mean == 0.7


def test_missing_profile_names_it_and_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"no profile 'nope'.*h100"):
        load_profile("nope")
    missing = str(tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match="absent.yaml"):
        load_profile(missing)


def test_unknown_key_names_the_file_and_the_key(tmp_path):
    path = write_profile(tmp_path, teacher={"step_per_token_s": 1.0})
    with pytest.raises(ValueError, match=r"test\.yaml: teacher: unknown keys \['step_per_token_s'\]"):
        load_profile(path)


def test_missing_key_or_section_names_the_file(tmp_path):
    path = tmp_path / "short.yaml"
    data = {"source": "x", "teacher": {k: v for k, v in TEACHER.items() if k != "kv_capacity_tokens"}}
    path.write_text(yaml.safe_dump({**data, "scorer": SCORER}))
    with pytest.raises(ValueError, match=r"short\.yaml: teacher: missing keys \['kv_capacity_tokens'\]"):
        load_profile(str(path))
    path.write_text(yaml.safe_dump({"source": "x", "teacher": TEACHER}))
    with pytest.raises(ValueError, match=r"short\.yaml: missing the 'scorer' section"):
        load_profile(str(path))
    path.write_text(yaml.safe_dump({"source": "x", "teacher": TEACHER, "scorer": 5}))
    with pytest.raises(ValueError, match=r"short\.yaml: scorer: must be a mapping"):
        load_profile(str(path))
    path.write_text("source: [unclosed")
    with pytest.raises(ValueError, match=r"short\.yaml: not valid YAML"):
        load_profile(str(path))


# ---- teacher: sampling ---------------------------------------------------------------------------


@arun
async def test_same_seed_same_candidates_in_fresh_engines(model):
    req = request("a", tokens(100, 30), n=4, max_tokens=24, seed=7)
    first = (await teacher(model).expand([req]))[0]
    again = (await teacher(model).expand([req]))[0]
    other = (await teacher(model).expand([request("a", tokens(100, 30), n=4, max_tokens=24, seed=8)]))[0]
    assert first == again and first.key == "a" and len(first.candidates) == 4
    assert len({c.token_ids for c in first.candidates}) == 4  # the n samples differ from each other
    assert [c.token_ids for c in first.candidates] != [c.token_ids for c in other.candidates]
    assert all(100 <= t < 1000 for c in first.candidates for t in c.token_ids)


@arun
async def test_high_eos_prob_ends_every_candidate_with_eos(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path, teacher={"eos_prob": 0.5}))
    (result,) = await engine.expand([request("a", tokens(100, 20), n=16, max_tokens=64, seed=3)])
    for c in result.candidates:
        assert c.finish_reason == "stop" and c.finished
        assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
        assert 1 <= len(c.token_ids) <= 64
    assert sum(len(c.token_ids) for c in result.candidates) < 16 * 10  # mean length 1 / 0.5 = 2


@arun
async def test_zero_eos_prob_runs_every_candidate_to_max_tokens(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path))
    (result,) = await engine.expand([request("a", tokens(100, 20), n=8, max_tokens=40, seed=3)])
    for c in result.candidates:
        assert c.finish_reason == "length" and len(c.token_ids) == 40 and EOS not in c.token_ids
    assert engine.stats["generated_tokens"] == 8 * 40


# ---- teacher: prefix cache -----------------------------------------------------------------------


@arun
async def test_prefix_cache_hits_leading_computed_blocks(model, tmp_path):
    """vLLM semantics: a finished sequence leaves the full blocks of its computed tokens (prompt plus
    all sampled tokens but the last, which is never fed back); a prompt hits its leading cached full
    blocks, at most (len - 1) // block of them (the last token is always recomputed)."""
    engine = teacher(model, write_profile(tmp_path))
    p = tokens(100, 40)  # 2 full blocks + 8 tokens
    (cold,) = await engine.expand([request("p", p, n=2, max_tokens=20)])
    assert (cold.prompt_tokens, cold.cached_prompt_tokens) == (40, 0)
    (again,) = await engine.expand([request("p", p, n=2, max_tokens=20, seed=1)])
    assert again.cached_prompt_tokens == 32  # (40 - 1) // 16 = 2 blocks
    child = p + cold.candidates[0].token_ids  # 60 tokens, 59 computed: 3 full blocks
    (hit,) = await engine.expand([request("c", child, n=1, max_tokens=20)])
    assert (hit.prompt_tokens, hit.cached_prompt_tokens) == (60, 48)
    stranger = tokens(500, 60)
    (miss,) = await engine.expand([request("s", stranger, n=1, max_tokens=20)])
    assert miss.cached_prompt_tokens == 0
    assert engine.stats["cached_prompt_tokens"] == 32 + 48


@arun
async def test_last_sampled_token_is_not_cached(model, tmp_path):
    """A candidate that fills its last block exactly (40 + 24 = 64 tokens): only 63 tokens were
    computed, so its 4th block is not cached, even for a prompt that extends past it."""
    engine = teacher(model, write_profile(tmp_path))
    p = tokens(100, 40)
    (first,) = await engine.expand([request("p", p, n=1, max_tokens=24)])
    child = p + first.candidates[0].token_ids
    assert len(child) == 64
    (longer,) = await engine.expand([request("l", child + tokens(600, 10), n=1, max_tokens=8)])
    assert longer.cached_prompt_tokens == 48
    (exact,) = await engine.expand([request("e", child, n=1, max_tokens=8)])
    assert exact.cached_prompt_tokens == 48


@arun
async def test_concurrent_requests_sharing_a_prefix_both_hit(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path))
    p = tokens(100, 48)
    await engine.expand([request("warm", p, n=1, max_tokens=1)])
    a, b = await engine.expand(
        [request("a", p + tokens(300, 20), max_tokens=30), request("b", p + tokens(400, 20), max_tokens=30)]
    )
    assert engine.stats["peak_running_seqs"] == 2  # they ran together
    assert a.cached_prompt_tokens == b.cached_prompt_tokens == 48


@arun
async def test_blocks_in_use_are_not_evicted(model, tmp_path):
    """KV of 10 blocks. A (7 blocks: 3 prompt, 2 of them hits, + 4 for 64 new tokens) holds the
    warm prefix P while it runs, so P stays cached under pressure and C, which shares it, hits; B (4
    blocks) does not fit beside A (7 + 4 > 10) and waits, and C waits behind it (FIFO)."""
    engine = teacher(model, write_profile(tmp_path, teacher={"kv_capacity_tokens": 10 * BLOCK}))
    p = tokens(100, 32)
    await engine.expand([request("warm", p, n=1, max_tokens=1)])
    a, b, c = await engine.expand(
        [
            request("a", p + tokens(300, 16), max_tokens=64),
            request("b", tokens(500, 48), max_tokens=16),
            request("c", p + tokens(400, 16), max_tokens=16),
        ]
    )
    assert (a.cached_prompt_tokens, b.cached_prompt_tokens, c.cached_prompt_tokens) == (32, 0, 32)
    assert engine.stats["steps"] == 1 + 64 + 16  # warm-up, A alone, then B and C together
    assert_nothing_held(engine)


@arun
async def test_cancelled_request_frees_its_blocks(model, tmp_path):
    profile = write_profile(tmp_path, teacher={"kv_capacity_tokens": 10 * BLOCK})
    engine = teacher(model, profile, max_model_len=300_000)
    p = tokens(100, 32)
    await engine.expand([request("warm", p, max_tokens=1)])
    # ~2000 simulated seconds of decode (200 ms here): the caller gives up after 5 ms.
    long = request("long", p + tokens(300, 16), max_tokens=200_000)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(engine.expand([long]), 0.005)
    (after,) = await asyncio.wait_for(engine.expand([request("b", p + tokens(400, 16), max_tokens=8)]), 1.0)
    assert after.cached_prompt_tokens == 32  # the prefix the cancelled request shared is cached again
    assert_nothing_held(engine)
    assert engine.stats["generated_tokens"] == 1 + 8


@arun
async def test_kv_accounting_holds_under_shared_prefixes_and_pressure(model, tmp_path):
    """Waves of requests over a few shared prefixes, a KV cache of 40 blocks, some callers giving up:
    the blocks held plus the free cached ones never exceed the capacity, and an idle engine holds none."""
    rng = random.Random(0)
    engine = teacher(
        model, write_profile(tmp_path, teacher={"kv_capacity_tokens": 40 * BLOCK}), max_num_seqs=6
    )
    roots = [tokens(100 + 1000 * i, 16 * (1 + i)) for i in range(3)]
    worst = 0

    async def monitor():
        nonlocal worst
        while True:
            assert engine.used_blocks >= 0 and all(v > 0 for v in engine.in_use.values())
            worst = max(worst, engine.used_blocks + len(engine.cache))
            await asyncio.sleep(0)

    watch = asyncio.get_running_loop().create_task(monitor())
    for wave in range(8):
        reqs = [
            request(
                f"{wave}/{j}",
                rng.choice(roots) + tokens(5000 + 50 * j, rng.randrange(1, 40)),
                n=rng.randrange(1, 4),
                max_tokens=rng.randrange(1, 48),
                seed=wave * 100 + j,
            )
            for j in range(12)
        ]
        calls = [asyncio.ensure_future(engine.expand([r])) for r in reqs]
        await asyncio.sleep(0.0005)
        for call in calls[::5]:
            call.cancel()
        done = await asyncio.gather(*calls, return_exceptions=True)
        for r, d in zip(reqs, done, strict=True):
            if isinstance(d, asyncio.CancelledError):
                continue
            (result,) = d
            assert result.cached_prompt_tokens <= (len(r.prompt_token_ids) - 1) // BLOCK * BLOCK
            assert all(len(c.token_ids) == r.max_tokens for c in result.candidates)
        await settle(engine)  # the engine loop drops the cancelled requests
        assert_nothing_held(engine)
    watch.cancel()
    assert worst <= engine.total_blocks
    assert engine.stats["cached_prompt_tokens"] > 0


@arun
async def test_reset_prefix_cache_empties_it(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path))
    p = tokens(100, 40)
    await engine.expand([request("p", p)])
    await engine.reset_prefix_cache()
    (after,) = await engine.expand([request("p", p)])
    assert after.cached_prompt_tokens == 0
    (again,) = await engine.expand([request("p", p)])
    assert again.cached_prompt_tokens == 32


# ---- teacher: admission ----------------------------------------------------------------------------


@arun
async def test_slots_limit_the_batch(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path), max_num_seqs=4)
    reqs = [request(k, tokens(100 + 100 * i, 20), n=4, max_tokens=32) for i, k in enumerate("ab")]
    results = await engine.expand(reqs)
    assert [r.key for r in results] == ["a", "b"]
    assert engine.stats["peak_running_seqs"] == 4
    assert engine.stats["steps"] == 2 * 32  # one after the other
    assert engine.capacity() == {"kv_tokens": 100_000, "max_num_seqs": 4}


@arun
async def test_both_requests_run_together_when_they_fit(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path), max_num_seqs=8)
    reqs = [request(k, tokens(100 + 100 * i, 20), n=4, max_tokens=32) for i, k in enumerate("ab")]
    await engine.expand(reqs)
    assert engine.stats["peak_running_seqs"] == 8 and engine.stats["steps"] == 32


@arun
async def test_kv_capacity_too_small_for_two_serializes_them(model, tmp_path):
    # Each request needs 1 prompt block + 2 blocks for 32 new tokens = 3; the cache has 4.
    engine = teacher(
        model, write_profile(tmp_path, teacher={"kv_capacity_tokens": 4 * BLOCK}), max_num_seqs=8
    )
    reqs = [request(k, tokens(100 + 100 * i, 16), n=1, max_tokens=32) for i, k in enumerate("ab")]
    results = await engine.expand(reqs)
    assert all(len(r.candidates[0].token_ids) == 32 for r in results)
    assert engine.stats["peak_running_seqs"] == 1 and engine.stats["steps"] == 2 * 32


@arun
async def test_prompt_too_long_is_a_value_error_or_an_error_generation(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path), max_model_len=64)
    ok = request("ok", tokens(100, 48), max_tokens=16)  # 48 + 16 = 64 fits exactly
    bad = request("bad", tokens(100, 49), max_tokens=16)
    with pytest.raises(ValueError, match="max_model_len 64"):
        await engine.expand([bad])
    (fine,) = await engine.expand([ok])
    assert len(fine.candidates[0].token_ids) == 16
    gen_bad, gen_ok = await engine.generate([bad, ok])
    assert isinstance(gen_bad, Generation) and gen_bad.samples == ()
    assert gen_bad.error.startswith("ValueError") and "max_model_len 64" in gen_bad.error
    assert gen_ok.error is None and len(gen_ok.samples) == 1
    assert gen_ok.samples[0].token_ids == fine.candidates[0].token_ids
    assert gen_ok.samples[0].finish_reason == "length"


# ---- teacher: time ------------------------------------------------------------------------------


def expected_busy_s(prompt: int, n: int, max_tokens: int, cached: int = 0) -> float:
    """The profile formula for one request whose n sequences all run to max_tokens: the uncached
    prompt's prefill, then decode steps k = 0.. max_tokens-1 over n sequences of context prompt + k."""
    t = TEACHER
    steps = sum(
        t["step_base_s"] + t["step_per_seq_s"] * n + t["step_per_ctx_token_s"] * n * (prompt + k)
        for k in range(max_tokens)
    )
    return (prompt - cached) * t["prefill_per_token_s"] + steps


@pytest.mark.parametrize(("n", "max_tokens"), [(1, 50), (3, 50), (4, 7)])
@arun
async def test_busy_time_follows_the_profile_formula(model, tmp_path, n, max_tokens):
    engine = teacher(model, write_profile(tmp_path))
    await engine.expand([request("a", tokens(100, 40), n=n, max_tokens=max_tokens)])
    assert engine.stats["sim_busy_s"] == pytest.approx(expected_busy_s(40, n, max_tokens), rel=1e-9)
    assert engine.progress() == engine.stats["steps"] == max_tokens


@arun
async def test_busy_time_grows_with_batch_and_context(model, tmp_path):
    def busy(n, prompt):
        return expected_busy_s(prompt, n, 32)

    times = {}
    for n, prompt in [(1, 32), (4, 32), (1, 512)]:
        engine = teacher(model, write_profile(tmp_path))
        await engine.expand([request("a", tokens(100, prompt), n=n, max_tokens=32)])
        times[n, prompt] = engine.stats["sim_busy_s"]
        assert times[n, prompt] == pytest.approx(busy(n, prompt), rel=1e-9)
    assert times[1, 32] < times[4, 32] and times[1, 32] < times[1, 512]


@arun
async def test_cached_prompt_tokens_are_not_prefilled(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path))
    p = tokens(100, 40)
    await engine.expand([request("p", p, max_tokens=10)])
    before = engine.stats["sim_busy_s"]
    await engine.expand([request("p", p, max_tokens=10, seed=1)])
    expected = expected_busy_s(40, 1, 10, cached=32)
    assert engine.stats["sim_busy_s"] - before == pytest.approx(expected, rel=1e-9)


# ---- teacher: faults ----------------------------------------------------------------------------


def fault(kind: str, target: str = "teacher", **kw) -> FaultSpec:
    return FaultSpec(target=target, index=0, kind=kind, at_s=kw.pop("at_s", 0.0), **kw)


@arun
async def test_dead_engine_raises_engine_dead(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path), faults=[fault("dead")])
    await engine.check_health()  # the schedule counts from the first request
    with pytest.raises(EngineDead):
        await engine.expand([request("a", tokens(100, 20))])
    with pytest.raises(EngineDead):
        await engine.check_health()
    with pytest.raises(EngineDead):
        await engine.generate([request("a", tokens(100, 20))])  # not an error row
    engine.shutdown()


@arun
async def test_dead_engine_fails_the_requests_it_holds(model, tmp_path):
    # Dies 500 simulated seconds (50 ms) after its first request, which needs over 2000 s of decode.
    faults = [fault("dead", at_s=500.0)]
    engine = teacher(model, write_profile(tmp_path), faults=faults, max_model_len=300_000)
    with pytest.raises(EngineDead):
        await asyncio.wait_for(engine.expand([request("a", tokens(100, 20), max_tokens=200_000)]), 5.0)
    # Normally it was decoding when it died; on a throttled host it may still have been waiting.
    assert engine.progress() < 200_000 and engine.stats["generated_tokens"] == 0
    with pytest.raises(EngineDead):
        await engine.check_health()
    assert_nothing_held(engine)
    engine.shutdown()


@arun
async def test_with_an_epoch_the_schedule_counts_from_it(model, tmp_path):
    profile = write_profile(tmp_path)
    config = EngineConfig(model=model, backend="sim")
    now = time.time()
    dead_now = SimTeacher(config, EngineContext(0, sim(profile, [fault("dead")], epoch=now)))
    with pytest.raises(EngineDead):
        await dead_now.check_health()  # no request needed
    # One wall second ago is 10^4 simulated seconds ago: a fault from 100 s to 1100 s is over.
    over = [fault("dead", at_s=100.0, duration_s=1000.0)]
    revived = SimTeacher(config, EngineContext(0, sim(profile, over, epoch=now - 1.0)))
    (result,) = await revived.expand([request("a", tokens(100, 20), max_tokens=4)])
    assert len(result.candidates[0].token_ids) == 4
    dead_now.shutdown()


@arun
async def test_restarted_engine_has_no_faults(model, tmp_path):
    faults = [fault("dead"), fault("hung"), fault("slow")]
    engine = teacher(model, write_profile(tmp_path), faults=faults, restarted=True)
    (result,) = await asyncio.wait_for(engine.expand([request("a", tokens(100, 20), max_tokens=10)]), 1.0)
    assert len(result.candidates[0].token_ids) == 10
    await engine.check_health()
    assert engine.stats["sim_busy_s"] == pytest.approx(expected_busy_s(20, 1, 10), rel=1e-9)


@arun
async def test_other_engines_faults_do_not_apply(model, tmp_path):
    faults = [
        FaultSpec(target="teacher", index=1, kind="dead"),
        FaultSpec(target="scorer", index=0, kind="dead"),
    ]
    engine = teacher(model, write_profile(tmp_path), faults=faults)
    (result,) = await engine.expand([request("a", tokens(100, 20), max_tokens=10)])
    assert len(result.candidates[0].token_ids) == 10


@arun
async def test_slow_engine_takes_factor_times_as_long(model, tmp_path):
    profile = write_profile(tmp_path)
    req = request("a", tokens(100, 40), n=2, max_tokens=30)
    normal = teacher(model, profile)
    slow = teacher(model, profile, faults=[fault("slow", factor=4.0)])
    assert await normal.expand([req]) == await slow.expand([req])
    assert slow.stats["sim_busy_s"] == pytest.approx(4 * normal.stats["sim_busy_s"], rel=1e-9)


@arun
async def test_hung_engine_never_answers_and_makes_no_progress(model, tmp_path):
    engine = teacher(model, write_profile(tmp_path), faults=[fault("hung")])
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(engine.expand([request("a", tokens(100, 20), max_tokens=4)]), 0.05)
    assert engine.progress() == 0
    await asyncio.sleep(0.02)
    assert engine.progress() == 0 and engine.stats["generated_tokens"] == 0
    engine.shutdown()


@arun
async def test_hang_with_a_duration_ends(model, tmp_path):
    # 200 simulated seconds at 10^4 compression: 20 ms of wall clock.
    engine = teacher(model, write_profile(tmp_path), faults=[fault("hung", duration_s=200.0)])
    loop = asyncio.get_running_loop()
    start = loop.time()
    (result,) = await asyncio.wait_for(engine.expand([request("a", tokens(100, 20), max_tokens=4)]), 1.0)
    assert loop.time() - start >= 0.015 and len(result.candidates[0].token_ids) == 4
    assert engine.progress() == 4


# ---- scorer ---------------------------------------------------------------------------------------


def scorer(model: str, profile: str, *, faults=(), restarted=False, batch_tokens: int = 8192) -> SimScorer:
    student = StudentConfig(model=model, backend="sim", batch_tokens=batch_tokens)
    spec = ScorerSpec(student, teacher_model=model, sim=sim(profile, faults))
    context = EngineContext(0, sim(profile, faults), restarted=restarted) if restarted else None
    return SimScorer(spec, context)


PROMPT = tokens(1000, 10)


def cands(start: int, k: int = 3, length: int = 5) -> tuple[Candidate, ...]:
    return tuple(Candidate(tokens(start + 10 * j, length), "", "length") for j in range(k))


def score_req(group: str, prefix=(), candidates=None, key: str = "n") -> ScoreRequest:
    return ScoreRequest(key, group, PROMPT, tuple(prefix), "", candidates or cands(100))


@arun
async def test_scorer_reuses_a_group_context_then_release_drops_it(model, tmp_path):
    s = scorer(model, write_profile(tmp_path))
    first = cands(100)
    (r1,) = await s.score([score_req("g", (), first)])
    assert r1.tokens_processed == 10 + 15 and r1.num_tokens == (5, 5, 5) and r1.tokens_scored == 15
    assert s.cache.tokens == 10 + 15  # the context once, each candidate's own tokens
    prefix = first[1].token_ids
    second = cands(200)
    (r2,) = await s.score([score_req("g", prefix, second)])
    assert r2.tokens_processed == 1 + 15  # context cached: its last token, then the new candidates
    assert s.cache.tokens == 10 + 5 + 1 + 15  # the losing candidates are dropped
    prefix += second[0].token_ids
    (r3,) = await s.score([score_req("g", prefix, cands(300))])
    assert r3.tokens_processed == 16
    assert s.stats["hit_requests"] == 2 and s.stats["requests"] == s.progress() == 3
    await s.release(["g"])
    assert s.cache.tokens == 0
    (r4,) = await s.score([score_req("g", prefix, cands(300))])
    assert r4.tokens_processed == 10 + 10 + 15  # prompt + prefix again, then the candidates
    assert s.stats["tokens_processed"] == 25 + 16 + 16 + 35 and s.stats["tokens_scored"] == 60


@arun
async def test_scorer_misses_a_context_it_did_not_score(model, tmp_path):
    s = scorer(model, write_profile(tmp_path))
    await s.score([score_req("g", (), cands(100))])
    (other_group,) = await s.score([score_req("h", cands(100)[0].token_ids, cands(200))])
    assert other_group.tokens_processed == 10 + 5 + 15
    (not_a_candidate,) = await s.score([score_req("g", tokens(900, 5), cands(200))])
    assert not_a_candidate.tokens_processed == 5 + 15  # only the prompt was cached


@arun
async def test_scorer_evicts_the_most_recently_scored_trajectory_that_is_not_being_scored(model, tmp_path):
    # Budget 100 tokens. A forward needs its padded past + query KV + the query KV kept.
    s = scorer(model, write_profile(tmp_path, scorer={"memory_tokens": 100}))
    await s.score([score_req("a", (), cands(100))])  # a caches 25
    await s.score([score_req("b", (), cands(100))])  # b caches 25
    (a_hit,) = await s.score([score_req("a", cands(100)[0].token_ids, cands(200))])
    assert a_hit.tokens_processed == 16  # 50 cached + (14 + 16) + 16 = 96 fits: nothing evicted
    (b_hit,) = await s.score([score_req("b", cands(100)[0].token_ids, cands(200))])
    assert b_hit.tokens_processed == 16  # 56 + 46 > 100: a, scored last (waiting for its teacher), goes
    assert s.stats["evicted_groups"] == 1 and "a" not in s.cache and "b" in s.cache
    (a_miss,) = await s.score([score_req("a", cands(100)[0].token_ids + cands(200)[0].token_ids, cands(300))])
    assert a_miss.tokens_processed == 20 + 15  # evicted: its context is run again
    assert s.cache.tokens <= 100


@arun
async def test_scorer_splits_a_batch_that_does_not_fit_and_fails_only_a_request_too_big(model, tmp_path):
    s = scorer(model, write_profile(tmp_path, scorer={"memory_tokens": 60}))
    await s.score([score_req("a")])  # 25 cached; its forward needed 50
    both = await s.score([score_req("b"), score_req("c")])  # together 100: split, each evicts the other
    assert [r.tokens_processed for r in both] == [25, 25] and s.stats["oom"] == 0
    assert s.stats["evicted_groups"] == 2 and s.cache.tokens <= 60
    big = ScoreRequest("big", "big", tokens(5000, 40), (), "", cands(100))  # 2 x (40 + 15) > 60
    calls = await asyncio.gather(s.score([big]), s.score([score_req("d")]), return_exceptions=True)
    assert isinstance(calls[0], SimOutOfMemory) and "search.max_new_tokens" in str(calls[0])
    assert calls[1][0].tokens_processed == 25 and s.stats["oom"] == 1


@arun
async def test_scorer_batches_concurrent_calls_within_batch_tokens(model, tmp_path):
    s = scorer(model, write_profile(tmp_path), batch_tokens=30)  # two calls of 15 candidate tokens
    out = await asyncio.gather(*(s.score([score_req(f"g{i}")]) for i in range(6)))
    assert [r.tokens_processed for (r,) in out] == [25] * 6
    assert s.stats["forwards"] == 3 and s.stats["requests"] == 6


@arun
async def test_scorer_nll_is_deterministic_per_candidate_and_spread_as_the_profile_says(model, tmp_path):
    profile = write_profile(tmp_path)
    many = tuple(Candidate(tokens(100 + 7 * j, 1 + j % 9), "", "length") for j in range(200))
    (r,) = await scorer(model, profile).score([score_req("g", (), many)])
    (again,) = await scorer(model, profile).score([score_req("x", tokens(5000, 30), many)])
    assert r.nll_sums == again.nll_sums and r.num_tokens == tuple(1 + j % 9 for j in range(200))
    logs = [math.log(r.ppl(i)) for i in range(200)]
    mean, spread = SCORER["nll_mean"], SCORER["nll_spread"]
    assert all(mean - spread - 1e-9 <= x <= mean + spread + 1e-9 for x in logs)
    assert min(logs) < mean - 0.8 * spread and max(logs) > mean + 0.8 * spread
    assert sum(logs) / len(logs) == pytest.approx(mean, abs=0.05)
    assert len(set(r.nll_sums)) > 150  # candidates differ


@arun
async def test_scorer_faults(model, tmp_path):
    profile = write_profile(tmp_path)
    dead = scorer(model, profile, faults=[fault("dead", target="scorer")])
    await dead.check_health()  # the schedule counts from the first request
    with pytest.raises(EngineDead):
        await dead.score([score_req("g")])
    with pytest.raises(EngineDead):
        await dead.check_health()
    restarted = scorer(model, profile, faults=[fault("dead", target="scorer")], restarted=True)
    (r,) = await restarted.score([score_req("g")])
    assert r.tokens_processed == 25
    await restarted.check_health()
    teacher_fault = scorer(model, profile, faults=[fault("dead")])
    await teacher_fault.score([score_req("g")])


@arun
async def test_hung_scorer_never_answers_and_makes_no_progress(model, tmp_path):
    s = scorer(model, write_profile(tmp_path), faults=[fault("hung", target="scorer")])
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(s.score([score_req("g")]), 0.05)
    await asyncio.sleep(0.02)
    assert s.progress() == 0 and s.stats["tokens_processed"] == 0


@arun
async def test_scorer_answers_again_when_a_hang_ends(model, tmp_path):
    # 1000 simulated seconds: 100 ms of wall clock. The cancelled call must not block the scorer; its
    # forward still ends after the hang and commits the cache (never left half-updated).
    s = scorer(model, write_profile(tmp_path), faults=[fault("hung", target="scorer", duration_s=1000.0)])
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(s.score([score_req("g")]), 0.005)
    assert s.progress() == 0
    (r,) = await asyncio.wait_for(s.score([score_req("g")]), 1.0)
    assert r.tokens_processed == 16 and s.progress() == 2


# ---- registry -----------------------------------------------------------------------------------


def test_registry_builds_both_sim_backends(model):
    from gen_ssd_ray.engines.base import ScorerBackend, TeacherBackend
    from gen_ssd_ray.engines.registry import build_scorer, build_teacher

    cfg = EngineConfig(model=model, backend="sim", max_num_seqs=4)
    t = build_teacher(cfg, EngineContext(0, sim()))
    assert isinstance(t, SimTeacher) and isinstance(t, TeacherBackend)
    assert t.capacity()["max_num_seqs"] == 4
    spec = ScorerSpec(StudentConfig(model=model, backend="sim"), teacher_model=model, sim=sim())
    s = build_scorer(spec)
    assert isinstance(s, SimScorer) and isinstance(s, ScorerBackend)
    with pytest.raises(ValueError, match=r"unknown teacher backend 'simm'.*'sim'"):
        build_teacher(EngineConfig(model=model, backend="simm"))


# ---- the health probe (`ping`) of the real actor classes over sim engines ---------------------------


@arun
async def test_ping_is_real_work_that_a_hung_teacher_fails_while_its_actor_answers(model, tmp_path):
    from gen_ssd_ray.engines.actors import TeacherEngine

    prof = write_profile(tmp_path)
    cfg = EngineConfig(model=model, backend="sim", max_num_seqs=8, max_model_len=2048)
    healthy = TeacherEngine(cfg, 0, 1, sim(prof))
    await asyncio.wait_for(healthy.ping(), 1.0)
    assert healthy.backends[0].progress() == 1 and healthy.calls == 0  # one step; not counted as work
    hung = TeacherEngine(cfg, 0, 1, sim(prof, [fault("hung")]))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(hung.ping(), 0.05)
    assert await hung.progress() == 0  # the liveness counter answers, and shows no progress
    for e in (healthy, hung):
        await e.shutdown()


@arun
async def test_ping_of_a_scorer_goes_through_its_queue_and_leaves_no_cache(model, tmp_path):
    from gen_ssd_ray.engines.actors import StudentScorer

    prof = write_profile(tmp_path)
    student = StudentConfig(model=model, backend="sim")
    healthy = StudentScorer(ScorerSpec(student, teacher_model=model, sim=sim(prof)))
    await asyncio.wait_for(healthy.ping(), 1.0)
    assert (
        await healthy.progress() == 1
        and healthy.tokens_scored == 0
        and not healthy.backends[0].cache.groups()
    )
    hung_spec = ScorerSpec(student, teacher_model=model, sim=sim(prof, [fault("hung", target="scorer")]))
    hung = StudentScorer(hung_spec)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(hung.ping(), 0.05)
    assert await hung.progress() == 0


def test_scorer_under_load_processes_each_token_about_once_until_its_memory_is_short(model, tmp_path):
    """Many live trajectories at spread-out progress (gen_ssd_ray.sim.scorer_load): with room for all,
    about one token processed per token scored and nothing evicted; with room for half, trajectories
    are evicted and recomputed, never an out-of-memory."""
    from gen_ssd_ray.sim.scorer_load import ScorerLoad, drive

    load = ScorerLoad(
        live=32,
        context_tokens=1024,
        chunk_tokens=64,
        num_candidates=4,
        prompt_tokens=50,
        rounds=32,
        warmup_rounds=16,
    )
    roomy = asyncio.run(
        drive(
            scorer(
                model, write_profile(tmp_path, "roomy", scorer={"memory_tokens": 10**6}), batch_tokens=1024
            ),
            load,
        )
    )
    # (each call runs its last context token again, each new trajectory its prompt once: ~1.016)
    assert roomy["tokens_processed_per_scored"] < 1.03 and roomy["evicted_groups"] == 0
    assert roomy["calls"] == 32 * 32 and roomy["failed_calls"] == 0
    # about 27k tokens live: half of it. Each round then recomputes about the deficit (~14k tokens of
    # context for 8k scored: ~2.7, the bound for any policy), where evicting the least recently
    # scored would miss every call (1 + context / (K x chunk): ~3.2).
    short = asyncio.run(
        drive(
            scorer(
                model, write_profile(tmp_path, "short", scorer={"memory_tokens": 14_000}), batch_tokens=1024
            ),
            load,
        )
    )
    assert short["evicted_groups"] > 0 and short["oom"] == 0 and short["failed_calls"] == 0
    assert short["tokens_processed_per_scored"] > 1.2 and short["peak_cached_tokens"] <= 14_000
