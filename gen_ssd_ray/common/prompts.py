"""The one prompt renderer: a question becomes the same prompt tokens in generation, fine-tuning and
evaluation.

- `chat_messages(prompt, question)`: OpenAI-style messages (the system message if `prompt.system`
  is set, then the user turn: `prompt.instruction` with `{question}` replaced);
- `render_prompt(tokenizer, prompt, question)`: those messages in the tokenizer's own chat template,
  with the generation prompt, as text and token ids (`RenderedPrompt`). The beam managers render the
  teacher's and the student's prompts with it, evaluation renders every problem with it, and
- `render_example(tokenizer, prompt, question, response)`: fine-tuning's (prompt ids, response ids),
  whose prompt ids are `render_prompt`'s;
- `load_chat_tokenizer(path, key, trust_remote_code)`: a tokenizer that has a chat template, or an
  `InputError` naming the config key.

Knows tokenizers and chat templates; nothing about engines, Ray or the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from gen_ssd_ray.common.config import PromptConfig
from gen_ssd_ray.common.errors import InputError


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

    The ids are the text tokenized without special tokens (the template already wrote them), so the
    ids are exactly what a model sees when given the text.
    """
    text = tokenizer.apply_chat_template(
        chat_messages(prompt, question), tokenize=False, add_generation_prompt=True
    )
    return RenderedPrompt(text, tuple(tokenizer(text, add_special_tokens=False)["input_ids"]))


def render_example(
    tokenizer, prompt: PromptConfig, question: str, response: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a fine-tuning example in the tokenizer's chat template.

    The prompt ids are `render_prompt`'s. The response part is what the template writes after the
    generation prompt for the assistant turn (text plus end-of-turn marker). Templates that do not
    extend the prompt verbatim (some rewrite earlier turns) fall back to the response text followed by
    the EOS token.
    """
    rendered = render_prompt(tokenizer, prompt, question)
    assert rendered.text is not None
    full_text = tokenizer.apply_chat_template(
        [*chat_messages(prompt, question), {"role": "assistant", "content": response}], tokenize=False
    )
    if full_text.startswith(rendered.text):
        response_ids = tokenizer(full_text[len(rendered.text) :], add_special_tokens=False)["input_ids"]
    else:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(rendered.token_ids), response_ids


def load_chat_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder; an InputError naming `key` if it cannot be loaded or has no chat
    template (prompts are always rendered in the model's own template)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
        raise InputError(f"{key}: cannot load a tokenizer from {path} ({type(e).__name__}: {e})") from None
    if not getattr(tok, "chat_template", None):
        raise InputError(
            f"{key}: the tokenizer of {path} has no chat template, and prompts are rendered with the "
            "model's own template; use a chat/instruct model folder or add a chat_template.jinja to it"
        )
    return tok
