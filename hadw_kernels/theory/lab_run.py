"""One lab run: an arm trained on S seeds at once (stacked, never mixed), returning the true accuracy curves.

Each step, for every seed: evaluate the exact success probability of every prompt (softmax of the correct answer),
take the step's B scheduled prompts, sample G answers each from the pre-drawn uniforms (inverse CDF), reward 1 for
the correct answer, compute the arm's advantages and take one optimizer step on `hadw_policy_loss` with
backend="torch" (one update per batch, so the ratio is 1 and the clip never binds: the lab isolates the advantage).

The seeds share one loss call: the loss is the seq-mean over rows divided by the global `normalizer` B * G, so the
stacked loss is the sum of the per-seed losses and each seed's parameters get exactly their own gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hadw_kernels import LossConfig, hadw_policy_loss
from hadw_kernels.theory.lab_arms import AdvantageEstimator, Arm
from hadw_kernels.theory.lab_bandit import FAMILIES, Policy, Task, make_instances, make_streams, sample_answers

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Setting:
    """Everything but the arm and the learning rate: one cell of the study's grid."""

    family: str = "tabular"
    """'tabular' | 'shared' (see `lab_bandit.Policy`)."""
    optimizer: str = "sgd"
    """'sgd' (plain, no momentum) | 'adam' (torch defaults: betas 0.9 / 0.999, eps 1e-8)."""
    group: int = 8
    """G, responses per prompt."""
    batch: int = 32
    """B, prompts per step."""
    steps: int = 200
    """T, optimizer steps (one rollout batch each)."""
    adv_norm: str = "group_std"
    """'group_std' (GRPO, the paper's runs) | 'none' (r - p̂, the paper's theory)."""
    task: Task = field(default_factory=Task)
    """The prompts."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Setting.family must be one of {FAMILIES}, got {self.family!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Setting.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.adv_norm not in ("group_std", "none"):
            raise ValueError(f"Setting.adv_norm must be 'group_std' or 'none', got {self.adv_norm!r}")
        for name, low in (("group", 2), ("batch", 1), ("steps", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"Setting.{name} must be an int >= {low}, got {v!r}")
        if self.batch > self.task.prompts:
            raise ValueError(f"Setting.batch ({self.batch}) must not exceed the task's prompts ({self.task.prompts})")

    @property
    def key(self) -> str:
        """A short id: family/optimizer/G."""
        return f"{self.family}/{self.optimizer}/G{self.group}"


@dataclass
class RunCurves:
    """What one run returns. Accuracies are the exact mean success probability over prompts, before each step and
    after the last (T + 1 points)."""

    acc: np.ndarray
    """[S, T + 1] mean over all prompts."""
    hard: np.ndarray
    """[S, T + 1] mean over the initially hardest third."""
    easy: np.ndarray
    """[S, T + 1] mean over the initially easiest third."""
    adv_abs: np.ndarray
    """[T] mean |advantage| per response, averaged over seeds: the step size the arm actually takes."""
    anchor: np.ndarray
    """[T] the anchors' prior C_t^- averaged over seeds (NaN without an anchor)."""
    degenerate: np.ndarray
    """[T] fraction of groups with equal rewards (no signal), averaged over seeds."""


