"""Fine-tuning checkpoints (gen_ssd_ray.train.checkpoint): what is resumed from, what is never deleted.

Plain files only (no torch, no DeepSpeed): a fake checkpoint is a `step-NNNNNN` folder with two shard
files; a complete one also has the marker rank 0 writes after every rank saved. Each adversarial case
damages the folder the way a crash, a hand repair or a stray copy does, and checks that the resume
point is the newest complete checkpoint, that nothing complete is deleted, and that names which are not
checkpoints are refused with one line (an InputError, exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.train import checkpoint as ck

FP = "fp-0123456789ab"


def save(out: Path, step: int, *, complete: bool = True, world: int = 1, fp: str = FP) -> Path:
    """A fake checkpoint as the worker writes it: shards, sync, marker, then `latest`."""
    tag = ck.tag_for(step)
    folder = out / ck.CHECKPOINTS / tag
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * (100 + step))
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
    if complete:
        ck.sync_tree(folder)
        ck.write_marker(out, tag, world, fp)
        ck.mark_latest(out, tag, keep_last=10)
    return folder


def tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / ck.CHECKPOINTS).iterdir() if p.name != ck.LATEST)


def test_marker_lists_files_and_resume_takes_the_newest_complete(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    marker = json.loads((tmp_path / "checkpoints/step-000004/_complete.json").read_text())
    assert marker["step"] == 4 and marker["world_size"] == 1 and marker["fingerprint"] == FP
    assert marker["files"]["mp_rank_00_model_states.pt"] == 104
    assert ck.pointer(tmp_path) == "step-000004"
    assert ck.resume_tag(tmp_path, FP, 1) == "step-000004"


@pytest.mark.parametrize(
    "damage",
    [
        "pointer-missing-folder",
        "pointer-garbage",
        "pointer-empty",
        "pointer-binary",
        "pointer-to-half-written",
        "newest-deleted-by-hand",
        "newest-shard-truncated",
        "newest-shard-missing",
        "newest-marker-garbage",
        "pointer-removed",
        "pointer-is-a-folder",
    ],
)
def test_unresolvable_pointer_falls_back_and_deletes_nothing(tmp_path, damage):
    save(tmp_path, 2)
    save(tmp_path, 4)
    newest = save(tmp_path, 6)
    latest = tmp_path / ck.CHECKPOINTS / ck.LATEST
    expect = "step-000004"
    if damage == "pointer-missing-folder":
        latest.write_text("step-000008\n")
        expect = "step-000006"
    elif damage == "pointer-garbage":
        latest.write_text("../../etc\n")
        expect = "step-000006"
    elif damage == "pointer-empty":
        latest.write_text("")
        expect = "step-000006"
    elif damage == "pointer-binary":
        latest.write_bytes(b"\xff\xfe\x00step")
        expect = "step-000006"
    elif damage == "pointer-to-half-written":
        save(tmp_path, 8, complete=False)
        latest.write_text("step-000008\n")
        expect = "step-000006"
    elif damage == "newest-deleted-by-hand":
        shutil.rmtree(newest)
    elif damage == "newest-shard-truncated":
        (newest / "mp_rank_00_model_states.pt").write_bytes(b"m")
    elif damage == "newest-shard-missing":
        (newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    elif damage == "newest-marker-garbage":
        (newest / ck.MARKER).write_text('{"step": 6, "files": ')
    elif damage == "pointer-removed":
        latest.unlink()
        expect = "step-000006"
    elif damage == "pointer-is-a-folder":
        latest.unlink()
        latest.mkdir()
        expect = "step-000006"
    before = tags(tmp_path)
    ck.check_folder(tmp_path)
    assert ck.resume_tag(tmp_path, FP, 1) == expect
    # The driver's start-up and the next save never delete a complete checkpoint by a guess.
    ck.incomplete_tags(tmp_path)
    assert tags(tmp_path) == before
    assert set(ck.complete_tags(tmp_path)) >= {"step-000002", "step-000004"}


def test_all_checkpoints_incomplete_resumes_from_scratch_and_keeps_them(tmp_path):
    save(tmp_path, 2, complete=False)
    (tmp_path / ck.CHECKPOINTS / ck.LATEST).write_text("step-000002\n")
    assert ck.resume_tag(tmp_path, FP, 1) is None
    assert tags(tmp_path) == ["step-000002"]


def test_prune_keeps_last_complete_and_drops_superseded_partials(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 3, complete=False)  # a save cut short, superseded by step 4
    save(tmp_path, 4)
    save(tmp_path, 9, complete=False)  # newer than the new checkpoint: not touched
    folder = save(tmp_path, 6, complete=False)
    ck.sync_tree(folder)
    ck.write_marker(tmp_path, "step-000006", 1, FP)
    ck.mark_latest(tmp_path, "step-000006", keep_last=2)
    assert tags(tmp_path) == ["step-000004", "step-000006", "step-000009"]


@pytest.mark.parametrize(
    "name, kind",
    [
        ("step-000010.bak", "dir"),
        ("step-10", "dir"),
        ("old", "dir"),
        ("step-000010 copy", "dir"),
        ("step-000012", "file"),
        (".step-000010", "hidden-dir-ok"),
        ("notes.txt", "file-ok"),
    ],
)
def test_stray_names_are_refused_with_one_line(tmp_path, name, kind):
    save(tmp_path, 2)
    stray = tmp_path / ck.CHECKPOINTS / name
    if kind.startswith(("dir", "hidden-dir")):
        stray.mkdir()
    else:
        stray.write_text("x")
    if kind.endswith("-ok"):  # ignored: nothing is ever resumed from or deleted by its name
        ck.check_folder(tmp_path)
        assert ck.resume_tag(tmp_path, FP, 1) == "step-000002"
        return
    with pytest.raises(ck.CheckpointFolderError) as e:
        ck.check_folder(tmp_path)
    assert isinstance(e.value, InputError)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "move it out" in msg
    # Nothing else crashes on it either: the resume point and pruning ignore it.
    assert ck.resume_tag(tmp_path, FP, 1) == "step-000002"
    save(tmp_path, 4)
    assert stray.exists()


def test_hidden_temporaries_and_deepspeed_files_are_not_strays(tmp_path):
    save(tmp_path, 2)
    (tmp_path / ck.CHECKPOINTS / ".tmp-latest.1234").write_text("x")
    (tmp_path / ck.CHECKPOINTS / "zero_to_fp32.py").write_text("x")  # DeepSpeed writes them there
    (tmp_path / ck.CHECKPOINTS / "zero_to_torch.py").write_text("x")
    ck.check_folder(tmp_path)


def test_fingerprint_and_world_size_are_checked(tmp_path):
    save(tmp_path, 2, world=2)
    with pytest.raises(ck.CheckpointMismatchError, match=r"runtime.num_workers=2 to resume"):
        ck.resume_tag(tmp_path, FP, 1)
    with pytest.raises(ck.CheckpointMismatchError, match=r"another run.*output.force=true"):
        ck.resume_tag(tmp_path, "other", 2)
    assert ck.resume_tag(tmp_path, FP, 2) == "step-000002"


def test_checkpoint_not_owned_by_the_job_user_is_refused(tmp_path, monkeypatch):
    save(tmp_path, 2)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(ck.CheckpointUntrustedError, match=r"belongs to uid .*unpickled"):
        ck.resume_tag(tmp_path, FP, 1)


def test_step_of_never_crashes():
    assert ck.step_of("step-000012") == 12
    for bad in ("step-000012.bak", "step-", "latest", "", "step-12", "step-0000x1"):
        assert ck.step_of(bad) is None


def test_world_size_change_says_how_to_resume(tmp_path):
    """A folder whose checkpoints were written by another worker count: the refusal (another fingerprint)
    says which runtime.num_workers resumes it."""
    from gen_ssd_ray.common.config import load_config, to_yaml
    from gen_ssd_ray.train.config import FinetuneConfig
    from gen_ssd_ray.train.run import _world_size_hint

    old = load_config(None, ["runtime.num_workers=2"], FinetuneConfig)
    (tmp_path / ck.CONFIG).write_text(to_yaml(old))
    save(tmp_path, 2, world=2)
    now = load_config(None, ["runtime.num_workers=4"], FinetuneConfig)
    hint = _world_size_hint(now, tmp_path)
    assert "runtime.num_workers=2 to resume" in hint and "\n" not in hint
    assert _world_size_hint(old, tmp_path) == ""
    (tmp_path / ck.CONFIG).write_text("runtime: [not, a, mapping")
    assert _world_size_hint(now, tmp_path) == ""


@pytest.mark.parametrize("text", ["[]", "null", "42", '{"fingerprint": ', "\x00\xff", ""])
def test_junk_state_files_read_as_absent(tmp_path, text):
    (tmp_path / ck.STATE).write_bytes(text.encode("utf-8", "surrogateescape") if text else b"")
    assert ck.read_json(tmp_path / ck.STATE) is None


def test_saving_again_over_a_step_clears_its_marker_first(tmp_path):
    folder = save(tmp_path, 2)
    save(tmp_path, 4)
    ck.clear_marker(tmp_path, "step-000004")
    assert ck.resume_tag(tmp_path, FP, 1) == "step-000002"
    ck.clear_marker(tmp_path, "step-000008")  # no folder: nothing to do
    assert folder.is_dir()
