"""Run in a subprocess by tests/test_vllm_rollout.py (vLLM pins threads and reseeds the process it lives in),
either alone or under torchrun (two gloo ranks, one engine each through vLLM's external_launcher backend; each
rank samples its own prompts, and the trainer's collectives must still work next to the engines).

Builds the tiny char-level Qwen2 policy, starts a `VLLMRollout` on it, and checks the engine against the HF model
and `HFRollout`: sampling log-probs vs `response_logprobs`, before and after a weight push; the Generation
invariants; greedy tokens equal to HF's greedy decode; seeded reproducibility. Prints one JSON line of
measurements (prefixed RESULT) for the test to assert on; any failed check raises here with its numbers.
"""

import json
import os
import sys
import time

import torch

from hadw_trainer.config import ModelConfig
from hadw_trainer.logprobs import ResponseRows, response_logprobs
from hadw_trainer.model import build_tiny_model, char_tokenizer
from hadw_trainer.parallel import process_group as dist
from hadw_trainer.rollout.engine import Generation
from hadw_trainer.rollout.hf_engine import HFRollout
from hadw_trainer.rollout.vllm_engine import VLLMRollout

# different lengths (left padding); the last fills a 32-token KV block, so the engine's prefix cache holds it
PROMPTS = ["12+3=", "7-8=", "100-1=", "3+45-6=", "1234567890+9876543210-1111111111=2"]
N, MAX_NEW, TEMP = 4, 8, 0.8


def check_invariants(gen: Generation, prompts: list[str], n: int, tok, eos: int, max_new: int) -> None:
    """What the loop relies on, for any engine."""
    rows = len(prompts) * n
    assert gen.prompt_ids.shape == gen.prompt_mask.shape and gen.prompt_ids.shape[0] == rows
    assert gen.response_ids.shape == gen.response_mask.shape and gen.response_ids.shape[0] == rows
    assert 1 <= gen.response_ids.shape[1] <= max_new
    assert len(gen.texts) == rows and gen.truncated is not None and gen.truncated.shape == (rows,)
    if gen.sampling_logprobs is not None:
        assert gen.sampling_logprobs.shape == gen.response_ids.shape
        assert gen.sampling_logprobs.dtype == torch.float32
        assert (gen.sampling_logprobs[gen.response_mask == 0] == 0).all()
        assert (gen.sampling_logprobs[gen.response_mask == 1] <= 0).all()
    for r in range(rows):
        g = r // n  # contiguous groups: rows g*n ... g*n+n-1 belong to prompt g
        real = gen.prompt_ids[r][gen.prompt_mask[r].bool()]
        assert tok.decode(real) == prompts[g], (r, tok.decode(real), prompts[g])
        assert gen.prompt_mask[r].tolist() == sorted(gen.prompt_mask[r].tolist())  # left padding
        ids, mask = gen.response_ids[r].tolist(), gen.response_mask[r].tolist()
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length), mask  # a prefix ...
        if eos in ids[:length]:
            assert ids.index(eos) == length - 1 and not gen.truncated[r]  # ... up to and including the first EOS
        else:
            assert gen.truncated[r] and length == max_new, (ids, mask)
        assert all(t == tok.pad_token_id for t in ids[length:])
        assert gen.texts[r] == tok.decode(ids[:length], skip_special_tokens=True)


def max_logprob_diff(model, gen: Generation, temperature: float) -> float:
    with torch.no_grad():
        ref, _ = response_logprobs(model, ResponseRows.of(gen, slice(None)), temperature)
    return (ref - gen.sampling_logprobs[:, :ref.shape[1]]).abs().max().item()


