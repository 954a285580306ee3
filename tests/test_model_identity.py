"""`model_revision`: a model's identity covers everything in its folder that changes what the jobs write
(config, weights, tokenizer, chat template, generation config, remote code), by content: editing the
chat template gives a new revision (so a fixed template is not skipped as already done), rewriting a file
unchanged or touching an unrelated one does not."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gen_ssd_ray.common.models import model_revision

FILES = {
    "config.json": '{"model_type": "llama"}',
    "model.safetensors": "weights",
    "tokenizer.json": '{"model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"chat_template": "{{ messages }}", "eos_token": "<|im_end|>"}',
    "special_tokens_map.json": '{"eos_token": "<|im_end|>"}',
    "added_tokens.json": '{"<|im_end|>": 2}',
    "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "chat_template.json": '{"chat_template": "{{ messages }}"}',
    "generation_config.json": '{"eos_token_id": 2}',
    "vocab.json": '{"a": 0}',
    "merges.txt": "a b\n",
    "tokenizer.model": "sentencepiece",
    "additional_chat_templates/tool_use.jinja": "{{ tools }}",
    "tokenization_custom.py": "class T: pass\n",
}


def _folder(root: Path, files: dict[str, str] = FILES) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("name", sorted(n for n in FILES if n != "model.safetensors"))
def test_editing_a_tokenizer_template_or_config_file_changes_the_revision(tmp_path, name):
    folder = _folder(tmp_path)
    before = model_revision(str(folder))
    (folder / name).write_text(FILES[name] + " ")
    assert model_revision(str(folder)) != before, name


@pytest.mark.parametrize("name", ["chat_template.jinja", "generation_config.json", "added_tokens.json"])
def test_adding_or_removing_one_changes_the_revision(tmp_path, name):
    files = {k: v for k, v in FILES.items() if k != name}
    folder = _folder(tmp_path, files)
    without = model_revision(str(folder))
    (folder / name).write_text(FILES[name])
    assert model_revision(str(folder)) != without


def test_the_chat_template_inside_tokenizer_config_counts(tmp_path):
    folder = _folder(tmp_path)
    before = model_revision(str(folder))
    config = json.loads(FILES["tokenizer_config.json"])
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert model_revision(str(folder)) != before


def test_no_op_rewrites_and_unrelated_files_keep_the_revision(tmp_path):
    folder = _folder(tmp_path)
    before = model_revision(str(folder))
    for name, text in FILES.items():  # same content, new mtime
        (folder / name).write_text(text)
        os.utime(folder / name, (1, 1))
    (folder / "README.md").write_text("notes")
    (folder / "logs").mkdir()
    (folder / "logs" / "train.log").write_text("step 1")
    assert model_revision(str(folder)) == before


def test_weights_by_name_and_size(tmp_path):
    folder = _folder(tmp_path)
    before = model_revision(str(folder))
    (folder / "model.safetensors").write_text("WEIGHTS")  # same size
    assert model_revision(str(folder)) == before
    (folder / "model.safetensors").write_text("more weights")
    assert model_revision(str(folder)) != before


def _hub_cache(cache: Path, repo_id: str, commit: str, files: dict[str, str]) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    _folder(repo / "snapshots" / commit, files)


def test_a_cached_hub_model_is_identified_by_its_snapshot_files(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _hub_cache(tmp_path, "org/model", "abc123", FILES)
    first = model_revision("org/model")
    assert first != "org/model"
    _hub_cache(tmp_path, "org/model", "def456", {**FILES, "chat_template.jinja": "{{ fixed }}"})
    assert model_revision("org/model") != first
    assert model_revision("org/not-cached") == "org/not-cached"


def test_a_fixed_template_is_a_new_generation_and_finetuning_fingerprint(tmp_path):
    """The reported failure: every row errored for lack of a template, the template is added, and the
    same command must not find the folder already done."""
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.generate.config import GenerateConfig, run_fingerprint
    from gen_ssd_ray.train.config import FinetuneConfig, train_fingerprint

    files = {k: v for k, v in FILES.items() if not k.startswith(("chat_template", "additional"))}
    model = _folder(tmp_path / "model", {**files, "tokenizer_config.json": '{"eos_token": "<|im_end|>"}'})
    gen_cfg = load_config(None, [], GenerateConfig)
    ft_cfg = load_config(None, [], schema_cls=FinetuneConfig)
    gen_before = run_fingerprint(gen_cfg, str(model), str(model))
    ft_before = train_fingerprint(ft_cfg, model_revision(str(model)), "rows")
    (model / "chat_template.jinja").write_text(FILES["chat_template.jinja"])
    assert run_fingerprint(gen_cfg, str(model), str(model)) != gen_before
    assert train_fingerprint(ft_cfg, model_revision(str(model)), "rows") != ft_before
