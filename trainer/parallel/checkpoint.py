"""Checkpoints: OUTPUT/checkpoints/step_N/ with safetensors weights, optimizer, anchor, RNG and data cursor.

A checkpoint is written into a hidden temporary directory, every file is hashed into `manifest.json` (written
last), and the directory is renamed into place: a crash leaves either no `step_N` or a complete one. Loading
checks the manifest and every hash *before* touching the model, so a corrupt or partial checkpoint is reported
and never half-loaded. Only the newest `keep_last` complete checkpoints are kept.

Layout of step_N/:
    model.safetensors     policy weights (rank 0)                     } backend single / ddp
    optimizer.pt          AdamW state (rank 0; replicas are identical) }
    dcp/                  weights + optimizer, torch.distributed.checkpoint (every rank's shards): backend fsdp2
    zero/                 DeepSpeed's save_checkpoint (every rank's ZeRO partitions): backend zero2 / zero3
    state.json            step, anchor, data cursor, eval history, config
    rng_rank{r}.pt        torch / python / numpy RNG states of rank r
    manifest.json         {file: sha256}, written last
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Any

import torch

from hadw_trainer.parallel import process_group as dist

MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (missing, partial, corrupt, or from an incompatible run)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every step_N directory, oldest first (complete or not)."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(out)


def verify(path: str) -> dict[str, str]:
    """Raise CheckpointError unless `path` is a complete checkpoint whose files match their hashes."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    man_path = os.path.join(path, MANIFEST)
    if not os.path.exists(man_path):
        raise CheckpointError(f"checkpoint {path} is partial: no {MANIFEST} (the save did not finish)")
    try:
        with open(man_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({e})") from None
    for name, digest in manifest.get("files", {}).items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise CheckpointError(f"checkpoint {path} is partial: {name} is missing")
        if _sha256(fp) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def _files(root: str) -> list[str]:
    """Every file under `root`, relative, sorted (sharded formats write sub-directories)."""
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(out)


def save(ckpt_dir: str, step: int, par: Any, state: dict[str, Any], keep_last: int) -> str | None:
    """Write step_N atomically (collective: every rank calls it). Returns the path on rank 0.

    `par` is the run's `hadw_trainer.parallel.Parallel`: it writes the weights and optimizer in its backend's own
    format (safetensors + optimizer.pt for single / ddp, a DCP folder for fsdp2, DeepSpeed's for zero2 / zero3).
    Every rank writes into the same directory, so multi-node runs need OUTPUT on a shared filesystem.
    """
    final = os.path.join(ckpt_dir, f"step_{step}")
    tmp = os.path.join(ckpt_dir, f".tmp_step_{step}")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    if not os.path.isdir(tmp):
        raise CheckpointError(f"rank {dist.rank()} cannot see {tmp}, which rank 0 created: every rank writes into "
                              f"OUTPUT/checkpoints, so a multi-node run needs --output-dir on a filesystem shared by "
                              f"all nodes")
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{dist.rank()}.pt"))
    par.save(tmp)
    if dist.is_main():
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "backend": par.backend}, f, indent=1)
    dist.barrier()
    if not dist.is_main():
        dist.barrier()
        return None
    files = {name: _sha256(os.path.join(tmp, name)) for name in _files(tmp)}
    missing = [f"rng_rank{r}.pt" for r in range(dist.world_size()) if f"rng_rank{r}.pt" not in files]
    if missing:
        raise CheckpointError(f"{tmp}: {missing} were not written; every rank writes into OUTPUT/checkpoints, so a "
                              f"multi-node run needs --output-dir on a filesystem shared by all nodes")
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"step": step, "world_size": dist.world_size(), "backend": par.backend, "files": files}, f,
                  indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # re-saving a step (e.g. after a resume from an earlier one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest_complete(ckpt_dir: str, log: Any = print) -> str | None:
    """The newest checkpoint that verifies; each skipped one is reported with the reason."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log(f"WARNING: skipping {e}")
    return None


def load_weights(path: str, model: torch.nn.Module) -> None:
    """model.safetensors of a single / ddp checkpoint into `model` (names must match; tied lm_head may be absent)."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def load(path: str, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
         par: Any = None) -> dict[str, Any]:
    """Verify, then restore weights and optimizer (through `par` when given, else into `model` / `optimizer` from a
    single / ddp checkpoint) and this rank's RNG; returns state.json's content."""
    manifest = verify(path)
    if manifest.get("world_size", 1) != dist.world_size():
        raise CheckpointError(f"checkpoint {path} was written by {manifest.get('world_size')} ranks; this run has "
                              f"{dist.world_size()} (exact resume needs the same number of ranks)")
    rng_file = os.path.join(path, f"rng_rank{dist.rank()}.pt")
    if not os.path.exists(rng_file):
        raise CheckpointError(f"checkpoint {path} has no RNG state for rank {dist.rank()}")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    saved = manifest.get("backend", "single")
    backend = par.backend if par is not None else "single"
    same_format = {saved, backend} <= {"single", "ddp"} or saved == backend
    if not same_format:
        raise CheckpointError(f"checkpoint {path} was written by backend {saved!r}; this run uses {backend!r} "
                              f"(resume with the same parallel.backend; the HF export in OUTPUT/hf loads anywhere)")
    if par is not None:
        par.load(path)
    else:
        if model is not None:
            load_weights(path, model)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state
