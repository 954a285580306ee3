"""Engine backends behind two small protocols.

- teacher: `expand(requests: list[ExpandRequest]) -> list[ExpandResult]`
- scorer:  `score(requests: list[ScoreRequest]) -> list[ScoreResult]`

Backends: `teacher_vllm` (vLLM async engine, CPU or GPU), `scorer_hf` (transformers with per-beam KV
reuse), `scorer_vllm` (vLLM prompt_logprobs; recomputes the prefix), `fake` (deterministic, for tests).
Each backend imports its heavy dependencies inside its own module, so importing this package is cheap.
"""
