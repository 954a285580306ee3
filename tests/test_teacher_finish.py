"""vLLM finish reasons (gen_ssd_ray.engines.teacher_vllm): only stop/length end a chunk normally.

Every other reason ("abort", "error", an unknown string, none at all) and a result with fewer samples
than requested fail the `expand` call as an engine failure (`GenerationAborted`, not a ValueError, so
the beam manager moves the step to another engine and never makes it an error row of the problem).
No vLLM needed: the backend's `_generate` is replaced by a fake that returns vLLM-shaped outputs.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gen_ssd_ray.core.types import ExpandRequest
from gen_ssd_ray.engines.teacher_vllm import GenerationAborted, VllmTeacher


def _request(n: int = 2) -> ExpandRequest:
    return ExpandRequest("p/t0/s0", (1, 2, 3), n, 4, 7, temperature=1.0, top_p=1.0)


def _teacher(reasons: list, n: int | None = None) -> VllmTeacher:
    t = object.__new__(VllmTeacher)  # no engine: `_generate` is the fake below
    outputs = [
        SimpleNamespace(index=i, token_ids=[5, 6], text="a b", finish_reason=fr)
        for i, fr in enumerate(reasons)
    ]

    async def fake_generate(r):
        return SimpleNamespace(outputs=outputs, num_cached_tokens=0)

    t._generate = fake_generate
    return t


@pytest.mark.parametrize("reasons", [["stop", "length"], ["length", "length"], ["stop", "stop"]])
def test_stop_and_length_end_a_chunk(reasons):
    (res,) = asyncio.run(_teacher(reasons).expand([_request()]))
    assert [c.finish_reason for c in res.candidates] == reasons


@pytest.mark.parametrize(
    "reasons",
    [["stop", "abort"], ["abort", "abort"], ["length", None], ["error", "stop"], ["stop", "weird"], ["stop"]],
    ids=["one-abort", "all-abort", "none", "error", "unknown", "missing-sample"],
)
def test_other_finish_reasons_fail_the_call_as_an_engine_failure(reasons):
    with pytest.raises(GenerationAborted, match="p/t0/s0") as ei:
        asyncio.run(_teacher(reasons).expand([_request(n=2)]))
    assert not isinstance(ei.value, ValueError)  # a ValueError would become the problem's error row


def test_generate_keeps_abort_as_the_samples_reason():
    t = _teacher(["stop", None])
    (gen,) = asyncio.run(t.generate([_request()]))
    assert [s.finish_reason for s in gen.samples] == ["stop", "abort"]
