"""The policy: a character tokenizer and tiny Qwen2 / Llama built from a config, or a local HF model directory,
and the one function that turns a (prompt, response) batch into per-token log-probs.

    >>> tok = char_tokenizer()
    >>> model = build_tiny_model(ModelConfig(), tok)
    >>> sum(p.numel() for p in model.parameters())   # ~1.05M with the defaults
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.utils.checkpoint

from hadw_trainer.config import ModelConfig
from hadw_trainer.tasks import ARITH_CHARS

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


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is at 0 (what `generate` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def response_logprobs(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
    response_mask: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 0,
) -> torch.Tensor:
    """log pi(response token | prefix) at `temperature` -> [N, T] fp32 (0 where response_mask is 0).

    prompt_ids/prompt_mask [N, P] are left-padded; response_ids/response_mask [N, T] right-padded. Only the last
    T + 1 positions go through the LM head (`logits_to_keep`), so long prompts cost no vocabulary-sized logits.
    With `chunk_tokens` > 0 the LM head runs on that many tokens at a time under activation checkpointing, so the
    [N, T, vocab] logits never exist at once, in the forward or the backward (real models: V ~ 150k).
    """
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, response_mask], dim=1).long()
    T = response_ids.shape[1]
    pos = position_ids(attn)
    if chunk_tokens <= 0:
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1, use_cache=False)
        logits = out.logits[:, :-1].float()  # [N, T, V]: position t predicts response token t
        if temperature != 1.0:
            logits = logits / temperature
        lp = torch.log_softmax(logits, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        return lp * response_mask.to(lp.dtype)
    hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    h = hidden[:, -(T + 1):-1].reshape(-1, hidden.shape[-1])  # [N*T, H]
    targets = response_ids.reshape(-1)
    head = model.get_output_embeddings()
    parts = []
    for i in range(0, h.shape[0], chunk_tokens):
        sl = slice(i, i + chunk_tokens)
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(_token_logprobs, head, h[sl], targets[sl], temperature,
                                                           use_reentrant=False))
        else:
            parts.append(_token_logprobs(head, h[sl], targets[sl], temperature))
    lp = torch.cat(parts).view(response_ids.shape)
    return lp * response_mask.to(lp.dtype)
