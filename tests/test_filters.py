"""The row-filter language (gen_ssd_ray.common.filters): what it accepts, evaluates and refuses.

Every filter shipped in conf/ and the defaults keep their meaning (checked against pandas `query`);
a list of attack strings (attribute access, calls, `@` variables, dunders, lambdas, comprehensions,
imports, ...) is each refused before anything runs, with one line naming the key; and the
file-writing attack that pandas `query` executes is shown not to write with the new language.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pandas as pd
import pytest

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.filters import FilterError, columns_of, parse, parse_all

ROOT = Path(__file__).resolve().parents[1]


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "status": ["completed", "pruned", "completed", "error", None],
            "correct": [True, False, None, True, True],
            "selected": [True, False, True, False, None],
            "style": ["cot", "shortcut", "cot", None, "cot"],
            "num_response_tokens": [10, 600, 300, 0, 5],
            "student_ppl": [1.5, math.nan, 2.0, 3.0, None],
            "response": ["abc", "a longer answer", "", None, "xyzxyzxyz"],
            "method": ["beam", "best_of_n", "greedy", "beam", "beam"],
        }
    )


SAME_AS_PANDAS = [
    "selected == True",
    "status == 'completed'",
    "correct == True",
    "style != 'shortcut'",
    "status == 'completed' and correct == True",
    "status == 'completed' & correct == True",
    "not (num_response_tokens > 100)",
    "num_response_tokens > 100 or method == 'greedy'",
    "0 < num_response_tokens <= 300",
    "method in ['beam', 'greedy']",
    "method not in ['beam']",
    "method.isin(['beam', 'best_of_n'])",
    "~method.isin(['beam'])",
    "student_ppl < 2.5",
    "num_response_tokens >= -1",
    "~(status == 'completed') | selected == True",
    "~ student_ppl.isna() & student_ppl > 1.8",
    "response.str.len() > 3",
]


@pytest.mark.parametrize("expr", SAME_AS_PANDAS)
def test_accepted_filters_keep_what_pandas_query_keeps(expr):
    df = frame()
    want = df.query(expr, engine="python").index.tolist()
    got = df[parse(expr, "data.filters[0]").mask(df)].index.tolist()
    assert got == want


def test_null_tests_len_and_columns():
    df = frame()
    assert df[parse("student_ppl.isna()", "k").mask(df)].index.tolist() == [1, 4]
    assert df[parse("style == None", "k").mask(df)].index.tolist() == [3]
    assert df[parse("style != None", "k").mask(df)].index.tolist() == [0, 1, 2, 4]
    assert df[parse("len(response) >= 3", "k").mask(df)].index.tolist() == [0, 1, 4]
    assert columns_of(["status == 'completed' and correct == True", "len(response) > 2"]) == {
        "status",
        "correct",
        "response",
    }


def test_every_shipped_filter_parses():
    import yaml

    from gen_ssd_ray.pipeline.config import PipelineConfig  # noqa: F401  (its defaults parse too)
    from gen_ssd_ray.train.config import DEFAULT_FILTERS

    found = list(DEFAULT_FILTERS) + ["selected == True"]

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "filters" and isinstance(v, list):
                    found.extend(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in (ROOT / "conf").rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    assert len(found) >= 5
    for expr in found:
        parse(expr, "data.filters[0]")


ATTACKS = [
    # attribute access and calls
    "status.__class__ == 1",
    "status.str.startswith('c')",
    "status.apply(print) == 1",
    "df.to_csv('/tmp/x') == 1",
    "open('/tmp/x', 'w').write('x') > 0",
    "print(1) == None",
    "len(response, 2) > 1",
    "len('abc') > 1",
    "len(response.upper()) > 1",
    "method.isin(['a'], foo=1)",
    "method.isin(status)",
    "method.isna(1)",
    # @-variables (pandas query resolves them from the caller's scope)
    "@Path('/tmp/pwn').write_text('x') > 0",
    "selected == @x",
    "@__builtins__",
    # dunders and builtins
    "__import__('os').system('touch /tmp/pwn') == 0",
    "__builtins__ == 1",
    "__class__ == 1",
    # lambdas, comprehensions, conditionals, assignments
    "(lambda: 1)() == 1",
    "[x for x in status] == []",
    "{x for x in status} == 1",
    "{k: 1 for k in status} == 1",
    "sum(x for x in num_response_tokens) > 0",
    "(x := 1) == 1",
    "1 if selected else 0",
    # imports and statements (not expressions at all)
    "import os",
    "exec('import os')",
    "eval('1') == 1",
    "getattr(status, 'x') == 1",
    # subscripts, arithmetic, f-strings, odd literals
    "status[0] == 'c'",
    "num_response_tokens * 2 > 10",
    "num_response_tokens @ 2 > 10",
    "f'{status}' == 'x'",
    "status == b'bytes'",
    "status == {'a': 1}",
    "status == {1, 2}",
    "num_response_tokens > -num_response_tokens",
    "status is None",
    "method in status",
    "*status",
    # not a string / empty
    "",
    "   ",
]


@pytest.mark.parametrize("expr", ATTACKS)
def test_attacks_are_refused_before_anything_runs(expr):
    with pytest.raises(FilterError) as e:
        parse(expr, "data.filters[3]")
    assert isinstance(e.value, InputError)
    msg = str(e.value)
    assert msg.startswith("data.filters[3]=") and "\n" not in msg and "allowed" in msg


@pytest.mark.parametrize("bad", [1, None, ["x"], {"a": 1}])
def test_non_string_filters_are_refused(bad):
    with pytest.raises(FilterError, match=r"data.filters\[0\]"):
        parse_all([bad])


def test_file_writing_attack_writes_nothing(tmp_path):
    target = tmp_path / "pwned"
    attack = f"@Path({str(target)!r}).write_text('x') > 0"
    df = frame()
    # What pandas `query` did with it (the old behaviour): the file is written.
    Path  # noqa: B018  (the name the attack resolves from this scope)
    with contextlib.suppress(Exception):  # the query's result is junk; the write has happened
        df.query(attack, engine="python")
    assert target.exists()
    target.unlink()
    with pytest.raises(FilterError, match=r"`@` variables are not allowed"):
        parse(attack, "data.filters[0]").mask(df)
    for variant in (
        f"__import__('pathlib').Path({str(target)!r}).write_text('x') > 0",
        f"status.map(lambda s: open({str(target)!r}, 'w')) == 1",
    ):
        with pytest.raises(FilterError):
            parse(variant, "data.filters[0]").mask(df)
    assert not target.exists()


def test_evaluation_errors_name_the_key():
    df = frame()
    with pytest.raises(FilterError, match=r"data.filters\[1\]='nope == 1': no column 'nope'"):
        parse("nope == 1", "data.filters[1]").mask(df)
    with pytest.raises(FilterError, match=r"data.filters\[0\].*cannot be evaluated"):
        parse("status < 3", "data.filters[0]").mask(df)
