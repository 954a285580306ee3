"""The one prompt renderer: a question becomes the same prompt tokens in generation, fine-tuning and
evaluation.

- `chat_messages(prompt, question)`: OpenAI-style messages (the system message if `prompt.system`
  is set, then the user turn: `prompt.instruction` with `{question}` replaced); also the generation
  rows' `prompt` / `messages` columns (gen_ssd_ray.generate.rows.conversation), so what a trainer
  reads from them is what the models were asked;
- `render_prompt(tokenizer, prompt, question)`: those messages in the tokenizer's own chat template,
  with the generation prompt, as text and token ids (`RenderedPrompt`). The beam managers render the
  teacher's and the student's prompts with it, evaluation renders every problem with it, and
- `render_example(tokenizer, prompt, question, response)`: fine-tuning's (prompt ids, response ids),
  whose prompt ids are `render_prompt`'s;
- `load_chat_tokenizer(path, key, trust_remote_code)`: a tokenizer that has a chat template, or an
  `InputError` naming the config key;
- `encode_text(tokenizer, text)`: ids and character offsets of text that is data through and through
  (for example a generated response re-tokenized for another vocabulary), matching no control token;
- `check_chat_model(...)`: everything about a model's tokenizer and template that would fail every row
  (no tokenizer, no template, a template that rejects the prompt config or drops the question, control
  strings in the prompt config, a prompt budget no question fits), as one `InputError` before any actor
  starts.

Data is text, never control. The question and the response are data: a control string in them (the
template's own turn markers such as ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, or any other
added token of the tokenizer, special or not) is tokenized as the plain text it is, never as the control
token. How: the template is rendered and tokenized as usual. If no control string can touch the data
(none in it, none begun at its end or ended at its start, none around it) those are the ids, exactly the
usual ones (the common case: one render, one tokenization). Otherwise the added tokens that tokenization
matched inside the data's span of the text (located by rendering a placeholder in its place) are the
injected ones; the text is cut only at the template's own added tokens, and the pieces between them are
encoded without the added vocabulary (`tokenizers` normalizer + pre-tokenizer + model): that is how the
tokenizer encodes those pieces anyway, checked on every such call by first reproducing the usual ids the
same way. A tokenizer where that check fails, or a slow tokenizer (no offsets) given a control string in
the data, gives an error (`RenderedPrompt.error`, `PromptError` for `render_example`), never wrong
tokens. Whitespace-run added tokens (indentation compressors) are text, not control. The prompt config
(`prompt.system`, `prompt.instruction`) is the operator's, not data: `check_chat_model` refuses control
strings in it (a mistake: the template writes the turn markers itself).

Knows tokenizers and chat templates; nothing about engines, Ray or the jobs.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gen_ssd_ray.common.config import PromptConfig
from gen_ssd_ray.common.errors import InputError

# Rendered in place of the question (or response) to find where the template writes it.
_PLACEHOLDER = "GenSsdPlaceholder7q3"

Span = tuple[int, int]


class PromptError(ValueError):
    """A row whose text cannot be rendered as text with this tokenizer (the message says why)."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as text and token ids, or why it cannot be generated (`error`)."""

    text: str | None = None
    token_ids: tuple[int, ...] = ()
    error: str | None = None


def render_user_message(prompt: PromptConfig, question: str) -> str:
    """The user turn: `prompt.instruction` with `{question}` replaced. Plain replacement, not
    `str.format`, so braces in the instruction or the question (LaTeX) are left alone."""
    return prompt.instruction.replace("{question}", question)


def chat_messages(prompt: PromptConfig, question: str) -> list[dict[str, str]]:
    """OpenAI-style messages: the system message (only if `prompt.system` is set), then the user."""
    messages: list[dict[str, str]] = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": render_user_message(prompt, question)})
    return messages


def render_prompt(tokenizer, prompt: PromptConfig, question: str) -> RenderedPrompt:
    """The question in the tokenizer's chat template with the generation prompt: text and ids.

    The ids are the text tokenized without adding special tokens (the template already wrote them),
    so they are exactly what a model sees when given the text, except that control strings inside the
    question stay plain text (see the module docstring). `error` is set, and the ids are empty, if the
    question holds a control string this tokenizer cannot encode as text.
    """

    def render(q: str) -> str:
        return tokenizer.apply_chat_template(
            chat_messages(prompt, q), tokenize=False, add_generation_prompt=True
        )

    text = render(question)
    ids, error = _encode_data(tokenizer, text, question, lambda: _spans(render, question, text))
    if error is not None:
        return RenderedPrompt(text, (), f"question: {error}")
    return RenderedPrompt(text, tuple(ids))


