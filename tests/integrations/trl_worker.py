"""One of two torchrun processes (gloo, CPU): 3 fused-loss HADWGRPOTrainer steps on the tiny model, a checkpoint at
step 2; writes this rank's anchor, per-step rewards / prior / advantage slice and a digest of its weights to
<out>/rank<r>.json for tests/integrations/test_trl_trainer.py."""

import hashlib
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import trl_runs as R  # noqa: E402


def main(model_path: str, out: str) -> None:
    args = R.config(output_dir=os.path.join(out, "run"), max_steps=3, hadw_loss="fused", hadw_backend="torch",
                    save_strategy="steps", save_steps=2)
    run = R.train(R.RecordingHADW, args, model_path)
    records = [{"rewards": r["rewards"].tolist(), "prior": r["prior"], "advantages": r["advantages"].tolist()}
               for r in run.records]
    weights = b"".join(p.detach().cpu().numpy().tobytes() for p in run.model.parameters())
    result = {"world_size": run.accelerator.num_processes, "anchor": run.hadw_anchor.state_dict(),
              "records": records, "params_digest": hashlib.sha256(weights).hexdigest()}
    with open(os.path.join(out, f"rank{run.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    # Accelerate leaves the gloo group to interpreter shutdown, where its worker threads can abort the exit
    # ("terminate called without an active exception", seen once in CI; pytorch/pytorch#190489).
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
