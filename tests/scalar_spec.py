"""A second, independent statement of the spec: scalar Python loops in float64, no torch.

It is written from HADW.md directly (not from hadw_kernels.reference) so the two can check each other: the tests
compare the vectorised reference with this on small random batches for every preset and option.
"""

from __future__ import annotations

import math


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def scalar_loss(logprobs, old_logprobs, rewards, mask, G, anchor, cfg, ref_logprobs=None, normalizer=None):
    """Returns (loss, advantages, phi, metrics) for nested lists of floats; same meaning as hadw_loss."""
    logp, old, ref = logprobs, old_logprobs, ref_logprobs
    N = len(logp)
    P = N // G
    adv, phi, means, degenerate = [0.0] * N, [1.0] * N, [], []
    for g in range(P):
        rs = rewards[g * G:(g + 1) * G]
        mean = sum(rs) / G
        var = sum((r - mean) ** 2 for r in rs) / (G - 1 if cfg.std_unbiased else G)
        std = math.sqrt(var)
        degen = max(rs) == min(rs)
        means.append(mean)
        degenerate.append(degen)
        for k, r in enumerate(rs):
            i = g * G + k
            a_hat = 0.0 if degen else ((r - mean) / (std + cfg.std_eps) if cfg.adv_norm == "group_std" else r - mean)
            w = 1.0
            if cfg.hadw and anchor is not None:
                diff = mean - anchor
                d = -_sign(a_hat) * _sign(diff)
                w = cfg.lambda_scale * math.exp(d * abs(diff))
            phi[i] = w
            adv[i] = a_hat * w

    loss, metrics = scalar_policy_loss(logp, old, adv, mask, cfg, ref, normalizer=normalizer)
    metrics = {
        **{k: v for k, v in metrics.items() if k not in ("kl", "kl_loss")},
        "phi_mean": sum(phi) / N,
        "phi_min": min(phi),
        "phi_max": max(phi),
        "adv_abs_mean": sum(abs(a) for a in adv) / N,
        "degenerate_group_frac": sum(degenerate) / P,
        **{k: v for k, v in metrics.items() if k in ("kl", "kl_loss")},
    }
    return loss, adv, phi, metrics


def scalar_advantages(rewards, group_ids, cfg, anchor=None):
    """Advantages for groups given by id (any order, any size), NaN rewards unscorable. Returns (adv, raw, phi,
    degenerate by id) as lists / a dict."""
    nan = [r != r for r in rewards]
    ids = sorted(set(group_ids))
    members = {g: [i for i, x in enumerate(group_ids) if x == g and not nan[i]] for g in ids}
    scorable = [r for r, bad in zip(rewards, nan, strict=True) if not bad]
    batch_std = None
    if cfg.adv_norm == "batch_std" and len(scorable) > (1 if cfg.std_unbiased else 0):
        m = sum(scorable) / len(scorable)
        batch_std = math.sqrt(sum((r - m) ** 2 for r in scorable) / (len(scorable) - (1 if cfg.std_unbiased else 0)))
    adv, raw, phi, degenerate = [0.0] * len(rewards), [0.0] * len(rewards), [1.0] * len(rewards), {}
    for g in ids:
        rs = [rewards[i] for i in members[g]]
        degen = len(rs) < 2 or max(rs) == min(rs)
        degenerate[g] = degen
        mean = sum(rs) / len(rs) if rs else 0.0
        if len(rs) > (1 if cfg.std_unbiased else 0):
            std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - (1 if cfg.std_unbiased else 0)))
        else:
            std = 0.0
        for i in [i for i, x in enumerate(group_ids) if x == g]:
            if nan[i] or degen:
                a_hat = 0.0
            elif cfg.adv_norm == "group_std":
                a_hat = (rewards[i] - mean) / (std + cfg.std_eps)
            elif cfg.adv_norm == "batch_std":
                a_hat = (rewards[i] - mean) / (batch_std + cfg.std_eps)
            else:
                a_hat = rewards[i] - mean
            w = 1.0
            if cfg.hadw and anchor is not None:
                diff = (mean - anchor) if rs else 0.0
                w = cfg.lambda_scale * math.exp(-_sign(a_hat) * _sign(diff) * abs(diff))
            raw[i], phi[i], adv[i] = a_hat, w, a_hat * w
    return adv, raw, phi, degenerate


