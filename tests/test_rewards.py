"""Rule rewards: the math checker reads the final number of an answer the ways people write it and compares it with
the reference's; user functions may take the reference answer; bad functions are one-line errors."""
import pytest

from rlhf_ds.errors import UserError
from rlhf_ds.rewards import answer_format, final_answer, load_reward_fn, math_answer

REFERENCE = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72"


@pytest.mark.parametrize("answer, correct", [
    ("She sold 72 clips.", True),  # the last number
    ("48 + 24 = 72, so the answer is 72 clips", True),
    ("#### 72", True),
    ("The total is \\boxed{72}.", True),
    ("The answer is 72. (I first thought 70.)", True),  # 'the answer is' wins over the last number
    ("The answer is $72.00", True),
    ("72 clips in May, 24 in April, so 96", False),
    ("I don't know", False),
    ("#### 7,2", True),  # commas tolerated (7,2 -> 72)
])
def test_math_checker(answer, correct):
    assert math_answer("q", answer, REFERENCE) == (1.0 if correct else 0.0)


def test_numbers_with_commas_units_and_signs():
    assert final_answer("It costs $1,234.50 in total") == 1234.5
    assert final_answer("the change is -3 degrees") == -3.0
    assert final_answer("#### 1,000") == 1000.0
    assert final_answer("no digits here") is None


def test_format_reward():
    assert answer_format("q", "so #### 5") == 1.0 and answer_format("q", "\\boxed{5}") == 1.0
    assert answer_format("q", "it is 5") == 0.0


def test_reward_functions_load_by_name_or_path_and_may_take_the_reference(tmp_path):
    assert load_reward_fn("math").wants_reference and not load_reward_fn("format").wants_reference
    f = tmp_path / "r.py"
    f.write_text("def two(p, r):\n    return len(r)\n\ndef three(p, r, reference):\n    return float(r == reference)\n"
                 "def bad(p, r):\n    return 'x'\n\ndef nan(p, r):\n    return float('nan')\n")
    assert load_reward_fn(f"{f}:two")(["p"], ["abc"], ["ref"]) == [3.0]
    assert load_reward_fn(f"{f}:three")(["p", "p"], ["a", "b"], ["a", "a"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="must return a number"):
        load_reward_fn(f"{f}:bad")(["p"], ["a"], ["a"])
    with pytest.raises(UserError, match="must be finite"):
        load_reward_fn(f"{f}:nan")(["p"], ["a"], ["a"])
    with pytest.raises(UserError, match="built-in name"):
        load_reward_fn("nonsense")
