"""One fingerprint convention for every job: an explicit list of what changes the data.

Each job declares, next to its config schema, `DATA_KEYS`: the dotted config keys (a whole section,
or single fields) whose values change what the job writes. Everything else (resources, parallelism,
output placement, deadlines) is left out, so a re-run with more engines or another deadline resumes
in the same folder. Values that are not config keys but change the data too (a model folder's
revision, the content of the problems, a method's effective search knobs) are passed as `derived`,
under dotted keys of their own.

`fingerprint` is the first 16 hex digits of the SHA-256 of the picked values as sorted JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import Any


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *heads, last = dotted.split(".")
    for h in heads:
        tree = tree.setdefault(h, {})
    if isinstance(value, dict) and isinstance(tree.get(last), dict):
        tree[last].update(value)
    else:
        tree[last] = value


def picked(cfg: Any, keys: Iterable[str], derived: dict[str, Any] | None = None) -> dict[str, Any]:
    """The nested dict of `keys` of `cfg` (a dataclass), with `derived` merged in."""
    full = dataclasses.asdict(cfg)
    tree: dict[str, Any] = {}
    for key in keys:
        value: Any = full
        for part in key.split("."):
            value = value[part]
        _put(tree, key, value)
    for key, value in (derived or {}).items():
        _put(tree, key, value)
    return tree


def fingerprint(cfg: Any, keys: Iterable[str], derived: dict[str, Any] | None = None) -> str:
    blob = json.dumps(picked(cfg, keys, derived), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
