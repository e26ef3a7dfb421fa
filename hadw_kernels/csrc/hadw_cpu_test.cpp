// CTest unit test of the native core through its C interface (hadw_cpu.h), on hand-computed cases: the surrogate
// in each clip regime, the metrics, the gradient of the numerator, NaN/Inf counted at valid positions only, fp16 /
// bf16 inputs and masks read in place, the advantages of a group, the backward's rounding, and threads 1 vs 2
// bit for bit. The full parity with the PyTorch reference is tests/test_cpu_kernel.py (CTest: the `native` test).
#include "hadw_cpu.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

static int failures = 0;

static void check(bool ok, const char *what) {
    if (!ok) {
        std::printf("FAIL: %s\n", what);
        ++failures;
    }
}

static void near(double got, double want, double tol, const char *what) {
    if (!(std::fabs(got - want) <= tol * std::fmax(1.0, std::fabs(want)))) {
        std::printf("FAIL: %s: got %.9g, want %.9g\n", what, got, want);
        ++failures;
    }
}

static hadw_view view(const void *data, int64_t stride_n, int64_t stride_t, int32_t dtype) {
    hadw_view v;
    v.data = data;
    v.stride_n = stride_n;
    v.stride_t = stride_t;
    v.dtype = dtype;
    v._pad = 0;
    return v;
}

static hadw_loss_cfg grpo_cfg(int loss_agg) {
    hadw_loss_cfg c;
    std::memset(&c, 0, sizeof c);
    c.loss_agg = loss_agg;
    c.adv_per_row = 1;
    c.ratio_lo = 0.8f;
    c.ratio_hi = 1.2f;
    c.log_ratio_clamp = 20.0f;
    return c;
}

struct Out {
    float loss = 0, denom = 0, metrics[HADW_NUM_POLICY_METRICS] = {0}, kl[HADW_NUM_KL_METRICS] = {0};
    int64_t bad[HADW_NUM_NONFINITE] = {0};
};

static uint16_t to_bf16(float f) {  // exact for the values used here
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);
}

