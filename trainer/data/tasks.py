"""Tasks: where prompts come from. A synthetic arithmetic task with levels 1-5, and JSONL math datasets.

Every prompt source draws *global* batches (the same on every rank) from a cursor, and each rank keeps its slice:
the global batch of a step does not depend on the number of ranks, and the cursor is all a checkpoint needs.

    >>> task = ArithTask(levels=(1, 2, 3, 4, 5))
    >>> p = task.problem(random.Random(0), level=3)
    >>> p.level, eval(p.question) == int(p.answer)
    (3, True)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

# Level -> (number of operations, digits per operand). Operations are + and -; answers may be negative.
# Chosen so that a ~1M-parameter char model after a 1-2 minute warm-up is near-perfect on level 1 and
# rarely right on level 5 (see docs/results.md for the measured numbers).
ARITH_LEVELS: dict[int, tuple[int, int]] = {1: (1, 1), 2: (2, 1), 3: (1, 2), 4: (2, 2), 5: (3, 2)}
ARITH_CHARS = "0123456789+-="


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer."""

    question: str
    """The problem text, before the prompt template."""
    answer: str
    """The reference answer (exact string for 'arith'; LaTeX or plain for math-verify)."""
    level: int | None = None
    """Difficulty level (1-5) when known."""


class ArithTask:
    """Integer arithmetic: level sets the operand size and the number of + / - operations."""

    def __init__(self, levels: tuple[int, ...] = (1, 2, 3, 4, 5)) -> None:
        bad = [lv for lv in levels if lv not in ARITH_LEVELS]
        if bad or not levels:
            raise ValueError(f"ArithTask: levels must be a non-empty subset of {sorted(ARITH_LEVELS)}, got {levels}")
        self.levels = tuple(levels)

    @staticmethod
    def problem(rng: random.Random, level: int) -> Problem:
        n_ops, digits = ARITH_LEVELS[level]
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        nums = [rng.randint(lo, 10**digits - 1) for _ in range(n_ops + 1)]
        ops = [rng.choice("+-") for _ in range(n_ops)]
        text = str(nums[0]) + "".join(o + str(n) for o, n in zip(ops, nums[1:], strict=True))
        value = nums[0]
        for o, n in zip(ops, nums[1:], strict=True):
            value = value + n if o == "+" else value - n
        return Problem(question=text, answer=str(value), level=level)

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return [self.problem(rng, rng.choice(self.levels)) for _ in range(n)]

    def eval_set(self, per_level: int, seed: int) -> list[Problem]:
        """A fixed held-out set: `per_level` distinct problems per level (fewer where fewer exist)."""
        out: list[Problem] = []
        for level in self.levels:
            rng = random.Random(f"arith-eval-{seed}-{level}")
            seen: dict[str, Problem] = {}
            for _ in range(per_level * 20):
                if len(seen) == per_level:
                    break
                p = self.problem(rng, level)
                seen.setdefault(p.question, p)
            out.extend(seen.values())
        return out


def _parse_level(value: Any) -> int | None:
    """MATH writes levels as 'Level 3'; accept ints, digit strings and that form. Unknown -> None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    digits = "".join(ch for ch in str(value) if ch.isdigit())
    return int(digits) if digits else None


def load_jsonl(path: str) -> list[Problem]:
    """Read `problem`, `answer` and optional `level` from each line (also accepts `question` / `solution`-free
    files with `answer` given as a plain string). Errors name the file and line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    out: list[Problem] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            q = row.get("problem", row.get("question"))
            if q is None or "answer" not in row:
                raise ValueError(f"{path}:{lineno}: needs fields 'problem' and 'answer', got {sorted(row)}")
            out.append(Problem(question=str(q), answer=str(row["answer"]), level=_parse_level(row.get("level"))))
    if not out:
        raise ValueError(f"{path}: no problems")
    return out


def shipped_math_sample() -> str:
    """Path of the small MATH-style JSONL sample shipped with the package (for tests and smoke runs)."""
    return os.path.join(os.path.dirname(__file__), "math_sample.jsonl")


def format_prompt(problem: Problem, template: str, tokenizer: Any = None, chat: bool = False) -> str:
    """Apply the prompt template (and the tokenizer's chat template for instruct models)."""
    text = template.replace("{question}", problem.question)
    if chat:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("task.chat_template=true but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


class PromptSource:
    """Global batches of problems from a generator (arith) or a shuffled list (jsonl, epoch after epoch).

    `draw(n)` returns the next `n` problems of the global stream; it is a pure function of (seed, cursor), so
    saving `state_dict()` is enough to resume exactly.
    """

    def __init__(self, seed: int, task: ArithTask | None = None, problems: list[Problem] | None = None) -> None:
        if (task is None) == (problems is None):
            raise ValueError("PromptSource needs exactly one of task= or problems=")
        self.seed, self.task, self.problems = seed, task, problems
        self.cursor = 0  # problems drawn so far (global)
        self.draws = 0  # draw() calls so far
        self._perm_epoch: int | None = None
        self._perm: list[int] = []

    def _perm_for(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            assert self.problems is not None
            self._perm = list(range(len(self.problems)))
            random.Random(f"perm-{self.seed}-{epoch}").shuffle(self._perm)
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch(self) -> float:
        return self.cursor / len(self.problems) if self.problems else 0.0

    def draw(self, n: int) -> list[Problem]:
        if self.task is not None:
            out = self.task.sample(random.Random(f"train-{self.seed}-{self.draws}"), n)
        else:
            assert self.problems is not None
            size = len(self.problems)
            out = []
            for i in range(self.cursor, self.cursor + n):
                out.append(self.problems[self._perm_for(i // size)[i % size]])
        self.cursor += n
        self.draws += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "draws": self.draws, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"PromptSource: checkpoint was written with seed {state.get('seed')}, this run has "
                             f"seed {self.seed}")
        self.cursor, self.draws = int(state["cursor"]), int(state["draws"])


def task_problems(task: Any, seed: int) -> tuple[PromptSource, list[Problem]]:
    """(the training prompt stream of run seed `seed`, the fixed held-out problems) for a `TaskConfig`."""
    if task.name == "arith":
        arith = ArithTask(task.levels)
        return PromptSource(seed, task=arith), arith.eval_set(task.eval_per_level, task.eval_seed)
    train = load_jsonl(task.path)
    evals = load_jsonl(task.eval_path) if task.eval_path else train
    if task.eval_per_level:
        count: dict[Any, int] = {}
        kept = []
        for p in evals:
            count[p.level] = count.get(p.level, 0) + 1
            if count[p.level] <= task.eval_per_level:
                kept.append(p)
        evals = kept
    return PromptSource(seed, problems=train), evals


def drop_long_prompts(source: PromptSource, task: Any, tokenizer: Any, log: Any) -> None:
    """Drop training problems whose formatted prompt exceeds task.max_prompt_len tokens (reported, not silent)."""
    if source.problems is None:
        return
    keep = [p for p in source.problems if len(tokenizer(format_prompt(p, task.prompt_template, tokenizer,
                                                                      task.chat_template),
                                                        add_special_tokens=False).input_ids) <= task.max_prompt_len]
    if len(keep) < len(source.problems):
        log(f"dropped {len(source.problems) - len(keep)} of {len(source.problems)} training problems longer than "
            f"task.max_prompt_len={task.max_prompt_len} tokens")
    if not keep:
        raise ValueError(f"no training problem fits task.max_prompt_len={task.max_prompt_len}")
    source.problems = keep
