"""The verl plug-in against the real verl 0.9.1: everything is called through verl's own registries
(`get_adv_estimator_fn`, `get_policy_loss_fn`) and its actor loss `ppo_loss`, and compared with verl's "grpo",
"vanilla" and "gspo".

The plug-in is never imported here before verl's registries are used: verl loads it from the `verl.plugins` entry
point on `import verl`, which is what these tests rely on.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from integration_support import require

verl = require("verl")
from omegaconf import OmegaConf  # noqa: E402  (a verl dependency)
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback  # noqa: E402
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from hadw_kernels import DifficultyAnchor, LossConfig, hadw_advantages  # noqa: E402

PLUGIN = "hadw_kernels.integrations.verl"
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TOL = 1e-6  # the bound on |dloss| and |dgrad| in fp32; for values above 1 in size (token-sum's loss, a sum of
# every token's loss times dp_size, ~30 here where one fp32 ulp is 3.8e-6, and its gradients) it bounds the relative
# difference
MEASURED: dict[str, str] = {}  # case -> the measured differences, printed after the module


def plugin():
    return sys.modules[PLUGIN]


@pytest.fixture(scope="module", autouse=True)
def print_measured_parity():
    """Prints the measured parity (max |dloss|, |dgrad| per case) after this module's tests; `pytest -s` shows it."""
    yield
    for case, text in sorted(MEASURED.items()):
        print(f"\n  {case}: {text}", end="")
    print()


@pytest.fixture(autouse=True)
def fresh_anchor(monkeypatch):
    """Each test starts without an anchor; the loss runs on the eager reference (CPU, no compile per shape)."""
    plugin().reset_state()
    monkeypatch.setattr(plugin(), "LOSS_BACKEND", "torch")
    yield
    plugin().reset_state()


# -- loading ------------------------------------------------------------------------------------------------------
def test_import_verl_loads_the_plugin_through_its_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="verl.plugins") if ep.name == "hadw"]
    assert ep.value == PLUGIN
    assert get_policy_loss_fn("hadw_vanilla").__module__ == PLUGIN
    assert get_policy_loss_fn("hadw_gspo").__module__ == PLUGIN
    assert get_adv_estimator_fn("hadw_grpo").__module__ == PLUGIN


@pytest.mark.slow
def test_verl_external_modules_variable_loads_the_plugin():
    """The other loading route, with verl's entry-point discovery switched off."""
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as P, ADV_ESTIMATOR_REGISTRY"
            " as A\nassert {'hadw_vanilla', 'hadw_gspo'} <= set(P) and 'hadw_grpo' in A, (list(P), list(A))")
    env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES=PLUGIN)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


def test_importing_hadw_kernels_imports_no_framework():
    code = "import sys, hadw_kernels, hadw_kernels.integrations; assert not {'verl', 'trl'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the advantage estimator --------------------------------------------------------------------------------------
