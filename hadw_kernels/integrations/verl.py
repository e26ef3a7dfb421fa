"""verl 0.9.x plug-in: HA-DW advantages and the fused policy loss, registered in verl's own registries.

Importing this module registers (no fork of verl; verl imports it in every process, driver and Ray workers, through
the `verl.plugins` entry point that hadw-kernels declares, or set VERL_USE_EXTERNAL_MODULES to this module's name):

- the advantage estimator "hadw_grpo" (`algorithm.adv_estimator=hadw_grpo`): verl's "grpo" (outcome reward = sum of
  `token_level_rewards`, groups = rows sharing a `uid`, any order, any size) with each advantage multiplied by
  HA-DW's Phi. Settings: `algorithm.hadw.*` (`HADWSettings`); `algorithm.norm_adv_by_std_in_grpo` as for "grpo".
  With `algorithm.hadw.enable=false` it equals verl's "grpo" (tests/integrations/test_verl.py).
- the policy losses "hadw_vanilla" (= verl's "vanilla": token ratio, dual clip at `actor.clip_ratio_c`) and
  "hadw_gspo" (= verl's "gspo": GSPO's sequence ratio) (`actor_rollout_ref.actor.policy_loss.loss_mode=...`): the
  clipped surrogate computed by `hadw_policy_loss` (the fused Triton kernel on CUDA), normalised over the global
  batch exactly as verl's `agg_loss` does from `actor.global_batch_info` (dp_size, batch_num_tokens,
  global_batch_size, loss_scale_factor). verl's `ppo_loss` adds the entropy and KL terms around it as usual.
- `HADWCheckpointCallback` (`trainer.checkpoint_callback_class=hadw_kernels.integrations.verl.HADWCheckpointCallback`):
  verl's only checkpoint hook (v1 trainer, save side) writes the anchor into every `global_step_N` folder; the
  restore side has no hook in verl 0.9, so the callback, built when the trainer is, resolves the folder verl will
  resume from with verl's own rule and the estimator loads the anchor from it at its first call.

The anchor lives in the process that computes advantages (verl's driver / TaskRunner): it is stepped once per
training step on that step's whole batch (every rank's rows), so there is nothing to synchronise.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import verl.utils.torch_functional as verl_F
from verl.trainer.ppo.checkpoint_callback import CheckpointCallback
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

from hadw_kernels.anchor import DifficultyAnchor
from hadw_kernels.config import LossConfig
from hadw_kernels.loss import hadw_advantages, hadw_policy_loss

logger = logging.getLogger(__name__)

ESTIMATOR = "hadw_grpo"
LOSS_MODES = {"hadw_vanilla": "token", "hadw_gspo": "sequence"}  # registered name -> LossConfig.ratio_level
ANCHOR_FILE = "hadw_anchor.pt"
LOSS_BACKEND = "auto"
"""Backend of the policy loss (`hadw_policy_loss(backend=...)`): Triton on CUDA, the native C++ kernel on CPU (the
compiled reference where it is not built)."""

ANCHOR_KEYS = ("mode", "window", "include_current", "eta", "history", "sigma_init", "fixed_value", "init")
# verl's gspo clamps its log-ratio at +10 (not below); vanilla clamps at +-20 as LossConfig does by default.
GSPO_LOG_RATIO_CLAMP = 10.0


# -- settings: algorithm.hadw -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HADWSettings:
    """HA-DW settings of the "hadw_grpo" estimator, read from verl's `algorithm.hadw` section (hydra: add it with
    `+algorithm.hadw.lambda_scale=1.3 +algorithm.hadw.anchor.mode=window ...`; absent = these defaults)."""

    enable: bool = True
    """False: Phi = 1, the estimator is verl's "grpo" (no anchor is kept)."""
    lambda_scale: float = 1.3
    """lambda in Phi = lambda * exp(D * M) (the paper's best, 1.3)."""
    std_eps: float = 1e-6
    """Added to the group std (verl's "grpo" epsilon)."""
    anchor: dict[str, Any] = field(default_factory=dict)
    """`DifficultyAnchor` keyword arguments: mode ('window' | 'ema' | 'fixed'), window, include_current, eta,
    history, sigma_init, fixed_value, init."""

    @classmethod
    def from_algorithm_config(cls, config: Any) -> HADWSettings:
        """The settings in `config.hadw` (an `algorithm` DictConfig, an `AlgoConfig`, a dict or None)."""
        section = None if config is None else config.get("hadw", None)
        if section is None:
            return cls()
        items = _plain(section, "algorithm.hadw")
        unknown = sorted(set(items) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(f"algorithm.hadw: unknown key(s) {unknown}; valid keys: enable, lambda_scale, std_eps, "
                             f"anchor.{{{', '.join(ANCHOR_KEYS)}}}")
        anchor = _plain(items.get("anchor") or {}, "algorithm.hadw.anchor")
        unknown = sorted(set(anchor) - set(ANCHOR_KEYS))
        if unknown:
            raise ValueError(f"algorithm.hadw.anchor: unknown key(s) {unknown}; valid keys: {', '.join(ANCHOR_KEYS)}")
        settings = cls(**{**items, "anchor": anchor})
        if not isinstance(settings.enable, bool):
            raise ValueError(f"algorithm.hadw.enable must be true or false, got {settings.enable!r}")
        LossConfig(lambda_scale=settings.lambda_scale, std_eps=settings.std_eps)  # validates both
        DifficultyAnchor(**anchor)  # validates the anchor settings now, not at the first step
        return settings


def _plain(section: Any, name: str) -> dict[str, Any]:
    """A config section (DictConfig, dataclass-like Mapping or dict) as a plain dict."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            return dict(OmegaConf.to_container(section, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        pass
    if isinstance(section, Mapping):
        return {str(k): section[k] for k in section}
    raise ValueError(f"{name} must be a mapping of settings, got {type(section).__name__}")


# -- the driver-side anchor ---------------------------------------------------------------------------------------
class _DriverState:
    """The anchor of the process that computes advantages: built at the first "hadw_grpo" call from the settings
    then in force, restored from the resumed checkpoint when `HADWCheckpointCallback` found one."""

    def __init__(self) -> None:
        self.anchor: DifficultyAnchor | None = None
        self.settings: HADWSettings | None = None
        self.pending: dict[str, Any] | None = None  # a saved anchor waiting for the first estimator call
        self.pending_from: str | None = None
        self.callback_built = False
        self.last: dict[str, float] = {}

    def step(self, settings: HADWSettings, rewards: torch.Tensor) -> float:
        if self.anchor is None:
            self.anchor = DifficultyAnchor(**settings.anchor)
            self.settings = settings
            if self.pending is not None:
                self.anchor.load_state_dict(self.pending["anchor"])
                logger.info("hadw_grpo: anchor restored from %s (%d steps)", self.pending_from, self.anchor.steps)
                self.pending = None
            elif not self.callback_built:
                logger.warning("hadw_grpo: the anchor is not saved with verl's checkpoints; set trainer."
                               "checkpoint_callback_class=%s.HADWCheckpointCallback to keep it across a resume",
                               __name__)
        elif settings.anchor != self.settings.anchor:
            raise ValueError(f"algorithm.hadw.anchor changed during the run ({self.settings.anchor} -> "
                             f"{settings.anchor}); the anchor's history would no longer mean the same thing")
        return self.anchor.step(rewards)

    def snapshot(self) -> dict[str, Any] | None:
        if self.anchor is None:
            return None
        return {"anchor": self.anchor.state_dict(), "settings": asdict(self.settings)}


_STATE = _DriverState()


def current_anchor() -> DifficultyAnchor | None:
    """The anchor of this process (None before the first "hadw_grpo" call or with HA-DW off)."""
    return _STATE.anchor


def last_metrics() -> dict[str, float]:
    """The last "hadw_grpo" call's anchor and Phi statistics (anchor_prior, batch_accuracy, phi_mean, phi_min,
    phi_max, degenerate_group_frac); verl's estimator interface has no way to return metrics."""
    return dict(_STATE.last)


