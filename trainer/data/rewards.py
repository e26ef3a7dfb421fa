"""Rewards: the last value of a worked answer (the arithmetic task), exact match, and boxed-answer checking with
math-verify (math datasets).

Each reward function maps (response text, reference answer) -> float in [0, 1] and never raises: a malformed
response scores 0.

    >>> last_value("41,39,33", "33"), last_value("41,39,32", "33")
    (1.0, 0.0)
    >>> exact_match(" 42 ", "42")
    1.0
    >>> math_verify_reward("so \\\\boxed{\\\\frac{1}{2}}", "0.5")
    1.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def exact_match(response: str, answer: str) -> float:
    """1.0 when the stripped response equals the stripped answer."""
    return float(response.strip() == answer.strip())


def last_value(response: str, answer: str) -> float:
    """1.0 when the last comma-separated field of the response equals the answer (the fields before it are the
    model's working and are not graded, like the steps before a boxed answer)."""
    return float(response.rsplit(",", 1)[-1].strip() == answer.strip())


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("task.reward='math_verify' needs math-verify: pip install 'hadw-kernels[train]'") from e
    return math_verify


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces), or None when there is none or it is unclosed."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def math_verify_reward(response: str, answer: str) -> float:
    """1.0 when the response's last \\boxed{} answer is mathematically equal to `answer` (math-verify); 0.0 when
    there is no complete \\boxed{}, when either side fails to parse, or when they differ."""
    mv = _math_verify()
    boxed = last_boxed(response)
    if boxed is None or not boxed.strip():
        return 0.0
    try:
        gold = mv.parse(answer if "\\boxed" in answer or answer.strip().startswith("$") else f"${answer}$")
        pred = mv.parse(f"$\\boxed{{{boxed}}}$")
        if not gold or not pred:
            return 0.0
        return float(mv.verify(gold, pred))
    except Exception:  # math-verify can raise on pathological LaTeX; a reward never crashes the run
        return 0.0


REWARD_FNS: dict[str, Callable[[str, str], float]] = {"last_value": last_value, "exact": exact_match,
                                                      "math_verify": math_verify_reward}


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to -penalty at max_len."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -(over / buffer).clamp(max=1.0) * penalty