def main() -> None:
    dist.init()
    torch.set_num_threads(int(os.environ.get("WORKER_THREADS", "2")))
    t0 = time.time()
    rank = dist.rank()
    prompts = PROMPTS[rank:] + PROMPTS[:rank]  # each rank its own batch
    torch.manual_seed(0)  # the same policy on every rank
    tok = char_tokenizer()
    model = build_tiny_model(ModelConfig(), tok)
    eos = tok.eos_token_id
    res: dict = {"rank": rank, "world_size": dist.world_size()}

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    t = time.time()
    engine = VLLMRollout(model, tok, seed=0, workdir=os.environ.get("HADW_VLLM_WORKDIR"),
                         engine_kwargs={"block_size": 32})
    res["engine_start_s"] = round(time.time() - t, 2)
    assert torch.get_num_threads() == threads, "VLLMRollout changed the trainer's torch threads"
    assert torch.equal(torch.get_rng_state(), rng), "VLLMRollout changed the trainer's torch RNG state"
    torch.set_num_threads(threads)  # still a real function (vLLM's CPU worker replaces it with a no-op)

    # 1. before any push: vLLM's sampling log-probs == the HF model's, at the sampling temperature
    t = time.time()
    gen = engine.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP)
    res["generate_s"] = round(time.time() - t, 2)
    check_invariants(gen, prompts, N, tok, eos, MAX_NEW)
    res["diff_before"] = max_logprob_diff(model, gen, TEMP)
    res["diff_before_t1"] = max_logprob_diff(model, engine.generate(prompts, N, max_new_tokens=MAX_NEW,
                                                                    temperature=1.0), 1.0)
    res["eos_rows"] = int((~gen.truncated).sum())
    res["rows"] = gen.response_ids.shape[0]

    # the same Generation shape and invariants as HFRollout's, with identical prompt tensors
    hf = HFRollout(model, tok)
    hf_gen = hf.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP)
    check_invariants(hf_gen, prompts, N, tok, eos, MAX_NEW)
    assert torch.equal(hf_gen.prompt_ids, gen.prompt_ids) and torch.equal(hf_gen.prompt_mask, gen.prompt_mask)

    # greedy: no log-probs, one row per prompt, the same tokens as HF's greedy decode
    g_v = engine.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP, greedy=True)
    g_h = hf.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP, greedy=True)
    check_invariants(g_v, prompts, 1, tok, eos, MAX_NEW)
    assert g_v.sampling_logprobs is None
    assert g_v.texts == g_h.texts, (g_v.texts, g_h.texts)

    # sampling seeds come from the trainer's torch RNG: the same seed, the same rollouts
    torch.manual_seed(123)
    a = engine.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP)
    torch.manual_seed(123)
    b = engine.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP)
    assert torch.equal(a.response_ids, b.response_ids)
    assert len({tuple(r) for r in a.response_ids[:N].tolist()}) > 1, "the n samples of a prompt are all equal"

    # 2. change the HF weights (a few SGD steps raising the log-prob of the sampled responses)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        lp, _ = response_logprobs(model, ResponseRows.of(gen, slice(None)), TEMP)
        opt.zero_grad()
        (-lp.sum() / gen.response_mask.sum()).backward()
        opt.step()
    model.eval()
    stale = engine.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP)
    res["diff_stale"] = max_logprob_diff(model, stale, TEMP)  # the engine still samples from the old weights

    t = time.time()
    engine.sync_weights(model)
    res["sync_s"] = round(time.time() - t, 3)
    gen2 = engine.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP)
    check_invariants(gen2, prompts, N, tok, eos, MAX_NEW)
    res["diff_after"] = max_logprob_diff(model, gen2, TEMP)
    g_v = engine.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP, greedy=True)
    g_h = hf.generate(prompts, N, max_new_tokens=MAX_NEW, temperature=TEMP, greedy=True)
    assert g_v.texts == g_h.texts, (g_v.texts, g_h.texts)

    res["all_reduce"] = dist.all_reduce_sum(torch.ones(1)).item()  # the trainer's process group still works
    engine.close()
    dist.shutdown()
    res["total_s"] = round(time.time() - t0, 2)
    print("RESULT " + json.dumps(res), flush=True)
    for key in ("diff_before", "diff_before_t1", "diff_after"):
        assert res[key] < 1e-4, res
    assert res["diff_stale"] > 1e-3, res  # the push is what made `diff_after` small


if __name__ == "__main__":
    main()
    sys.exit(0)
