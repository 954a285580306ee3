"""Where the job's models come from: model names resolved to something loadable, and the model cache.

What this module knows:
- Model names: `resolve_model` turns ``embedded:teacher`` / ``embedded:student``, a local folder or a
  Hugging Face hub id into a string that ``from_pretrained`` and ``vllm.LLM`` accept, and raises
  `ModelNotFoundError` with the fix otherwise. The two embedded models
  are built by `gen_ssd_ray.common.embedded_models` (imported only when one is asked for).
- Model folders on object stores (``s3://bucket/models/x``, any scheme `gen_ssd_ray.common.storage`
  accepts): `resolve_model` downloads the folder once per node into
  ``<cache_root()>/models/remote/<scheme>/<bucket/key>@<versions>``, where ``<versions>`` hashes every
  object's name, size and ETag (`Storage.stat`), through `materialize` (a build lock, the marker written
  last: concurrent processes on a node wait for one download instead of making their own). The
  download is verified (every listed object present with its size; a ``config.json`` and weights; every
  shard a ``*.safetensors.index.json`` names) and refused otherwise with an InputError naming the key.
  A changed remote folder (other ETags) is a new folder, downloaded afresh. The local folder's path
  names its source, so `resolve_model(path)` on another node (an actor handed the driver's path)
  downloads the same version there (`localize_model`).
- Hub ids: one in the local Hugging Face cache (``$HF_HUB_CACHE``) with no revision asked for is used from
  there, as is. Otherwise, unless the hub is off (``HF_HUB_OFFLINE=1``), the revision (the config's
  ``revision`` key; null: ``main``) is resolved to its commit and that commit is downloaded with
  ``huggingface_hub.snapshot_download`` once per node into
  ``<cache_root()>/models/hub/<org>/<name>@<commit>`` (through `materialize`; the folder is verified like
  an object-store copy). The path names its source, so an actor on another node handed it downloads the
  same commit (`localize_model`). Offline, or with huggingface.co unreachable, a hub id that is not cached
  is a `ModelNotFoundError` (exit 2) naming the model, the key and the fixes (pre-download it, or give a
  local folder or an s3:// URI).
- `model_revision`: a cheap identity of a model folder, part of the jobs' fingerprints (of a remote
  folder: its cached copy, whose marker holds the URI and every object's ETag).
- The cache: `cache_root`, and `materialize`, which builds a folder under ``<cache_root()>/models/``
  once, atomically and under a file lock, so concurrent callers (Ray actors, pytest workers) never race
  or see half a folder (used by the embedded models and the lab tokenizer).

What it does not know: it does not load models for inference or serve them (see ``gen_ssd_ray.engines``).

Importing this module is cheap: torch, transformers and huggingface_hub are imported inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.fsio import fsync_dir

logger = logging.getLogger(__name__)

EMBEDDED_TEACHER = "embedded:teacher"
EMBEDDED_STUDENT = "embedded:student"
EMBEDDED_MODELS = (EMBEDDED_STUDENT, EMBEDDED_TEACHER)

# Written last into a finished folder; holds the recipe it was built from. Bump BUILD_FORMAT to rebuild.
MARKER = ".complete"
BUILD_FORMAT = 1
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ModelNotFoundError(InputError):
    """A model name that cannot be resolved offline; the message says what to do."""


def cache_root() -> Path:
    """Root of the project's cache: ``$GEN_SSD_CACHE`` if set, else ``~/.cache/gen_ssd_ray``."""
    env = os.environ.get("GEN_SSD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gen_ssd_ray"


def staging_dir(uri: str, job: str) -> Path:
    """The local folder where `job` stages the files of its object-store output folder `uri` (the same
    path on every node with the same cache root): ``<cache_root()>/staging/<job>/<hash of the URI>``."""
    return cache_root() / "staging" / job / hashlib.sha256(uri.encode()).hexdigest()[:16]


def models_dir(root: Path | None) -> Path:
    return Path(root if root is not None else cache_root()).expanduser() / "models"


# ----------------------------------------------------------------------------------------------------------
# Atomic, locked, idempotent folder creation


def _is_complete(dest: Path, recipe: dict[str, Any]) -> bool:
    try:
        return json.loads((dest / MARKER).read_text()) == recipe
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path, dest: Path, wait_s: float | None = None) -> Iterator[None]:
    """Exclusive ``flock`` on `path` (created if missing), waiting at most `wait_s` seconds (None: the
    default bound of gen_ssd_ray.common.joblock, GEN_SSD_LOCK_WAIT_S overrides it); past it,
    LockTimeoutError names the lock file, its holder and the fix."""
    from gen_ssd_ray.common.joblock import hold_lock

    fix = (
        f"wait for that process to finish building {dest}, or stop it if it hangs (the lock is freed "
        "when it exits) and re-run; GEN_SSD_LOCK_WAIT_S=<seconds> waits longer"
    )
    with hold_lock(
        path, f"materialize {dest.name}", wait_s=wait_s, what=f"the build lock of {dest}", fix=fix
    ):
        yield


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