def render_example(
    tokenizer, prompt: PromptConfig, question: str, response: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a fine-tuning example in the tokenizer's chat template.

    The prompt ids are `render_prompt`'s. The response part is what the template writes after the
    generation prompt for the assistant turn (text plus end-of-turn marker). Templates that do not
    extend the prompt verbatim (some rewrite earlier turns) fall back to the response text followed by
    the EOS token. Control strings in the question or the response stay plain text; raises PromptError
    if this tokenizer cannot encode them as text.
    """
    rendered = render_prompt(tokenizer, prompt, question)
    if rendered.error is not None:
        raise PromptError(rendered.error)
    assert rendered.text is not None
    messages = chat_messages(prompt, question)

    def render(r: str) -> str:
        return tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": r}], tokenize=False)

    full_text = render(response)
    start = len(rendered.text)
    if full_text.startswith(rendered.text):

        def spans() -> list[Span] | None:
            found = _spans(render, response, full_text)
            if found is None or any(a < start for a, _ in found):
                return None
            return [(a - start, b - start) for a, b in found]

        response_ids, error = _encode_data(tokenizer, full_text[start:], response, spans)
    else:
        response_ids, error = _encode_data(tokenizer, response, response, lambda: [(0, len(response))])
        response_ids = response_ids + [tokenizer.eos_token_id]
    if error is not None:
        raise PromptError(f"response: {error}")
    return list(rendered.token_ids), response_ids


def load_chat_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder; an InputError naming `key` if it cannot be loaded or has no chat
    template (prompts are always rendered in the model's own template)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
        raise InputError(f"{key}: cannot load a tokenizer from {path} ({_one_line(e)})") from None
    if not getattr(tok, "chat_template", None):
        raise InputError(
            f"{key}: the tokenizer of {path} has no chat template, and prompts are rendered with the "
            "model's own template; use a chat/instruct model folder or add a chat_template.jinja to it"
        )
    return tok


def encode_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of `text` as plain text: what
    ``tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)`` gives, except that no
    added token (control string) is matched; identical for text that holds none. Needs a fast
    tokenizer for text that holds one (a slow one encodes it as it always has)."""
    if getattr(tokenizer, "backend_tokenizer", None) is None or not _added_tokens(tokenizer):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return _plain_encode(tokenizer, text)


# ----------------------------------------------------------------------------------------------------------
# Checks that would fail every row


def check_chat_model(
    path: str,
    key: str,
    prompt: PromptConfig,
    trust_remote_code: bool = False,
    max_prompt_tokens: int | None = None,
    budget: str = "the prompt budget",
    example: bool = False,
    tokenizer: Any = None,
):
    """The model's chat tokenizer, after checking everything that would make every row fail.

    Raises InputError (one line: `key` or the prompt key, and the fix) if the tokenizer cannot be loaded
    or has no chat template; if the template fails on the prompt config (for example a template that
    rejects a system message) or writes no user message; if `prompt.system` or `prompt.instruction`
    holds one of the tokenizer's control strings; if an empty question's prompt already has more than
    `max_prompt_tokens` tokens (`budget` names the keys that set that number and is quoted in the
    message); with `example`, if the template cannot render an assistant turn (fine-tuning). Pass
    `tokenizer` to check an already loaded one (`path` is then only named in messages).
    """
    tok = tokenizer if tokenizer is not None else load_chat_tokenizer(path, key, trust_remote_code)
    controls = sorted(c for c in _added_tokens(tok).values() if c)
    for field, value in (("prompt.system", prompt.system), ("prompt.instruction", prompt.instruction)):
        bad = [c for c in controls if value and c in value]
        if bad:
            raise InputError(
                f"{field}: holds the control string {bad[0]!r} of the tokenizer of {path}; remove it (the "
                "chat template writes the turn markers itself, and questions are always rendered as text)"
            )
    try:
        rendered, text = _render_checked(tok, prompt, example)
    except Exception as e:  # jinja2 TemplateError, the template's raise_exception, ...
        if prompt.system and _renders(tok, PromptConfig(instruction=prompt.instruction), example):
            where, fix = "prompt.system", "unset prompt.system (this template takes no system message)"
        else:
            turns = "a user and an assistant turn" if example else "a user turn"
            where, fix = key, f"use a model whose chat template renders {turns}"
        raise InputError(
            f"{where}: the chat template of {path} fails on this prompt config ({_one_line(e)}); {fix}"
        ) from None
    if _PLACEHOLDER not in text:
        raise InputError(
            f"{key}: the chat template of {path} does not write the user message into the prompt, so "
            "every question would be lost; use a model whose template renders the user turn"
        )
    n = len(rendered.token_ids)
    if max_prompt_tokens is not None and n > max_prompt_tokens:
        raise InputError(
            f"{key}: the chat template of {path} with this prompt config takes {n} tokens for an empty "
            f"question, more than the {max_prompt_tokens} left for the prompt by {budget}, so every problem "
            "would be too long; raise the context length or lower the new-token budget"
        )
    return tok


def _render_checked(tok, prompt: PromptConfig, example: bool) -> tuple[RenderedPrompt, str]:
    """(the empty question's prompt, the text with a placeholder question); raises what the template
    raises."""
    rendered = render_prompt(tok, prompt, "")
    text = tok.apply_chat_template(
        chat_messages(prompt, _PLACEHOLDER), tokenize=False, add_generation_prompt=True
    )
    if example:
        render_example(tok, prompt, "", "")
    return rendered, text


def _renders(tok, prompt: PromptConfig, example: bool) -> bool:
    try:
        _render_checked(tok, prompt, example)
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Data as text: tokenization that never turns data into control tokens


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _added_tokens(tokenizer) -> dict[int, str]:
    """Id -> content of every added token (special or not) but whitespace runs (some tokenizers add
    those to compress indentation: text, not control); {} for tokenizers that have none."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {int(i): str(t) for i, t in decoder.items() if str(t).strip()}


def _spans(render: Callable[[str], str], value: str, text: str) -> list[Span] | None:
    """Where `value` lies in `text` == render(value): [] if nowhere, None if it cannot be told.

    Found by rendering a placeholder in its place: text == value.join(parts). A template that transforms
    the value (e.g. trims it) still locates a single occurrence by the text around it.
    """
    ph = _PLACEHOLDER
    while ph in text:  # (the text holds the value, and whatever else the data put there)
        ph += "q"
    parts = render(ph).split(ph)
    if len(parts) == 1:
        return []
    if value.join(parts) == text:
        spans, pos = [], 0
        for part in parts[:-1]:
            pos += len(part)
            spans.append((pos, pos + len(value)))
            pos += len(value)
        return spans
    head, tail = parts[0], parts[-1]
    if (
        len(parts) == 2
        and len(text) >= len(head) + len(tail)
        and text.startswith(head)
        and text.endswith(tail)
    ):
        return [(len(head), len(text) - len(tail))]
    return None


def _encode_data(
    tokenizer, text: str, value: str, spans: Callable[[], list[Span] | None]
) -> tuple[list[int], str | None]:
    """(ids, None) of `text` where the data `value` (at `spans()`) yields no added token; ([], why) if
    this tokenizer cannot encode it so."""
    added = _added_tokens(tokenizer)
    if not added:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
    if getattr(tokenizer, "backend_tokenizer", None) is None:  # slow tokenizer: no offsets
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        hits = [c for c in added.values() if c and c in value]
        if hits:
            return (
                [],
                f"holds the control string {hits[0]!r}, which this (slow) tokenizer cannot encode as text",
            )
        return ids, None
    if not _may_match(tokenizer, value):  # the usual ids: no added token can overlap the data
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # The added tokens the text matched; an unknown-token id stands for unknown text, not a match.
    unk = getattr(tokenizer, "unk_token_id", None)
    markers = [
        (k, (s, e))
        for k, (i, (s, e)) in enumerate(zip(ids, enc["offset_mapping"], strict=True))
        if i in added and (i != unk or added[i] in text[s:e])
    ]
    if not markers:
        return ids, None
    where = spans()
    if where is None:  # the template transforms the value beyond recognition: refuse control strings
        hits = [c for c in added.values() if c and c in value]
        if hits:
            return [], f"holds the control string {hits[0]!r}, and the chat template rewrites it"
        return ids, None

    def core(k: int, off: Span) -> Span:  # the token's own characters (without stripped whitespace)
        content, (s, e) = added[ids[k]], off
        j = text.find(content, s, e)
        return (j, j + len(content)) if j >= 0 else (s, e)

    def inside(k: int, off: Span) -> bool:
        a, b = core(k, off)
        return any(a < e and s < b for s, e in where)

    injected = [m for m in markers if inside(*m)]
    if not injected:
        return ids, None

    def cut_at(cuts: list[tuple[int, Span]]) -> list[int]:
        out, pos = [], 0
        for k, (s, e) in cuts:
            if s > pos:
                out += _plain_encode(tokenizer, text[pos:s], pos == 0)[0]
            out.append(ids[k])
            pos = max(pos, e)
        if pos < len(text):
            out += _plain_encode(tokenizer, text[pos:], pos == 0)[0]
        return out

    def controls(seq: list[int]) -> int:
        return sum(i in added and i != unk for i in seq)

    # Faithful (cutting at every match reproduces the usual ids) and clean (the pieces between the
    # template's own tokens encode to no control token), or refused.
    template = [m for m in markers if m not in injected]
    safe = cut_at(template)
    if cut_at(markers) != ids or controls(safe) != controls([ids[k] for k, _ in template]):
        what = added[ids[injected[0][0]]]
        return [], f"holds the control string {what!r}, which this tokenizer cannot encode as text"
    return safe, None


@dataclass(frozen=True)
class _Controls:
    """A fast tokenizer's control strings, prepared for `_may_match`."""

    contents: tuple[str, ...]
    pattern: re.Pattern
    prefixes: frozenset[str]  # proper prefixes of the control strings
    suffixes: frozenset[str]  # proper suffixes
    longest: int
    normalized: bool  # some control matches after normalization: only offsets can tell


_CONTROLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _may_match(tokenizer, value: str) -> bool:
    """Whether an added token of the tokenizer could match text overlapping `value`, wherever `value`
    stands: it holds a control string, or starts with the end of one, or ends with the start of one,
    or lies inside one (or a control matches after normalization). False: the usual tokenization of
    any text around `value` matches nothing in it (the fast path of `_encode_data`)."""
    c = _CONTROLS.get(tokenizer)
    if c is None:
        added = _added_tokens(tokenizer)
        contents = tuple(sorted(set(added.values()), key=len, reverse=True))
        decoder = tokenizer.added_tokens_decoder
        normalized = tokenizer.backend_tokenizer.normalizer is not None and any(
            getattr(decoder[i], "normalized", False) for i in added
        )
        c = _Controls(
            contents,
            re.compile("|".join(map(re.escape, contents))),
            frozenset(t[:k] for t in contents for k in range(1, len(t))),
            frozenset(t[k:] for t in contents for k in range(1, len(t))),
            len(contents[0]),
            normalized,
        )
        _CONTROLS[tokenizer] = c
    if not value:
        return False
    if c.normalized or c.pattern.search(value):
        return True
    edge = min(len(value), c.longest - 1)
    if any(value[-k:] in c.prefixes or value[:k] in c.suffixes for k in range(1, edge + 1)):
        return True
    return len(value) < c.longest and any(value in t for t in c.contents)


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_encode(tokenizer, text: str, first: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, offsets) of `text` through the tokenizer's `tokenizers` pipeline (normalizer,
    pre-tokenizer, model) without its added vocabulary but whitespace runs (see `_added_tokens`): never
    a control token. `first=False` encodes a piece that follows an added token, as the tokenizer does
    inside a text (a Metaspace pre-tokenizer with prepend_scheme "first" prepends its space marker only
    at the start of the text). The pipeline is built once per tokenizer."""
    plain = _PLAIN.get(tokenizer)
    if plain is None:
        from tokenizers import Tokenizer

        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        kept = [t for t in spec.get("added_tokens", []) if not t["content"].strip()]
        spec.update(added_tokens=kept, post_processor=None, truncation=None, padding=None)
        head = Tokenizer.from_str(json.dumps(spec))
        spec["pre_tokenizer"], changed = _never_prepend(spec.get("pre_tokenizer"))
        rest = Tokenizer.from_str(json.dumps(spec)) if changed else head
        # A kept added token outside the model's vocabulary gets the next free id: give back its own.
        remap = {head.token_to_id(t["content"]): t["id"] for t in kept}
        plain = (head, rest, {k: v for k, v in remap.items() if k != v})
        _PLAIN[tokenizer] = plain
    head, rest, remap = plain
    enc = (head if first else rest).encode(text, add_special_tokens=False)
    ids = [remap.get(i, i) for i in enc.ids] if remap else list(enc.ids)
    return ids, [tuple(o) for o in enc.offsets]


def _never_prepend(node: Any) -> tuple[Any, bool]:
    """A pre-tokenizer spec (JSON) with every Metaspace prepend_scheme "first" set to "never"."""
    if isinstance(node, list):
        pairs = [_never_prepend(n) for n in node]
        return [n for n, _ in pairs], any(c for _, c in pairs)
    if not isinstance(node, dict):
        return node, False
    out, changed = {}, False
    for k, v in node.items():
        out[k], c = _never_prepend(v)
        changed |= c
    if out.get("type") == "Metaspace" and out.get("prepend_scheme") == "first":
        out["prepend_scheme"], changed = "never", True
    return out, changed
