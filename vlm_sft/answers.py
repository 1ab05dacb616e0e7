"""Answer parsing and matching for generation-based evaluation, as RLinf scores its reported accuracy.

A generated reply is reduced to one answer string, then compared to the gold target "B. choice text" after
lower-casing and collapsing whitespace. Rules, in order:
  1. drop <think>...</think> blocks (and anything before a stray closing </think>);
  2. after the LAST "final answer is" / "the answer is" / "answer:" (first marker found, case-insensitive),
     take the first non-empty line, without a leading ":";
  3. else the content of the last \\boxed{...};
  4. else the last non-empty line (a ``` fence line is empty);
  then strip whitespace, backticks and trailing "." and "/".
Two refinements over RLinf: rule 2 stops at the end of the line (an explanation after "Answer: B. Yes" does
not spoil it), and the gold string gets the same trailing-punctuation cleanup as the prediction (RLinf marks a
correct "B. It is open." wrong because it strips the prediction's "." but not the gold's).
"""
import re

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_MARKERS = ("final answer is", "the answer is", "answer:")
_BOXED = "\\boxed{"


def letter_for(index: int) -> str:
    """0 -> "A", 1 -> "B", ...: the choice letters of the prompt and the target."""
    if not 0 <= index < 26:
        raise ValueError(f"answers.letter_for: choice index must be in [0, 26), got {index}")
    return chr(ord("A") + index)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None when there is none (or it is unclosed)."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _clean(text: str) -> str:
    text = text.strip().strip("`").strip()
    return text.rstrip("./ \t").strip("`").strip()


def _first_line(text: str) -> str:
    """First line with an answer in it (blank lines and ``` fences do not count)."""
    return next((line for line in text.splitlines() if _clean(line)), "")


def _last_line(text: str) -> str:
    return next((line for line in reversed(text.splitlines()) if _clean(line)), "")


def parse_generated_answer(text: str) -> str:
    """The answer string in a generated reply (see the module docstring for the rules)."""
    text = _THINK_BLOCK.sub("", text)
    close = text.lower().rfind("</think>")
    if close >= 0:  # the prompt opened <think>: only the part after its end is the reply
        text = text[close + len("</think>"):]
    lower = text.lower()
    for marker in _MARKERS:
        at = lower.rfind(marker)
        if at >= 0:
            answer = _first_line(text[at + len(marker):].lstrip(" \t:"))
            break
    else:
        boxed = _last_boxed(text)
        answer = boxed if boxed is not None else _last_line(text)
    boxed = _last_boxed(answer)  # "The final answer is \boxed{B. Yes}"
    return _clean(boxed if boxed is not None else answer)


def _normalise(text: str) -> str:
    return " ".join(_clean(text).lower().split())


def answers_match(pred: str, gold: str) -> bool:
    """Exact match after lower-casing, collapsing whitespace and the trailing-punctuation cleanup."""
    return _normalise(pred) == _normalise(gold)
