"""The scorer's per-trajectory KV bookkeeping: the context once, candidates' own tokens, and eviction
of the trajectories furthest from their next call."""

from __future__ import annotations

from gen_ssd_ray.engines.beam_cache import BeamCache, Node, forward_kv_tokens


def step(cache: BeamCache, group: str, gen: int, context: tuple, cands: list[tuple]) -> int:
    """One score call's bookkeeping, as the scorers do it; returns the tokens it runs."""
    hit = cache.lookup(group, context)
    base = Node(context, hit.length, None, gen, hit.node)
    cache.commit(group, [base, *(Node(context + c, len(context), None, gen, base) for c in cands)])
    cache.drop_older(group, gen)
    return len(context) - hit.length + sum(len(c) for c in cands)


def test_context_once_candidates_once_losers_dropped():
    c = BeamCache(10_000)
    prompt = tuple(range(100))
    assert step(c, "g", 1, prompt, [(1, 2), (3, 4), (5, 6)]) == 100 + 6
    assert c.tokens == 100 + 6
    ctx = prompt + (3, 4)
    hit = c.lookup("g", ctx)
    assert hit.length == len(ctx) - 1  # the last context token is run again
    assert [n for _, n in hit.node.segments(hit.length)] == [100, 1]
    assert step(c, "g", 2, ctx, [(7,), (8,), (9,)]) == 1 + 3
    # prompt + the selected candidate (kept as the chain) + its last token run again + 3 new candidates
    assert c.tokens == 100 + 2 + 1 + 3
    c.release(["g"])
    assert c.tokens == 0 and "g" not in c


def test_lookup_takes_the_longest_cached_prefix_only_within_the_group():
    c = BeamCache(10_000)
    step(c, "g", 1, (1, 2, 3, 4), [(5, 6)])
    assert c.lookup("g", (1, 2, 3, 4, 5, 6, 7)).length == 6
    assert c.lookup("g", (1, 2, 3, 4, 9)).length == 4
    assert c.lookup("g", (1, 2, 9)).length == 0
    assert c.lookup("h", (1, 2, 3, 4, 5, 6, 7)).length == 0


def test_make_room_evicts_most_recently_scored_first_protected_last_kept_never():
    c = BeamCache(100)
    for i, g in enumerate("abcd"):
        step(c, g, i + 1, tuple(range(10 * i, 10 * i + 15)), [(1,) * 5])  # 20 tokens each
    assert c.tokens == 80
    # d was scored last (it now waits for its teacher): it goes first; c is queued: kept while others go
    assert c.make_room(40, protect={"c"}) and c.groups() == ["a", "b", "c"]
    assert c.make_room(60, protect={"c", "a"}, keep={"a"}) and c.groups() == ["a", "c"]
    # a queued trajectory goes when nothing else is left (it recomputes); the forward's own never does
    assert c.make_room(80, protect={"c", "a"}, keep={"a"}) and c.groups() == ["a"]
    assert not c.make_room(90, keep={"a"}) and c.groups() == ["a"] and c.evicted_groups == 3


def test_forward_kv_tokens_pads_the_past_to_the_longest_row():
    assert forward_kv_tokens([], []) == 0
    assert forward_kv_tokens([10, 30], [5, 7]) == 2 * (30 + 7) + 12


def test_a_first_call_starts_from_the_longest_prefix_shared_with_a_recent_first_context():
    from gen_ssd_ray.engines.beam_cache import SHARED_MIN_TOKENS, common_prefix

    c = BeamCache(10_000)
    template = tuple(range(500, 540))
    step(c, "a", 1, template + (1, 2), [(3,)])
    hit = c.lookup("b", template + (7, 8, 9))
    assert hit.shared and hit.length == 40 and hit.node.ids == template + (1, 2)
    assert not c.lookup("b", template[: SHARED_MIN_TOKENS - 1] + (7, 8)).length  # too short to share
    assert c.lookup("a", template + (7,)).length == 40  # its own first context, where the rest differs
    c.release(["a"])
    assert c.lookup("b", template + (7, 8, 9)).length == 0  # a released trajectory shares nothing
    assert common_prefix((1, 2, 3), (1, 2, 4, 5)) == 2 and common_prefix((), (1,)) == 0
