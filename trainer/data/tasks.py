"""Tasks: where prompts come from. A synthetic arithmetic task with levels 1-5, and JSONL math datasets.

Every prompt source draws *global* batches (the same on every rank) from a cursor, and each rank keeps its slice:
the global batch of a step does not depend on the number of ranks, and the cursor is all a checkpoint needs.

    >>> task = ArithTask(levels=(1, 2, 3, 4, 5))
    >>> p = task.problem(random.Random(0), level=3)
    >>> p.question, p.solution, p.answer
    ('6-1-5+7-4', '5,0,7,3', '3')
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

# Level L: L + 1 operations (+ or -) on one-digit numbers whose running total stays within 0-9, e.g. level 2 is
# "3+4-2+5" (= 10 would leave the range, so it is never drawn; "3+4-2-5" is). The model answers with the running
# total after each operation, comma-separated ("7,5,0"), and the reward reads the last one. Every step is a
# one-digit fact a tiny model learns quickly; a level is hard because all its steps must be right, so accuracy
# falls with the chain length (docs/results.md).
ARITH_LEVELS = (1, 2, 3, 4, 5)
ARITH_CHARS = "0123456789+-=,"


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer."""

    question: str
    """The problem text, before the prompt template."""
    answer: str
    """The reference answer (the final value for 'arith'; LaTeX or plain for math-verify)."""
    level: int | None = None
    """Difficulty level (1-5) when known."""
    solution: str | None = None
    """A worked answer ending in `answer` (arith: the running totals), what the supervised warm-up imitates."""


class ArithTask:
    """Running-total arithmetic; the level is the number of operations. Problems in `held_out` (questions) are never
    drawn by `sample`, so the eval set stays unseen by the warm-up and by RL."""

    def __init__(self, levels: tuple[int, ...] = ARITH_LEVELS, held_out: frozenset[str] = frozenset()) -> None:
        bad = [lv for lv in levels if lv not in ARITH_LEVELS]
        if bad or not levels:
            raise ValueError(f"ArithTask: levels must be a non-empty subset of {list(ARITH_LEVELS)}, got {levels}")
        self.levels = tuple(levels)
        self.held_out = held_out

    @staticmethod
    def problem(rng: random.Random, level: int) -> Problem:
        total = rng.randint(0, 9)
        text, totals = str(total), []
        for _ in range(level + 1):
            op = rng.choice("+-")
            if (op == "+" and total == 9) or (op == "-" and total == 0):
                op = "-" if op == "+" else "+"
            n = rng.randint(1, 9 - total if op == "+" else total)
            total += n if op == "+" else -n
            text += op + str(n)
            totals.append(str(total))
        return Problem(question=text, answer=totals[-1], level=level, solution=",".join(totals))

    @staticmethod
    def slipped_solution(problem: Problem, rng: random.Random) -> str:
        """A worked solution with one slip, as a sloppy student writes it: one running total off by one, and the
        totals after it computed correctly from the wrong value (so the answer is wrong). The slip's position and
        sign are drawn among those that keep every total within 0-9 (the last total always has one)."""
        right = [int(t) for t in problem.solution.split(",")]
        # a slip of `delta` at step k shifts that total and every later one by delta (the ops are additions)
        options = [[t + delta * (i >= k) for i, t in enumerate(right)] for k in range(len(right)) for delta in (-1, 1)]
        options = [v for v in options if all(0 <= x <= 9 for x in v)]
        return ",".join(map(str, rng.choice(options)))

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            p = self.problem(rng, rng.choice(self.levels))
            if p.question not in self.held_out:
                out.append(p)
        return out

    def eval_set(self, per_level: int, seed: int) -> list[Problem]:
        """A fixed held-out set: `per_level` distinct problems per level (level 1 has 810 distinct problems; hold out
        a small part of them, so that training still covers the level)."""
        out: list[Problem] = []
        for level in self.levels:
            rng = random.Random(f"arith-eval-{seed}-{level}")
            seen: dict[str, Problem] = {}
            for _ in range(per_level * 50):
                if len(seen) == per_level:
                    break
                p = self.problem(rng, level)
                seen.setdefault(p.question, p)
            if len(seen) < per_level:
                raise ValueError(f"ArithTask.eval_set: level {level} has fewer than {per_level} distinct problems to "
                                 f"hold out; lower task.eval_per_level")
            out.extend(seen.values())
        return out

    def holding_out(self, problems: list[Problem]) -> ArithTask:
        """The same task with `problems` never drawn."""
        return ArithTask(self.levels, self.held_out | frozenset(p.question for p in problems))


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
        evals = arith.eval_set(task.eval_per_level, task.eval_seed)
        return PromptSource(seed, task=arith.holding_out(evals)), evals
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