def materialize(
    dest: Path, recipe: dict[str, Any], build: Callable[[Path], None], *, wait_s: float | None = None
) -> Path:
    """Create folder `dest` with ``build(tmp_folder)`` unless it is already complete for `recipe`.

    The folder is built in a hidden temporary sibling, the marker holding `recipe` is written last, and the
    whole folder is renamed into place, so `dest` is either absent, outdated or complete, never partial.
    A lock file next to it serializes concurrent builders (threads or processes); the second one finds the
    folder complete and returns at once. The wait for that lock is bounded by `wait_s` seconds (None:
    gen_ssd_ray.common.joblock's default, 600 s or GEN_SSD_LOCK_WAIT_S): a builder that hangs makes the
    others fail with LockTimeoutError (an InputError) naming the lock file and its holder, not wait forever.
    """
    if _is_complete(dest, recipe):
        return dest
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{dest.name}.lock", dest, wait_s):
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


# ----------------------------------------------------------------------------------------------------------
# Names


# Files that make up a tokenizer and its chat template in a Hugging Face folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
# Files of a model folder whose bytes change what the jobs produce besides the weights: the tokenizer, the
# chat template (in tokenizer_config.json, chat_template.jinja/.json or additional_chat_templates/), the
# generation config (vLLM takes stop tokens from it) and remote code (trust_remote_code).
REVISION_FILES = (
    "config.json",
    ".complete",
    "generation_config.json",
    *TOKENIZER_FILES,
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "preprocessor_config.json",
)
REVISION_GLOBS = ("additional_chat_templates/*", "*.py", "*.tiktoken")


def model_revision(path: str) -> str:
    """A cheap identity of a model: the content of its config, tokenizer, chat template, generation
    config and remote-code files (`REVISION_FILES`, `REVISION_GLOBS`), the names and sizes of its weight
    files, and its `.complete` marker if it has one (written by the fine-tuning job and the embedded
    model builders; it holds the run's fingerprint, so a retrained model of the same shape is a new
    revision). Content, not timestamps: rewriting a file unchanged keeps the revision; editing the chat
    template changes it. A hub id is identified by the same files of its snapshot in the offline
    Hugging Face cache, or by its name if it has none there. An object-store folder is identified by
    its local copy (`resolve_model`), whose marker holds the URI and every object's size and ETag."""
    if is_remote_location(path) or (
        not Path(path).exists() and (_remote_source(path) is not None or _hub_source(path) is not None)
    ):
        path = resolve_model(path)
    folder = Path(path)
    if not folder.is_dir():
        folder = _cached_snapshot(path)
        if folder is None:
            return path
    h = hashlib.sha256()
    named = {folder / name for name in REVISION_FILES}
    for pattern in REVISION_GLOBS:
        named.update(folder.glob(pattern))
    for f in sorted(named, key=lambda p: p.relative_to(folder).as_posix()):
        if f.is_file():
            rel = f.relative_to(folder).as_posix()
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            h.update(f"{rel}:{digest}\n".encode())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _cached_snapshot(name: str) -> Path | None:
    """The snapshot folder of hub id `name` in the offline Hugging Face cache, if it is there."""
    if not _HUB_ID.fullmatch(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id after all
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def resolve_model(name: str, key: str = "model", revision: str | None = None) -> str:
    """A model name as a string that ``from_pretrained`` and ``vllm.LLM(model=...)`` load offline.

    - An object-store folder ``s3://bucket/models/x``: downloaded once per node (see the module doc);
      returns the local copy. A local copy's path on a node that lacks it is downloaded there too.
    - ``embedded:teacher`` / ``embedded:student``: materialized if needed (under `cache_root()`); returns
      the folder.
    - An existing local path: must be a folder with a ``config.json``; returns it as an absolute path.
    - A hub id ``org/name`` that is not a local path: returned unchanged if `revision` is None and its
      ``config.json`` is in the local Hugging Face cache (``$HF_HUB_CACHE``); else `revision` (None:
      "main") is downloaded once per node and the local copy returned (see the module doc).
    Anything else raises `ModelNotFoundError` (an InputError) naming `key` (and `revision`'s key, the
    key's sibling ``revision``) and saying what to do.
    """
    if isinstance(name, str) and is_remote_location(name):
        return _resolve_remote(name, key)
    if isinstance(name, str) and not Path(name).expanduser().exists():
        source = _remote_source(name)
        if source is not None:
            return _resolve_remote(source[0], key, expect=source[1])
        hub = _hub_source(name)
        if hub is not None:
            return _resolve_hub(hub[0], key, hub[1])
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"empty model name {name!r}: give {EMBEDDED_TEACHER}, a folder or a hub id")
    if name.startswith("embedded:"):
        if name not in EMBEDDED_MODELS:
            raise ModelNotFoundError(
                f"unknown embedded model {name!r}: choose one of {list(EMBEDDED_MODELS)}"
            )
        from gen_ssd_ray.common import embedded_models

        materialize = (
            embedded_models.materialize_teacher
            if name == EMBEDDED_TEACHER
            else embedded_models.materialize_student
        )
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
        if isinstance(cached, str) and revision is None:
            return name
        return _resolve_hub(name, key, revision, hub_cache=constants.HF_HUB_CACHE)
    raise ModelNotFoundError(
        f"model {name!r} is not an existing folder, not a hub id of the form org/name, and not one of "
        f"{list(EMBEDDED_MODELS)}"
    )


