"""The lab task's tokenizer: a small word-level vocabulary that writes numbers digit by digit.

What this module knows: how to build a `tokenizers` tokenizer that covers every piece of text the lab
generator (`gen_ssd_ray.lab.problems`) and the job's default prompt can write, and how to save it as a
Hugging Face folder (``tokenizer.json``, ``tokenizer_config.json``, ChatML ``chat_template.jinja``) that
``transformers.AutoTokenizer.from_pretrained`` and vLLM load.

How text is cut: a regex pre-tokenizer splits text into ``####``, words (``[A-Za-z]+``), single digits,
single other characters, and single whitespace characters; a word, digit or other character may carry
one leading space (`` apples``, `` 1``). Each piece is one vocabulary entry (`unk_token` if unknown) and
the decoder concatenates the pieces, so ``decode(encode(text)) == text`` for any text made of known
pieces. The vocabulary holds every word and punctuation mark of `vocabulary_texts()` and of
`EXTRA_TEXTS` (the default instruction and chat roles), each with and without a leading space, the ten
digits, ``####``, newline and space: a few hundred entries.

Special tokens: ``<|endoftext|>`` (bos and pad), ``<|im_start|>``, ``<|im_end|>`` (eos), ``<unk>``. No
token is added automatically when encoding (no bos), so ``AutoTokenizer(text)`` equals the raw
`tokenizers` encoding. The tokenizer class is the generic fast one (``PreTrainedTokenizerFast``), which
runs ``tokenizer.json`` as is (a model-specific class such as Qwen2's would rebuild its own pipeline).

What it does not know: models (see `gen_ssd_ray.lab.models`) and training. `tokenizers` and
`transformers` are imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from gen_ssd_ray.lab.problems import vocabulary_texts

BOS_PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK = "<unk>"
SPECIAL_TOKENS = (BOS_PAD, IM_START, IM_END, UNK)  # ids 0..3
MODEL_MAX_LENGTH = 512
TOKENIZER_DIRNAME = "lab-tokenizer"

# ChatML, as SmolLM2 and Qwen write it, without a default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Text outside the generator that the vocabulary also covers: the job's default instruction (see
# gen_ssd_ray.common.config.PromptConfig) and the chat roles.
EXTRA_TEXTS = (
    "Solve the following math problem step by step. Put the final answer after '####' on the last line.\n\n",
    "system user assistant",
)
# One pre-token: "####", a word, a digit or another non-space character (each with at most one leading
# space), or a single whitespace character.
PRETOKEN_PATTERN = r" ?####| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s"


def vocabulary() -> list[str]:
    """The vocabulary, special tokens first (ids 0..3), then the pieces in a fixed order."""
    pieces: set[str] = {"\n", " ", "####", " ####"}
    pieces.update(str(d) for d in range(10))
    pieces.update(f" {d}" for d in range(10))
    for text in (*vocabulary_texts(), *EXTRA_TEXTS):
        for piece in re.findall(PRETOKEN_PATTERN, text):
            core = piece.strip()
            if core:
                pieces.update({core, " " + core})
    return [*SPECIAL_TOKENS, *sorted(pieces)]


def vocabulary_hash() -> str:
    """A short fingerprint of the vocabulary, pattern and chat template (part of the cache recipe)."""
    blob = json.dumps([vocabulary(), PRETOKEN_PATTERN, CHAT_TEMPLATE]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_raw_tokenizer() -> Any:
    """The `tokenizers.Tokenizer` (word level, regex pre-tokenizer, concatenating decoder)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {piece: i for i, piece in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_lab_tokenizer(folder: Path | str) -> Path:
    """Write the tokenizer as a Hugging Face folder (created if missing) and return it."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_raw_tokenizer(),
        bos_token=BOS_PAD,
        eos_token=IM_END,
        pad_token=BOS_PAD,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(folder)
    _drop_loader_flags(folder / "tokenizer_config.json")
    return folder


def materialize_lab_tokenizer(root: Path | None = None) -> Path:
    """The tokenizer folder ``<root>/models/lab-tokenizer`` (root: `gen_ssd_ray.common.models.cache_root()`),
    built once, atomically and under a lock; rebuilt when the vocabulary changes."""
    from gen_ssd_ray.common.models import BUILD_FORMAT, materialize, models_dir

    dest = models_dir(root) / TOKENIZER_DIRNAME
    recipe = {"format": BUILD_FORMAT, "model": "lab-tokenizer", "vocabulary": vocabulary_hash()}
    return materialize(dest, recipe, save_lab_tokenizer)


def _drop_loader_flags(path: Path) -> None:
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
