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
    N, T = len(logp), len(logp[0])
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
            a = adv[i]
            pg = max(-a * rho, -a * min(max(rho, lo), hi))
            if cfg.clip_ratio_c is not None and a < 0:
                if pg > -cfg.clip_ratio_c * a:
                    n_dual += 1
                pg = min(pg, -cfg.clip_ratio_c * a)
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
        "phi_mean": sum(phi) / N,
        "phi_min": min(phi),
        "phi_max": max(phi),
        "adv_abs_mean": sum(abs(a) for a in adv) / N,
        "degenerate_group_frac": sum(degenerate) / P,
        "response_len_mean": n_tok / N,
        "num_tokens": float(n_tok),
        "num_seqs": float(n_seq),
    }
    if ref is not None:
        kl_loss = agg(row_kl)
        metrics["kl"] = sum_kl / max(n_tok, 1)
        metrics["kl_loss"] = kl_loss
        loss = pg_loss + cfg.kl_coef * kl_loss
    return loss, adv, phi, metrics