# ----------------------------------------------------------------------------------------------------------
# Model folders on object stores

REMOTE = "remote"  # <models_dir>/remote/<scheme>/<bucket/key>@<versions>
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_remote_location(name: str) -> bool:
    """Whether `name` is an object-store URI (s3://, gs://, ...) rather than a path, hub id or embedded name."""
    from gen_ssd_ray.common.storage import is_remote

    return isinstance(name, str) and "://" in name and is_remote(name)


def remote_cache_folder(uri: str, versions: str, root: Path | None = None) -> Path:
    """Where the copy of `uri` at `versions` lives on this node (its path names its source)."""
    scheme, _, rest = uri.partition("://")
    return models_dir(root) / REMOTE / scheme / f"{rest.strip('/')}@{versions}"


def check_source_location(value: str, key: str) -> None:
    """Config validation of a model or data location: a built-in name (``embedded:...``, ``lab:...``)
    passes; anything else must be a usable path or object-store URI (`storage.check_location`:
    StorageError naming `key`, exit 2, before anything starts)."""
    from gen_ssd_ray.common.storage import check_location

    if isinstance(value, str) and value.startswith(("embedded:", "lab:")):
        return
    check_location(value, key)


def localize_model(name: str) -> str:
    """What an actor calls on the model path it was handed: an object-store URI, or the path of a
    downloaded copy (of an object-store folder or a hub model) this node lacks, resolved (downloaded
    once on this node); any other name unchanged (a local folder, a hub id, a simulated engine's name)."""
    if is_remote_location(name) or (
        isinstance(name, str)
        and (_remote_source(name) is not None or _hub_source(name) is not None)
        and not Path(name).exists()
    ):
        return resolve_model(name)
    return name


def _cache_relative(path: str, sub: str) -> str | None:
    """`path` relative to ``<this node's model cache>/<sub>`` (posix), or None when it is not under it."""
    if not isinstance(path, str) or not path.strip() or "://" in path:
        return None
    base = (models_dir(None) / sub).expanduser().absolute()
    try:
        return Path(path).expanduser().absolute().relative_to(base).as_posix()
    except ValueError:
        return None


def _remote_source(path: str) -> tuple[str, str] | None:
    """(uri, versions) of a path made by `remote_cache_folder` under this node's cache; else None."""
    rel = _cache_relative(path, REMOTE)
    if rel is None:
        return None
    scheme, _, rest = rel.partition("/")
    rest, at, versions = rest.rpartition("@")
    if not (scheme and rest and at and versions):
        return None
    return f"{scheme}://{rest}", versions


def _remote_listing(uri: str, key: str) -> tuple[Any, dict[str, tuple[int, str]]]:
    """(Storage, {name: (size, version token)}) of the model folder `uri`, checked to be a model."""
    from gen_ssd_ray.common.fsio import TMP_PREFIX
    from gen_ssd_ray.common.storage import Storage

    storage = Storage(uri, key=key)
    objects: dict[str, tuple[int, str]] = {}
    for name in storage.list():
        if Path(name).name.startswith(TMP_PREFIX):
            continue
        st = storage.stat(name)
        if st is not None:
            objects[name] = (st.size, st.token)
    if not objects:
        raise ModelNotFoundError(
            f"{key}={uri!r}: no objects under that prefix: upload a Hugging Face model folder there "
            "(config.json, *.safetensors, the tokenizer files) or fix the URI"
        )
    check_model_files(set(objects), key, uri, lambda n: storage.read_text(n))
    return storage, objects


