"""Plug-ins for RL frameworks. Each submodule imports its framework; this package imports none of them.

- `hadw_kernels.integrations.verl`: verl 0.9.x: the advantage estimator "hadw_grpo", the policy losses
  "hadw_vanilla" and "hadw_gspo", and a checkpoint callback that saves the anchor (loaded by verl itself through
  the `verl.plugins` entry point this package declares).
- `hadw_kernels.integrations.trl`: TRL 1.16: `HADWGRPOTrainer` / `HADWGRPOConfig` (HA-DW advantages under TRL's own
  loss, or the fused `hadw_policy_loss`).

docs/integrations.md gives the command lines, what each mode supports and the known limits.
"""
