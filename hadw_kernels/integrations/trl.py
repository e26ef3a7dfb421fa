"""TRL 1.16 integration: `HADWGRPOTrainer`, a `GRPOTrainer` whose advantages are HA-DW's.

    from hadw_kernels.integrations.trl import HADWGRPOConfig, HADWGRPOTrainer

    args = HADWGRPOConfig(output_dir="out", loss_type="dapo", hadw_lambda=1.3, hadw_loss="fused")
    trainer = HADWGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset)
    trainer.train()

Two modes (`HADWGRPOConfig.hadw_loss`):
- "trl" (default): TRL's own loss, every `loss_type` (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo), on
  HA-DW advantages.
- "fused": `hadw_policy_loss` (the fused Triton kernel on CUDA) for loss types grpo, bnpo, dr_grpo and dapo, with
  TRL's normalisation, KL (`beta`, `use_bias_correction_kl`), token or sequence ratio (`importance_sampling_level`),
  vLLM importance-sampling ratio, off-policy mask, high-entropy token mask, static entropy bonus, MoE aux loss and the
  metrics kl, entropy, clip_ratio/{low,high,region}_mean.

Advantages: once per generation batch, on the rewards TRL has gathered from every process (the same tensor on each),
the anchor steps on them and `hadw_advantages` gives each process its slice: every process holds the same anchor
without any communication of its own. TRL's conventions carry over: rewards = weighted sum of the reward functions,
NaN = unscorable (advantage 0), std + 1e-4, `scale_rewards` group / batch / none. The anchor is saved in each
checkpoint folder (`hadw_anchor.pt`) and restored on `train(resume_from_checkpoint=...)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from hadw_kernels.anchor import ANCHOR_MODES, DifficultyAnchor
from hadw_kernels.config import LossConfig
from hadw_kernels.loss import hadw_advantages, hadw_policy_loss
from hadw_kernels.validation import BACKENDS

HADW_LOSS_MODES = ("trl", "fused")
# TRL loss_type -> the aggregation whose denominator `_fused_normalizer` supplies (TRL's `_compute_loss`)
FUSED_LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                  "dapo": "token-mean"}
ADV_NORM = {"group": "group_std", "batch": "batch_std", "none": "none"}  # TRL scale_rewards -> LossConfig.adv_norm
TRL_STD_EPS = 1e-4  # TRL divides by std + 1e-4
ANCHOR_FILE = "hadw_anchor.pt"
_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class HADWGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus HA-DW's settings (every `hadw_*` field is also a command-line flag through
    `HfArgumentParser`)."""

    hadw: bool = field(default=True, metadata={"help": "Reweight advantages by HA-DW's Phi (False: Phi = 1, the "
                                                       "advantages equal TRL's)."})
    hadw_lambda: float = field(default=1.3, metadata={"help": "lambda in Phi = lambda * exp(D * M)."})
    hadw_anchor_mode: str = field(default="window", metadata={"help": "Anchor: window | ema | fixed."})
    hadw_anchor_window: int = field(default=10, metadata={"help": "window mode: number of past batch accuracies."})
    hadw_anchor_include_current: bool = field(default=False, metadata={
        "help": "window mode: include the current batch (the authors' released code)."})
    hadw_anchor_eta: float = field(default=1.0, metadata={"help": "ema mode: base rate eta."})
    hadw_anchor_history: int = field(default=10, metadata={"help": "ema mode: posteriors in sigma_t."})
    hadw_anchor_fixed_value: float = field(default=0.5, metadata={"help": "fixed mode: the anchor."})
    hadw_loss: str = field(default="trl", metadata={"help": "trl: TRL's own loss on HA-DW advantages; fused: "
                                                            "hadw_policy_loss (loss types grpo, bnpo, dr_grpo, dapo)."})
    hadw_backend: str = field(default="auto", metadata={"help": "hadw_policy_loss backend: auto | torch | compiled "
                                                                "| triton."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hadw_anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"hadw_anchor_mode={self.hadw_anchor_mode!r} is not valid; choose one of {ANCHOR_MODES}")
        if self.hadw_loss not in HADW_LOSS_MODES:
            raise ValueError(f"hadw_loss={self.hadw_loss!r} is not valid; choose one of {HADW_LOSS_MODES}")
        if self.hadw_backend not in BACKENDS:
            raise ValueError(f"hadw_backend={self.hadw_backend!r} is not valid; choose one of {BACKENDS}")
        anchor_from_args(self)  # validates the anchor settings
        advantage_config_from_args(self)


def anchor_from_args(args: Any) -> DifficultyAnchor:
    """A fresh `DifficultyAnchor` with the `hadw_anchor_*` settings of `args`."""
    kwargs: dict[str, Any] = {"mode": args.hadw_anchor_mode}
    if args.hadw_anchor_mode == "window":
        kwargs.update(window=args.hadw_anchor_window, include_current=args.hadw_anchor_include_current)
    elif args.hadw_anchor_mode == "ema":
        kwargs.update(eta=args.hadw_anchor_eta, history=args.hadw_anchor_history)
    else:
        kwargs.update(fixed_value=args.hadw_anchor_fixed_value)
    return DifficultyAnchor(**kwargs)


def advantage_config_from_args(args: Any) -> LossConfig:
    """The advantage settings in TRL's conventions: std + 1e-4 (Bessel-corrected), scale_rewards mapped."""
    if args.scale_rewards not in ADV_NORM:
        raise ValueError(f"scale_rewards={args.scale_rewards!r} is not valid; choose one of {tuple(ADV_NORM)}")
    return LossConfig(adv_norm=ADV_NORM[args.scale_rewards], std_eps=TRL_STD_EPS, std_unbiased=True, hadw=args.hadw,
                      lambda_scale=args.hadw_lambda)


class HADWGRPOMixin:
    """HA-DW for a `GRPOTrainer` (or a subclass of your own): `class MyTrainer(HADWGRPOMixin, MyGRPOTrainer)`.

    Attributes:
        hadw_anchor: the `DifficultyAnchor`, identical on every process.
        hadw_last_batch: the last generation batch's `Advantages` over all processes' rows, with its rewards [N],
            prior (C_t^- or None) and this process's slice of rows.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        a = self.args
        missing = [f for f in HADWGRPOConfig.__dataclass_fields__ if f.startswith("hadw") and not hasattr(a, f)]
        if missing:
            raise ValueError(f"{type(self).__name__} needs HADWGRPOConfig arguments; args lacks {missing}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(f"{type(self).__name__}: multi_objective_aggregation="
                             f"{self.multi_objective_aggregation!r} is not supported (HA-DW needs each group's mean "
                             f"reward); use 'sum_then_normalize'")
        if a.hadw_loss == "fused":
            if self.loss_type not in FUSED_LOSS_AGG:
                raise ValueError(f"hadw_loss='fused' supports loss_type {tuple(FUSED_LOSS_AGG)}, got "
                                 f"{self.loss_type!r}; use hadw_loss='trl' (TRL's own loss on HA-DW advantages)")
            if a.delta is not None:
                raise ValueError("hadw_loss='fused' has no two-sided clipping (delta); use hadw_loss='trl'")
            if self.use_adaptive_entropy:
                raise ValueError("hadw_loss='fused' supports a static entropy_coef only; use hadw_loss='trl' for "
                                 "use_adaptive_entropy")
            self._hadw_loss_config = LossConfig(
                clip_low=self.epsilon_low, clip_high=self.epsilon_high, ratio_level=self.importance_sampling_level,
                loss_agg=FUSED_LOSS_AGG[self.loss_type], hadw=False, kl_coef=float(self.beta), kl_estimator="k3",
                kl_ratio_weighted=bool(a.use_bias_correction_kl),
                norm_len=self.max_completion_length if self.loss_type == "dr_grpo" else None)
        self._hadw_advantage_config = advantage_config_from_args(a)
        self.hadw_anchor: DifficultyAnchor = anchor_from_args(a)
        self.hadw_last_batch: dict[str, Any] | None = None
        self._hadw_rewards_per_func: torch.Tensor | None = None

    # -- advantages ---------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._hadw_rewards_per_func = rewards_per_func  # gathered from every process: [N_global, n_funcs]
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._hadw_rewards_per_func = self._hadw_rewards_per_func, None
        mode = "train" if self.model.training else "eval"
        # TRL's reward: weighted sum over reward functions, NaN where every function returned None
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        n_global = rewards.shape[0]
        if n_global % group_size:
            raise ValueError(f"{type(self).__name__}: {n_global} gathered rewards do not form groups of "
                             f"{group_size}")
        prior = None
        if self.args.hadw:
            # once per generation batch, on the gathered rewards: the same y_t on every process, no collective. A
            # batch without a single scorable reward has no y_t (and only zero advantages): the anchor keeps still.
            stepped = mode == "train" and bool((~torch.isnan(rewards)).any())
            prior = self.hadw_anchor.step(rewards) if stepped else self.hadw_anchor.value
        group_ids = torch.arange(n_global, device=rewards.device) // group_size
        adv = hadw_advantages(rewards, anchor=prior, config=self._hadw_advantage_config, group_ids=group_ids)
        n_local = output["advantages"].shape[0]
        rows = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        output["advantages"] = adv.advantages[rows].to(output["advantages"].dtype)
        logged = self._logs["advantages"]  # TRL logged its own advantages of every process: replace them
        for _ in range(min(n_global, len(logged))):
            logged.pop()
        logged.extend(adv.advantages.tolist())
        self.hadw_last_batch = {"rewards": rewards, "advantages": adv, "prior": prior, "rows": rows}
        metrics = self._metrics[mode]
        if prior is not None:
            metrics["hadw/anchor"].append(float(prior))
        if self.args.hadw and stepped:
            metrics["hadw/batch_accuracy"].append(float(self.hadw_anchor.last_accuracy))
        metrics["hadw/phi_mean"].append(adv.phi.mean().item())
        metrics["hadw/phi_min"].append(adv.phi.min().item())
        metrics["hadw/phi_max"].append(adv.phi.max().item())
        metrics["hadw/degenerate_group_frac"].append(adv.degenerate.float().mean().item())
        return output

    # -- the fused loss -----------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if self.args.hadw_loss != "fused":
            return super()._compute_loss(model, inputs)
        return self._hadw_fused_loss(model, inputs)

    def _fused_normalizer(self, mask: torch.Tensor, inputs: dict[str, Any], mode: str) -> torch.Tensor | float:
        """TRL's denominator of each loss type, gradient-accumulation scaling included."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in ("grpo", "dr_grpo"):  # rows (x max_completion_length through norm_len for dr_grpo)
            return float(mask.shape[0] * accumulation)
        if self.loss_type == "bnpo":  # this micro-batch's tokens
            return mask.sum().clamp(min=1.0) * accumulation
        # dapo: the generation batch's tokens, per process and accumulation window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _hadw_fused_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in _MODEL_INPUTS})
        mode = "train" if self.model.training else "eval"

        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        # Per-token multipliers of the surrogate (not of the KL), as TRL applies them: off-policy sequence mask,
        # high-entropy token mask, vLLM importance-sampling ratio. Together they are hadw_policy_loss's
        # rollout_is_weights.
        weights = []
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old)
            weights.append(self.get_off_policy_mask(
                advantages=advantages if advantages.dim() == 2 else advantages.unsqueeze(1),
                per_token_logps=per_token_logps, sampling_per_token_logps=sampling, mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold))
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            weights.append(entropy_mask)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        rollout_is_weights = None
        if weights:
            rollout_is_weights = torch.ones_like(per_token_logps, dtype=torch.float32)
            for w in weights:
                rollout_is_weights = rollout_is_weights * w.to(torch.float32)

        out = hadw_policy_loss(
            per_token_logps, old, advantages, mask, config=self._hadw_loss_config,
            ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
            rollout_is_weights=rollout_is_weights, normalizer=self._fused_normalizer(mask, inputs, mode),
            backend=self.args.hadw_backend)
        loss = out.loss
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # TRL's logged policy_loss: the micro-batch loss before the accumulation scaling (dapo's is already scaled)
        policy_loss = loss.detach() if self.loss_type == "dapo" else loss.detach() * accumulation

        if self._entropy_bonus_enabled:  # static coefficient (adaptive control is refused at construction)
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
            loss = loss - self.entropy_coef * entropy_loss
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        # TRL's metrics, as global token-weighted means (TRL reduces sum and count the same way)
        n_tokens = out.metrics["num_tokens"].to(torch.float32)

        def global_mean(value: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([value.to(torch.float32) * n_tokens, n_tokens]),
                                             reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(out.metrics["kl"]))
        entropy_mean = (entropies * mask).sum() / mask.sum().clamp(min=1.0)
        self._metrics[mode]["entropy"].append(global_mean(entropy_mean.detach()))
        self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(out.metrics["clipfrac_low"]))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(out.metrics["clipfrac_high"]))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(out.metrics["clipfrac"]))
        return loss

    # -- checkpoints (the hooks TRL itself uses for its entropy controller) -------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            tmp = os.path.join(folder, ANCHOR_FILE + ".tmp")
            torch.save({"anchor": self.hadw_anchor.state_dict()}, tmp)
            os.replace(tmp, os.path.join(folder, ANCHOR_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ANCHOR_FILE)
        if not os.path.exists(path):
            raise ValueError(f"{type(self).__name__}: resuming from {checkpoint}, which holds no {ANCHOR_FILE} (a "
                             f"checkpoint written without HA-DW); the anchor's history cannot be restored")
        self.hadw_anchor.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["anchor"])


class HADWGRPOTrainer(HADWGRPOMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` with HA-DW advantages (and optionally the fused loss); arguments as `GRPOTrainer`, with
    `args` a `HADWGRPOConfig`."""
