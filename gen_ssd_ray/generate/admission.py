"""How many problems a teacher engine keeps in flight: what its KV cache and its slots serve, not a
fixed count.

A problem in flight keeps its accepted prefix in the engine's prefix cache between chunks (while the
student scores it); if the prefixes of all problems in flight do not fit, the engine evicts them and
prefills them again at every chunk. So per engine

    kv    = (KV_FRACTION * kv_tokens - max_num_seqs * chunk_tokens)
            / (trajectories * beam_width * (prompt_tokens + max_new_tokens))

(the running sequences' new tokens are reserved first; the K candidates of a beam share its prefix
blocks). Every problem in flight is counted at its full response budget, not its average: problems
admitted together grow together, and long reasoning traces mostly run to the budget, so an average
(half the budget) over-admits. Measured on the simulated H100 engine with 8k-token traces
(scripts/bench_fixes.py): at half the budget 141 problems in flight and a 52% prefix-cache hit rate;
at the full budget 71 problems, 99.6%, and 10% more tokens/s. And a problem at the
teacher runs `trajectories * beam_width * num_candidates` sequences (as the method runs the search)
in the engine's `max_num_seqs` slots; more problems than SLOT_WAVES rounds of the slots only queue:

    slots = SLOT_WAVES * max_num_seqs / (trajectories * beam_width * num_candidates)

The student scorers hold each live beam's context once plus its K candidates (the hf scorer,
gen_ssd_ray.engines.scorer_hf), inside budgets they report (`capacity()`); a scorer over budget evicts
trajectories and recomputes them. So over the whole job, with the scorers' KV summed (a forward's
working set of about `2 x student.batch_tokens` reserved on each):

    scorer = (KV_FRACTION * sum(scorer kv_tokens) - scorers * 2 * batch_tokens)
             / (trajectories * beam_width * (prompt_tokens + max_new_tokens + K * chunk_tokens))
             / teacher engines

Admission is min(kv, slots, scorer), at least 1 and at most `teacher.max_inflight_problems` (which
`teacher.admission=fixed` uses as is). `kv_tokens` and `max_num_seqs` are what the engine reports
(`TeacherBackend.capacity()`: vLLM's allocated blocks). Bounding the queue inside an engine to a few
chunk times keeps call deadlines what they are for: detecting hung engines, not flow control.
"""

from __future__ import annotations

from collections.abc import Sequence

from gen_ssd_ray.generate.config import GenerateConfig, search_params

KV_FRACTION = 0.9
# Rounds of the engine's slots queued at most: enough to keep every slot busy while up to
# SLOT_WAVES - 1 rounds of problems are at the scorer, few enough that a call waits a few chunks.
SLOT_WAVES = 4


def inflight_per_engine(
    cfg: GenerateConfig,
    kv_tokens: int,
    max_num_seqs: int,
    prompt_tokens: int,
    scorer_kv_tokens: Sequence[int] = (),
) -> int:
    """See the module docstring. `kv_tokens` 0 (a teacher backend that does not report its cache)
    skips the teacher's KV bound; empty `scorer_kv_tokens` (scorers that report none) the scorers'."""
    q = cfg.search
    cap = cfg.teacher.max_inflight_problems
    if cfg.teacher.admission == "fixed":
        return cap
    run = search_params(cfg)
    bounds = [cap]
    if kv_tokens > 0:
        room = KV_FRACTION * kv_tokens - max_num_seqs * q.chunk_tokens
        bounds.append(
            int(room // (q.trajectories_per_problem * q.beam_width * (prompt_tokens + q.max_new_tokens)))
        )
        seqs = q.trajectories_per_problem * run.beam_width * run.num_candidates
        bounds.append(SLOT_WAVES * max_num_seqs // seqs)
    if scorer_kv_tokens:
        room = KV_FRACTION * sum(scorer_kv_tokens) - len(scorer_kv_tokens) * 2 * cfg.student.batch_tokens
        beam = prompt_tokens + q.max_new_tokens + run.num_candidates * q.chunk_tokens
        per_problem = q.trajectories_per_problem * run.beam_width * beam
        bounds.append(int(room // per_problem) // cfg.teacher.num_engines)
    return max(1, min(bounds))
