"""How many problems a teacher engine keeps in flight: what its KV cache holds, not a fixed count.

A problem in flight keeps its accepted prefix in the engine's prefix cache between chunks (while the
student scores it); if the prefixes of all problems in flight do not fit, the engine evicts them and
prefills them again at every chunk. So per engine

    problems = (KV_FRACTION * kv_tokens - max_num_seqs * chunk_tokens)
               / (trajectories * beam_width * (prompt_tokens + max_new_tokens / 2))

(the running sequences' new tokens are reserved first; a problem's prefix averages half the response
budget over its life), at least 1 and at most `teacher.max_inflight_problems`. `kv_tokens` and
`max_num_seqs` are what the engine reports (`TeacherBackend.capacity()`: vLLM's allocated blocks).
Keeping admission inside capacity also keeps queueing delay inside an engine short, so call
deadlines detect hung engines instead of acting as flow control.
"""

from __future__ import annotations

from gen_ssd_ray.generate.config import GenerateConfig

KV_FRACTION = 0.9


def inflight_per_engine(cfg: GenerateConfig, kv_tokens: int, max_num_seqs: int, prompt_tokens: int) -> int:
    q = cfg.search
    cap = cfg.teacher.max_inflight_problems
    if kv_tokens <= 0:  # a backend that does not report its cache: the configured count
        return cap
    room = KV_FRACTION * kv_tokens - max_num_seqs * q.chunk_tokens
    per_problem = q.trajectories_per_problem * q.beam_width * (prompt_tokens + q.max_new_tokens / 2)
    return max(1, min(cap, int(room // per_problem)))
