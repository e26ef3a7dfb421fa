"""`DifficultyAnchor`: the evolving estimate C_t of the model's batch accuracy (spec §3, paper eqs. 7-12).

One `step(rewards)` per rollout batch returns the prior C_t^- that batch t is weighted against, then folds the
batch accuracy y_t into the history (so the posterior C_t^+ becomes the next prior). y_t is the mean reward over
*all* responses of the batch (eq. 7). Every rank must fold in the same y_t to hold the same anchor, and nothing here
communicates unless asked: pass the rewards gathered from all ranks, or a y_t you computed (`accuracy=`), or this
rank's rewards with `process_group=` to all-reduce their sum and count over that group (every rank of it must call).

    >>> anchor = DifficultyAnchor(mode="window", window=10)
    >>> anchor.step(torch.tensor([1.0, 0.0, 0.0, 0.0]))   # first batch: no history, the prior is y_1
    0.25
    >>> anchor.step(torch.tensor([1.0, 1.0, 0.0, 0.0]))   # prior = mean of the previous accuracies
    0.25
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

ANCHOR_MODES = ("window", "ema", "fixed")


def _check_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"DifficultyAnchor: {name} must be a finite number, got {value!r}")
    return float(value)


class DifficultyAnchor:
    """History-aware difficulty anchor.

    Args:
        mode: 'window' (default; the authors' code): C_t^- = mean of the last `window` batch accuracies.
            'ema' (the paper's eqs. 8-11): C_t^+ = (1 - eta_t) C_t^- + eta_t y_t, eta_t = clip(eta * sigma_t, 0, 1),
            sigma_t = population std of the last `history` posteriors (sigma_init while fewer than two exist).
            'fixed': C_t^- = fixed_value always (the paper's Table 2 ablation).
        window: h, the number of past batch accuracies averaged in 'window' mode (10).
        include_current: 'window' mode only: put y_t in the window before computing the prior, as the authors'
            released code does (default False: the prior uses history only, as eq. 13 reads).
        eta: 'ema' mode's base rate. With a small eta the anchor freezes near its first value (sigma_t is tiny, so
            eta_t ~ 0); `eta_t` reports the rate actually used so the freeze is visible.
        history: m, the number of past posteriors whose std sets sigma_t in 'ema' mode (10).
        sigma_init: sigma used while fewer than two posteriors exist ('ema' mode, 1.0).
        fixed_value: the constant anchor of 'fixed' mode (0.5).
        init: prior for the first batch; None uses that batch's own accuracy y_1.
    """

    def __init__(
        self,
        mode: str = "window",
        *,
        window: int = 10,
        include_current: bool = False,
        eta: float = 1.0,
        history: int = 10,
        sigma_init: float = 1.0,
        fixed_value: float = 0.5,
        init: float | None = None,
    ) -> None:
        if mode not in ANCHOR_MODES:
            raise ValueError(f"DifficultyAnchor: unknown mode {mode!r}; "
                             f"choose one of {', '.join(map(repr, ANCHOR_MODES))}")
        for name, v in (("window", window), ("history", history)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DifficultyAnchor: {name} must be an int >= 1, got {v!r}")
        if not isinstance(include_current, bool):
            raise ValueError(f"DifficultyAnchor: include_current must be a bool, got {include_current!r}")
        if include_current and mode != "window":
            raise ValueError("DifficultyAnchor: include_current applies to mode='window' only")
        self.mode = mode
        self.window = window
        self.include_current = include_current
        self.eta = _check_unit("eta", eta)
        if self.eta < 0:
            raise ValueError(f"DifficultyAnchor: eta must be >= 0, got {eta!r}")
        self.history = history
        self.sigma_init = _check_unit("sigma_init", sigma_init)
        if self.sigma_init < 0:
            raise ValueError(f"DifficultyAnchor: sigma_init must be >= 0, got {sigma_init!r}")
        self.fixed_value = _check_unit("fixed_value", fixed_value)
        self.init = None if init is None else _check_unit("init", init)
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self._accuracies: deque[float] = deque(maxlen=self.window)  # window mode: y_{t-h} ... y_{t-1}
        self._posteriors: deque[float] = deque(maxlen=self.history)  # ema mode: C_{t-m}^+ ... C_{t-1}^+
        self._prior: float | None = self.fixed_value if self.mode == "fixed" else self.init
        self._posterior: float | None = None
        self._eta_t: float | None = None
        self._last_accuracy: float | None = None

    # -- reading ------------------------------------------------------------------------------------------------
    @property
    def value(self) -> float | None:
        """C_t^-, the prior of the batch being trained: the value the last `step` returned (before any step: `init`,
        or `fixed_value` in 'fixed' mode, else None). This is what `hadw_loss(anchor=this_object)` uses."""
        return self._prior

    @property
    def posterior(self) -> float | None:
        """C_t^+ after the last step: the history with y_t folded in (the next prior in 'window' and 'ema' modes)."""
        return self._posterior

    @property
    def eta_t(self) -> float | None:
        """The rate eta_t = clip(eta * sigma_t, 0, 1) used by the last step ('ema' mode; None otherwise)."""
        return self._eta_t

    @property
    def last_accuracy(self) -> float | None:
        """y_t of the last step: the global mean reward of that batch."""
        return self._last_accuracy

    # -- updating -----------------------------------------------------------------------------------------------
    @staticmethod
    def batch_accuracy(rewards: torch.Tensor, process_group: Any = None) -> float:
        """y_t = sum of the scorable rewards / their number (eq. 7; NaN rewards are unscorable and left out).

        Args:
            rewards: [N] this batch's rewards (any shape; flattened).
            process_group: None (default): no communication, the rewards are the whole batch. A torch.distributed
                process group (e.g. `torch.distributed.group.WORLD`, or your data-parallel group under tensor or
                pipeline parallelism): the sum and count are all-reduced over it; every rank of it must call.
        """
        rewards = torch.as_tensor(rewards)
        if rewards.numel() == 0:
            raise ValueError("DifficultyAnchor.step: rewards is empty; a batch needs at least one response")
        if not (rewards.dtype.is_floating_point or rewards.dtype in (torch.bool, torch.int8, torch.int16,
                                                                       torch.int32, torch.int64, torch.uint8)):
            raise ValueError(f"DifficultyAnchor.step: rewards must be real numbers, got dtype {rewards.dtype}")
        r = rewards.detach().reshape(-1).to(torch.float64)
        inf = int(torch.isinf(r).sum())
        if inf:
            raise ValueError(f"DifficultyAnchor.step: rewards has {inf} infinite value(s); NaN marks an unscorable "
                             f"response, +-Inf is not a reward")
        scorable = ~torch.isnan(r)
        stats = torch.stack([torch.where(scorable, r, 0.0).sum(), scorable.to(torch.float64).sum()])
        if process_group is not None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("DifficultyAnchor.step: process_group was given but torch.distributed is not "
                                 "initialised")
            if torch.distributed.get_backend(process_group) == "nccl" and stats.device.type != "cuda":
                stats = stats.cuda()
            torch.distributed.all_reduce(stats, group=process_group)
        total, count = stats.tolist()
        if count == 0:
            raise ValueError("DifficultyAnchor.step: every reward of the batch is NaN (unscorable); y_t is undefined")
        return total / count

    def step(self, rewards: torch.Tensor | None = None, *, accuracy: float | None = None,
             process_group: Any = None) -> float:
        """Return C_t^- for this batch, then fold its accuracy y_t in. Call once per rollout batch, on every rank
        with the same y_t.

        Args:
            rewards: the batch's rewards: all of them (e.g. gathered from every rank), or this rank's share with
                `process_group`. NaN = unscorable (left out).
            accuracy: y_t computed by the caller, instead of `rewards`.
            process_group: all-reduce the rewards' sum and count over this group (see `batch_accuracy`); None
                (default) communicates nothing.
        """
        if (rewards is None) == (accuracy is None):
            raise ValueError("DifficultyAnchor.step: give exactly one of rewards and accuracy")
        if accuracy is not None:
            if process_group is not None:
                raise ValueError("DifficultyAnchor.step: process_group applies to rewards, not to a given accuracy")
            y = _check_unit("accuracy", accuracy)
        else:
            y = self.batch_accuracy(rewards, process_group)
        if self.mode == "fixed":
            prior = self.fixed_value
            self._posterior = self.fixed_value
        elif self.mode == "window":
            if self.include_current:
                self._accuracies.append(y)
                prior = sum(self._accuracies) / len(self._accuracies)
            else:
                if self._accuracies:
                    prior = sum(self._accuracies) / len(self._accuracies)
                else:
                    prior = y if self.init is None else self.init
                self._accuracies.append(y)
            self._posterior = sum(self._accuracies) / len(self._accuracies)
        else:  # ema
            prior = self._posterior if self._posterior is not None else (y if self.init is None else self.init)
            if len(self._posteriors) >= 2:
                mean = sum(self._posteriors) / len(self._posteriors)
                sigma = math.sqrt(sum((c - mean) ** 2 for c in self._posteriors) / len(self._posteriors))
            else:
                sigma = self.sigma_init
            self._eta_t = min(max(self.eta * sigma, 0.0), 1.0)
            self._posterior = (1.0 - self._eta_t) * prior + self._eta_t * y
            self._posteriors.append(self._posterior)
        self._prior = prior
        self._last_accuracy = y
        self.steps += 1
        return prior

    def check_synchronized(self, process_group: Any = None) -> None:
        """Raise a ValueError unless every rank of `process_group` (default: the world) holds this same anchor state.
        A collective (all-gather of the state) that runs only when you call it, e.g. once after resuming."""
        world = torch.distributed.get_world_size(process_group)
        states: list[Any] = [None] * world
        torch.distributed.all_gather_object(states, self.state_dict(), group=process_group)
        differing = [rank for rank, state in enumerate(states) if state != states[0]]
        if differing:
            raise ValueError(f"DifficultyAnchor: ranks {differing} of the group hold a different anchor state than "
                             f"rank 0 (steps {[s['steps'] for s in states]}); every rank must step with the same y_t")

    # -- state --------------------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return dict(mode=self.mode, window=self.window, include_current=self.include_current, eta=self.eta,
                    history=self.history, sigma_init=self.sigma_init, fixed_value=self.fixed_value, init=self.init)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (plain Python numbers, safe for torch.save and JSON)."""
        return dict(config=self._config(), steps=self.steps, accuracies=list(self._accuracies),
                    posteriors=list(self._posteriors), prior=self._prior, posterior=self._posterior,
                    eta_t=self._eta_t, last_accuracy=self._last_accuracy)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`. The anchor's configuration must match the saved one."""
        missing = {"config", "steps", "accuracies", "posteriors", "prior", "posterior", "eta_t"} - set(state)
        if missing:
            raise ValueError(f"DifficultyAnchor.load_state_dict: missing keys {sorted(missing)}")
        saved, mine = dict(state["config"]), self._config()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError("DifficultyAnchor.load_state_dict: saved configuration differs (saved, current): "
                             + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
        self._reset()
        self.steps = int(state["steps"])
        self._accuracies.extend(float(a) for a in state["accuracies"])
        self._posteriors.extend(float(c) for c in state["posteriors"])
        self._prior = state["prior"]
        self._posterior = state["posterior"]
        self._eta_t = state["eta_t"]
        self._last_accuracy = state.get("last_accuracy")

    def __repr__(self) -> str:
        return f"DifficultyAnchor(mode={self.mode!r}, value={self._prior}, steps={self.steps})"
