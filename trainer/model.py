"""The policy: a character tokenizer and tiny Qwen2 / Llama built from a config, or a local HF model directory
(per-token log-probs of a batch: `hadw_trainer.logprobs`).

    >>> tok = char_tokenizer()
    >>> model = build_tiny_model(ModelConfig(), tok)
    >>> sum(p.numel() for p in model.parameters())   # ~1.05M with the defaults
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from hadw_trainer.config import ModelConfig
from hadw_trainer.data.tasks import ARITH_CHARS

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the 'train' extra is required
        raise ImportError("hadw_trainer needs transformers: pip install 'hadw-kernels[train]'") from e
    return transformers


def char_tokenizer(chars: str = ARITH_CHARS + " "):
    """A one-character-per-token `PreTrainedTokenizerFast` with <pad>=0, <bos>=1, <eos>=2, left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + sorted(set(chars)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()  # join characters back without spaces
    return _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def build_tiny_model(cfg: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    """A small causal LM from a config (no download). Weights come from the current torch RNG."""
    tf = _transformers()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    return model.to(getattr(torch, cfg.dtype))


def load_tokenizer(path: str):
    """Load a tokenizer saved next to a model. Character tokenizers are reloaded as `PreTrainedTokenizerFast`
    (AutoTokenizer would pick the model's own tokenizer class, which drops spaces)."""
    tf = _transformers()
    tc_path = os.path.join(path, "tokenizer_config.json")
    cls_name = None
    if os.path.exists(tc_path):
        with open(tc_path) as f:
            cls_name = json.load(f).get("tokenizer_class")
    if cls_name in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        tok = tf.PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = tf.AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, cfg: ModelConfig) -> tuple[torch.nn.Module, Any]:
    """A local HF model directory -> (model in train mode, tokenizer)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.path={path!r} is not a directory (a local Hugging Face model directory with "
                                f"config.json, weights and tokenizer files is expected; nothing is downloaded)")
    tf = _transformers()
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))
    tok = load_tokenizer(path)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = True
    return model, tok


def save_model(model: torch.nn.Module, tokenizer: Any, path: str) -> None:
    """HF directory: config.json + model.safetensors + tokenizer files (loadable by `load_model`)."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    tc_path = os.path.join(path, "tokenizer_config.json")
    if type(tokenizer).__name__ == "PreTrainedTokenizerFast":  # so load_tokenizer does not pick the model's class
        with open(tc_path) as f:
            tc = json.load(f)
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(tc_path, "w") as f:
            json.dump(tc, f, indent=2)
