"""DifficultyAnchor: the three modes against the spec's equations, state round trips, bad arguments, and the
anchor over two real gloo processes equal to the single-process anchor over the concatenated batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hadw_kernels import DifficultyAnchor

ACCS = [0.25, 0.5, 0.75, 0.5, 0.125, 1.0, 0.0, 0.375]


def batch_with_accuracy(y, n=8):
    k = round(y * n)
    return torch.tensor([1.0] * k + [0.0] * (n - k))


def test_batch_accuracy_counts_responses():
    a = DifficultyAnchor()
    assert a.batch_accuracy(torch.tensor([1.0, 0.0, 0.5, 0.5])) == 0.5
    assert a.batch_accuracy(torch.tensor([[1, 1], [1, 0]])) == 0.75  # any shape, ints allowed


def test_window_prior_excludes_current_batch():
    a = DifficultyAnchor(mode="window", window=3)
    priors = [a.step(batch_with_accuracy(y)) for y in ACCS]
    expected = [ACCS[0]]  # first batch, no history: C_1 = y_1
    for t in range(1, len(ACCS)):
        hist = ACCS[max(0, t - 3):t]
        expected.append(sum(hist) / len(hist))
    assert priors == pytest.approx(expected, abs=1e-15)
    assert a.value == priors[-1]
    assert a.posterior == pytest.approx(sum(ACCS[-3:]) / 3)
    assert a.eta_t is None and a.steps == len(ACCS) and a.last_accuracy == ACCS[-1]


def test_window_include_current_is_the_released_code():
    a = DifficultyAnchor(mode="window", window=3, include_current=True)
    priors = [a.step(batch_with_accuracy(y)) for y in ACCS]
    expected = [sum(ACCS[max(0, t - 2):t + 1]) / len(ACCS[max(0, t - 2):t + 1]) for t in range(len(ACCS))]
    assert priors == pytest.approx(expected, abs=1e-15)


def test_window_init():
    a = DifficultyAnchor(init=0.3)
    assert a.value == 0.3
    assert a.step(batch_with_accuracy(0.75)) == 0.3
    assert a.step(batch_with_accuracy(0.25)) == 0.75


def test_ema_equations():
    eta, m = 0.8, 3
    a = DifficultyAnchor(mode="ema", eta=eta, history=m, sigma_init=1.0)
    posts, prior_expected, etas = [], [], []
    c = None
    for y in ACCS:
        prior = y if c is None else c
        if len(posts) >= 2:
            last = posts[-m:]
            mu = sum(last) / len(last)
            sigma = math.sqrt(sum((x - mu) ** 2 for x in last) / len(last))  # population std (1/m)
        else:
            sigma = 1.0
        eta_t = min(max(eta * sigma, 0.0), 1.0)
        c = (1 - eta_t) * prior + eta_t * y
        posts.append(c)
        prior_expected.append(prior)
        etas.append(eta_t)
        assert a.step(batch_with_accuracy(y)) == pytest.approx(prior, abs=1e-15)
        assert a.eta_t == pytest.approx(eta_t, abs=1e-15)
        assert a.posterior == pytest.approx(c, abs=1e-15)
    assert etas[1] == 0.8  # sigma_init while fewer than two posteriors exist


def test_ema_eta_is_clipped_to_one():
    a = DifficultyAnchor(mode="ema", eta=5.0, sigma_init=1.0)
    a.step(batch_with_accuracy(0.0))
    a.step(batch_with_accuracy(1.0))
    assert a.eta_t == 1.0 and a.posterior == 1.0  # eta_t = clip(5 * 1, 0, 1) = 1: C jumps to y


def test_ema_freeze_hazard_is_visible():
    """With a small eta (the closed TRL port used 0.1) sigma_t is tiny, eta_t ~ 0 and C stays near its start while
    the true accuracy climbs from 0.1 to 0.9."""
    a = DifficultyAnchor(mode="ema", eta=0.1, history=10)
    accs = [0.1 + 0.8 * t / 49 for t in range(50)]
    for y in accs:
        a.step(torch.full((64,), y, dtype=torch.float64))
    assert a.eta_t < 1e-3
    assert abs(a.posterior - 0.1) < 0.2 and accs[-1] - a.posterior > 0.6
    w = DifficultyAnchor(mode="window", window=10)
    for y in accs:
        w.step(torch.full((64,), y, dtype=torch.float64))
    assert abs(w.posterior - sum(accs[-10:]) / 10) < 1e-12


def test_fixed():
    a = DifficultyAnchor(mode="fixed", fixed_value=0.4)
    assert a.value == 0.4
    assert [a.step(batch_with_accuracy(y)) for y in ACCS[:3]] == [0.4, 0.4, 0.4]
    assert a.last_accuracy == ACCS[2]


@pytest.mark.parametrize("kwargs", [dict(mode="window", window=3), dict(mode="window", include_current=True),
                                    dict(mode="ema", eta=0.7, history=4), dict(mode="fixed", fixed_value=0.6)])
def test_state_dict_round_trip_resumes_exactly(kwargs, tmp_path):
    full = DifficultyAnchor(**kwargs)
    first = [full.step(batch_with_accuracy(y)) for y in ACCS]
    a = DifficultyAnchor(**kwargs)
    for y in ACCS[:4]:
        a.step(batch_with_accuracy(y))
    torch.save(a.state_dict(), tmp_path / "anchor.pt")
    b = DifficultyAnchor(**kwargs)
    b.load_state_dict(torch.load(tmp_path / "anchor.pt"))
    assert b.state_dict() == a.state_dict()
    rest = [b.step(batch_with_accuracy(y)) for y in ACCS[4:]]
    assert first[4:] == rest
    assert b.state_dict() == full.state_dict()


def test_load_state_dict_rejects_other_config():
    a = DifficultyAnchor(mode="window", window=5)
    a.step(batch_with_accuracy(0.5))
    with pytest.raises(ValueError, match=r"saved configuration differs.*window=5 vs 10"):
        DifficultyAnchor(mode="window").load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"missing keys \['accuracies'"):
        DifficultyAnchor().load_state_dict({"config": {}, "steps": 0})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="mean"), r"unknown mode 'mean'"),
        (dict(window=0), r"window must be an int >= 1"),
        (dict(history=2.5), r"history must be an int >= 1"),
        (dict(eta=-0.1, mode="ema"), r"eta must be >= 0"),
        (dict(eta=float("nan"), mode="ema"), r"eta must be a finite number"),
        (dict(mode="ema", include_current=True), r"include_current applies to mode='window' only"),
        (dict(init=float("inf")), r"init must be a finite number"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DifficultyAnchor(**kwargs)


def test_nan_rewards_are_unscorable_and_accuracy_can_be_given():
    a, b = DifficultyAnchor(mode="ema", eta=0.5), DifficultyAnchor(mode="ema", eta=0.5)
    for rewards in ([1.0, float("nan"), 0.0, 0.0], [1.0, 1.0, float("nan"), 0.0]):
        scorable = [x for x in rewards if x == x]
        y = sum(scorable) / len(scorable)
        assert a.step(torch.tensor(rewards)) == b.step(accuracy=y)
        assert a.last_accuracy == y
    assert a.state_dict() == b.state_dict()


def test_bad_rewards():
    a = DifficultyAnchor()
    with pytest.raises(ValueError, match=r"1 infinite value"):
        a.step(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=r"every reward of the batch is NaN"):
        a.step(torch.tensor([float("nan")] * 3))
    with pytest.raises(ValueError, match=r"exactly one of rewards and accuracy"):
        a.step(torch.ones(2), accuracy=0.5)
    with pytest.raises(ValueError, match=r"exactly one of rewards and accuracy"):
        a.step()
    with pytest.raises(ValueError, match=r"accuracy must be a finite number"):
        a.step(accuracy=float("nan"))
    with pytest.raises(ValueError, match=r"process_group was given but torch.distributed is not initialised"):
        a.step(torch.ones(2), process_group=object())
    with pytest.raises(ValueError, match=r"rewards is empty"):
        a.step(torch.zeros(0))
    assert a.steps == 0 and a.value is None  # a rejected batch changes nothing


# -- two real gloo processes ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, shards, kwargs, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        anchor, local = DifficultyAnchor(**kwargs), DifficultyAnchor(**kwargs)
        trace = []
        for step_shards in shards:
            prior = anchor.step(step_shards[rank], process_group=dist.group.WORLD)
            trace.append((prior, anchor.posterior, anchor.eta_t, anchor.last_accuracy))
            local.step(step_shards[rank])  # no process group: no collective, this rank's accuracy only
        anchor.check_synchronized()
        local_last = local.last_accuracy
        try:
            local.check_synchronized()  # the two ranks' local anchors differ: the check must say so
            unsynchronized_detected = False
        except ValueError:
            unsynchronized_detected = True
        torch.save((trace, local_last, unsynchronized_detected), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_equal_single_process_over_concatenated_batch(tmp_path):
    """With process_group the anchor reduces y_t over the ranks; without, it communicates nothing."""
    g = torch.Generator().manual_seed(0)
    # uneven shards: rank 0 holds 6 responses, rank 1 holds 10; y_t must count responses, not ranks
    shards = [[torch.rand(6, generator=g).round(), torch.rand(10, generator=g).round()] for _ in range(6)]
    for kwargs in (dict(mode="window", window=3), dict(mode="ema", eta=0.5, history=3)):
        mp.spawn(_worker, args=(2, _free_port(), shards, kwargs, str(tmp_path / kwargs["mode"])), nprocs=2, join=True)
        single = DifficultyAnchor(**kwargs)
        expected = []
        for s in shards:
            prior = single.step(torch.cat(s))
            expected.append((prior, single.posterior, single.eta_t, single.last_accuracy))
        for rank in range(2):
            trace, local_last, unsynchronized_detected = torch.load(tmp_path / f"{kwargs['mode']}.{rank}")
            assert trace == expected
            assert local_last == pytest.approx(float(shards[-1][rank].mean()), abs=1e-15)
            assert unsynchronized_detected
