"""Generated-answer parsing and matching (RLinf's evaluation rules)."""
import pytest

from vlm_sft.answers import answers_match, letter_for, parse_generated_answer

GOLD = "B. Yes"


@pytest.mark.parametrize(
    "generated",
    [
        "B. Yes",
        "B. Yes\n",
        "  B.   Yes  \n\n",
        "b. yes",
        "The answer is B. Yes.",
        "the ANSWER IS: B. Yes",
        "Looking at the gripper, it is closed.\nThe answer is B. Yes",
        "The answer is\nB. Yes\nbecause the gripper holds the cup.",
        "Answer: B. Yes",
        "I think the answer is A. No. Wait, the final answer is B. Yes.",
        "The final answer is: `B. Yes`",
        "<think>The cup is lifted, so A. No is wrong.</think>\nB. Yes",
        "<THINK>\nmulti\nline\nreasoning\n</THINK>B. Yes.",
        "reasoning that the prompt opened</think>\nB. Yes",
        "\\boxed{B. Yes}",
        "So we get \\boxed{A. No} at first, but then \\boxed{B. Yes}.",
        "The final answer is \\boxed{B. Yes}",
        "The robot reaches for the cup.\n\nB. Yes/",
        "```\nB. Yes\n```",
        "The answer is:\n```\nB. Yes\n```",
        "`B. Yes`.",
    ],
)
def test_generations_that_say_b_yes_match(generated):
    assert parse_generated_answer(generated).lower().split() == ["b.", "yes"]
    assert answers_match(parse_generated_answer(generated), GOLD)


@pytest.mark.parametrize(
    "generated",
    [
        "A. No",
        "B",  # the letter alone is not the target string
        "Yes",
        "The answer is A. No.",
        "B. Yes\nThe answer is A. No",  # the marker wins over the last line
        "<think>B. Yes</think>\nA. No",  # thinking is ignored
        "",
        "   \n  ",
    ],
)
def test_generations_that_do_not_say_b_yes_do_not_match(generated):
    assert not answers_match(parse_generated_answer(generated), GOLD)


def test_parse_returns_the_cleaned_answer_text():
    assert parse_generated_answer("The answer is B. Yes.") == "B. Yes"
    assert parse_generated_answer("Answer:  C. Left of the bowl \nExplanation: ...") == "C. Left of the bowl"
    assert parse_generated_answer("first line\n\nD. 3 objects\n\n") == "D. 3 objects"
    assert parse_generated_answer("\\boxed{C. {nested} braces}") == "C. {nested} braces"
    assert parse_generated_answer("unclosed \\boxed{B. Yes") == "unclosed \\boxed{B. Yes"
    assert parse_generated_answer("") == ""


def test_matching_normalises_case_whitespace_and_trailing_punctuation_on_both_sides():
    assert answers_match("b.  the gripper is OPEN", "B. The gripper is open")
    assert answers_match("B. The gripper is open", "B. The gripper is open.")  # gold choice text ends with "."
    assert not answers_match("B. The gripper is open", "B. The gripper is closed")
    assert not answers_match("", GOLD)


def test_letter_for():
    assert [letter_for(i) for i in range(5)] == ["A", "B", "C", "D", "E"]
    assert letter_for(25) == "Z"
    for bad in (-1, 26):
        with pytest.raises(ValueError, match="choice index"):
            letter_for(bad)