def rollout(seed: int, *, binary: bool = True, pad_rows: int = 2):
    """A verl-like batch: groups of 1-6 responses (uid strings), rows shuffled, synthetic padding rows appended
    (own uid, empty response mask, zero reward) as verl's upsampling does."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 4, 5, 6, 4, 4]
    uids = np.array([f"uid-{seed}-{g}" for g, n in enumerate(sizes) for _ in range(n)], dtype=object)
    n, t = len(uids), 5
    if binary:
        scores = (torch.rand(n, generator=gen) < 0.4).float()
        scores[sum(sizes[:6]):] = 1.0  # one all-correct group (degenerate)
    else:
        scores = torch.randn(n, generator=gen)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    token_rewards = torch.zeros(n, t)
    token_rewards[torch.arange(n), lengths - 1] = scores  # verl puts the outcome reward on the last token
    perm = torch.randperm(n, generator=gen)
    token_rewards, mask, uids = token_rewards[perm], mask[perm], uids[perm.numpy()]
    if pad_rows:
        token_rewards = torch.cat([token_rewards, torch.zeros(pad_rows, t)])
        mask = torch.cat([mask, torch.zeros(pad_rows, t)])
        uids = np.concatenate([uids, np.array([f"pad{seed}"] * pad_rows, dtype=object)])
    return token_rewards, mask, uids


def algorithm_config(**hadw):
    cfg = OmegaConf.create({"adv_estimator": "hadw_grpo", "norm_adv_by_std_in_grpo": True, "hadw": hadw})
    OmegaConf.set_struct(cfg, True)  # as hydra hands it over
    return cfg


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_estimator_with_hadw_off_equals_verls_grpo(norm, binary):
    token_rewards, mask, uids = rollout(1 + norm + 2 * binary, binary=binary)
    ref, ref_returns = get_adv_estimator_fn("grpo")(token_level_rewards=token_rewards, response_mask=mask,
                                                    index=uids, norm_adv_by_std_in_grpo=norm)
    cfg = algorithm_config(enable=False)
    cfg.norm_adv_by_std_in_grpo = norm
    # verl calls every estimator but "grpo" and "gae" with exactly these keywords (trainer/ppo/ray_trainer.py)
    ours, returns = get_adv_estimator_fn("hadw_grpo")(token_level_rewards=token_rewards, response_mask=mask,
                                                      config=cfg, index=uids)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err = (ours - ref).abs().max().item()
    MEASURED[f"estimator hadw off, norm={norm!s:5}, binary={binary!s:5}"] = f"max|dadv| {err:.2e}"
    assert err <= TOL
    assert torch.equal(returns, ours)
    assert plugin().current_anchor() is None  # HA-DW off keeps no anchor


def test_estimator_with_hadw_on_equals_hadw_advantages_over_three_steps():
    cfg = algorithm_config(lambda_scale=1.5, anchor={"mode": "window", "window": 2})
    independent = DifficultyAnchor(mode="window", window=2)
    for step in range(3):
        token_rewards, mask, uids = rollout(10 + step)
        ours, _ = get_adv_estimator_fn("hadw_grpo")(token_level_rewards=token_rewards, response_mask=mask,
                                                    config=cfg, index=uids)
        real = mask.sum(1) > 0
        scores = token_rewards.sum(1)
        prior = independent.step(scores[real])  # y_t over the real rows only: padding rows are not responses
        assert plugin().current_anchor().value == pytest.approx(prior, abs=1e-12)
        _, group_ids = np.unique(uids, return_inverse=True)
        rewards = torch.where(real, scores, torch.full_like(scores, math.nan))
        expected = hadw_advantages(rewards, anchor=prior, group_ids=torch.as_tensor(group_ids),
                                   config=LossConfig(lambda_scale=1.5, std_eps=1e-6)).advantages
        sizes = torch.bincount(torch.as_tensor(group_ids))[torch.as_tensor(group_ids)]
        single = real & (sizes == 1)
        expected = torch.where(single, scores / (1 + 1e-6), expected)  # verl's one-response convention
        torch.testing.assert_close(ours, expected[:, None] * mask, rtol=0, atol=1e-6)
        assert ours[~real].abs().max() == 0
        assert (ours[single].sum(1) != 0).any() or (scores[single] == 0).all()
        phi_moved = (ours.sum(1) - hadw_advantages(rewards, anchor=None, group_ids=torch.as_tensor(group_ids),
                                                   config=LossConfig(std_eps=1e-6)).advantages).abs()
        assert phi_moved[real & ~single].max() > 1e-3  # HA-DW really reweighted something
    assert plugin().last_metrics()["anchor_prior"] == pytest.approx(prior)


def test_settings_default_without_an_hadw_section():
    from verl.trainer.config import AlgoConfig

    plain = OmegaConf.create({"adv_estimator": "hadw_grpo"})
    OmegaConf.set_struct(plain, True)
    for cfg in (plain, AlgoConfig(adv_estimator="hadw_grpo"), None):  # hydra's DictConfig, verl's dataclass, none
        assert plugin().HADWSettings.from_algorithm_config(cfg) == plugin().HADWSettings()
    token_rewards, mask, uids = rollout(6)
    get_adv_estimator_fn("hadw_grpo")(token_level_rewards=token_rewards, response_mask=mask, config=plain, index=uids)
    assert plugin().current_anchor().mode == "window" and plugin().current_anchor().steps == 1


def test_estimator_bad_input_names_the_problem():
    token_rewards, mask, uids = rollout(3)
    est = get_adv_estimator_fn("hadw_grpo")
    with pytest.raises(ValueError, match="index is None"):
        est(token_level_rewards=token_rewards, response_mask=mask, config=algorithm_config())
    with pytest.raises(ValueError, match="one uid per row"):
        est(token_level_rewards=token_rewards, response_mask=mask, config=algorithm_config(), index=uids[:-1])
    bad = token_rewards.clone()
    bad[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"token_level_rewards sums to \+-Inf on row\(s\) \[0\]"):
        est(token_level_rewards=bad, response_mask=mask, config=algorithm_config(), index=uids)
    with pytest.raises(ValueError, match=r"algorithm.hadw: unknown key\(s\) \['lamda'\]"):
        est(token_level_rewards=token_rewards, response_mask=mask, config=algorithm_config(lamda=1.3), index=uids)
    with pytest.raises(ValueError, match="algorithm.hadw.anchor: unknown"):
        est(token_level_rewards=token_rewards, response_mask=mask, config=algorithm_config(anchor={"windw": 3}),
            index=uids)
    with pytest.raises(ValueError, match="unknown mode"):
        est(token_level_rewards=token_rewards, response_mask=mask, config=algorithm_config(anchor={"mode": "x"}),
            index=uids)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        est(token_level_rewards=token_rewards[:, 0], response_mask=mask, config=algorithm_config(), index=uids)


def test_anchor_settings_cannot_change_mid_run():
    token_rewards, mask, uids = rollout(4)
    est = get_adv_estimator_fn("hadw_grpo")
    est(token_level_rewards=token_rewards, response_mask=mask, config=algorithm_config(), index=uids)
    with pytest.raises(ValueError, match="changed during the run"):
        est(token_level_rewards=token_rewards, response_mask=mask, config=algorithm_config(anchor={"window": 3}),
            index=uids)


# -- the documented command line, composed by verl's own hydra config -------------------------------------------
DOC_OVERRIDES = [  # docs/integrations.md, "verl": keep the two in step
    "algorithm.adv_estimator=hadw_grpo",
    "+algorithm.hadw.lambda_scale=1.3",
    "+algorithm.hadw.anchor.mode=window",
    "+algorithm.hadw.anchor.window=10",
    "actor_rollout_ref.actor.policy_loss.loss_mode=hadw_vanilla",
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
    "trainer.checkpoint_callback_class=hadw_kernels.integrations.verl.HADWCheckpointCallback",
]


@pytest.mark.slow
def test_documented_overrides_compose_into_verls_config(tmp_path):
    require("hydra")
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=DOC_OVERRIDES + [
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.rollout.n=4",
            f"trainer.default_local_dir={tmp_path}"])
    settings = plugin().HADWSettings.from_algorithm_config(cfg.algorithm)
    assert settings == plugin().HADWSettings(lambda_scale=1.3, anchor={"mode": "window", "window": 10})
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert get_policy_loss_fn(actor.policy_loss.loss_mode).__module__ == PLUGIN
    assert isinstance(build_checkpoint_callback(cfg), plugin().HADWCheckpointCallback)
    token_rewards, mask, uids = rollout(5)
    out, _ = get_adv_estimator_fn(cfg.algorithm.adv_estimator)(
        token_level_rewards=token_rewards, response_mask=mask, config=cfg.algorithm, index=uids)
    assert plugin().current_anchor().window == 10 and out.shape == mask.shape


# -- checkpoint / resume ------------------------------------------------------------------------------------------
def trainer_config(tmp_path, resume_mode="auto"):
    return OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path), "resume_mode": resume_mode,
                                         "resume_from_path": None, "checkpoint_callback_class": f"{PLUGIN}."
                                         "HADWCheckpointCallback"}})


def test_anchor_survives_a_verl_checkpoint_and_resume(tmp_path):
    cfg = algorithm_config(anchor={"mode": "ema", "eta": 0.5})
    est = get_adv_estimator_fn("hadw_grpo")
    batches = [rollout(20 + i) for i in range(4)]

    def run(steps):
        return [est(token_level_rewards=r, response_mask=m, config=cfg, index=u)[0] for r, m, u in steps]

    uninterrupted = run(batches)
    final_state = plugin().current_anchor().state_dict()

    plugin().reset_state()
    callback = build_checkpoint_callback(trainer_config(tmp_path))  # verl's own factory, as the trainer does
    run(batches[:2])
    folder = tmp_path / "global_step_2"
    callback.on_save(trainer=None, global_step=2, checkpoint_dir=str(folder))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")  # what verl writes after a save

    plugin().reset_state()  # a new driver process
    build_checkpoint_callback(trainer_config(tmp_path))
    resumed = run(batches[2:])
    for a, b in zip(resumed, uninterrupted[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert plugin().current_anchor().state_dict() == final_state

    plugin().reset_state()  # resume_mode=disable: verl starts afresh, and so does the anchor
    build_checkpoint_callback(trainer_config(tmp_path, resume_mode="disable"))
    run(batches[2:3])
    assert plugin().current_anchor().steps == 1

    plugin().reset_state()  # other anchor settings than the checkpoint's: refused, naming the difference
    build_checkpoint_callback(trainer_config(tmp_path))
    with pytest.raises(ValueError, match="saved configuration differs"):
        est(token_level_rewards=batches[2][0], response_mask=batches[2][1], index=batches[2][2],
            config=algorithm_config(anchor={"mode": "ema", "eta": 0.25}))


# -- the policy losses through ppo_loss ---------------------------------------------------------------------------
RESP = 7  # padded response length


def micro_batch(gen, rows: int, *, is_weights: bool, ref: bool):
    """One micro-batch as verl's engine hands it to `ppo_loss`: padded prompts/responses/attention_mask, the
    response-side fields, and `log_probs` as the model returns them (flat over every valid token of the sequence,
    here the differentiable leaf). Ratios are spread so that every clip branch fires."""
    prompt_len = torch.randint(1, 5, (rows,), generator=gen)
    resp_len = torch.randint(0, RESP + 1, (rows,), generator=gen)
    resp_len[0] = RESP
    resp_len[-1] = 0 if rows > 2 else resp_len[-1]  # a fully masked row
    p_max = int(prompt_len.max())
    pos = torch.arange(RESP)[None, :]
    response_mask = (pos < resp_len[:, None]).float()
    response_mask[1, 1] = 0.0  # a token inside a response that is not trained on (a tool output)
    attention = torch.cat([(torch.arange(p_max)[None, :] >= p_max - prompt_len[:, None]),
                           pos < resp_len[:, None]], dim=1).long()
    old = -torch.rand(rows, RESP, generator=gen) * 3 - 0.05
    # per-token spread for the token ratio, a per-row offset for GSPO's sequence ratio (exp of the row's mean)
    delta = torch.randn(rows, RESP, generator=gen) * 0.4 + torch.randn(rows, 1, generator=gen) * 0.5
    delta[0, :3] = torch.tensor([1.6, -1.2, 0.3])  # ratio ~5 (dual clip when A < 0), ~0.3 (low clip)
    logp = old + delta
    adv = torch.randn(rows, 1, generator=gen).expand(rows, RESP) * response_mask
    adv[0] = -adv[0].abs() - 0.5  # the dual-clip row has A < 0
    flat, segments = [], []
    for b in range(rows):
        seg = torch.randn(int(prompt_len[b] + resp_len[b]), generator=gen) - 2.0
        r = int(resp_len[b])
        seg[int(prompt_len[b]) - 1:int(prompt_len[b]) - 1 + r] = logp[b, :r]  # token j's log-prob sits at p-1+j
        flat.append(seg)
        segments.append(seg.numel())
    data = TensorDict({
        "prompts": torch.ones(rows, p_max, dtype=torch.long),
        "responses": torch.ones(rows, RESP, dtype=torch.long),
        "attention_mask": attention,
        "response_mask": response_mask,
        "old_log_probs": old,
        "advantages": adv,
    }, batch_size=[rows])
    if is_weights:
        data["rollout_is_weights"] = (torch.rand(rows, RESP, generator=gen) * 1.5 + 0.25) * response_mask
    if ref:
        data["ref_log_prob"] = old + torch.randn(rows, RESP, generator=gen) * 0.1
    return data, torch.cat(flat), torch.randn(sum(segments), generator=gen).abs()


def actor_config(loss_mode: str, agg: str, *, scale_factor: int | None, ref: bool) -> FSDPActorConfig:
    return FSDPActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=3, clip_ratio=0.2,
                           clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=agg,
                           loss_scale_factor=scale_factor, entropy_coeff=0.01 if ref else 0.0, use_kl_loss=ref,
                           kl_loss_coef=0.05, kl_loss_type="low_var_kl",
                           policy_loss=PolicyLossConfig(loss_mode=loss_mode))


def run_ppo_loss(loss_mode, agg, batches, info, *, scale_factor, ref):
    """ppo_loss on every micro-batch of every simulated rank: [(loss, grad of the flat log-probs, metrics)]."""
    out = []
    for data, flat, entropy in batches:
        config = actor_config(loss_mode, agg, scale_factor=scale_factor, ref=ref)
        data = data.clone()
        tu.assign_non_tensor(data, **info)
        leaf = flat.clone().requires_grad_(True)
        model_output = {"log_probs": leaf}
        if ref:
            model_output["entropy"] = entropy
        loss, metrics = ppo_loss(config, model_output, data)
        loss.backward()
        out.append((loss.detach(), leaf.grad, metrics))
    return out


# plain; with token-level IS weights, verl's KL loss and entropy bonus around it; with loss_scale_factor (which only
# seq-mean-token-sum-norm reads)
CASES = [(mode, agg, variant) for mode in ("vanilla", "gspo") for agg in AGG_MODES
         for variant in ("plain", "is+kl+entropy", "scale_factor")
         if variant != "scale_factor" or agg == "seq-mean-token-sum-norm"]


@pytest.mark.parametrize(("mode", "agg", "variant"), CASES)
def test_loss_equals_verls_through_ppo_loss_over_micro_batches_and_two_ranks(mode, agg, variant):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mode}/{agg}/{variant}".encode()))
    extras = variant == "is+kl+entropy"
    ranks = [[micro_batch(gen, rows, is_weights=extras, ref=extras) for rows in (3, 4, 2)] for _ in range(2)]
    masks = [d["response_mask"] for rank in ranks for d, _, _ in rank]
    # global_batch_info as verl's engine fills it: the global mini-batch's token count and row count, dp_size 2
    info = dict(dp_size=2, batch_num_tokens=int(sum(m.sum() for m in masks)),
                global_batch_size=sum(m.shape[0] for m in masks))
    scale_factor = 16 if variant == "scale_factor" else None
    worst_loss = worst_grad = 0.0
    totals = {}
    for name in (mode, f"hadw_{mode}"):
        per_rank = [run_ppo_loss(name, agg, rank, info, scale_factor=scale_factor, ref=extras) for rank in ranks]
        totals[name] = sum(loss for rank in per_rank for loss, _, _ in rank) / 2  # DDP averages the ranks
        if name == mode:
            reference = per_rank
            continue
        for rank_ref, rank_ours in zip(reference, per_rank, strict=True):
            for (l_ref, g_ref, m_ref), (l_ours, g_ours, m_ours) in zip(rank_ref, rank_ours, strict=True):
                worst_loss = max(worst_loss, (l_ours - l_ref).abs().item() / max(1.0, l_ref.abs().item()))
                worst_grad = max(worst_grad, ((g_ours - g_ref).abs() / g_ref.abs().clamp(min=1.0)).max().item())
                for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
                    assert m_ours[key].aggregate() == pytest.approx(m_ref[key].aggregate(), abs=TOL), key
    MEASURED[f"loss {mode:7s} {agg:23s} {variant:13s}"] = f"max|dloss| {worst_loss:.2e}  max|dgrad| {worst_grad:.2e}"
    assert worst_loss <= TOL and worst_grad <= TOL
    # every regime really fired somewhere in the batch
    fired = [m for rank in reference for _, _, m in rank]
    assert max(m["actor/pg_clipfrac"].aggregate() for m in fired) > 0
    if mode == "vanilla":
        assert max(m["actor/pg_clipfrac_lower"].aggregate() for m in fired) > 0  # the dual clip
    assert totals[mode].abs() > 1e-3  # not a vacuous zero loss


def test_loss_needs_the_global_denominator_under_data_parallelism():
    gen = torch.Generator().manual_seed(0)
    data, flat, _ = micro_batch(gen, 3, is_weights=False, ref=False)
    config = actor_config("hadw_vanilla", "token-mean", scale_factor=None, ref=False)
    config.global_batch_info.update(dp_size=2, batch_num_tokens=None, global_batch_size=None)
    fn = get_policy_loss_fn("hadw_vanilla")
    args = dict(old_log_prob=data["old_log_probs"], log_prob=data["old_log_probs"].clone(),
                advantages=data["advantages"], response_mask=data["response_mask"].bool(), config=config)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fn(loss_agg_mode="token-mean", **args)
    with pytest.raises(ValueError, match="global_batch_size"):
        fn(loss_agg_mode="seq-mean-token-mean", **args)
    with pytest.raises(ValueError, match="loss_agg_mode='seq-sum'"):
        fn(loss_agg_mode="seq-sum", **args)
    bad = data["advantages"].clone()
    bad[0, 0] = math.nan
    config.global_batch_info.update(dp_size=1)
    with pytest.raises(ValueError, match="advantages"):
        fn(loss_agg_mode="token-mean", **{**args, "advantages": bad})


@pytest.mark.slow
def test_loss_on_the_triton_kernel_equals_verls(monkeypatch):
    """The backend a CUDA worker uses (the fused kernel), here under the Triton interpreter."""
    require("triton")
    from hadw_kernels.ops import triton_loss

    if not hasattr(triton_loss, "policy_loss_terms_with_checks"):
        pytest.skip("the Triton kernel of hadw_policy_loss is not in this version of hadw_kernels.ops.triton_loss")
    monkeypatch.setattr(plugin(), "LOSS_BACKEND", "triton")
    gen = torch.Generator().manual_seed(7)
    batches = [micro_batch(gen, rows, is_weights=True, ref=False) for rows in (3, 2)]
    info = dict(dp_size=2, batch_num_tokens=40, global_batch_size=10)
    for mode in ("vanilla", "gspo"):
        ref = run_ppo_loss(mode, "seq-mean-token-mean", batches, info, scale_factor=None, ref=False)
        ours = run_ppo_loss(f"hadw_{mode}", "seq-mean-token-mean", batches, info, scale_factor=None, ref=False)
        dl = max((a[0] - b[0]).abs().item() for a, b in zip(ref, ours, strict=True))
        dg = max((a[1] - b[1]).abs().max().item() for a, b in zip(ref, ours, strict=True))
        MEASURED[f"loss {mode:7s} seq-mean-token-mean     triton-interp"] = f"max|dloss| {dl:.2e}  max|dgrad| {dg:.2e}"
        assert dl <= TOL and dg <= TOL
