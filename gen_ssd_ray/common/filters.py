"""Row filters as a small, safe expression language (what `data.filters` entries are written in).

A filter is one boolean expression over a table's columns, in Python/pandas-query syntax:

    selected == True
    status == 'completed' and correct == True
    style != 'shortcut'
    not (num_response_tokens > 512) or method.isin(['beam', 'best_of_n'])
    len(response) >= 20 & ~student_ppl.isna()

Allowed, and nothing else:
- column names (plain identifiers; not `__dunder__` names);
- literals: strings, numbers, True / False / None, and lists or tuples of those (for `in` / `isin`);
  a unary minus on a number;
- comparisons `==  !=  <  <=  >  >=  in  not in`, chained or not (`0 < x <= 5`);
- boolean logic: `and`, `or`, `not`, and pandas' `&`, `|`, `~` (read as `and`, `or`, `not`, which is
  what pandas `query` does: they bind more loosely than comparisons);
- the column methods `col.isin([...])`, `col.isna()`, `col.notna()`, and string length `len(col)` or
  `col.str.len()` (the length of a string column; null stays null).

`parse(expr, key)` checks an expression before anything runs (a walk over the `ast` against that
whitelist: no attribute access, calls, subscripts, `@` variables, lambdas, comprehensions, f-strings
or imports) and raises `FilterError`, an InputError, with one line naming `key` (for example
`data.filters[1]`) and what is not allowed. The parsed `Filter` knows the columns it references
(`columns`, so a reader can load only those) and evaluates to a boolean mask with `mask(df)` on a
pandas DataFrame: a null compares False, except with `!=` (True), as in pandas; `== None` / `!= None`
test for null. A column that is missing or of the wrong type at evaluation is a `FilterError` too.

Knows pandas (imported lazily, by `mask`) and Python's `ast`; nothing about jobs or files.
"""

from __future__ import annotations

import ast
import io
import keyword
import operator
import tokenize
from dataclasses import dataclass
from typing import Any

from gen_ssd_ray.common.errors import InputError

ALLOWED = (
    "allowed: column names, string/number/True/False/None literals and lists of them, comparisons "
    "(== != < <= > >= in, not in), and/or/not (& | ~), col.isin([...]), col.isna(), col.notna(), "
    "len(col), col.str.len()"
)

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


class FilterError(InputError):
    """A filter expression that is not allowed or cannot be evaluated; the message names its key."""


def _describe(node: ast.AST) -> str:
    """A short name of a construct for the error message."""
    text = {
        ast.Attribute: "attribute access",
        ast.Call: "function calls",
        ast.Subscript: "subscripts",
        ast.Lambda: "lambda",
        ast.ListComp: "comprehensions",
        ast.SetComp: "comprehensions",
        ast.DictComp: "comprehensions",
        ast.GeneratorExp: "comprehensions",
        ast.JoinedStr: "f-strings",
        ast.NamedExpr: "assignment expressions",
        ast.IfExp: "conditional expressions",
        ast.Dict: "dict literals",
        ast.Set: "set literals",
        ast.Starred: "starred expressions",
        ast.Await: "await",
        ast.Yield: "yield",
        ast.BinOp: "arithmetic",
    }.get(type(node))
    return text or type(node).__name__