def scalar_policy_loss(logp, old, adv, mask, cfg, ref=None, is_weights=None, normalizer=None):
    """The policy loss on given advantages (adv[i] per row, or adv[i][t] per token). Returns (loss, metrics)."""
    N, T = len(logp), len(logp[0])
    c = cfg.log_ratio_clamp
    lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
    row_pg, row_kl, lengths = [0.0] * N, [0.0] * N, [0] * N
    n_low = n_high = n_dual = 0
    sum_akl = sum_kl = 0.0
    for i in range(N):
        toks = [t for t in range(T) if mask[i][t]]
        lengths[i] = len(toks)
        if cfg.ratio_level == "sequence" and toks:
            seq = sum(logp[i][t] - old[i][t] for t in toks) / len(toks)
            seq_ratio = math.exp(min(max(seq, -c), c))
        for t in toks:
            if cfg.ratio_level == "sequence":
                rho = seq_ratio
            else:
                rho = math.exp(min(max(logp[i][t] - old[i][t], -c), c))
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            pg = max(-a * rho, -a * min(max(rho, lo), hi))
            if cfg.clip_ratio_c is not None and a < 0:
                if pg > -cfg.clip_ratio_c * a:
                    n_dual += 1
                pg = min(pg, -cfg.clip_ratio_c * a)
            if is_weights is not None:
                w = is_weights[i][t]
                pg *= w if cfg.rollout_is_threshold is None else min(w, cfg.rollout_is_threshold)
            n_low += a < 0 and rho < lo
            n_high += a > 0 and rho > hi
            x = min(max(old[i][t] - logp[i][t], -c), c)
            sum_akl += math.exp(x) - x - 1
            row_pg[i] += pg
            if ref is not None:
                delta = ref[i][t] - logp[i][t]
                if cfg.kl_estimator == "k1":
                    kl = -delta
                elif cfg.kl_estimator == "k2":
                    kl = 0.5 * delta * delta
                else:
                    delta = min(max(delta, -c), c)
                    kl = math.exp(delta) - delta - 1
                if cfg.kl_ratio_weighted:
                    kl *= rho
                row_kl[i] += kl
                sum_kl += kl

    n_tok = sum(lengths)
    n_seq = sum(1 for n in lengths if n > 0)

    def agg(rows):
        if cfg.loss_agg == "token-mean":
            total, count = sum(rows), n_tok
        elif cfg.loss_agg == "seq-mean-token-mean":
            total, count = sum(x / n for x, n in zip(rows, lengths, strict=True) if n > 0), n_seq
        else:
            total, count = sum(rows), n_seq
        denom = max(count, 1) if normalizer is None else normalizer
        if cfg.loss_agg == "seq-mean-token-sum-norm":
            denom *= cfg.norm_len if cfg.norm_len is not None else T
        return total / denom

    pg_loss = agg(row_pg)
    loss = pg_loss
    metrics = {
        "clipfrac": (n_low + n_high) / max(n_tok, 1),
        "clipfrac_low": n_low / max(n_tok, 1),
        "clipfrac_high": n_high / max(n_tok, 1),
        "dual_clipfrac": n_dual / max(n_tok, 1),
        "approx_kl": sum_akl / max(n_tok, 1),
        "pg_loss": pg_loss,
        "response_len_mean": n_tok / N,
        "num_tokens": float(n_tok),
        "num_seqs": float(n_seq),
    }
    if ref is not None:
        kl_loss = agg(row_kl)
        metrics["kl"] = sum_kl / max(n_tok, 1)
        metrics["kl_loss"] = kl_loss
        loss = pg_loss + cfg.kl_coef * kl_loss
    return loss, metrics
