"""Tiny, fully local GRPO runs for the TRL integration tests (in-process and under torchrun): a character tokenizer,
a 2-layer Qwen2 built from a config (no download), a prompt dataset and rewards, and a trainer subclass that
records every generation batch."""

from __future__ import annotations

import os
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from hadw_kernels.integrations.trl import HADWGRPOConfig, HADWGRPOTrainer  # noqa: E402

CHARS = "abcdefgh0123456789+= "


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>"] + sorted(set(CHARS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>", padding_side="left")


def model(tok, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return transformers.Qwen2ForCausalLM(cfg)


def saved_model(path: str, seed: int = 0) -> str:
    """Write the tiny model and its tokenizer to `path` once and return it: TRL builds its reference model (beta > 0)
    from the policy's path, so the policy is handed over as a path too."""
    if not os.path.exists(os.path.join(path, "config.json")):
        tok = tokenizer()
        model(tok, seed).save_pretrained(path)
        tok.save_pretrained(path)
    return path


def dataset() -> Dataset:
    return Dataset.from_dict({"prompt": ["1+2=", "3+4=", "a+b=", "5+5=", "7+1=", "h+g=", "2+2=", "c+d="] * 6})


def reward_has_one(completions, **_):
    """Binary, like an accuracy: ~30% of this random model's 8-character completions contain a '1'."""
    return [1.0 if "1" in c else 0.0 for c in completions]


def reward_unscorable_h(completions, **_):
    """As `reward_has_one`, but None (unscorable) for completions starting with 'h'."""
    return [None if c.startswith("h") else (1.0 if "1" in c else 0.0) for c in completions]


def reward_none(completions, **_):
    """Every completion unscorable."""
    return [None] * len(completions)


def config(cls=HADWGRPOConfig, *, output_dir: str, **overrides: Any):
    """A small CPU run's arguments; `output_dir` is where the Trainer may write (a test's tmp_path)."""
    base = dict(output_dir=output_dir, use_cpu=True, report_to=[], seed=0,
                per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2,
                max_completion_length=8, max_steps=2, logging_steps=1, save_strategy="no", learning_rate=3e-2,
                disable_tqdm=True, temperature=1.0)
    return cls(**{**base, **overrides})


class Recording:
    """Mixin recording each generation batch: the gathered rewards and prior (HA-DW trainers) and this process's
    advantages as they enter the loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        record = {"advantages": output["advantages"].detach().clone()}
        last = getattr(self, "hadw_last_batch", None)
        if last is not None:
            record.update(rewards=last["rewards"].clone(), prior=last["prior"], rows=last["rows"],
                          anchor=self.hadw_anchor.state_dict())
        self.records.append(record)
        return output


class RecordingHADW(Recording, HADWGRPOTrainer):
    pass


class RecordingStock(Recording, GRPOTrainer):
    pass


def train(trainer_cls, args, model_path: str, *, reward=reward_has_one, resume_from_checkpoint=None):
    """`trainer_cls` trained on the tiny model saved at `model_path` (see `saved_model`)."""
    trainer = trainer_cls(model=model_path, reward_funcs=reward, args=args, train_dataset=dataset(),
                          processing_class=tokenizer())
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def step_logs(trainer) -> list[dict[str, float]]:
    """The per-step log entries (loss, grad_norm, ...), in step order."""
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


__all__ = ["GRPOConfig", "HADWGRPOConfig", "RecordingHADW", "RecordingStock", "config", "saved_model", "step_logs",
           "train"]
