"""Named recipes: plain functions returning a `JobConfig`. `--set section.field=value` changes any field.

- `tiny-arith` (the main job) and `tiny-arith-grpo` (the same without HA-DW): synthetic arithmetic, levels 1-5,
  a 1.05M-parameter char-level Qwen2 warmed up by a cached supervised run, then GRPO (+ HA-DW), G = 8, on CPU.
- `tiny-arith-{dapo,gspo}[-hadw]`: the same task with the other presets.
- `{model}-{grpo,dapo,gspo}[-hadw]`: the paper's runs (its Table 8), for model in qwen3-4b-base, qwen3-8b-base,
  llama3.2-3b-instruct. They need `--set model.path=LOCAL_HF_DIR task.path=MATH_TRAIN.jsonl` (nothing is
  downloaded) and 8 GPUs: `torchrun --nproc-per-node 8 -m hadw_trainer --recipe ...` (ZeRO-2, colocated vLLM
  rollouts; docs/distributed.md).
- `math-sample`: the math pipeline on the shipped JSONL sample (smoke test; give it any local model).
- `smoke`: tiny-arith shrunk to seconds (a 60k-parameter model, 3 steps): checks an install; the tests run it.
"""

from __future__ import annotations

from collections.abc import Callable

from hadw_trainer.config import (
    AlgoConfig,
    CheckpointConfig,
    ConfigError,
    EvalConfig,
    JobConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RolloutConfig,
    SFTConfig,
    TaskConfig,
    TrainConfig,
)
from hadw_trainer.data.tasks import shipped_math_sample

# The paper's prompt (spec §6).
PAPER_PROMPT = "{question}. Let's think step by step and output the final answer within \\boxed{}."


def tiny_arith(loss: str = "grpo", hadw: bool = True) -> JobConfig:
    """The main job: ~5 minutes on 2 CPU cores (the warm-up once, then 120 RL steps)."""
    return JobConfig(
        recipe="tiny-arith",
        model=ModelConfig(arch="qwen2", hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                          max_position_embeddings=64),
        task=TaskConfig(name="arith", levels=(1, 2, 3, 4, 5), eval_per_level=100, prompt_template="{question}=",
                        reward="last_value"),
        # A sloppy teacher: half the worked solutions the warm-up imitates carry one slip (a running total off by
        # one), so the base model knows every step but slips under sampling, on every level: held-out greedy 0.55,
        # avg@8 0.39, and about 20% of groups of 8 all-equal. Sampled slips are what RL can teach away
        # (docs/results.md). Without slips the base is sharper (greedy 0.69, avg@8 0.56) and RL barely moves it.
        sft=SFTConfig(steps=300, batch_size=128, lr=3e-3, seed=0, slip=0.5),
        # 64 prompts x 8 per step and one AdamW update per step at lr 1e-4 after 3 warm-up steps. Measured over 40-160
        # steps (docs/results.md): lr 2e-4 and above drop greedy accuracy in the first 20-40 steps or collapse later
        # (the updates are noise-dominated); 32 prompts per step learns as fast per sample but less steadily.
        rollout=RolloutConfig(prompts_per_step=64, group_size=8, max_new_tokens=12, temperature=1.0),
        algo=AlgoConfig(preset=loss, loss={} if hadw else {"hadw": False}, mini_batch_prompts=64,
                        micro_batch_prompts=16),
        optim=OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=3, grad_clip=1.0),
        eval=EvalConfig(every=30, k=8, temperature=1.0, greedy=True),
        checkpoint=CheckpointConfig(every=40, keep_last=2),
        train=TrainConfig(max_steps=120, seed=0, threads=2),
    )


