"""Lab task models: randomly initialized Llamas with the lab tokenizer, to be trained from scratch.

What this module knows: the named sizes (`LAB_MODEL_SIZES`: ``teacher``, ``student``, and the bigger
``medium`` and ``large`` for machines with more compute) and how to write
such a model folder with `gen_ssd_ray.common.embedded_models.build_tiny_model` and the lab tokenizer
(`gen_ssd_ray.lab.tokenizer.materialize_lab_tokenizer`). Every size keeps head_dim = 32, the smallest
head size vLLM's CPU attention runs, and 512 positions (the longest lab prompt plus solution is well
under 256 tokens).

What it does not know: training (the project's fine-tuning job trains these folders) and serving.
torch and transformers are imported inside the functions it calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from gen_ssd_ray.lab.tokenizer import MODEL_MAX_LENGTH, materialize_lab_tokenizer


@dataclass(frozen=True)
class LabModelSize:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


LAB_MODEL_SIZES: dict[str, LabModelSize] = {
    # 0.32M parameters. Trained from scratch on the default lab task (then 2,000 problems x 3 styles, batch 8,
    # AdamW lr 3e-3) for 3 minutes on one CPU core (~9.5k tokens/s, 2,040 steps, 1.7M tokens) it answered
    # 76% of 50 test problems greedily; on a GPU, with equal token counts, 59% of 100 after 1.26M tokens
    # and 93% after 2.5M (84% when sampling at temperature 0.8).
    "teacher": LabModelSize(
        num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256
    ),
    # 0.08M parameters: two layers (a one-layer model cannot copy the right operands from the question)
    # at half the teacher's width. In the default pipeline (cold start on 1,200 problems x 3 step-by-step
    # styles, 3 epochs, ~9k tokens/s) it answered 14.6% of 500 test problems; distilled on Gen-SSD's
    # selections, 25.2%. The earlier 1-layer, hidden-128 student reached only 11.6% and 17.0%.
    "student": LabModelSize(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128),
    # 0.82M parameters, ~3.2k tokens/s on one core: 64% after 1.15M tokens, 90% after 2.3M.
    "medium": LabModelSize(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=384),
    # 2.4M parameters, ~1.3k tokens/s on one core: too slow to train on a laptop CPU (2% after 0.94M).
    "large": LabModelSize(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=512),
}


def build_lab_model(
    path: Path | str, *, size: str, seed: int, dtype: str = "float32", tokenizer_root: Path | None = None
) -> Path:
    """Write a randomly initialized ``LlamaForCausalLM`` of the named `size` with the lab tokenizer to
    folder `path` (deterministic in `seed`). `tokenizer_root` is the cache root for the tokenizer folder
    (default `gen_ssd_ray.common.models.cache_root()`). Returns `path`. Raises ValueError for an unknown size."""
    from gen_ssd_ray.common.embedded_models import build_tiny_model

    if size not in LAB_MODEL_SIZES:
        raise ValueError(f"unknown lab model size {size!r}; choose one of {sorted(LAB_MODEL_SIZES)}")
    return build_tiny_model(
        Path(path),
        **asdict(LAB_MODEL_SIZES[size]),
        seed=seed,
        tokenizer_from=materialize_lab_tokenizer(tokenizer_root),
        dtype=dtype,
        max_position_embeddings=MODEL_MAX_LENGTH,
    )