class Optimizer:
    """SGD without momentum, or Adam with torch's defaults, written out: the update of `torch.optim.SGD` and of
    `torch.optim.Adam(foreach=False)` operation for operation (tests check bit equality). Not torch.optim itself:
    constructing one imports torch._dynamo, ~4 s per worker process (10 s on a loaded machine), longer than a
    whole quick run's share. Both act elementwise, so stacked seeds stay independent."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, name: str, params: list[torch.Tensor], lr: float) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
        self.name, self.params, self.lr, self.steps = name, params, lr, 0
        if name == "adam":
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.name == "sgd":
                p.add_(p.grad, alpha=-self.lr)
                continue
            beta1, beta2 = self.BETAS
            m, v = self.exp_avg[i], self.exp_avg_sq[i]
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1**self.steps)
            denom = (v.sqrt() / math.sqrt(1 - beta2**self.steps)).add_(self.EPS)
            p.addcdiv_(m, denom, value=-step_size)


def arm_loss(estimator: AdvantageEstimator, logp: torch.Tensor, rewards: torch.Tensor,
             true_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's loss for S stacked seeds: the arm's advantages, then the library's policy loss.

    Args:
        estimator: the arm's `AdvantageEstimator` (its anchors advance by one step).
        logp: [S * B * G, 1] log-probs of the sampled answers (differentiable); rows seed-major, each prompt's G
            responses contiguous.
        rewards: [S, B * G] 0/1 rewards in the same order.
        true_p: [S, B] the batch prompts' exact success probabilities (the oracle's baseline).
    Returns: (loss 0-d = the sum of the per-seed losses, advantages [S * B * G], anchor priors [S]).
    """
    advantages, priors = estimator(rewards, true_p)
    mask = torch.ones_like(logp, dtype=torch.bool)
    out = hadw_policy_loss(logp, logp.detach(), advantages, mask, config=estimator.config,
                           normalizer=rewards.shape[1], backend="torch")
    return out.loss, advantages, priors


def run_arm(setting: Setting, arm: Arm, seeds: tuple[int, ...] | list[int], lr: float) -> RunCurves:
    """Train `arm` on every seed (at learning rate lr * arm.lr_mult) and return its curves."""
    seeds = tuple(seeds)
    S, B, G, T = len(seeds), setting.batch, setting.group, setting.steps
    instances = make_instances(setting.task, seeds)
    streams = make_streams(seeds, setting.task.prompts, T, B, G)
    policy = Policy(setting.family, instances)
    optimizer = Optimizer(setting.optimizer, policy.params, lr * arm.lr_mult)
    estimator = AdvantageEstimator(arm, LossConfig.grpo(adv_norm=setting.adv_norm), S, G)

    correct = torch.from_numpy(instances.correct)  # [S, P]
    hard = torch.from_numpy(instances.hard).to(torch.float64)
    easy = torch.from_numpy(instances.easy).to(torch.float64)
    schedule = torch.from_numpy(streams.schedule)  # [S, T, B]
    uniforms = torch.from_numpy(streams.uniforms)  # [S, T, B, G]
    K = setting.task.answers
    acc, acc_hard, acc_easy = (np.empty((S, T + 1)) for _ in range(3))
    adv_abs, anchor, degenerate = (np.empty(T) for _ in range(3))

    def record(t: int, probs: torch.Tensor) -> torch.Tensor:
        p = probs.gather(-1, correct[..., None]).squeeze(-1)  # [S, P] exact success probability
        acc[:, t] = p.mean(1).numpy()
        acc_hard[:, t] = ((p * hard).sum(1) / hard.sum(1)).numpy()
        acc_easy[:, t] = ((p * easy).sum(1) / easy.sum(1)).numpy()
        return p

    for t in range(T):
        logits = policy.logits()
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            p_true = record(t, probs)
            prompts = schedule[:, t]  # [S, B]
            answers = sample_answers(probs.gather(1, prompts[..., None].expand(-1, -1, K)), uniforms[:, t])
            rewards = (answers == correct.gather(1, prompts)[..., None]).to(torch.float64)  # [S, B, G]
        logp = torch.log_softmax(logits.gather(1, prompts[..., None].expand(-1, -1, K)), -1)  # [S, B, K]
        logp = logp.gather(-1, answers).reshape(S * B * G, 1)
        loss, advantages, priors = arm_loss(estimator, logp, rewards.reshape(S, B * G), p_true.gather(1, prompts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        adv_abs[t] = float(advantages.abs().mean())
        anchor[t] = float(priors.mean())
        spread = rewards.amax(-1) != rewards.amin(-1)
        degenerate[t] = 1.0 - float(spread.to(torch.float64).mean())
    with torch.no_grad():
        record(T, torch.softmax(policy.logits(), -1))
    return RunCurves(acc=acc, hard=acc_hard, easy=acc_easy, adv_abs=adv_abs, anchor=anchor, degenerate=degenerate)