def reset_state() -> None:
    """Forget this process's anchor and any pending restore (a new run in the same process)."""
    global _STATE
    _STATE = _DriverState()


# -- the advantage estimator --------------------------------------------------------------------------------------
def uid_to_group_ids(index: Any, n_rows: int, device: torch.device | None = None) -> torch.Tensor:
    """[N] int64 group ids from verl's `index` (the `uid` of each row: strings or integers, any order)."""
    if index is None:
        raise ValueError(f"{ESTIMATOR}: index is None; verl passes each row's uid (non_tensor_batch['uid']) to "
                         f"group the responses of a prompt")
    ids = np.asarray(index)
    if ids.ndim != 1 or ids.shape[0] != n_rows:
        raise ValueError(f"{ESTIMATOR}: index has shape {ids.shape} but token_level_rewards has {n_rows} rows; "
                         f"expected one uid per row")
    _, inverse = np.unique(ids, return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device)


@register_adv_est(ESTIMATOR)
def compute_hadw_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    epsilon: float | None = None,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    **_unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's "grpo" outcome advantage with HA-DW's Phi, for one training step's whole batch.

    Args:
        token_level_rewards: [N, T] (the outcome reward is its row sum, as in "grpo").
        response_mask: [N, T]; rows without a response token (verl's synthetic padding rows) are left out of the
            group statistics and of y_t, and get advantage 0.
        index: [N] uid of each row (np.ndarray of str); rows sharing a uid form a group, in any order.
        epsilon: added to the group std (default `algorithm.hadw.std_eps`, 1e-6 as in "grpo").
        norm_adv_by_std_in_grpo: divide by the group std (default: the algorithm config's value, else True).
        config: verl's `algorithm` config; its `hadw` section gives `HADWSettings`.

    Returns:
        (advantages, returns): both [N, T], the row's advantage on every response token, 0 elsewhere. NaN rewards
        are unscorable (advantage 0, left out of the statistics); a group with exactly one scorable row keeps
        verl's convention reward / (1 + epsilon) (reward without std scaling) and Phi = 1.
    """
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"{ESTIMATOR}: token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must both be [N, T]")
    settings = HADWSettings.from_algorithm_config(config)
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    eps = settings.std_eps if epsilon is None else float(epsilon)
    n_rows = token_level_rewards.shape[0]
    group_ids = uid_to_group_ids(index, n_rows, token_level_rewards.device)

    with torch.no_grad():
        scores = token_level_rewards.detach().sum(dim=-1)
        if torch.isinf(scores).any():
            rows = torch.nonzero(torch.isinf(scores)).flatten().tolist()[:8]
            raise ValueError(f"{ESTIMATOR}: token_level_rewards sums to +-Inf on row(s) {rows}; NaN marks an "
                             f"unscorable response, Inf is not a reward")
        has_response = (response_mask != 0).any(dim=-1)
        rewards = torch.where(has_response, scores, torch.full_like(scores, math.nan))
        prior = _STATE.step(settings, rewards) if settings.enable else None
        cfg = LossConfig(adv_norm="group_std" if norm_adv_by_std_in_grpo else "none", std_eps=eps,
                         std_unbiased=True, hadw=settings.enable, lambda_scale=settings.lambda_scale)
        adv = hadw_advantages(rewards, anchor=prior, config=cfg, group_ids=group_ids)
        advantages = adv.advantages
        # verl's "grpo" gives a prompt with a single response mean 0 and std 1 (REINFORCE on the raw reward).
        scorable = ~adv.unscorable
        counts = torch.bincount(adv.group_index[scorable], minlength=adv.group_mean.numel())
        single = scorable & (counts[adv.group_index] == 1)
        if bool(single.any()):
            alone = scores.to(advantages.dtype) / (1.0 + eps) if norm_adv_by_std_in_grpo else scores
            advantages = torch.where(single, alone.to(advantages.dtype), advantages)
        if settings.enable:
            _STATE.last = dict(anchor_prior=float(prior), batch_accuracy=float(_STATE.anchor.last_accuracy),
                               phi_mean=float(adv.phi.mean()), phi_min=float(adv.phi.min()),
                               phi_max=float(adv.phi.max()),
                               degenerate_group_frac=float(adv.degenerate.float().mean()))
            logger.info("hadw_grpo: %s", _STATE.last)
        out = advantages.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return out, out


# -- the policy losses --------------------------------------------------------------------------------------------
def _aggregation(loss_agg_mode: str, info: Mapping[str, Any]) -> tuple[str, Any, int | None, int]:
    """verl's `agg_loss` as (LossConfig.loss_agg, normalizer, norm_len, dp_size): the loss is
    hadw_policy_loss(..., normalizer) * dp_size, as verl scales for data-parallel gradient averaging."""
    dp_size = int(info.get("dp_size") or 1)
    batch_num_tokens = info.get("batch_num_tokens")
    global_batch_size = info.get("global_batch_size")
    loss_scale_factor = info.get("loss_scale_factor")
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0, None, dp_size  # a sum: the denominator is 1
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("hadw policy loss: global_batch_info['batch_num_tokens'] (the global token count) is "
                             "required when dp_size > 1")
        return "token-mean", batch_num_tokens, None, dp_size
    if loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        if global_batch_size is None and dp_size > 1:
            raise ValueError("hadw policy loss: global_batch_info['global_batch_size'] is required when dp_size > 1")
        norm_len = None
        if loss_agg_mode == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
            norm_len = int(loss_scale_factor)
        return loss_agg_mode, global_batch_size, norm_len, dp_size
    raise ValueError(f"hadw policy loss: loss_agg_mode={loss_agg_mode!r} is not supported; choose token-mean, "
                     f"token-sum, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm")


def _policy_loss(
    ratio_level: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    if config is None:
        raise ValueError("hadw policy loss: config (verl's actor config) is required")
    clip = config.get("clip_ratio", 0.2)
    clip_low = config.get("clip_ratio_low", None)
    clip_high = config.get("clip_ratio_high", None)
    clip_low = clip if clip_low is None else clip_low
    clip_high = clip if clip_high is None else clip_high
    info = config.get("global_batch_info", None) or {}
    agg, normalizer, norm_len, dp_size = _aggregation(loss_agg_mode, info)
    token = ratio_level == "token"
    cfg = LossConfig(clip_low=float(clip_low), clip_high=float(clip_high),
                     clip_ratio_c=float(config.get("clip_ratio_c", 3.0)) if token else None,
                     ratio_level=ratio_level, loss_agg=agg, hadw=False, norm_len=norm_len,
                     log_ratio_clamp=20.0 if token else GSPO_LOG_RATIO_CLAMP)
    if not token and rollout_is_weights is not None:
        log_prob = _gspo_token_gradients(log_prob, rollout_is_weights, response_mask)
    out = hadw_policy_loss(log_prob, old_log_prob, advantages, response_mask, config=cfg,
                           rollout_is_weights=rollout_is_weights, normalizer=normalizer, backend=LOSS_BACKEND)
    with torch.no_grad():
        mask = response_mask != 0
        neg_log_ratio = old_log_prob.detach() - log_prob.detach()
        if token:  # verl's vanilla reports the clamped log-ratio, gspo the raw one
            neg_log_ratio = neg_log_ratio.clamp(-20.0, 20.0)
        ppo_kl = verl_F.masked_mean(neg_log_ratio, mask)
    metrics = {
        "actor/pg_clipfrac": out.metrics["clipfrac"].item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": out.metrics["dual_clipfrac"].item(),
    }
    return out.loss * dp_size, metrics


def _gspo_token_gradients(log_prob: torch.Tensor, weights: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log_prob [N, T] with the same values and the gradient reaching token t rescaled by |y| w_t / sum_s w_s.

    verl's gspo writes the ratio per token, s_t = sg[s] * pi_t / sg[pi_t], so token t's gradient carries its own
    importance weight w_t; `hadw_policy_loss` differentiates s = exp(mean log-ratio) itself, which spreads the row's
    weighted gradient evenly (the mean of w over the row; TRL's GSPO does the same). The two agree whenever w is
    constant along a row (no weights, or verl's sequence-level weights); with token-level weights (rollout_is=token)
    this rescaling makes them agree exactly (tested)."""
    mask = response_mask != 0
    w = torch.where(mask, weights.detach().to(log_prob.dtype), torch.zeros((), dtype=log_prob.dtype))
    total = w.sum(dim=-1, keepdim=True)
    scale = torch.where(total > 0, w * mask.sum(dim=-1, keepdim=True) / total.clamp(min=1e-30), torch.ones_like(w))
    detached = log_prob.detach()
    return detached + (log_prob - detached) * scale


@register_policy_loss("hadw_vanilla")
def compute_policy_loss_hadw_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's "vanilla" PPO-clip loss (token ratio, dual clip at config.clip_ratio_c) by `hadw_policy_loss`.

    Args (verl's PolicyLossFn): old_log_prob, log_prob, advantages, response_mask, rollout_is_weights: [N, T];
    loss_agg_mode: verl's aggregation; config: the actor config (clip_ratio[_low|_high], clip_ratio_c,
    global_batch_info). Returns (loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}).
    """
    return _policy_loss("token", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


@register_policy_loss("hadw_gspo")
def compute_policy_loss_hadw_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's "gspo" loss (sequence ratio exp(mean log-ratio), no dual clip) by `hadw_policy_loss`; arguments and
    metrics as `compute_policy_loss_hadw_vanilla` (pg_clipfrac_lower is 0, as in verl)."""
    return _policy_loss("sequence", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


# -- checkpoints --------------------------------------------------------------------------------------------------
def resume_folder(config: Any) -> str | None:
    """The `global_step_N` folder verl's trainer resumes from, by its own rule (trainer.resume_mode: 'disable' ->
    None; 'auto' -> the latest checkpoint under trainer.default_local_dir; 'resume_path' -> resume_from_path)."""
    trainer = config.get("trainer", None) if config is not None else None
    if trainer is None:
        return None
    mode = trainer.get("resume_mode", "auto")
    if mode == "disable":
        return None
    if mode == "resume_path":
        path = trainer.get("resume_from_path", None)
        return None if path is None else os.path.abspath(str(path))
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    return find_latest_ckpt_path(os.path.abspath(str(trainer.get("default_local_dir"))))


class HADWCheckpointCallback(CheckpointCallback):
    """Saves the "hadw_grpo" anchor into each verl checkpoint folder (`hadw_anchor.pt`) and restores it on resume.

    Enable with `trainer.checkpoint_callback_class=hadw_kernels.integrations.verl.HADWCheckpointCallback` (v1
    trainer, verl's default). To combine with a callback of your own, subclass this one and call `super()`.
    """

    def __init__(self, config: Any = None) -> None:
        super().__init__(config=config)
        _STATE.callback_built = True
        folder = resume_folder(config)
        if folder is None:
            return
        path = os.path.join(folder, ANCHOR_FILE)
        if os.path.exists(path):
            _STATE.pending = torch.load(path, map_location="cpu", weights_only=True)
            _STATE.pending_from = path
        else:
            logger.warning("hadw_grpo: resuming from %s, which holds no %s; the anchor starts afresh", folder,
                           ANCHOR_FILE)

    def on_save(self, trainer: Any, global_step: int, checkpoint_dir: str, async_save: bool = False,
                **kwargs: Any) -> None:
        super().on_save(trainer=trainer, global_step=global_step, checkpoint_dir=checkpoint_dir,
                        async_save=async_save, **kwargs)
        state = _STATE.snapshot()
        if state is None:
            return
        state["global_step"] = int(global_step)
        os.makedirs(checkpoint_dir, exist_ok=True)
        tmp = os.path.join(checkpoint_dir, ANCHOR_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(checkpoint_dir, ANCHOR_FILE))