def check_model_files(names: set[str], key: str, where: str, read_text: Callable[[str], str]) -> None:
    """Refuse a model folder (its file `names`) without config.json, without weights, or missing a
    shard its ``*.safetensors.index.json`` names (ModelNotFoundError naming `key`)."""
    if "config.json" not in names:
        raise ModelNotFoundError(
            f"{key}={where!r} has no config.json: it is not a Hugging Face model folder (upload the whole "
            "folder that save_pretrained wrote)"
        )
    top = {n for n in names if "/" not in n}
    if not any(n.endswith(_WEIGHT_SUFFIXES) for n in top):
        raise ModelNotFoundError(
            f"{key}={where!r} has no weights (*.safetensors): the upload is incomplete or the folder is "
            "not a model; upload the weight files too"
        )
    for index in sorted(n for n in top if n.endswith(".index.json")):
        try:
            shards = set(json.loads(read_text(index)).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            raise ModelNotFoundError(f"{key}={where!r}: {index} is not a readable weight index") from None
        missing = sorted(shards - names)
        if missing:
            raise ModelNotFoundError(
                f"{key}={where!r}: the weight files {missing[:3]} named in {index} are missing: the "
                "upload is incomplete; upload them"
            )


def _resolve_remote(uri: str, key: str, expect: str | None = None) -> str:
    """The local copy of the object-store model folder `uri` (downloaded once per node)."""
    from gen_ssd_ray.common.storage import check_location

    uri = check_location(uri, key)
    storage, objects = _remote_listing(uri, key)
    versions = hashlib.sha256(
        json.dumps(sorted((n, s, t) for n, (s, t) in objects.items())).encode()
    ).hexdigest()[:16]
    if expect is not None and versions != expect:
        raise ModelNotFoundError(
            f"{key}: the model folder {uri} changed since this job resolved it (objects version {expect}, "
            f"now {versions}): re-run the job so that every node uses the same version"
        )
    dest = remote_cache_folder(uri, versions)
    recipe = {
        "format": BUILD_FORMAT,
        "source": uri,
        "objects": {n: [s, t] for n, (s, t) in sorted(objects.items())},
    }

    def download(tmp: Path) -> None:
        start, total = time.perf_counter(), 0
        for name, (size, _) in sorted(objects.items()):
            storage.download_file(name, tmp / name)
            got = (tmp / name).stat().st_size
            if got != size:
                raise ModelNotFoundError(
                    f"{key}={uri!r}: {name} has {got} bytes, the listing said {size}: the folder changed "
                    "during the download; re-run when the upload is finished"
                )
            total += size
        elapsed = time.perf_counter() - start
        logger.info("downloaded %s: %d files, %d bytes in %.2f s", uri, len(objects), total, elapsed)
        (tmp / DOWNLOAD_LOG).write_text(
            json.dumps({"pid": os.getpid(), "bytes": total, "files": len(objects), "seconds": elapsed}) + "\n"
        )

    return str(materialize(dest, recipe, download))


# ----------------------------------------------------------------------------------------------------------
# Hub models, downloaded once per node

HUB = "hub"  # <models_dir>/hub/<org>/<name>@<commit>
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache_folder(repo: str, commit: str, root: Path | None = None) -> Path:
    """Where the copy of hub model `repo` at `commit` lives on this node (its path names its source)."""
    return models_dir(root) / HUB / f"{repo}@{commit}"


def hub_offline(*also: str) -> bool:
    """Whether the Hugging Face hub is switched off for this process: ``HF_HUB_OFFLINE``, or any of the
    variables `also` names (the data loader adds ``HF_DATASETS_OFFLINE``)."""
    return any(
        os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", *also)
    )


def _hub_source(path: str) -> tuple[str, str] | None:
    """(repo, commit) of a path made by `hub_cache_folder` under this node's cache; else None."""
    rel = _cache_relative(path, HUB)
    if rel is None:
        return None
    repo, at, commit = rel.rpartition("@")
    if not (at and _HUB_ID.fullmatch(repo) and _COMMIT.fullmatch(commit)):
        return None
    return repo, commit


def _resolve_hub(repo: str, key: str, revision: str | None, hub_cache: str | None = None) -> str:
    """The local copy of hub model `repo` at `revision` (None: main), downloaded once per node."""
    rev_key = key.rpartition(".")[0] + ".revision" if "." in key else "revision"
    what = f"{key}={repo!r}" + (f" ({rev_key}={revision!r})" if revision else "")
    fixes = (
        f"pre-download it where huggingface.co is reachable (`hf download {repo}"
        + (f" --revision {revision}" if revision else "")
        + "`) and copy the Hugging Face cache here (or set HF_HUB_CACHE), or set "
        f"{key} to a local model folder or an s3:// URI of one"
    )
    if revision is not None and _COMMIT.fullmatch(revision):  # a commit already on this node: no network
        dest = hub_cache_folder(repo, revision)
        if _is_complete(dest, _hub_recipe(repo, revision)):
            return str(dest)
    if hub_offline():
        cached = _hub_cached_snapshot(repo, revision)
        if cached is not None:
            return cached
        where = f"the offline Hugging Face cache ({hub_cache})" if hub_cache else "this node's cache"
        raise ModelNotFoundError(
            f"{what}: not a local folder and not in {where}, and HF_HUB_OFFLINE=1 forbids downloading "
            f"it: unset HF_HUB_OFFLINE where huggingface.co is reachable (it is then downloaded once per "
            f"node into {models_dir(None) / HUB}), or {fixes}"
        )
    # A full commit is used as is (another node fetching the driver's commit asks nothing else).
    if revision is not None and _COMMIT.fullmatch(revision):
        commit = revision
    else:
        commit = _hub_commit(repo, revision, what, fixes)
    dest = hub_cache_folder(repo, commit)

    def download(tmp: Path) -> None:
        from huggingface_hub import snapshot_download

        start = time.perf_counter()
        try:
            snapshot_download(repo_id=repo, revision=commit, local_dir=tmp)
        except Exception as e:  # the network went away, a file vanished, the disk filled up
            if isinstance(e, OSError) and not _network_error(e):
                raise
            raise ModelNotFoundError(
                f"{what}: downloading commit {commit} failed ({_short(e)}); {fixes}"
            ) from None
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
        names = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
        check_model_files(names, key, f"{repo}@{commit}", lambda n: (tmp / n).read_text())
        total = sum((tmp / n).stat().st_size for n in names)
        elapsed = time.perf_counter() - start
        logger.info(
            "downloaded %s@%s: %d files, %d bytes in %.2f s", repo, commit, len(names), total, elapsed
        )
        (tmp / DOWNLOAD_LOG).write_text(
            json.dumps({"pid": os.getpid(), "bytes": total, "files": len(names), "seconds": elapsed}) + "\n"
        )

    return str(materialize(dest, _hub_recipe(repo, commit), download))


def _hub_cached_snapshot(repo: str, revision: str | None) -> str | None:
    """The snapshot folder of `repo` at `revision` in the Hugging Face cache, if it is complete there."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=repo, revision=revision, local_files_only=True)
    except Exception:  # not cached (or not that revision): the caller says what to do
        return None
    return folder if isinstance(folder, str) and (Path(folder) / "config.json").is_file() else None


def _hub_recipe(repo: str, commit: str) -> dict[str, Any]:
    return {"format": BUILD_FORMAT, "source": f"hf://{repo}", "commit": commit}


def _hub_commit(repo: str, revision: str | None, what: str, fixes: str) -> str:
    """The commit `revision` of `repo` names on the hub (one metadata request)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    try:
        info = HfApi().model_info(repo, revision=revision, timeout=30)
    except hub_errors.RevisionNotFoundError:
        raise ModelNotFoundError(
            f"{what}: the hub has no such revision; set it to a branch, tag or commit of {repo}"
        ) from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as e:
        raise ModelNotFoundError(
            f"{what}: no such model on the hub, or it is private or gated ({_short(e)}): check the name, "
            f"log in (`hf auth login` / HF_TOKEN) if it needs access, or {fixes}"
        ) from None
    except Exception as e:  # unreachable: DNS, refused, timeouts, proxies, offline mode set in the library
        raise ModelNotFoundError(f"{what}: huggingface.co is unreachable ({_short(e)}): {fixes}") from None
    if not info.sha:
        raise ModelNotFoundError(f"{what}: the hub did not name a commit for this revision; {fixes}")
    return info.sha


def _network_error(e: BaseException) -> bool:
    """Whether an OSError is the network's (a connection or timeout), not the local disk's."""
    return isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(
        ("requests", "httpx", "urllib3")
    )


def _short(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


# Written into a downloaded copy (information only: who downloaded it, how many bytes, how long).
DOWNLOAD_LOG = ".download.json"
