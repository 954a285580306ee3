"""The pure Gen-SSD core: search state machines over token ids and scores.

Nothing in this package imports ray, torch, vllm or transformers (a test checks it in a fresh
interpreter). Engines are reached only through the request/result dataclasses in `types`.
"""

from gen_ssd_ray.core.answers import extract_final_answer, extract_gold_answer
from gen_ssd_ray.core.policies import PRUNING_POLICIES, SELECTION_POLICIES, get_pruner, get_selector
from gen_ssd_ray.core.search import ProblemSearch, SearchParams
from gen_ssd_ray.core.types import (
    Candidate,
    ChunkRecord,
    ExpandRequest,
    ExpandResult,
    ScoredCandidate,
    ScoreRequest,
    ScoreResult,
    Trajectory,
)

__all__ = [
    "PRUNING_POLICIES",
    "SELECTION_POLICIES",
    "Candidate",
    "ChunkRecord",
    "ExpandRequest",
    "ExpandResult",
    "ProblemSearch",
    "ScoreRequest",
    "ScoreResult",
    "ScoredCandidate",
    "SearchParams",
    "Trajectory",
    "extract_final_answer",
    "extract_gold_answer",
    "get_pruner",
    "get_selector",
]