@dataclass(frozen=True)
class Filter:
    """A checked filter expression: its text, the key it came from, and the columns it references."""

    expr: str
    key: str
    tree: ast.Expression
    columns: frozenset[str]

    def mask(self, df) -> Any:
        """The boolean mask (a pandas Series aligned with `df`) of the rows the filter keeps."""
        import pandas as pd

        missing = sorted(self.columns - set(map(str, df.columns)))
        if missing:
            raise FilterError(
                f"{self.key}={self.expr!r}: no column {missing[0]!r} (columns: {sorted(map(str, df.columns))})"
            )
        try:
            value = _Evaluator(df).bool(self.tree.body)
        except FilterError:
            raise
        except Exception as e:  # a comparison pandas cannot make (str < int, ...)
            raise FilterError(
                f"{self.key}={self.expr!r} cannot be evaluated: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(value, pd.Series):  # a constant expression: keep all rows or none
            value = pd.Series(bool(value), index=df.index)
        return value.fillna(False).astype(bool)


def parse(expr: Any, key: str) -> Filter:
    """Check `expr` against the whitelist (see the module docstring); raises FilterError naming `key`."""
    if not isinstance(expr, str) or not expr.strip():
        raise FilterError(f"{key}={expr!r}: a filter must be a non-empty expression string ({ALLOWED})")
    try:
        tree = ast.parse(_pandas_booleans(expr.strip()), mode="eval")
    except (SyntaxError, tokenize.TokenError) as e:
        why = e.msg if isinstance(e, SyntaxError) else e.args[0]
        what = "`@` variables are not allowed" if "@" in expr else f"not a valid expression ({why})"
        raise FilterError(f"{key}={expr!r}: {what}; {ALLOWED}") from None
    columns: set[str] = set()
    _Checker(expr, key, columns).bool(tree.body)
    return Filter(expr, key, tree, frozenset(columns))


def _pandas_booleans(expr: str) -> str:
    """`&`, `|` and `~` as `and`, `or` and `not` (what pandas `query` does: they bind more loosely than
    comparisons, so `a == 1 & b == 2` means `(a == 1) and (b == 2)`)."""
    words = {"&": "and", "|": "or", "~": "not"}
    toks = [
        (tokenize.NAME, words[t.string])
        if t.type == tokenize.OP and t.string in words
        else (t.type, t.string)
        for t in tokenize.generate_tokens(io.StringIO(expr).readline)
    ]
    return tokenize.untokenize(toks).strip()


def parse_all(exprs: list[Any], key: str = "data.filters") -> list[Filter]:
    """`parse` every entry of a list of filters, naming each `key[i]`."""
    if not isinstance(exprs, (list, tuple)):
        raise FilterError(f"{key}={exprs!r}: must be a list of filter expressions ([] keeps every row)")
    return [parse(e, f"{key}[{i}]") for i, e in enumerate(exprs)]


def columns_of(exprs: list[Any], key: str = "data.filters") -> set[str]:
    """Every column the filters reference."""
    return set().union(*(f.columns for f in parse_all(exprs, key)))


class _Checker:
    """Walks the tree and raises on anything outside the whitelist; collects column names."""

    def __init__(self, expr: str, key: str, columns: set[str]):
        self.expr, self.key, self.columns = expr, key, columns

    def fail(self, node: ast.AST, what: str | None = None) -> None:
        what = what or f"{_describe(node)} are not allowed"
        raise FilterError(f"{self.key}={self.expr!r}: {what} ({ALLOWED})")

    def bool(self, node: ast.AST) -> None:
        """A boolean expression."""
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                self.bool(v)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self.bool(node.operand)
        elif isinstance(node, ast.Compare):
            self.value(node.left)
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, (ast.In, ast.NotIn)):
                    self.literal_list(right)
                elif type(op) in _COMPARE:
                    self.value(right)
                else:
                    self.fail(node, f"the comparison {type(op).__name__} is not allowed")
        elif isinstance(node, ast.Call) and _method(node) in ("isin", "isna", "notna"):
            self.method(node)
        elif isinstance(node, (ast.Name, ast.Constant)):
            self.value(node)  # a boolean column, or True / False
        else:
            self.fail(node)

    def method(self, node: ast.Call) -> None:
        name = _method(node)
        if node.keywords:
            self.fail(node, "keyword arguments are not allowed")
        self.column(node.func.value)  # type: ignore[attr-defined]
        if name == "isin":
            if len(node.args) != 1:
                self.fail(node, "isin takes one list of literals")
            self.literal_list(node.args[0])
        elif node.args:
            self.fail(node, f"{name}() takes no arguments")

    def value(self, node: ast.AST) -> None:
        """An operand of a comparison: a column, a literal, or a string length."""
        if isinstance(node, ast.Name):
            self.column(node)
        elif isinstance(node, ast.Constant):
            self.literal(node)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            if not (isinstance(node.operand, ast.Constant) and _is_number(node.operand.value)):
                self.fail(node, "unary minus is allowed on number literals only")
        elif _is_len(node):
            self.column(_len_column(node))
        else:
            self.fail(node)

    def column(self, node: ast.AST) -> None:
        if not isinstance(node, ast.Name):
            self.fail(node)
        name = node.id  # type: ignore[attr-defined]
        if name.startswith("__") or keyword.iskeyword(name):
            self.fail(node, f"the name {name!r} is not allowed")
        self.columns.add(name)

    def literal(self, node: ast.AST) -> None:
        if not isinstance(node, ast.Constant) or not (
            node.value is None or isinstance(node.value, (str, bool)) or _is_number(node.value)
        ):
            self.fail(node, f"the literal {ast.unparse(node)!r} is not allowed")

    def literal_list(self, node: ast.AST) -> None:
        if not isinstance(node, (ast.List, ast.Tuple)):
            self.fail(node, "`in` / isin need a list of literals, e.g. ['a', 'b']")
        for elt in node.elts:  # type: ignore[attr-defined]
            if isinstance(elt, ast.UnaryOp) and isinstance(elt.op, ast.USub):
                self.value(elt)
            else:
                self.literal(elt)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _method(node: ast.Call) -> str | None:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None