def paper_run(model: str, loss: str, hadw: bool) -> JobConfig:
    """The paper's Table 8 settings (spec §6): MATH, 256 prompts x G=8, mini-batch 16, micro-batch 1 prompt, lr 1e-6,
    weight decay 0.1, 10 warm-up steps, clip 1.0, no KL, 4096-token responses, 3 epochs (DAPO: 9)."""
    return JobConfig(
        recipe=f"{model}-{loss}{'-hadw' if hadw else ''}",
        model=ModelConfig(path=None, dtype="bfloat16", gradient_checkpointing=True),
        task=TaskConfig(name="jsonl", path=None, prompt_template=PAPER_PROMPT, reward="math_verify",
                        chat_template=model.endswith("instruct"), max_prompt_len=1024, eval_per_level=0),
        # vLLM colocated on each GPU (the paper's setup); its sampling log-probs cost nothing, unlike HF generate's
        rollout=RolloutConfig(engine="vllm", prompts_per_step=256, group_size=8, max_new_tokens=4096,
                              temperature=1.0, chunk_prompts=32, sampling_logprobs=True,
                              vllm_gpu_memory_utilization=0.4),
        # micro-batches hold whole groups and count prompts per rank: on 8 GPUs a 16-prompt mini-batch is 2 prompts
        # (16 responses) per GPU, done as 2 micro-batches of 1 prompt (the paper's 4 counts responses per GPU,
        # which would split a group of 8; the loss does not depend on the split)
        algo=AlgoConfig(preset=loss, loss={"lambda_scale": 1.3} if hadw else {"hadw": False}, mini_batch_prompts=16,
                        micro_batch_prompts=1),
        optim=OptimConfig(lr=1e-6, weight_decay=0.1, warmup_steps=10, grad_clip=1.0),
        eval=EvalConfig(every=20, k=0, greedy=True, batch_prompts=64),
        checkpoint=CheckpointConfig(every=20, keep_last=2),
        # ZeRO-2: optimizer state and gradients sharded over the 8 GPUs, full bf16 weights on each (what the
        # colocated vLLM engine reads directly); 3B-8B fit an 80 GB GPU this way
        parallel=ParallelConfig(backend="zero2"),
        # 7.5k MATH problems / 256 per step ~ 29 steps per epoch; 3 epochs (DAPO 9)
        train=TrainConfig(max_steps=(9 if loss == "dapo" else 3) * 30, seed=0, threads=0),
    )


def math_sample() -> JobConfig:
    """The math pipeline on the shipped sample with tiny sizes: give it any local model (`model.path`)."""
    cfg = paper_run("sample", "grpo", True)
    cfg.recipe = "math-sample"
    cfg.model = ModelConfig(path=None, dtype="float32")
    cfg.task.path = shipped_math_sample()
    cfg.rollout = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=32)
    cfg.parallel = ParallelConfig()
    cfg.algo = AlgoConfig(preset="grpo", mini_batch_prompts=4, micro_batch_prompts=2)
    cfg.optim = OptimConfig(lr=1e-5, warmup_steps=0)
    cfg.eval = EvalConfig(every=0, k=0, greedy=True, batch_prompts=16)
    cfg.checkpoint = CheckpointConfig(every=0, keep_last=1)
    cfg.train = TrainConfig(max_steps=2, seed=0, threads=2)
    return cfg


def smoke() -> JobConfig:
    """tiny-arith shrunk to seconds: a 60k-parameter model, levels 1-2, 3 RL steps, no plots. Checks an install
    (`hadw-train --recipe smoke --output-dir /tmp/smoke`); the trainer's tests run it."""
    cfg = tiny_arith()
    cfg.recipe = "smoke"
    cfg.model = ModelConfig(arch="qwen2", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                            max_position_embeddings=32)
    cfg.task.levels, cfg.task.eval_per_level = (1, 2), 16
    cfg.sft = SFTConfig(steps=60, batch_size=32, lr=3e-3, seed=0)
    cfg.rollout = RolloutConfig(prompts_per_step=8, group_size=4, max_new_tokens=6, temperature=1.0)
    cfg.algo.mini_batch_prompts, cfg.algo.micro_batch_prompts = 4, 2
    cfg.optim = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=2, grad_clip=1.0)
    cfg.eval = EvalConfig(every=0, k=2, temperature=1.0, greedy=True, batch_prompts=64)
    cfg.checkpoint = CheckpointConfig(every=0, keep_last=2)
    cfg.train = TrainConfig(max_steps=3, seed=0, threads=1, plots=False, tensorboard=False, progress=False)
    return cfg


def _tiny(loss: str, hadw: bool) -> Callable[[], JobConfig]:
    def make() -> JobConfig:
        cfg = tiny_arith(loss, hadw)
        cfg.recipe = f"tiny-arith-{loss}{'-hadw' if hadw else ''}"
        return cfg

    return make


RECIPES: dict[str, Callable[[], JobConfig]] = {"tiny-arith": tiny_arith, "math-sample": math_sample, "smoke": smoke}
for _loss in ("grpo", "dapo", "gspo"):
    for _hadw in (False, True):
        RECIPES[f"tiny-arith-{_loss}{'-hadw' if _hadw else ''}"] = _tiny(_loss, _hadw)
        for _model in ("qwen3-4b-base", "qwen3-8b-base", "llama3.2-3b-instruct"):
            RECIPES[f"{_model}-{_loss}{'-hadw' if _hadw else ''}"] = (
                lambda m=_model, lo=_loss, h=_hadw: paper_run(m, lo, h))


def get_recipe(name: str) -> JobConfig:
    """A fresh JobConfig for the recipe `name`; an unknown name raises ConfigError listing the valid ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid recipes:\n  " + "\n  ".join(sorted(RECIPES)))
    return RECIPES[name]()
