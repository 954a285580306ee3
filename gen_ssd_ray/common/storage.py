"""One storage layer: every job location is a local path or an object-store URI, read and written here.

What this module knows:
- `check_location(value, key)`: the one test of a location a user gave (an output folder, a data
  file, a model folder). A local path (no scheme, or ``file://``) or a URI whose scheme fsspec
  resolves to a writable store (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ...) passes and comes
  back normalized (``file://x`` -> ``x``; trailing ``/`` dropped). Anything else is refused with
  `StorageError` (an InputError: exit 2, before anything starts) naming `key`, the scheme and the fix:
  an unknown scheme is never turned into a local folder named ``s3:``. A known scheme whose library is
  missing is refused with the package to install (``s3fs`` ships with the project; ``gcsfs`` and
  others are the user's to add). `is_remote(value)` says whether a location is an object store.
- `Storage(uri)`: one folder. Names below it are ``/``-separated relative paths. Operations:
  `exists`, `read_bytes`/`read_text`, `write_bytes`/`write_text`/`write_json` (all or nothing: locally
  through gen_ssd_ray.common.fsio's temp-file + fsync + rename; on an object store one PUT, whose
  object appears only complete), `create_bytes` (exclusive: False when the name exists; locally a
  hard link of a complete temp file, on S3 a conditional PUT ``If-None-Match: *``), `replace_bytes`
  (conditional on the `token` of `stat`: the object's ETag on S3; False when it changed), `stat`,
  `list` (names under a prefix, recursive, sorted; object-store listings are never cached), `delete`,
  `upload_file`/`download_file`, `upload_dir`/`download_dir` (a folder tree, each file all or
  nothing), `open_input` (a seekable binary file to read), `arrow()` (a pyarrow FileSystem and this
  folder's path on it, for `pyarrow.parquet` / `pyarrow.dataset`), `child(name)` and `uri_of(name)`.
- Credentials and endpoints come from each store's own standard environment (for S3:
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``,
  ``AWS_DEFAULT_REGION``, or an instance role); nothing is passed through the config.

What it does not know: locking and commit protocols (gen_ssd_ray.common.joblock holds a folder, on an
object store with a lease object; each job's output module decides what a commit is). Exclusive and
conditional writes need the store's support: local disks, S3 (and S3-compatible servers that honour
conditional PUTs) and GCS have it; on other stores `create_bytes` and `replace_bytes` fall back to a
check then a write, which two racing writers can both pass (`conditional` says which one a Storage
has). Object stores have no rename: an object is either absent or complete, which is what the jobs'
commit protocols rely on.

fsspec and the store's library are imported on first use of a remote folder; local folders import
only the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gen_ssd_ray.common import fsio
from gen_ssd_ray.common.errors import InputError

# Schemes fsspec knows that cannot hold a job's folders (read-only, archives, wrappers, caches).
_NOT_A_STORE = {
    "http",
    "https",
    "zip",
    "tar",
    "libarchive",
    "github",
    "gist",
    "git",
    "reference",
    "data",
    "cached",
    "blockcache",
    "filecache",
    "simplecache",
    "dir",
    "generic",
    "async_wrapper",
    "asyncwrapper",
    "jupyter",
    "jlab",
    "pyscript",
    "dask",
    "wandb",
    "hf",
}
_LOCAL = {"", "file", "local"}
# Stores whose conditional PUTs this module uses (create: If-None-Match / replace: If-Match).
_CONDITIONAL = {"s3", "s3a", "gs", "gcs", "memory"}


class StorageError(InputError):
    """A location that cannot be used (bad scheme, missing library): exit 2, nothing started."""


def scheme_of(value: str) -> str:
    """The URI scheme of `value` ("" for a plain local path)."""
    head, sep, _ = str(value).partition("://")
    return head.lower() if sep and head and "/" not in head else ""


def is_remote(value: str | os.PathLike[str]) -> bool:
    """Whether `value` names an object store (any scheme other than file://)."""
    return scheme_of(str(value)) not in _LOCAL


def check_location(value: Any, key: str) -> str:
    """`value` normalized if it is a usable location, else StorageError naming `key` (see module doc)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise StorageError(
            f"{key}={value!r}: not a path or URI; give a local path or e.g. s3://bucket/prefix"
        )
    value = value.strip()
    scheme = scheme_of(value)
    if scheme in _LOCAL:
        local = value.split("://", 1)[1] if scheme else value
        first = local.split("/", 1)[0]
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+:", first):
            raise StorageError(
                f"{key}={value!r}: looks like a URI with a slash missing (a local folder named {first!r} "
                f"would be made); write {first}//..."
            )
        return local
    from fsspec.registry import known_implementations, registry

    fix = "use a local path, or an object-store URI such as s3://bucket/prefix or gs://bucket/prefix"
    if scheme in _NOT_A_STORE:
        raise StorageError(f"{key}={value!r}: {scheme}:// cannot hold a job's files; {fix}")
    if scheme not in known_implementations and scheme not in registry:
        raise StorageError(f"{key}={value!r}: unknown storage scheme {scheme}://; {fix}")
    try:
        from fsspec.registry import get_filesystem_class

        get_filesystem_class(scheme)
    except ImportError as e:
        hint = known_implementations.get(scheme, {}).get("err") or str(e)
        raise StorageError(
            f"{key}={value!r}: {scheme}:// needs a library that is not installed: {hint}"
        ) from e
    bucket = value.split("://", 1)[1].strip("/")
    if not bucket and scheme != "memory":
        raise StorageError(f"{key}={value!r}: no bucket; give {scheme}://bucket/prefix")
    return value.rstrip("/")


def check_local(value: Any, key: str, what: str) -> str:
    """A location that must be on this machine's file system (e.g. a cache); StorageError otherwise."""
    value = check_location(value, key)
    if is_remote(value):
        raise StorageError(f"{key}={value!r}: {what} must be a local path, not an object-store URI")
    return value


@dataclass(frozen=True)
class Stat:
    """What `Storage.stat` knows of one file: size in bytes, modification time (epoch seconds, None if
    the store does not say) and `token`, the version a conditional `replace_bytes` compares against."""

    size: int
    mtime: float | None
    token: str


def _join(base: str, name: str) -> str:
    name = name.strip("/")
    return f"{base.rstrip('/')}/{name}" if name else base


class Storage:
    """One folder, local or on an object store (see the module doc)."""

    def __init__(self, uri: str | os.PathLike[str], *, key: str = "location"):
        self.uri = check_location(uri, key)
        self.scheme = scheme_of(self.uri)
        self.remote = is_remote(self.uri)
        self.conditional = (not self.remote) or self.scheme in _CONDITIONAL
        self._fs: Any = None
        self._root = self.uri if not self.remote else ""

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __reduce__(self):  # picklable for Ray: the fsspec handle is rebuilt where it is used
        return (Storage, (self.uri,))

    # -- paths -------------------------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        """The fsspec filesystem (remote folders only), created on first use, listings uncached."""
        if self._fs is None:
            if not self.remote:
                raise TypeError(f"{self.uri} is a local folder")
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.uri, use_listings_cache=False)
            self._root = self._root.rstrip("/")
        return self._fs

    def _path(self, name: str = "") -> str:
        if self.remote:
            self.fs  # noqa: B018 - sets _root
            return _join(self._root, name)
        return str(Path(self.uri) / name) if name else self.uri

    @property
    def local_path(self) -> Path:
        """This folder as a Path (local folders only)."""
        if self.remote:
            raise TypeError(f"{self.uri} is on an object store, not a local folder")
        return Path(self.uri)

    def uri_of(self, name: str) -> str:
        """The location of `name` as a user would write it (a path, or scheme://bucket/...)."""
        return _join(self.uri, name) if self.remote else str(Path(self.uri) / name)

    def child(self, name: str) -> Storage:
        return Storage(self.uri_of(name))

    # -- reading -----------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        if not self.remote:
            return (Path(self.uri) / name).exists()
        return bool(self.fs.exists(self._path(name)))

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes; FileNotFoundError if it is absent."""
        if not self.remote:
            return (Path(self.uri) / name).read_bytes()
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file", self.uri_of(name)) from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def stat(self, name: str) -> Stat | None:
        """Size, mtime and version token of `name`, or None if it is absent."""
        if not self.remote:
            try:
                st = os.stat(Path(self.uri) / name)
            except FileNotFoundError:
                return None
            return Stat(st.st_size, st.st_mtime, f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}")
        try:
            info = self.fs.info(self._path(name), refresh=True)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        elif isinstance(mtime, str):
            import datetime as _dt

            try:
                mtime = _dt.datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp()
            except ValueError:
                mtime = None
        token = (
            info.get("ETag") or info.get("generation") or info.get("etag") or f"{mtime}-{info.get('size')}"
        )
        return Stat(
            int(info.get("size") or 0), mtime if isinstance(mtime, (int, float)) else None, str(token)
        )

    def list(self, prefix: str = "") -> list[str]:
        """Names of the files under `prefix` (recursive), relative to this folder, sorted; [] if none."""
        if not self.remote:
            base = Path(self.uri)
            top = base / prefix if prefix else base
            if top.is_file():
                return [prefix]
            if not top.is_dir():
                return []
            return sorted(
                str(p.relative_to(base)).replace(os.sep, "/") for p in top.rglob("*") if p.is_file()
            )
        self.fs.invalidate_cache()
        top = self._path(prefix)
        try:
            found = self.fs.find(top, withdirs=False)
        except FileNotFoundError:
            return []
        root = self._root + "/"
        return sorted(p[len(root) :] for p in found if p.startswith(root))

    @contextlib.contextmanager
    def open_input(self, name: str) -> Iterator[BinaryIO]:
        """A seekable binary file open on `name` for reading."""
        if not self.remote:
            with open(Path(self.uri) / name, "rb") as fh:
                yield fh
            return
        with self.fs.open(self._path(name), "rb") as fh:
            yield fh

    def arrow(self) -> tuple[Any, str]:
        """A pyarrow FileSystem and this folder's path on it (`pq.read_table(f"{path}/x", filesystem=fs)`)."""
        import pyarrow.fs as pafs

        if not self.remote:
            return pafs.LocalFileSystem(), str(Path(self.uri).absolute())
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self._root

    # -- writing -----------------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace `name` with `data`, all or nothing (locally also durably: fsync)."""
        if not self.remote:
            fsio.atomic_write_bytes(Path(self.uri) / name, data)
            return
        self.fs.pipe_file(self._path(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any, **json_kwargs: Any) -> None:
        self.write_text(name, json.dumps(obj, **json_kwargs) + "\n")

    def create_bytes(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet: True if this call created it, False if it was
        there (the data is then not written). Exclusive where the store supports it (`conditional`)."""
        if not self.remote:
            path = Path(self.uri) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{fsio.TMP_PREFIX}{path.name}.{os.getpid()}.x")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            finally:
                tmp.unlink(missing_ok=True)
            fsio.fsync_dir(path.parent)
            return True
        path = self._path(name)
        if not self.conditional and self.fs.exists(path):
            return False
        return self._put_if(path, data, FileExistsError, mode="create")

    def replace_bytes(self, name: str, data: bytes, token: str) -> bool:
        """Replace `name` with `data` only if its version is still `token` (from `stat`): True if
        replaced, False if it changed (or vanished) meanwhile."""
        if not self.remote:
            st = self.stat(name)
            if st is None or st.token != token:
                return False
            self.write_bytes(name, data)
            return True
        path = self._path(name)
        if self.scheme in ("s3", "s3a"):
            return self._put_if(path, data, FileNotFoundError, IfMatch=token)
        if self.scheme in ("gs", "gcs"):
            return self._put_if(path, data, FileNotFoundError, if_generation_match=token)
        st = self.stat(name)
        if st is None or st.token != token:
            return False
        self.fs.pipe_file(path, data)
        return True

    def _put_if(self, path: str, data: bytes, refused: type[OSError], **condition: Any) -> bool:
        """One conditional PUT: True if written, False if the store refused the precondition (a
        precondition failure, or `refused`: the object exists for a create, vanished for a replace)."""
        try:
            self.fs.pipe_file(path, data, **condition)
        except refused:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def delete(self, name: str) -> None:
        """Remove file `name` (nothing if absent)."""
        if not self.remote:
            Path(self.uri, name).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))

    def delete_tree(self, prefix: str) -> None:
        """Remove every file under `prefix` (a folder tree); nothing if there is none."""
        if not self.remote:
            shutil.rmtree(Path(self.uri) / prefix, ignore_errors=True)
            return
        for name in self.list(prefix):
            self.delete(name)

    def upload_file(self, local: str | os.PathLike[str], name: str) -> None:
        """Copy a local file to `name`, all or nothing."""
        if not self.remote:
            dest = Path(self.uri) / name
            with open(local, "rb") as src, fsio.atomic_writer(dest) as out:
                shutil.copyfileobj(src, out, 1 << 20)
            return
        self.fs.put_file(os.fspath(local), self._path(name))

    def download_file(self, name: str, local: str | os.PathLike[str]) -> None:
        """Copy `name` to a local file, all or nothing."""
        local = Path(local)
        with fsio.atomic_writer(local, sync_dir=False) as out, self.open_input(name) as src:
            shutil.copyfileobj(src, out, 1 << 20)

    def upload_dir(self, local: str | os.PathLike[str], prefix: str) -> list[str]:
        """Copy every file of the local folder tree `local` under `prefix`; returns the names written."""
        local = Path(local)
        names = []
        for p in sorted(local.rglob("*")):
            if p.is_file():
                rel = str(p.relative_to(local)).replace(os.sep, "/")
                self.upload_file(p, _join(prefix, rel))
                names.append(_join(prefix, rel))
        return names

    def download_dir(self, prefix: str, local: str | os.PathLike[str]) -> list[str]:
        """Copy every file under `prefix` into the local folder `local`; returns the relative names."""
        local = Path(local)
        rels = []
        for name in self.list(prefix):
            rel = name[len(prefix.strip("/")) :].lstrip("/") if prefix else name
            self.download_file(name, local / rel)
            rels.append(rel)
        return rels

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[BinaryIO]:
        """A binary file whose content becomes `name` when the block exits normally (all or nothing;
        on an exception `name` keeps its old content or stays absent)."""
        if not self.remote:
            with fsio.atomic_writer(Path(self.uri) / name) as fh:
                yield fh
            return
        buf = io.BytesIO()
        yield buf
        data = buf.getvalue()
        if len(data) <= 256 << 20:
            self.fs.pipe_file(self._path(name), data)
            return
        with tempfile.NamedTemporaryFile(prefix="gen-ssd-upload-") as tmp:
            tmp.write(data)
            tmp.flush()
            self.fs.put_file(tmp.name, self._path(name))


def _precondition_failed(e: BaseException) -> bool:
    text = str(e)
    return "PreconditionFailed" in text or "pre-conditions" in text or "412" in text
