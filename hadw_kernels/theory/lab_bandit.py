"""The lab's stand-in for an LLM: prompts with K candidate answers (one correct), a policy over them, and the
random streams every arm of a comparison shares (spec §1's setting with one "token" per response).

- `Task`: the prompts, how their initial success probabilities spread over hard and easy, the feature geometry.
- `make_instances(task, seeds)`: one prompt set per seed, stacked [S, ...]; the same seed gives the same prompts for
  every arm, group size and policy family.
- `Policy`: the two families, stacked over seeds so one call updates all of them (seeds never mix: every parameter
  belongs to one seed). 'tabular': free logits per prompt. 'shared': logits = frozen prompt offset + features . w,
  with w [d] shared by all prompts of a seed, so an update on one prompt moves every other (as in an LLM).
- `Streams`: the prompt schedule [S, T, B] and the sampling uniforms [S, T, B, G], drawn before any arm runs;
  `sample_answers` turns a uniform into an answer by inverse CDF, so every arm consumes the same numbers.

Everything is float64: the policies are tiny, and float64 keeps a seed's run independent of how many seeds share
the stacked tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

FAMILIES = ("tabular", "shared")
DIFFICULTIES = ("loguniform", "beta")
_STREAM_TAG = 0x1AB  # mixed into every seed, so lab seeds never coincide with the other simulators' streams


@dataclass(frozen=True)
class Task:
    """The bandit: P prompts with K answers each, one correct; initial success probabilities p0 from hard to easy."""

    prompts: int = 96
    """P, prompts per seed. The hardest third (lowest p0) and the easiest third are reported separately."""
    answers: int = 10
    """K candidate answers per prompt."""
    difficulty: str = "loguniform"
    """'loguniform': log p0 uniform on [p_low, p_high]; 'beta': p0 ~ Beta(beta_a, beta_b) clipped to [p_low, p_high]."""
    p_low: float = 0.01
    """Smallest initial success probability."""
    p_high: float = 0.9
    """Largest initial success probability."""
    beta_a: float = 0.7
    """Beta option: first shape parameter."""
    beta_b: float = 1.3
    """Beta option: second shape parameter (mean a / (a + b) = 0.35 with the defaults)."""
    features: int = 16
    """d, the shared family's feature dimension."""
    signal: float = 0.5
    """Shared family: the correct answer's feature carries signal * u on one shared unit direction u, so raising
    w . u helps every prompt; the rest of each feature is N(0, I / d) noise, through which prompts interfere."""

    def __post_init__(self) -> None:
        for name, low in (("prompts", 3), ("answers", 2), ("features", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"Task.{name} must be an int >= {low}, got {v!r}")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"Task.difficulty must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        if not (0.0 < self.p_low < self.p_high < 1.0):
            raise ValueError(f"Task: need 0 < p_low < p_high < 1, got p_low={self.p_low!r}, p_high={self.p_high!r}")
        for name in ("beta_a", "beta_b", "signal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                    v == 0 and name != "signal"):
                raise ValueError(f"Task.{name} must be a finite number > 0 (signal >= 0), got {v!r}")


@dataclass
class Instances:
    """S seeds' prompt sets, stacked (numpy, float64 / int64)."""

    seeds: tuple[int, ...]
    p0: np.ndarray
    """[S, P] initial success probability of each prompt."""
    correct: np.ndarray
    """[S, P] index of the correct answer."""
    offsets: np.ndarray
    """[S, P, K] initial logits: 0 for wrong answers, log(p0 (K-1) / (1 - p0)) for the correct one."""
    features: np.ndarray
    """[S, P, K, d] the shared family's answer features."""
    hard: np.ndarray
    """[S, P] bool, the third of the prompts with the lowest p0."""
    easy: np.ndarray
    """[S, P] bool, the third with the highest p0."""


def seed_sequence(seed: int, *tags: int) -> np.random.SeedSequence:
    """The SeedSequence of one lab seed (and sub-stream tags)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"lab seeds must be ints >= 0, got {seed!r}")
    return np.random.SeedSequence([_STREAM_TAG, int(seed), *tags])


def _initial_p(task: Task, rng: np.random.Generator) -> np.ndarray:
    if task.difficulty == "loguniform":
        return np.exp(rng.uniform(math.log(task.p_low), math.log(task.p_high), task.prompts))
    return np.clip(rng.beta(task.beta_a, task.beta_b, task.prompts), task.p_low, task.p_high)


def make_instances(task: Task, seeds: tuple[int, ...] | list[int]) -> Instances:
    """One prompt set per seed; it depends on the seed and the task only (not on G, the family or the arm)."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("make_instances: need at least one seed")
    P, K, d = task.prompts, task.answers, task.features
    p0, correct, feats = [], [], []
    for seed in seeds:
        rng = np.random.default_rng(seed_sequence(seed, 0))
        p0.append(_initial_p(task, rng))
        correct.append(rng.integers(0, K, P))
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        f = rng.standard_normal((P, K, d)) / math.sqrt(d)
        f[np.arange(P), correct[-1]] += task.signal * u
        feats.append(f)
    p0_arr, correct_arr = np.stack(p0), np.stack(correct)
    offsets = np.zeros((len(seeds), P, K))
    # softmax with the wrong logits at 0 gives p0 for the correct one when its logit is log(p0 (K - 1) / (1 - p0))
    np.put_along_axis(offsets, correct_arr[..., None], np.log(p0_arr * (K - 1) / (1.0 - p0_arr))[..., None], axis=2)
    order = np.argsort(p0_arr, axis=1, kind="stable")
    third = P // 3
    hard = np.zeros_like(p0_arr, dtype=bool)
    easy = np.zeros_like(p0_arr, dtype=bool)
    np.put_along_axis(hard, order[:, :third], True, axis=1)
    np.put_along_axis(easy, order[:, P - third:], True, axis=1)
    return Instances(seeds=seeds, p0=p0_arr, correct=correct_arr, offsets=offsets, features=np.stack(feats),
                     hard=hard, easy=easy)


class Policy:
    """S seeds' policies over the same task, stacked; `logits()` is [S, P, K] and differentiable in `params`."""

    def __init__(self, family: str, instances: Instances) -> None:
        if family not in FAMILIES:
            raise ValueError(f"Policy: family must be one of {FAMILIES}, got {family!r}")
        self.family = family
        offsets = torch.from_numpy(instances.offsets)
        if family == "tabular":
            self.theta = offsets.clone().requires_grad_(True)  # [S, P, K]
            self.params = [self.theta]
        else:
            self.offsets = offsets
            self.features = torch.from_numpy(instances.features)  # [S, P, K, d]
            self.w = torch.zeros(offsets.shape[0], instances.features.shape[-1], dtype=torch.float64,
                                 requires_grad=True)  # [S, d]
            self.params = [self.w]

    def logits(self) -> torch.Tensor:
        """[S, P, K] logits of every prompt's answers."""
        if self.family == "tabular":
            return self.theta
        return self.offsets + (self.features * self.w[:, None, None, :]).sum(-1)


@dataclass
class Streams:
    """The random numbers of one comparison, shared by every arm: which prompts each step trains on, and the
    uniforms that pick each sampled answer."""

    schedule: np.ndarray
    """[S, T, B] prompt indices: each seed walks through fresh random permutations of its P prompts."""
    uniforms: np.ndarray
    """[S, T, B, G] uniforms in [0, 1): response g of prompt b at step t is the answer whose CDF interval holds it."""


def make_streams(seeds: tuple[int, ...] | list[int], prompts: int, steps: int, batch: int, group: int) -> Streams:
    """Schedule and sampling uniforms for S seeds; they depend on the seed and the sizes only, never on the arm."""
    if not (1 <= batch <= prompts):
        raise ValueError(f"make_streams: prompts per step must be in [1, {prompts}], got {batch}")
    if steps < 1 or group < 2:
        raise ValueError(f"make_streams: need steps >= 1 and G >= 2, got steps={steps}, G={group}")
    schedules, uniforms = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed_sequence(seed, 1, group, batch))
        need = steps * batch
        order = np.concatenate([rng.permutation(prompts) for _ in range(-(-need // prompts))])[:need]
        schedules.append(order.reshape(steps, batch))
        uniforms.append(rng.random((steps, batch, group)))
    return Streams(schedule=np.stack(schedules), uniforms=np.stack(uniforms))


def sample_answers(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: [S, B, K] probabilities and [S, B, G] uniforms -> [S, B, G] int64 answers.

    The answer is the first k with u < cumsum(probs)[k] (clamped to K - 1 against a last partial sum below 1)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf.contiguous(), uniforms.contiguous(), right=True).clamp_(max=probs.shape[-1] - 1)
