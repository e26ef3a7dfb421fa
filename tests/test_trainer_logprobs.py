"""The trainer's log-probs and policy loss from hidden states (`hadw_trainer.logprobs`) against materialised logits:
a tiny HF model's full [n, P + T, V] logits, log-softmax at the temperature, gathered, and `hadw_policy_loss` on
them. Log-probs, entropy, the loss, every metric and every parameter's gradient (the LM head tied to the input
embedding, and untied), in float64 (to rounding) and fp32; one call and budgets small enough to split the tokens
into chunks and the vocabulary into blocks; both loss strategies (one pass, and two passes for GSPO across
vocabulary blocks); the old/ref helper on a plain HF model; the config's memory knob."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from hadw_kernels import LossConfig, hadw_policy_loss  # noqa: E402
from hadw_kernels.reference import POLICY_METRICS  # noqa: E402
from hadw_trainer.config import ConfigError, apply_overrides  # noqa: E402
from hadw_trainer.logprobs import (  # noqa: E402
    PolicyScorer,
    ResponseRows,
    as_scorer,
    batch_logprobs,
    response_logprobs,
    response_policy_loss,
)
from hadw_trainer.recipes import get_recipe  # noqa: E402
from hadw_trainer.rollout.engine import Generation  # noqa: E402

V = 300  # > 2 vocabulary blocks of 128 under a small budget
TEMP = 0.7


def budget(name: str, dtype: torch.dtype) -> int | None:
    """Bytes of chunk temporaries (one logit: the compute dtype's size, float32 for float32 and float64 models):
    'one-chunk' = the library's default (all 118 valid tokens at once), 'chunks' = whole-vocabulary chunks of 70
    tokens, 'split' = chunks of 64 tokens (the library's smallest) over vocabulary blocks of 128 entries."""
    size = torch.finfo(dtype).bits // 8
    return {"one-chunk": None, "chunks": 70 * V * size, "split": 64 * 128 * size}[name]


def tiny_model(tied: bool, dtype=torch.float64, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = (tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)) if tied
             else tf.LlamaForCausalLM(tf.LlamaConfig(**common)))
    with torch.no_grad():  # logits spread over a few units, so the entropy and the ratios are not trivial
        model.get_output_embeddings().weight.mul_(40.0)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model.to(dtype).train()


def make_rows(n=20, P=5, T=9, seed=1) -> ResponseRows:
    """Left-padded prompts, right-padded responses (row 1 a single token, row 2 the full width), pad id 0 after
    each response: 180 positions, 118 valid."""
    g = torch.Generator().manual_seed(seed)
    p_ids = torch.randint(3, V, (n, P), generator=g)
    p_mask = torch.ones_like(p_ids)
    p_mask[0, :2] = 0
    p_mask[3, :4] = 0
    r_ids = torch.randint(3, V, (n, T), generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    lengths[1], lengths[2] = 1, T
    r_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    r_ids = torch.where(r_mask.bool(), r_ids, torch.zeros_like(r_ids))  # pad id 0 after the response
    return ResponseRows(p_ids, p_mask, r_ids, r_mask)


def materialised(model, rows: ResponseRows, temperature: float = TEMP):
    """(log-probs, entropy) [n, T] from the full logits (the definition), in the model's dtype, differentiable."""
    ids = torch.cat([rows.prompt_ids, rows.response_ids], 1)
    attn = torch.cat([rows.prompt_mask, rows.response_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    T = rows.response_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, -(T + 1):-1]
    logp = torch.log_softmax(logits / temperature, -1)
    mask = rows.response_mask.to(logp.dtype)
    lp = logp.gather(-1, rows.response_ids[..., None]).squeeze(-1) * mask
    return lp, -(logp.exp() * logp).sum(-1) * mask


def grads(model) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(got, want, rtol, atol):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("chunking", ["one-chunk", "chunks", "split"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logprobs_and_entropy_equal_materialised_logits(tied, chunking, dtype):
    model = tiny_model(tied, dtype)
    rows = make_rows()
    w_lp = torch.randn(rows.response_ids.shape, dtype=dtype)  # an arbitrary downstream use of both outputs
    w_ent = torch.randn(rows.response_ids.shape, dtype=dtype)
    lp, ent = response_logprobs(model, rows, TEMP, budget(chunking, dtype))
    assert lp.shape == ent.shape == rows.response_ids.shape and lp.dtype == dtype
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    got = grads(model)
    want_lp, want_ent = materialised(model, rows)
    ((want_lp * w_lp).sum() + (want_ent * w_ent).sum()).backward()
    want = grads(model)
    tol = TOL[dtype]
    torch.testing.assert_close(lp, want_lp, **tol)
    torch.testing.assert_close(ent, want_ent, **tol)
    assert bool((lp[rows.response_mask == 0] == 0).all()) and bool((ent[rows.response_mask == 0] == 0).all())
    assert_grads_close(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    assert "model.embed_tokens.weight" in got and got["model.embed_tokens.weight"].abs().sum() > 0
    if not tied:
        assert got["lm_head.weight"].abs().sum() > 0


def _loss_case(model, rows, preset: str, with_ref: bool, seed=3):
    """Old log-probs = the model's own + noise (the clip branches fire), advantages of both signs, a reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp, _ = materialised(model, rows)
    mask = rows.response_mask.to(lp.dtype)
    old = (lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=lp.dtype)) * mask
    ref = (lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=lp.dtype)) * mask if with_ref else None
    adv = torch.randn(lp.shape[0], generator=g, dtype=lp.dtype)
    cfg = LossConfig.preset(preset, **({"kl_coef": 0.05} if with_ref else {}))
    return old, adv, ref, cfg


CASES = {  # preset, reference policy (KL), chunking, dtype
    "grpo-kl-f64": ("grpo", True, "one-chunk", torch.float64),
    "dapo-chunks-f64": ("dapo", False, "chunks", torch.float64),
    "gspo-chunks-f64": ("gspo", False, "chunks", torch.float64),
    "gspo-kl-split-f64": ("gspo", True, "split", torch.float64),
    "grpo-kl-chunks-f32": ("grpo", True, "chunks", torch.float32),
    "dr_grpo-split-f32": ("dr_grpo", False, "split", torch.float32),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_policy_loss_equals_hadw_policy_loss_on_materialised_logits(tied, case):
    """The policy pass: `response_policy_loss` (one pass over whole-vocabulary chunks, row-aligned for GSPO; two
    passes over vocabulary blocks) against `hadw_policy_loss` on the materialised log-probs, with a global
    normaliser as the update passes it."""
    preset, with_ref, chunking, dtype = CASES[case]
    model = tiny_model(tied, dtype)
    rows = make_rows()
    old, adv, ref, cfg = _loss_case(model, rows, preset, with_ref)
    normalizer = float(rows.response_mask.sum()) * 1.5  # as if other micro-batches / ranks held more tokens
    out = response_policy_loss(model, rows, old, adv, temperature=TEMP, config=cfg, normalizer=normalizer,
                               ref_logprobs=ref, backend="torch", memory_budget=budget(chunking, dtype))
    out.loss.backward()
    got = grads(model)
    want_lp, want_ent = materialised(model, rows)
    want = hadw_policy_loss(want_lp, old, adv, rows.response_mask, config=cfg, normalizer=normalizer,
                            ref_logprobs=ref, backend="torch")
    want.loss.backward()
    want_grads = grads(model)
    tol = TOL[dtype]
    torch.testing.assert_close(out.loss, want.loss, **tol)
    assert out.metrics["clipfrac"] > 0  # the clip branches really fire
    for k in POLICY_METRICS + (("kl", "kl_loss") if with_ref else ()):
        torch.testing.assert_close(out.metrics[k], want.metrics[k], **tol, msg=k)
    valid = rows.response_mask.bool()
    torch.testing.assert_close(out.metrics["entropy"], want_ent.detach()[valid].mean(), **tol)
    torch.testing.assert_close(out.logprobs, want_lp.detach(), **tol)
    torch.testing.assert_close(out.entropy, want_ent.detach(), **tol)
    assert not out.logprobs.requires_grad and not out.entropy.requires_grad
    assert_grads_close(got, want_grads, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


def test_batch_logprobs_old_and_ref_passes():
    """The old / ref helper: a plain HF model (the reference policy) is scored like a scorer, in calls of any
    number of rows, in eval mode and without grad; the model's mode is restored; rows are trimmed per call."""
    model = tiny_model(True, torch.float64)
    rows = make_rows()
    n, T = rows.response_ids.shape
    gen = Generation(rows.prompt_ids, rows.prompt_mask, torch.cat([rows.response_ids, torch.zeros(n, 2).long()], 1),
                     torch.cat([rows.response_mask, torch.zeros(n, 2).long()], 1))
    lp5, ent5 = batch_logprobs(model, gen, rows_per_call=5, temperature=TEMP,
                               memory_budget=budget("split", torch.float32))
    lp_all, ent_all = batch_logprobs(PolicyScorer(model), gen, rows_per_call=n, temperature=TEMP)
    assert model.training and lp5.dtype == torch.float32 and lp5.shape == (n, T + 2)
    assert not lp5.requires_grad
    want_lp, want_ent = materialised(model.eval(), rows)
    for lp, ent in ((lp5, ent5), (lp_all, ent_all)):
        torch.testing.assert_close(lp[:, :T].double(), want_lp.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ent[:, :T].double(), want_ent.detach(), rtol=1e-6, atol=1e-6)
        assert bool((lp[:, T:] == 0).all())


def test_as_scorer_keeps_wrapped_scorers():
    import types

    model = tiny_model(True)
    scorer = PolicyScorer(model)
    assert as_scorer(scorer) is scorer
    wrapper = types.SimpleNamespace(module=scorer)  # what DDP and a DeepSpeed engine expose
    assert as_scorer(wrapper) is wrapper
    fresh = as_scorer(model)
    assert isinstance(fresh, PolicyScorer) and fresh.model is model
    assert scorer.head_weight() is model.lm_head.weight is model.model.embed_tokens.weight


def test_memory_knob_config():
    cfg = get_recipe("smoke")
    assert cfg.model.logprob_memory_mb == 0 and cfg.model.logprob_memory_budget() is None
    cfg = apply_overrides(cfg, ["model.logprob_memory_mb=0.5"])
    assert cfg.model.logprob_memory_budget() == 2**19
    assert apply_overrides(get_recipe("smoke"), ["model.logprob_memory_mb=1e-9"]).model.logprob_memory_budget() == 1
    for backend in ("single", "ddp", "fsdp2", "zero2", "zero3"):
        apply_overrides(get_recipe("tiny-arith"), [f"parallel.backend={backend}", "model.logprob_memory_mb=64"]
                        ).validate(2)
    for bad, msg in (("-1", "must be >= 0"), ("nan", "finite number of MiB"), ("inf", "finite number of MiB")):
        with pytest.raises(ConfigError, match=msg):
            apply_overrides(get_recipe("tiny-arith"), [f"model.logprob_memory_mb={bad}"]).validate(1)
    with pytest.raises(ConfigError, match="logprob_memory_mb"):  # the old knob is gone, with a hint
        apply_overrides(get_recipe("tiny-arith"), ["model.logprob_chunk_tokens=64"])