def _is_len(node: ast.AST) -> bool:
    """`len(col)` or `col.str.len()`."""
    if not isinstance(node, ast.Call) or node.keywords:
        return False
    f = node.func
    if isinstance(f, ast.Name) and f.id == "len":
        return len(node.args) == 1 and isinstance(node.args[0], ast.Name)
    return (
        not node.args
        and isinstance(f, ast.Attribute)
        and f.attr == "len"
        and isinstance(f.value, ast.Attribute)
        and f.value.attr == "str"
        and isinstance(f.value.value, ast.Name)
    )


def _len_column(node: ast.Call) -> ast.Name:
    if isinstance(node.func, ast.Name):
        return node.args[0]  # type: ignore[return-value]
    return node.func.value.value  # type: ignore[attr-defined,return-value]


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.UnaryOp):  # -number (checked)
        return -node.operand.value  # type: ignore[attr-defined]
    return node.value  # type: ignore[attr-defined]


class _Evaluator:
    """Evaluates a checked tree on a pandas DataFrame (only the node types `_Checker` lets through)."""

    def __init__(self, df):
        self.df = df

    def bool(self, node: ast.AST):
        if isinstance(node, ast.BoolOp):
            values = [self.bool(v) for v in node.values]
            out = values[0]
            for v in values[1:]:
                out = (out & v) if isinstance(node.op, ast.And) else (out | v)
            return out
        if isinstance(node, ast.UnaryOp):  # not (and ~, rewritten)
            return ~self._as_bool(self.bool(node.operand))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            col = self.df[node.func.value.id]  # type: ignore[attr-defined]
            name = _method(node)
            if name == "isin":
                return col.isin([_literal(e) for e in node.args[0].elts])  # type: ignore[attr-defined]
            return col.isna() if name == "isna" else col.notna()
        return self._as_bool(self.value(node))

    def _as_bool(self, v):
        import pandas as pd

        if isinstance(v, pd.Series):
            return v.astype("boolean").fillna(False).astype(bool)
        return bool(v)

    def value(self, node: ast.AST):
        if isinstance(node, ast.Name):
            return self.df[node.id]
        if isinstance(node, (ast.Constant, ast.UnaryOp)):
            return _literal(node)
        col = self.df[_len_column(node).id]  # type: ignore[arg-type]
        return col.str.len()

    def compare(self, node: ast.Compare):
        out = None
        left_node = node.left
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            part = self._compare_one(left_node, op, right_node)
            out = part if out is None else (out & part)
            left_node = right_node
        return out

    def _compare_one(self, left_node: ast.AST, op: ast.cmpop, right_node: ast.AST):
        import pandas as pd

        left = self.value(left_node)
        if isinstance(op, (ast.In, ast.NotIn)):
            values = [_literal(e) for e in right_node.elts]  # type: ignore[attr-defined]
            hit = left.isin(values) if isinstance(left, pd.Series) else left in values
            return ~hit if isinstance(op, ast.NotIn) else hit
        right = self.value(right_node)
        if right is None or left is None:  # `x == None` / `x != None`: null tests
            other = left if right is None else right
            if isinstance(op, (ast.Eq, ast.NotEq)) and isinstance(other, pd.Series):
                return other.isna() if isinstance(op, ast.Eq) else other.notna()
            raise FilterError("None can only be compared with == or != to a column")
        result = _COMPARE[type(op)](left, right)
        if isinstance(result, pd.Series):
            # A null compares False, except with != (True), as in pandas, whatever the column's dtype.
            for side in (left, right):
                if isinstance(side, pd.Series):
                    result = (result | side.isna()) if isinstance(op, ast.NotEq) else (result & side.notna())
        return result
