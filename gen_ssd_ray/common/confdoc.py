"""What a job's typed config documents about itself: every key, its default and its one-line doc.

The docs are read from the config source itself, never written twice: the `#` comment lines directly
above a dataclass field (or a comment at the end of the field's line) are that field's doc. A field a
subclass re-declares without a comment keeps the doc of the class it overrides (`StudentConfig.model`
is documented by `ModelPoolConfig.model`). A section's doc (a field holding a dataclass) is its comment,
else the first sentence of its class docstring.

- `config_keys(schema)`: the flattened keys of a schema, in declaration order (`KeyDoc`: dotted key, the
  default as YAML, the doc, and the module that declares the field); a list of dataclasses (`sim.faults`)
  lists its element's keys as `sim.faults[].kind`;
- `sections(schema)`: the dotted keys that are sections, with their docs;
- `format_keys(schema)`: the `--help` listing;
- `nearest_keys(schema, key)`: what an unknown key most likely meant (difflib), for error messages.

This module only reads source text (`inspect`, `tokenize`, `ast`): it imports nothing heavy and does
not load or validate configs (gen_ssd_ray.common.config does).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, e.g. "teacher.model"; list elements as "sim.faults[].kind"
    default: str  # the default rendered as YAML (a flow value on one line)
    doc: str  # the whole comment, joined into one paragraph ("" if the field has none)
    module: str  # the module declaring the field (where its doc belongs)

    @property
    def line(self) -> str:
        """The one-line doc: the first sentence of `doc`."""
        return first_sentence(self.doc)


# ---- reading comments ------------------------------------------------------------------------------


@functools.cache
def _own_docs(cls: type) -> dict[str, str]:
    """{field: comment} for the fields `cls` itself declares (not inherited); {} without source."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}  # line number (1-based) -> comment text, for whole-line comments
    trailing: dict[int, str] = {}  # line number -> comment at the end of a code line
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                (comments if not tok.line[: tok.start[1]].strip() else trailing)[tok.start[0]] = text
        tree = ast.parse(source)
    except (SyntaxError, tokenize.TokenError):
        return {}
    klass = tree.body[0]
    if not isinstance(klass, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    for node in klass.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line in comments:  # the contiguous comment lines right above the field
            above.insert(0, comments[line])
            line -= 1
        text = " ".join(p for p in (*above, trailing.get(node.lineno, "")) if p)
        if text:
            docs[node.target.id] = text
    return docs


def field_doc(cls: type, name: str) -> tuple[str, str]:
    """(doc, declaring module) of field `name` of dataclass `cls`: its own comment, else the comment of
    the nearest base class that documents it."""
    declared = None
    for klass in cls.__mro__:
        if name not in klass.__dict__.get("__annotations__", {}):
            continue
        declared = declared or klass
        doc = _own_docs(klass).get(name)
        if doc:
            return doc, klass.__module__
    return "", (declared or cls).__module__


def first_sentence(text: str) -> str:
    """`text` up to its first full stop that ends a sentence (not "e.g." or a decimal point)."""
    for m in re.finditer(r"\.\s+(?=\S)", text):
        before = text[: m.start()]
        if re.search(r"(\be\.g|\bi\.e|\betc|\bvs)$", before):
            continue
        return before + "."
    return text


def class_doc(cls: type) -> str:
    """The first sentence of a class's own docstring (not one inherited, nor the dataclass signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(cls.__name__ + "("):
        return ""
    return first_sentence(" ".join(doc.split()))


# ---- walking a schema ------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: fall back to the raw strings
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _list_element(tp: Any) -> type | None:
    """The dataclass `X` of a `list[X]` annotation, else None."""
    if typing.get_origin(tp) is list:
        (arg,) = typing.get_args(tp) or (None,)
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def render(value: Any) -> str:
    """A default as a one-line YAML value (JSON is YAML): null, true, 0.5, embedded:teacher, "a b"."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    plain = isinstance(value, str) and re.fullmatch(r"[\w./:@+-]+", value) is not None
    if plain and value not in ("null", "true", "false") and not re.fullmatch(r"[-+.\d_eE]+", value):
        return value  # a string YAML reads back as the same string: unquoted
    return json.dumps(value, default=str)


def _walk(cls: type, instance: Any, prefix: str) -> typing.Iterator[tuple[str, KeyDoc | None, str]]:
    """(dotted key, KeyDoc for a leaf or None for a section, section doc) in declaration order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        doc, module = field_doc(cls, f.name)
        tp = hints.get(f.name, f.type)
        value = getattr(instance, f.name) if instance is not None else None
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield key, None, doc or class_doc(tp)
            yield from _walk(tp, value, key + ".")
            continue
        yield key, KeyDoc(key, render(value), doc, module), ""
        element = _list_element(tp)
        if element is not None:
            for sub in _walk(element, None, key + "[]."):
                if sub[1] is not None:  # element fields have no default of their own: the class's
                    yield sub[0], dataclasses.replace(sub[1], default=_element_default(element, sub[0])), ""
                else:
                    yield sub


def _element_default(element: type, key: str) -> str:
    name = key.rsplit(".", 1)[-1]
    f = next(f for f in dataclasses.fields(element) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return render(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return render(f.default_factory())
    return "(required)"


def config_keys(schema: type) -> list[KeyDoc]:
    """Every leaf key of `schema` (a dataclass config) with its default (of `schema()`) and doc."""
    return [d for _, d, _ in _walk(schema, schema(), "") if d is not None]


def sections(schema: type) -> dict[str, str]:
    """{dotted section key: its doc} of `schema`."""
    return {k: doc for k, d, doc in _walk(schema, schema(), "") if d is None}


def format_keys(schema: type, width: int = 110) -> str:
    """The `--help` listing: one line `key = default` per key, its one-line doc indented below it, and a
    header line per section."""
    out: list[str] = []
    for key, d, doc in _walk(schema, schema(), ""):
        depth = key.count(".")
        indent = "  " * (depth + 1)
        if d is None:
            head = f"{key}:" + (f"  {first_sentence(doc)}" if doc else "")
            out.extend(textwrap.wrap(head, width, initial_indent=indent, subsequent_indent=indent + "    "))
            continue
        out.append(f"{indent}{key} = {d.default}")
        if d.line:
            out.extend(
                textwrap.wrap(
                    d.line, width, initial_indent=indent + "    ", subsequent_indent=indent + "    "
                )
            )
    return "\n".join(out)


# ---- unknown keys ----------------------------------------------------------------------------------


def normalize_key(key: str) -> str:
    """A key as `config_keys` spells it: list indices become `[]` (`sim.faults[0].kind`)."""
    return re.sub(r"\[\d+\]", "[]", key)


def nearest_keys(schema: type, key: str, n: int = 3) -> list[str]:
    """The keys of `schema` `key` most likely meant: the same name in another section first
    (`teacher.limit` -> `data.limit`) or a close spelling in the same section (difflib: `data.limt` ->
    `data.limit`); only if there is none, the closest spellings of the whole key."""
    key = normalize_key(key)
    keys = [d.key for d in config_keys(schema)] + list(sections(schema))
    head, _, last = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == head}
    found = [siblings[s] for s in difflib.get_close_matches(last, list(siblings), n=n, cutoff=0.75)]
    found += [k for k in keys if k.rpartition(".")[2] == last and k != key]
    found = found or difflib.get_close_matches(key, keys, n=n, cutoff=0.8)
    return list(dict.fromkeys(found))[:n]


def section_keys(schema: type, key: str) -> tuple[str, list[str]]:
    """(the deepest existing section of `key`, the names it holds): what the user can write there."""
    known = {"": None, **sections(schema)}
    head = normalize_key(key)
    while head and head not in known:
        head = head.rpartition(".")[0]
    prefix = head + "." if head else ""
    names = [
        k[len(prefix) :]
        for k in [d.key for d in config_keys(schema)] + list(sections(schema))
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    ]
    return head, names
