"""Shared test inputs and comparisons."""

from __future__ import annotations

import torch


def make_batch(n_groups=3, group_size=4, T=7, *, dtype=torch.float64, spread=0.3, masked_rows=(), equal_groups=(),
               mask_p=0.25, seed=0, binary=True, with_ref=False):
    """A random rollout batch whose ratios spread far enough that every clip branch fires.

    Returns dict(logprobs (requires grad), old_logprobs, rewards, mask, ref_logprobs or None).
    """
    g = torch.Generator().manual_seed(seed)
    N = n_groups * group_size
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = old + spread * torch.randn(N, T, generator=g, dtype=torch.float64)
    if binary:
        rewards = torch.randint(0, 2, (N,), generator=g).to(torch.float64)
    else:
        rewards = torch.rand(N, generator=g, dtype=torch.float64)
    for k in equal_groups:
        rewards[k * group_size:(k + 1) * group_size] = rewards[k * group_size]
    # make sure the non-degenerate groups really are non-degenerate
    for k in range(n_groups):
        if k not in equal_groups and rewards[k * group_size:(k + 1) * group_size].unique().numel() == 1:
            rewards[k * group_size] = 1.0 - rewards[k * group_size]
    mask = torch.rand(N, T, generator=g) > mask_p
    mask[:, 0] = True  # every row has a token unless it is listed as masked
    for i in masked_rows:
        mask[i] = False
    ref = old + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64) if with_ref else None
    return dict(
        logprobs=logp.to(dtype).requires_grad_(),
        old_logprobs=old.to(dtype),
        rewards=rewards,
        mask=mask,
        ref_logprobs=None if ref is None else ref.to(dtype),
    )


def as_lists(batch):
    out = {k: (v.detach().double().tolist() if v is not None else None) for k, v in batch.items()}
    out["mask"] = batch["mask"].bool().tolist()
    return out


def assert_close(actual, expected, *, rtol=1e-6, atol=1e-8, name="value"):
    """Max-abs and RMS-relative comparison that names the worst coordinate on failure."""
    def to64(x):
        return x.detach().double() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)

    actual, expected = to64(actual), to64(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values at {(~torch.isfinite(actual)).nonzero().tolist()}"
    err = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    rms_rel = (err.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp(min=atol)).item()
    if (err > tol).any():
        idx = int(torch.argmax(err - tol))
        coord = tuple(int(c) for c in torch.unravel_index(torch.tensor(idx), err.shape)) if err.dim() else ()
        raise AssertionError(f"{name}: max error {err.max().item():.3e} at {coord}: "
                             f"got {actual.reshape(-1)[idx].item()}, expected {expected.reshape(-1)[idx].item()} "
                             f"(rms rel {rms_rel:.3e})")
