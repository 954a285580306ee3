"""`check_chat_model`: what would fail every row fails once, before anything starts, with one line naming
the key and the fix (InputError, exit 2): no tokenizer, a broken one, no chat template, a template that
fails on the prompt config or drops the question, control strings in the prompt config, a prompt budget
no question fits. On tokenizer-only copies of the embedded teacher (no weights are loaded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gen_ssd_ray.common.config import PromptConfig
from gen_ssd_ray.common.errors import InputError

KEY = "teacher.model='m'"


@pytest.fixture(scope="module")
def teacher_tokenizer_folder(tmp_path_factory) -> Path:
    from gen_ssd_ray.common.models import resolve_model

    src, dst = Path(resolve_model("embedded:teacher")), tmp_path_factory.mktemp("teacher-tokenizer")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def teacher_tokenizer(teacher_tokenizer_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_tokenizer_folder)


@pytest.fixture
def folder(teacher_tokenizer_folder, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(teacher_tokenizer_folder, dst)
    return dst


def _set_template(folder: Path, template: str | None) -> None:
    """Write (or, with None, remove) the chat template, wherever the folder keeps it."""
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)


def _check(folder: Path, prompt: PromptConfig | None = None, **kw):
    from gen_ssd_ray.common.prompts import check_chat_model

    return check_chat_model(str(folder), KEY, prompt or PromptConfig(), **kw)


def _fails(folder: Path, match: str, prompt: PromptConfig | None = None, **kw) -> str:
    with pytest.raises(InputError, match=match) as e:
        _check(folder, prompt, **kw)
    message = str(e.value)
    assert "\n" not in message, message
    return message


CHATML_BODY = "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
GEN = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def test_a_good_model_passes_and_returns_its_tokenizer(folder):
    tok = _check(folder, max_prompt_tokens=2000, example=True)
    assert tok.chat_template
    assert _check(folder, tokenizer=tok) is tok


def test_no_tokenizer(folder):
    for f in folder.iterdir():
        if f.name != "config.json":
            f.unlink()
    assert _fails(folder, "cannot load a tokenizer").startswith(KEY)


def test_broken_tokenizer_file(folder):
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    assert _fails(folder, "cannot load a tokenizer").startswith(KEY)


def test_no_chat_template(folder):
    _set_template(folder, None)
    assert _fails(folder, "no chat template.*chat_template.jinja").startswith(KEY)


def test_template_syntax_error(folder):
    _set_template(folder, "{% for m in messages %}" + CHATML_BODY)
    assert _fails(folder, "fails on this prompt config.*TemplateSyntaxError").startswith(KEY)


def test_template_that_rejects_a_system_message_names_prompt_system(folder):
    _set_template(
        folder,
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}" + CHATML_BODY + "{% endfor %}" + GEN,
    )
    _check(folder)  # no system message: fine
    message = _fails(folder, "System role not supported", PromptConfig(system="Be brief."))
    assert message.startswith("prompt.system:") and "unset prompt.system" in message


def test_template_that_cannot_render_an_assistant_turn_fails_fine_tuning_only(folder):
    _set_template(
        folder,
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no assistant') }}"
        "{% endif %}" + CHATML_BODY + "{% endfor %}" + GEN,
    )
    _check(folder)
    assert "assistant turn" in _fails(folder, "no assistant", example=True)


def test_template_that_drops_the_question(folder):
    _set_template(
        folder, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}" + GEN
    )
    _fails(folder, "does not write the user message")


CONTROLS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"]


def test_control_strings_in_the_prompt_config(teacher_tokenizer_folder, teacher_tokenizer):
    folder, tok = teacher_tokenizer_folder, teacher_tokenizer
    for control in CONTROLS:
        message = _fails(folder, "control string", PromptConfig(system=f"Be brief.{control}"), tokenizer=tok)
        assert message.startswith("prompt.system:") and control in message
        instruction = f"{{question}}{control}\nassistant\n"
        message = _fails(folder, "control string", PromptConfig(instruction=instruction), tokenizer=tok)
        assert message.startswith("prompt.instruction:")


def test_a_prompt_budget_no_question_fits(teacher_tokenizer_folder, teacher_tokenizer):
    from gen_ssd_ray.common.prompts import render_prompt

    folder, tok = teacher_tokenizer_folder, teacher_tokenizer
    for prompt in (PromptConfig(), PromptConfig(system="You are a careful tutor. " * 20)):
        n = len(render_prompt(tok, prompt, "").token_ids)
        budget = f"teacher.max_model_len=100 - search.max_new_tokens={100 - n + 1}"
        message = _fails(
            folder, f"takes {n} tokens", prompt, max_prompt_tokens=n - 1, budget=budget, tokenizer=tok
        )
        assert message.startswith(KEY) and budget in message
        _check(folder, prompt, max_prompt_tokens=n, tokenizer=tok)  # room for an empty question: rows may fit
