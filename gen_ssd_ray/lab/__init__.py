"""The lab task: a built-in arithmetic word-problem task small enough to train models on a laptop CPU.

- `gen_ssd_ray.lab.problems`: the seeded problem generator (train/test splits, gold solutions in the
  ``concise``, ``verbose``, ``detour`` and ``shortcut`` styles), the fine-tuning rows built from it and
  `classify_style`, which tells the style of any solution text;
- `gen_ssd_ray.lab.tokenizer`: the word-level, digit-by-digit tokenizer with a ChatML template;
- `gen_ssd_ray.lab.models`: randomly initialized teacher/student Llamas with that tokenizer.

The data loader serves the problems as ``embedded:lab/train`` and ``embedded:lab/test``. Importing this
package is cheap: only the pure-Python generator is imported here.
"""

from gen_ssd_ray.lab.problems import (
    STYLES,
    Difficulty,
    classify_style,
    generate_split,
    lab_sft_rows,
    write_jsonl,
    write_lab_sft_jsonl,
)

__all__ = [
    "STYLES",
    "Difficulty",
    "classify_style",
    "generate_split",
    "lab_sft_rows",
    "write_jsonl",
    "write_lab_sft_jsonl",
]
