"""gen_ssd_ray.common.fsio: atomic, durable single-file writes (no Ray, no models)."""

from __future__ import annotations

import json
import os

import pytest

from gen_ssd_ray.common import fsio


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(fsio.TMP_PREFIX))


def test_write_creates_parent_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "x.bin"
    fsio.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert leftovers(path.parent) == []


def test_write_replaces_existing_content(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old content, longer than the new one\n")
    fsio.atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    fsio.atomic_write_text(path, "h\u00e9\u2192\n")
    assert path.read_bytes() == "h\u00e9\u2192\n".encode()
    assert leftovers(tmp_path) == []


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fsio.atomic_write_bytes(tmp_path / "x", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_keeps_old_content_and_removes_temporary_file(tmp_path, exc):
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(type(exc)):
        with fsio.atomic_writer(path) as fh:
            fh.write(b"half")
            assert leftovers(tmp_path)  # the write goes to a temporary sibling
            raise exc
    assert path.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_failure_without_old_file_leaves_nothing(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(TypeError):  # not JSON serializable: fails before anything is written
        fsio.atomic_write_json(path, {"a": object()})
    with pytest.raises(ValueError):
        with fsio.atomic_writer(path) as fh:
            fh.write(b"partial")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_json_round_trip_with_trailing_newline(tmp_path):
    path = tmp_path / "s.json"
    obj = {"b": [1, 2.5, None], "a": {"x": "y\u00e9"}}
    fsio.atomic_write_json(path, obj, indent=1, sort_keys=True)
    text = path.read_text()
    assert text == json.dumps(obj, indent=1, sort_keys=True) + "\n"
    assert json.loads(text) == obj


def test_writer_without_folder_sync(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(fsio, "fsync_dir", synced.append)
    with fsio.atomic_writer(tmp_path / "a", sync_dir=False) as fh:
        fh.write(b"a")
    assert synced == []
    fsio.atomic_write_bytes(tmp_path / "b", b"b")
    assert synced == [tmp_path]
    assert (tmp_path / "a").read_bytes() == b"a" and (tmp_path / "b").read_bytes() == b"b"


def test_fsync_dir(tmp_path):
    fsio.fsync_dir(tmp_path)
    fsio.fsync_dir(str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        fsio.fsync_dir(tmp_path / "f")
