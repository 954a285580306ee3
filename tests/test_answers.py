"""Answer extraction (gen_ssd_ray.core.answers): gold answers and model responses."""

import pytest

from gen_ssd_ray.core.answers import extract_final_answer, extract_gold_answer, last_boxed


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("so\n#### 1,000", "1000"),
        ("#### -5", "-5"),
        ("#### $18", "18"),
        ("#### 72 dollars", "72"),
        ("#### 72.", "72"),
        ("#### (1, 2)", "(1, 2)"),  # not a number: commas kept
        ("#### \\frac{1}{2}", "\\frac{1}{2}"),
        ("So the answer is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
        ("18", "18"),
        ("  3.5 ", "3.5"),
        (18, "18"),
        (2.5, "2.5"),
        (None, None),
        (True, None),
        (float("nan"), None),
        ("", None),
        ("   ", None),
        ("\\boxed{}", None),  # an empty box is no answer
        ("text\n####", None),  # a bare #### does not take the next line
        ("####\n72", None),
        ("a long solution\nwithout a marked answer", None),
        ("x" * 65, None),
    ],
)
def test_extract_gold_answer(value, expected):
    assert extract_gold_answer(value) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("... so she has 5 apples.\n#### 5", "5"),
        ("#### 5 apples", "5"),
        ("#### $1,234.50", "1234.50"),
        ("first \\boxed{3}, finally \\boxed{4}. #### 9", "4"),  # a box wins over ####
        ("The answer is 42.", "42"),
        ("The answer is: 42", "42"),
        ("answer: $1,000", "1000"),
        ("3 plus 4 makes 7.", "7"),
        ("It costs 1,250, total.", "1250"),
        ("about .5 of it", ".5"),
        ("\\boxed{} then 12", "12"),  # empty box falls through
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


def test_last_boxed_balanced_and_unbalanced():
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{\\frac{1}{2}} tail") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1") is None
    assert last_boxed("nothing") is None