int main() {
    std::printf("hadw_cpu: ISA %s, ABI %d\n", hadw_cpu_isa(), hadw_cpu_abi_version());
    check(hadw_cpu_abi_version() == HADW_CPU_ABI_VERSION, "ABI version");

    // 1. Two rows of three tokens, token-mean. Row 0 (A = +1): ratios 1.1 (inside), 0.5 (below: unclipped arm
    //    active), 1.5 (above: clipped, no gradient). Row 1 (A = -1): 0.5 (clipped from below, no gradient),
    //    1.1 (inside), padding holding NaN.
    {
        const float logp[6] = {std::log(1.1f), std::log(0.5f), std::log(1.5f), std::log(0.5f), std::log(1.1f), NAN};
        const float old[6] = {0, 0, 0, 0, 0, -INFINITY};
        const uint8_t mask[6] = {1, 1, 1, 1, 1, 0};
        const float adv[2] = {1.0f, -1.0f};
        hadw_view lp = view(logp, 3, 1, HADW_F32), ol = view(old, 3, 1, HADW_F32), m = view(mask, 3, 1, HADW_U8);
        hadw_view a = view(adv, 1, 0, HADW_F32), none = view(nullptr, 0, 0, 0);
        hadw_loss_cfg c = grpo_cfg(HADW_TOKEN_MEAN);
        float grad[6];
        Out o;
        int rc = hadw_cpu_policy_loss(2, 3, &lp, &ol, &none, &m, &a, &none, &c, grad, &o.loss, &o.denom, o.metrics,
                                      nullptr, o.bad, 1);
        check(rc == HADW_OK, "policy loss runs");
        // pg: row 0: -1.1, -0.5, -1.2; row 1: max(0.5, 0.8) = 0.8, 1.1 -> total -0.9 over 5 tokens
        near(o.loss, -0.9 / 5, 1e-6, "loss");
        near(o.denom, 5, 0, "denom = valid tokens");
        const float want_grad[6] = {-1.1f, -0.5f, 0.0f, 0.0f, 1.1f, 0.0f};  // d numerator / dlogp
        for (int k = 0; k < 6; ++k) near(grad[k], want_grad[k] / 5, 1e-6, "gradient (numerator / 5 tokens)");
        near(o.metrics[1], 1.0 / 5, 1e-7, "clipfrac_low (A < 0, rho < 0.8)");
        near(o.metrics[2], 1.0 / 5, 1e-7, "clipfrac_high (A > 0, rho > 1.2)");
        near(o.metrics[0], 2.0 / 5, 1e-7, "clipfrac");
        const double k3 = 2 * (1 / 1.1 + std::log(1.1) - 1) + 2 * (2 - std::log(2.0) - 1) + (1 / 1.5 + std::log(1.5) - 1);
        near(o.metrics[4], k3 / 5, 1e-6, "approx_kl");
        near(o.metrics[6], 2.5, 1e-7, "response_len_mean");
        near(o.metrics[7], 5, 0, "num_tokens");
        near(o.metrics[8], 2, 0, "num_seqs");
        for (int j = 0; j < HADW_NUM_NONFINITE; ++j) check(o.bad[j] == 0, "padding NaN / -inf is not counted");

        // dual clip c = 3 on row 1 with rho = 4 (> c): the loss is capped at -c A = 3, no gradient
        const float logp2[6] = {0, 0, 0, std::log(4.0f), 0, 0};
        hadw_view lp2 = view(logp2, 3, 1, HADW_F32);
        c.dual_clip = 1;
        c.clip_c = 3.0f;
        rc = hadw_cpu_policy_loss(2, 3, &lp2, &ol, &none, &m, &a, &none, &c, grad, &o.loss, &o.denom, o.metrics,
                                  nullptr, o.bad, 1);
        near(o.metrics[3], 1.0 / 5, 1e-7, "dual_clipfrac");
        near(grad[3], 0.0, 0, "dual clip: no gradient");
        near(o.loss, (-1 - 1 - 1 + 3 + 1) / 5.0, 1e-6, "dual clip: loss");

        // NaN at valid positions is counted (per tensor), at padding not
        float logp3[6], old3[6];
        std::memcpy(logp3, logp, sizeof logp3);
        std::memcpy(old3, old, sizeof old3);
        logp3[0] = NAN;
        old3[4] = INFINITY;
        hadw_view lp3 = view(logp3, 3, 1, HADW_F32), ol3 = view(old3, 3, 1, HADW_F32);
        hadw_cpu_policy_loss(2, 3, &lp3, &ol3, &none, &m, &a, &none, &c, nullptr, &o.loss, &o.denom, o.metrics,
                             nullptr, o.bad, 1);
        check(o.bad[0] == 1 && o.bad[1] == 1 && o.bad[2] == 0, "NaN / Inf at valid positions counted");
    }

    // 2. Inputs read in place: bf16 log-probs (exact values), an fp16 mask with a negative zero, a transposed
    //    (column-major) old_logprobs; seq-mean-token-mean.
    {
        const float vals[4] = {-0.5f, -1.0f, -0.25f, -2.0f};
        uint16_t lp16[4], mask16[4] = {0x3c00, 0x8000, 0x3c00, 0x3c00};  // 1, -0, 1, 1
        for (int k = 0; k < 4; ++k) lp16[k] = to_bf16(vals[k]);
        const float old_t[4] = {-0.5f, -0.25f, -1.0f, -2.0f};  // [T, N] storage of old = [[-.5, -1], [-.25, -2]]
        const float adv[2] = {1.0f, 2.0f};
        hadw_view lp = view(lp16, 2, 1, HADW_BF16), ol = view(old_t, 1, 2, HADW_F32), m = view(mask16, 2, 1, HADW_F16);
        hadw_view a = view(adv, 1, 0, HADW_F32), none = view(nullptr, 0, 0, 0);
        hadw_loss_cfg c = grpo_cfg(HADW_SEQ_MEAN_TOKEN_MEAN);
        float grad[4], dlogp[4];
        Out o;
        hadw_cpu_policy_loss(2, 2, &lp, &ol, &none, &m, &a, &none, &c, grad, &o.loss, &o.denom, o.metrics, nullptr,
                             o.bad, 1);
        // ratios: row 0: 1 (masked: -0), row 1: 1, 1 -> pg = -A: row means -1 and -2, over 2 rows
        near(o.loss, -1.5, 1e-7, "bf16 / fp16 / strided: loss");
        near(o.metrics[7], 3, 0, "fp16 -0 is a zero of the mask");
        near(grad[0], -1.0 / 2, 1e-7, "row 0 gradient: -A / |y_0| / rows");
        near(grad[1], 0.0, 0, "masked");
        near(grad[2], -2.0 / 2 / 2, 1e-7, "row 1 gradient: -A / |y_1| / rows");
        hadw_cpu_scale_grad(2, 2, grad, 3.0f, dlogp, HADW_F32, 1);
        near(dlogp[2], -1.5, 1e-7, "backward: times the upstream gradient");
    }

    // 3. Advantages: rewards [1, 0, 0, 0], anchor 0.5, lambda 1.3, Bessel std: A_hat = (0.75, -0.25 x 3) / 0.5,
    //    hard group (mean 0.25 < 0.5): Phi = 1.3 exp(0.25) for the correct answer, 1.3 exp(-0.25) for the others.
    {
        const float rewards[8] = {1, 0, 0, 0, 1, 1, 1, 1};
        hadw_view r = view(rewards, 1, 0, HADW_F32);
        hadw_adv_cfg c;
        std::memset(&c, 0, sizeof c);
        c.std_unbiased = 1;
        c.has_anchor = 1;
        c.std_eps = 1e-6f;
        c.lambda_scale = 1.3f;
        c.anchor = 0.5;
        float adv[8], phi[8], metrics[HADW_NUM_ADV_METRICS];
        check(hadw_cpu_advantages(8, 4, &r, &c, adv, phi, metrics) == HADW_OK, "advantages run");
        near(phi[0], 1.3 * std::exp(0.25), 1e-6, "phi of the correct answer");
        near(phi[1], 1.3 * std::exp(-0.25), 1e-6, "phi of a wrong answer");
        near(adv[0], 0.75 / (0.5 + 1e-6) * 1.3 * std::exp(0.25), 1e-6, "advantage");
        near(adv[5], 0.0, 0, "degenerate group: 0");
        near(metrics[4], 0.5, 0, "degenerate_group_frac");
        check(hadw_cpu_advantages(8, 3, &r, &c, adv, phi, metrics) == HADW_EBADARG, "N % G != 0 is rejected");
    }

    // 4. The backward: scale, then round to nearest even. bf16: 1 + 2^-8 and 1 + 3 * 2^-8 are ties (-> 1 and
    //    1 + 2^-6); fp16: 1 + 2^-11 and 1 + 3 * 2^-11 likewise, and 65520 (halfway to 2^16) overflows to Inf.
    {
        const float b[2] = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256};
        const float h[3] = {1.0f + 1.0f / 2048, 1.0f + 3.0f / 2048, 65520.0f};
        uint16_t out[3];
        hadw_cpu_scale_grad(1, 2, b, 1.0f, out, HADW_BF16, 1);
        check(out[0] == 0x3f80 && out[1] == 0x3f82, "bf16 round to nearest even");
        hadw_cpu_scale_grad(1, 3, h, 1.0f, out, HADW_F16, 1);
        check(out[0] == 0x3c00 && out[1] == 0x3c02 && out[2] == 0x7c00, "fp16 round to nearest even, overflow");
        float f[3];
        hadw_cpu_scale_grad(3, 1, h, 0.5f, f, HADW_F32, 1);
        near(f[2], 32760.0, 0, "fp32 scale");
    }

    // 5. Threads 1 and 2 give the same bits (small chunks so that both threads get work), on the library's own
    // threads and, where built with it, on OpenMP's.
    {
        const int64_t N = 64, T = 97;
        std::vector<float> logp(N * T), old(N * T), adv(N), ref(N * T);
        std::vector<uint8_t> mask(N * T);
        uint32_t s = 12345;
        auto rnd = [&s] { s = s * 1664525u + 1013904223u; return (s >> 8) / 16777216.0f; };
        for (int64_t k = 0; k < N * T; ++k) {
            old[k] = -3 * rnd();
            logp[k] = old[k] + 0.6f * (rnd() - 0.5f);
            ref[k] = old[k] + 0.2f * (rnd() - 0.5f);
            mask[k] = rnd() > 0.2f;
        }
        for (int64_t i = 0; i < N; ++i) adv[i] = 2 * rnd() - 1;
        hadw_view lp = view(logp.data(), T, 1, HADW_F32), ol = view(old.data(), T, 1, HADW_F32);
        hadw_view rf = view(ref.data(), T, 1, HADW_F32), m = view(mask.data(), T, 1, HADW_U8);
        hadw_view a = view(adv.data(), 1, 0, HADW_F32), none = view(nullptr, 0, 0, 0);
        hadw_cpu_set_tuning(200, 400);
        const int openmp = hadw_cpu_threading(-1);
        std::printf("threads: %s\n", openmp ? "OpenMP, then own" : "own (built without OpenMP)");
        for (int run = 0; run < 2 * (1 + openmp); ++run) {
            const int seq = run % 2;
            hadw_cpu_threading(run < 2 ? openmp : 0);
            hadw_loss_cfg c = grpo_cfg(HADW_SEQ_MEAN_TOKEN_MEAN);
            c.seq_ratio = seq;
            c.kl_estimator = 3;
            c.kl_in_loss = 1;
            c.kl_coef = 0.1f;
            std::vector<float> g1(N * T), g2(N * T);
            Out o1, o2;
            hadw_cpu_policy_loss(N, T, &lp, &ol, &rf, &m, &a, &none, &c, g1.data(), &o1.loss, &o1.denom, o1.metrics,
                                 o1.kl, o1.bad, 1);
            hadw_cpu_policy_loss(N, T, &lp, &ol, &rf, &m, &a, &none, &c, g2.data(), &o2.loss, &o2.denom, o2.metrics,
                                 o2.kl, o2.bad, 2);
            check(std::memcmp(&o1, &o2, sizeof o1) == 0, "threads 1 and 2: loss and metrics bit for bit");
            check(std::memcmp(g1.data(), g2.data(), sizeof(float) * N * T) == 0, "threads 1 and 2: gradient");
            check(std::isfinite(o1.loss) && o1.kl[0] > 0, "finite loss, positive kl");
        }
        hadw_cpu_threading(openmp);
        hadw_cpu_set_tuning(0, 0);
    }

    if (failures) {
        std::printf("%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all checks passed\n");
    return 0;
}
