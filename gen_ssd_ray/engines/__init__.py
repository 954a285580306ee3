"""Engines behind two protocols (`base`), picked by name (`registry`), held by thin actors (`actors`).

- teacher: `expand(requests)` (K continuations per partial solution) and `generate(requests)` (whole
  responses), sampling carried by every request; backend `vllm` (`teacher_vllm`, CPU or GPU);
- scorer: `score(requests)` and `release(groups)`; backends `hf` (`scorer_hf`, transformers with
  per-beam KV reuse) and `vllm` (`scorer_vllm`, prompt_logprobs reading the prefix cache);
- `fake`: deterministic in-process engines for unit tests of the search core.

Each backend imports its heavy dependencies inside its own module, so importing this package is cheap.
"""
