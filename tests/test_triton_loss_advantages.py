"""The Triton advantages (`hadw_advantages(..., backend="triton")`, what "auto" runs on CUDA) under the Triton
interpreter: groups by id in any row order and of any size (1 row, several chunks of the kernel's loop), NaN =
unscorable, per-group / whole-batch / no scaling, HA-DW on and off; against the torch reference and a float64 scalar
loop (tests/scalar_spec.py). Kernel outputs are poisoned with NaN before each run."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from scalar_spec import scalar_advantages  # noqa: E402

from hadw_kernels import DifficultyAnchor, LossConfig, hadw_advantages  # noqa: E402
from hadw_kernels.ops import _triton_runtime, triton_advantages  # noqa: E402
from hadw_kernels.ops._config_json import config_to_json  # noqa: E402
from hadw_kernels.reference import compute_advantages  # noqa: E402

FIELDS = ("advantages", "raw", "phi", "group_mean", "group_std", "diff", "degenerate", "group_index", "unscorable")
NAN = float("nan")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(_triton_runtime, "POISON_OUTPUTS", True)


def ragged_batch(seed=0):
    """Rows in random order; groups of sizes 1, 2, 3, 6 and 9 (several 4-row chunks of the interpreter's loop);
    NaN rewards including a group with none scorable and one with a single scorable reward; an equal-reward group;
    non-consecutive negative and large ids."""
    g = torch.Generator().manual_seed(seed)
    sizes = [9, 6, 3, 2, 1, 2, 3, 3]
    ids = torch.cat([torch.full((s,), gid) for s, gid in zip(sizes, [40, -3, 7, 1000, 5, 6, 8, 9], strict=True)])
    rewards = torch.rand(ids.numel(), generator=g)
    rewards[ids == 6] = NAN  # nothing scorable
    rewards[(ids == 8).nonzero()[:2, 0]] = NAN  # one scorable reward
    rewards[ids == 9] = 0.25  # all equal
    rewards[[0, 12]] = NAN
    perm = torch.randperm(ids.numel(), generator=g)
    return rewards[perm], ids[perm]


def check(rewards, cfg, anchor, group_size=None, group_ids=None, tol=2e-6):
    ref = compute_advantages(rewards, group_size, anchor, cfg, torch.float32, group_ids)
    got = triton_advantages.compute_advantages(rewards, group_size, anchor, cfg, None, group_ids)
    for f in FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        assert a.dtype == b.dtype and a.shape == b.shape, (f, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype.is_floating_point:
            assert torch.isfinite(a).all(), f"{f}: unwritten or non-finite {a}"
            err = (a - b).abs().max().item() if a.numel() else 0.0
            assert err <= tol * max(1.0, b.abs().max().item()), (f, err, a, b)
        else:
            assert torch.equal(a, b), (f, a, b)
    return got


@pytest.mark.parametrize("hadw", [True, False], ids=["hadw", "plain"])
@pytest.mark.parametrize("std_unbiased", [True, False], ids=["n-1", "n"])
@pytest.mark.parametrize("adv_norm", ["group_std", "batch_std", "none"])
def test_group_ids_any_order_match_the_reference_and_a_float64_loop(adv_norm, std_unbiased, hadw):
    rewards, ids = ragged_batch()
    cfg = LossConfig.grpo(adv_norm=adv_norm, std_unbiased=std_unbiased, std_eps=1e-4, hadw=hadw)
    anchor = torch.tensor(0.45, dtype=torch.float64)
    got = check(rewards, cfg, anchor, group_ids=ids)
    exp_adv, exp_raw, exp_phi, exp_degenerate = scalar_advantages(rewards.double().tolist(), ids.tolist(), cfg,
                                                                  anchor=0.45 if hadw else None)
    for name, value, expected in (("advantages", got.advantages, exp_adv), ("raw", got.raw, exp_raw),
                                  ("phi", got.phi, exp_phi)):
        err = (value.double() - torch.tensor(expected, dtype=torch.float64)).abs().max().item()
        assert err < 1e-5, (name, err)
    assert got.degenerate.tolist() == [exp_degenerate[g] for g in sorted(set(ids.tolist()))]
    assert got.degenerate.any() and not got.degenerate.all() and got.unscorable.any()
    assert got.advantages[got.unscorable].eq(0).all()


@pytest.mark.parametrize("adv_norm", ["group_std", "batch_std"])
def test_contiguous_groups_match_the_reference_and_the_id_path(adv_norm):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 2, (6 * 5,), generator=g).float()  # G = 5: two chunks of the interpreter's loop
    rewards[5:10] = 1.0
    rewards[[3, 17]] = NAN
    cfg = LossConfig.dapo(adv_norm=adv_norm)
    anchor = torch.tensor(0.3, dtype=torch.float64)
    contiguous = check(rewards, cfg, anchor, group_size=5)
    perm = torch.randperm(30, generator=g)
    by_id = check(rewards[perm], cfg, anchor, group_ids=(torch.arange(30) // 5)[perm])
    assert torch.allclose(by_id.advantages, contiguous.advantages[perm], rtol=1e-6, atol=1e-7)


def test_one_group_per_row_one_group_for_all_and_integer_rewards():
    rewards, _ = ragged_batch(seed=3)
    cfg = LossConfig.grpo()
    anchor = torch.tensor(0.5, dtype=torch.float64)
    singles = check(rewards, cfg, anchor, group_ids=torch.arange(rewards.numel()))
    assert singles.degenerate.all() and singles.advantages.eq(0).all()
    check(rewards, cfg, anchor, group_ids=torch.zeros(rewards.numel(), dtype=torch.int32))
    ints = torch.tensor([3, 1, 1, 0, 2, 2, 2, 5])
    check(ints, cfg, anchor, group_size=4)
    check(ints > 1, cfg, None, group_ids=torch.tensor([1, 0, 1, 0, 1, 0, 1, 0]))


def test_hadw_advantages_backend_triton_end_to_end():
    rewards, ids = ragged_batch(seed=4)
    cfg = LossConfig.grpo(adv_norm="batch_std")
    anchor = DifficultyAnchor(mode="fixed", fixed_value=0.4)
    anchor.step(rewards)
    got = hadw_advantages(rewards, anchor=anchor, config=cfg, group_ids=ids, backend="triton")
    want = hadw_advantages(rewards, anchor=anchor, config=cfg, group_ids=ids, backend="torch")
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert torch.allclose(a.double(), b.double(), rtol=2e-6, atol=2e-6) if a.is_floating_point() \
            else torch.equal(a, b), f
    # HA-DW off: the anchor is ignored (decided once, by the caller), Phi = 1
    off = hadw_advantages(rewards, anchor=0.9, config=cfg.replace(hadw=False), group_ids=ids, backend="triton")
    assert off.phi.eq(1).all() and off.diff.eq(0).all()
    # float64 rewards are the reference's, exactly
    exact = hadw_advantages(rewards.double(), anchor=0.4, config=cfg, group_ids=ids, backend="triton")
    assert exact.advantages.dtype == torch.float64
    assert torch.equal(exact.advantages, hadw_advantages(rewards.double(), anchor=0.4, config=cfg, group_ids=ids,
                                                         backend="torch").advantages)


def test_opcheck_and_compiled_caller():
    rewards, ids = ragged_batch(seed=5)
    cfg = LossConfig.grpo(adv_norm="batch_std")
    index, order, starts, n_groups, max_size = triton_advantages.group_layout(rewards, None, ids)
    args = (rewards, order, starts, torch.tensor(0.5, dtype=torch.float64), 0, n_groups, max_size,
            config_to_json(cfg))
    torch.library.opcheck(triton_advantages.group_advantages, args, test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    anchor = torch.tensor(0.5, dtype=torch.float64)

    def stage(r):
        return triton_advantages.compute_advantages(r, 4, anchor, cfg).advantages * 2.0

    r = rewards[:28]
    got = torch.compile(stage, fullgraph=True, backend="aot_eager")(r)
    assert torch.equal(got, stage(r))
