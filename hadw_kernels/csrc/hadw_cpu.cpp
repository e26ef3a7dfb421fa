// The HA-DW loss on CPU: forward and gradient in one pass over the tokens (interface and semantics: hadw_cpu.h).
//
// Layout of the work:
// - rows are split into fixed chunks of ~chunk_tokens tokens; each chunk writes its own float64 partial sums and
//   the chunks are added up in chunk order, so the result does not depend on the number of threads (bit for bit);
// - per row: the inputs are read in place (fp32 with unit stride) or converted into small fp32 row buffers (other
//   dtypes, strides, any mask dtype), which stay in L1; one vectorised sweep computes the ratio, the clipped
//   surrogate, the KL term, approx_kl, the clip counts, the NaN/Inf counts and the per-token gradient, reduced to
//   per-row fp32 sums that are added to the chunk's float64 partials; GSPO needs the row's log-ratio sum first, so
//   it makes a second sweep over the (L1-resident) row;
// - the gradient written is that of the loss's numerator: the denominator (a global count, known at the end) and
//   the upstream gradient are applied by hadw_cpu_scale_grad in the backward.
//
// Portability: no -march in the build. The row kernels are compiled three times (x86-64: AVX-512, AVX2 + FMA,
// and the baseline) by inlining one template body into functions with different `target` attributes; the
// CPU picks one at first use (__builtin_cpu_supports). Loops are vectorised by the compiler (`omp simd`, from
// -fopenmp-simd, which needs no OpenMP runtime); exp is a branch-free polynomial so that it vectorises too.
//
// Threads: std::thread, no OpenMP runtime (torch ships its own, and two OpenMP runtimes in a process fight). Extra
// threads start only above a size where they pay, take chunks from a shared counter, and a thread the scheduler
// has not started by the time the caller ran out of chunks is cancelled rather than waited for, so a loaded
// machine never makes a call wait for a descheduled thread that has no work.

#include "hadw_cpu.h"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define HADW_INLINE inline __attribute__((always_inline))
#define HADW_EXPORT extern "C" __attribute__((visibility("default")))
#else
#define HADW_INLINE inline
#define HADW_EXPORT extern "C"
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HADW_X86_DISPATCH 1
#endif

namespace {

// -- scalar helpers (always inlined, so they are compiled for each instruction set) -------------------------------
// Bit casts without taking an address (an address-taken local inside an `omp simd` loop stops its vectorisation).
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define HADW_BIT_CAST 1
#endif
#endif
#ifdef HADW_BIT_CAST
HADW_INLINE float as_float(uint32_t u) { return __builtin_bit_cast(float, u); }
HADW_INLINE uint32_t as_uint(float f) { return __builtin_bit_cast(uint32_t, f); }
#else
HADW_INLINE float as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
HADW_INLINE uint32_t as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
#endif

HADW_INLINE bool finite(float x) { return std::fabs(x) <= FLT_MAX; }  // false for NaN and +-Inf

HADW_INLINE float clampf(float x, float c) { return x < -c ? -c : (x > c ? c : x); }  // NaN stays NaN

// exp(x) in fp32 to ~1 ulp (Cephes' expf polynomial), branch-free so that loops around it vectorise. Results below
// the smallest normal float (x < -87.34) are 0 rather than subnormal; x > 88.72 gives +Inf; NaN gives NaN.
HADW_INLINE float exp_f(float x) {
    const float hi = 88.7228317f, lo = -87.3365479f;
    float xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest, |n| <= 128
    const int32_t ni = static_cast<int32_t>(n);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    const int32_t h = ni >> 1;  // 2^n as two normal factors: n = 128 and n = -126 are in range
    y = y * as_float(static_cast<uint32_t>(h + 127) << 23) * as_float(static_cast<uint32_t>(ni - h + 127) << 23);
    y = x > hi ? INFINITY : y;
    y = x < lo ? 0.0f : y;
    return x != x ? x : y;
}

HADW_INLINE float bf16_to_f(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

// IEEE half -> float, exact for every input (normal, subnormal, Inf, NaN), branch-free.
HADW_INLINE float f16_to_f(uint16_t h) {
    const uint32_t em = h & 0x7fffu;
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t shifted = em << 13;
    float f = as_float(shifted) * 5.192296858534828e33f;  // * 2^112 re-biases the exponent (subnormals too)
    f = em >= 0x7c00u ? as_float(shifted | 0x7f800000u) : f;  // Inf / NaN keep their payload
    return as_float(as_uint(f) | sign);
}

// float -> bf16, round to nearest even; NaN stays a (quiet) NaN.
HADW_INLINE uint16_t f_to_bf16(float f) {
    const uint32_t u = as_uint(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? ((u >> 16) | 0x40u) : rounded);
}

// float -> IEEE half, round to nearest even, overflow to Inf, NaN to a quiet NaN (F. Giesen's branch-free method).
HADW_INLINE uint16_t f_to_f16(float f) {
    uint32_t u = as_uint(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    const uint32_t f32_inf = 255u << 23, f16_max = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    const uint32_t big = u > f32_inf ? 0x7e00u : 0x7c00u;
    const uint32_t small = as_uint(as_float(u) + as_float(denorm_magic)) - denorm_magic;
    const uint32_t normal = (u + ((15u - 127u) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    const uint32_t o = u >= f16_max ? big : (u < (113u << 23) ? small : normal);
    return static_cast<uint16_t>(o | (sign >> 16));
}

// -- reading rows -------------------------------------------------------------------------------------------------
template <typename E>
HADW_INLINE const E *row_ptr(const hadw_view &v, int64_t i) {
    return static_cast<const E *>(v.data) + i * v.stride_n;
}

// Row i of a float view as fp32: the data itself when it is fp32 with unit stride, else converted into `buf`.
HADW_INLINE const float *float_row(const hadw_view &v, int64_t i, int64_t T, float *buf) {
    const int64_t st = v.stride_t;
    switch (v.dtype) {
    case HADW_F32: {
        const float *p = row_ptr<float>(v, i);
        if (st == 1) return p;
        for (int64_t t = 0; t < T; ++t) buf[t] = p[t * st];
        return buf;
    }
    case HADW_BF16: {
        const uint16_t *p = row_ptr<uint16_t>(v, i);
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) buf[t] = bf16_to_f(p[t * st]);
        return buf;
    }
    case HADW_F16: {
        const uint16_t *p = row_ptr<uint16_t>(v, i);
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) buf[t] = f16_to_f(p[t * st]);
        return buf;
    }
    default: {  // HADW_F64 (checked at entry)
        const double *p = row_ptr<double>(v, i);
        for (int64_t t = 0; t < T; ++t) buf[t] = static_cast<float>(p[t * st]);
        return buf;
    }
    }
}

template <typename E>
HADW_INLINE void nonzero_row(const hadw_view &v, int64_t i, int64_t T, float *buf) {
    const E *p = row_ptr<E>(v, i);
    const int64_t st = v.stride_t;
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) buf[t] = p[t * st] != 0 ? 1.0f : 0.0f;
}

// Row i of the mask, read in place: nonzero = valid (NaN counts as nonzero, as `mask != 0` does in torch).
HADW_INLINE const float *mask_row(const hadw_view &v, int64_t i, int64_t T, float *buf) {
    switch (v.dtype) {
    case HADW_F32:
        if (v.stride_t == 1) return row_ptr<float>(v, i);
        nonzero_row<float>(v, i, T, buf);
        return buf;
    case HADW_F64: nonzero_row<double>(v, i, T, buf); return buf;
    case HADW_F16:
    case HADW_BF16: {  // +-0 are the only zeros; NaN is nonzero
        const uint16_t *p = row_ptr<uint16_t>(v, i);
        const int64_t st = v.stride_t;
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) buf[t] = (p[t * st] & 0x7fffu) != 0 ? 1.0f : 0.0f;
        return buf;
    }
    case HADW_U8: nonzero_row<uint8_t>(v, i, T, buf); return buf;
    case HADW_I8: nonzero_row<int8_t>(v, i, T, buf); return buf;
    case HADW_I16: nonzero_row<int16_t>(v, i, T, buf); return buf;
    case HADW_I32: nonzero_row<int32_t>(v, i, T, buf); return buf;
    default: nonzero_row<int64_t>(v, i, T, buf); return buf;  // HADW_I64
    }
}

HADW_INLINE float float_at(const hadw_view &v, int64_t i) {
    switch (v.dtype) {
    case HADW_F32: return *row_ptr<float>(v, i);
    case HADW_F64: return static_cast<float>(*row_ptr<double>(v, i));
    case HADW_BF16: return bf16_to_f(*row_ptr<uint16_t>(v, i));
    case HADW_F16: return f16_to_f(*row_ptr<uint16_t>(v, i));
    case HADW_U8: return static_cast<float>(*row_ptr<uint8_t>(v, i));
    case HADW_I8: return static_cast<float>(*row_ptr<int8_t>(v, i));
    case HADW_I16: return static_cast<float>(*row_ptr<int16_t>(v, i));
    case HADW_I32: return static_cast<float>(*row_ptr<int32_t>(v, i));
    default: return static_cast<float>(*row_ptr<int64_t>(v, i));
    }
}

// -- the policy loss ----------------------------------------------------------------------------------------------
// Columns of a chunk's float64 partial sums.
enum Slot {
    S_LOSS,       // sum_i w_i * sum_t (pg + kl_coef * kl)      (w_i = 1 / |y_i| for seq-mean-token-mean, else 1)
    S_PG,         // sum_i w_i * sum_t pg
    S_KL_AGG,     // sum_i w_i * sum_t kl
    S_TOKENS,     // valid tokens
    S_SEQS,       // rows with a valid token
    S_LOW,        // valid tokens with A < 0 and rho < 1 - clip_low
    S_HIGH,       // valid tokens with A > 0 and rho > 1 + clip_high
    S_DUAL,       // valid tokens where the dual clip is active
    S_APPROX_KL,  // sum of k3(old || new)
    S_KL_TOK,     // sum of kl
    S_BAD,        // 5 slots: NaN / Inf counts (hadw_cpu.h)
    NUM_SLOTS = S_BAD + HADW_NUM_NONFINITE
};

struct Ctx;
struct Rows;
struct Scratch;
using LoadFn = float (*)(const Ctx &, int64_t, Scratch &, Rows &);

struct Ctx {
    LoadFn load;  // the instruction set's load_row_inputs
    int64_t N, T;
    hadw_view logp, old, ref, mask, adv, isw;
    bool has_ref, has_isw, adv_per_row, row_mean;
    int seq_ratio, kl_est;
    float lo, hi, clip_c, kl_coef, clamp, is_thr;  // kl_coef = 0 where the KL is not in the loss
    bool dual, krw;
    float *grad;  // NULL: not wanted
};

struct RowSums {
    float ntok = 0, pg = 0, kl = 0, akl = 0, low = 0, high = 0, dual = 0;
    float bad_lp = 0, bad_old = 0, bad_ref = 0, bad_isw = 0, bad_adv = 0;
};

struct Rows {  // one row's fp32 inputs (pointers into the tensors or into the scratch buffers) and its gradient
    const float *lp, *old, *m, *ref, *isw, *adv;
    float *g;
};

// The clipped surrogate of one token: pg = -min(rho A, clip(rho) A) with the optional dual clip, its derivative
// with respect to log rho, and whether the dual clip is active. Ties follow torch's autograd of the reference:
// where both arms are equal (rho inside the clip range) the unclipped arm's gradient; a dual-clip tie
// (torch.minimum) gets half. Scalar-valued functions only (a struct local inside an `omp simd` loop becomes a
// per-lane memory array and stops vectorisation); after inlining the compiler shares their common terms.
HADW_INLINE float pg_clipped(float ratio, float clipped_ratio, float a) {
    const float pun = -a * ratio, pcl = -a * clipped_ratio;
    return pun > pcl ? pun : pcl;
}

HADW_INLINE float pg_value(const Ctx &c, float ratio, float clipped_ratio, float a) {
    const float p = pg_clipped(ratio, clipped_ratio, a);
    const float pd = -a * c.clip_c;
    return (c.dual && a < 0.0f) ? (p < pd ? p : pd) : p;
}

HADW_INLINE float pg_grad(const Ctx &c, float ratio, float clipped_ratio, float a) {  // d pg / d log rho
    const float p = pg_clipped(ratio, clipped_ratio, a);
    const bool unclipped = a >= 0.0f ? ratio <= c.hi : ratio >= c.lo;
    const float d = unclipped ? -a * ratio : 0.0f;
    const float pd = -a * c.clip_c;
    return (c.dual && a < 0.0f) ? (p < pd ? d : (p == pd ? 0.5f * d : 0.0f)) : d;
}

HADW_INLINE float dual_active(const Ctx &c, float ratio, float clipped_ratio, float a) {  // 1 or 0
    return (c.dual && a < 0.0f && pg_clipped(ratio, clipped_ratio, a) > -a * c.clip_c) ? 1.0f : 0.0f;
}

// KL(policy || ref) per token and its derivative w.r.t. logp; KL: 1 = k1, 2 = k2, 3 = k3.
template <int KL>
HADW_INLINE float kl_value(float lpz, float refz, float clamp) {
    const float delta = refz - lpz;
    if (KL == 1) return -delta;
    if (KL == 2) return 0.5f * delta * delta;
    const float dc = clampf(delta, clamp);
    return exp_f(dc) - dc - 1.0f;
}

template <int KL>
HADW_INLINE float kl_grad(float lpz, float refz, float clamp) {
    const float delta = refz - lpz;
    if (KL == 1) return 1.0f;
    if (KL == 2) return -delta;
    return std::fabs(delta) <= clamp ? 1.0f - exp_f(clampf(delta, clamp)) : 0.0f;
}

// Token ratio: everything in one sweep.
template <int KL>
HADW_INLINE void token_row(const Ctx &c, int64_t T, const Rows &r, RowSums &s) {
    float ntok = 0, pg_s = 0, kl_s = 0, akl_s = 0, low = 0, high = 0, dual = 0;
    float b_lp = 0, b_old = 0, b_ref = 0, b_isw = 0, b_adv = 0;
    const float clamp = c.clamp, lo = c.lo, hi = c.hi, thr = c.is_thr, kc = c.kl_coef;
    const bool krw = c.krw, tok_adv = !c.adv_per_row;
    const float *lp = r.lp, *old = r.old, *m = r.m, *ref = r.ref, *isw = r.isw, *adv = r.adv;
    float *g = r.g;
#pragma omp simd reduction(+ : ntok, pg_s, kl_s, akl_s, low, high, dual, b_lp, b_old, b_ref, b_isw, b_adv)
    for (int64_t t = 0; t < T; ++t) {
        const bool v = m[t] != 0.0f;
        const float lpi = lp[t], oi = old[t], ai = adv[t], wi = isw[t];
        b_lp += (v && !finite(lpi)) ? 1.0f : 0.0f;
        b_old += (v && !finite(oi)) ? 1.0f : 0.0f;
        b_isw += (v && !finite(wi)) ? 1.0f : 0.0f;
        b_adv += (v && tok_adv && !finite(ai)) ? 1.0f : 0.0f;
        // padding may hold NaN / -inf: zero it before any arithmetic
        const float lpz = v ? lpi : 0.0f;
        const float lr = lpz - (v ? oi : 0.0f);
        const float a = v ? ai : 0.0f;
        ntok += v ? 1.0f : 0.0f;
        const float nlr = clampf(-lr, clamp);
        akl_s += v ? exp_f(nlr) - nlr - 1.0f : 0.0f;
        const float ratio = exp_f(clampf(lr, clamp));
        const float rc = ratio < lo ? lo : (ratio > hi ? hi : ratio);
        dual += v ? dual_active(c, ratio, rc, a) : 0.0f;
        low += (v && a < 0.0f && ratio < lo) ? 1.0f : 0.0f;
        high += (v && a > 0.0f && ratio > hi) ? 1.0f : 0.0f;
        const float wz = v ? wi : 0.0f;
        const float w = wz > thr ? thr : wz;  // clamp(max=threshold); thr = +Inf without truncation
        pg_s += v ? pg_value(c, ratio, rc, a) * w : 0.0f;
        const bool gate = std::fabs(lr) <= clamp;  // the log-ratio clamp passes the gradient inside [-c, c]
        float gr = gate ? pg_grad(c, ratio, rc, a) * w : 0.0f;
        if (KL) {
            const float rf = ref[t];
            const float rz = v ? rf : 0.0f;
            b_ref += (v && !finite(rf)) ? 1.0f : 0.0f;
            const float kl = kl_value<KL>(lpz, rz, clamp), dkl = kl_grad<KL>(lpz, rz, clamp);
            // kl_ratio_weighted: kl * rho, whose derivative is dkl * rho + kl * d rho / d logp
            const float dklw = krw ? dkl * ratio + (gate ? kl * ratio : 0.0f) : dkl;
            kl_s += v ? (krw ? kl * ratio : kl) : 0.0f;
            gr += kc * dklw;
        }
        g[t] = v ? gr : 0.0f;
    }
    s.ntok = ntok; s.pg = pg_s; s.kl = kl_s; s.akl = akl_s; s.low = low; s.high = high; s.dual = dual;
    s.bad_lp = b_lp; s.bad_old = b_old; s.bad_ref = b_ref; s.bad_isw = b_isw; s.bad_adv = b_adv;
}

// GSPO: the sequence ratio s = exp(mean_t log-ratio) needs the whole row first, then a second sweep (from L1)
// evaluates the surrogate at s per token, and a third writes the gradient, the same d/d log s share on every
// valid token plus the KL term's own.
template <int KL>
HADW_INLINE void seq_row(const Ctx &c, int64_t T, const Rows &r, RowSums &s, float row_w) {
    float ntok = 0, lr_s = 0, akl_s = 0, b_lp = 0, b_old = 0, b_ref = 0, b_isw = 0, b_adv = 0;
    const float clamp = c.clamp, lo = c.lo, hi = c.hi, thr = c.is_thr, kc = c.kl_coef;
    const bool krw = c.krw, tok_adv = !c.adv_per_row;
    const float *lp = r.lp, *old = r.old, *m = r.m, *ref = r.ref, *isw = r.isw, *adv = r.adv;
    float *g = r.g;
#pragma omp simd reduction(+ : ntok, lr_s, akl_s, b_lp, b_old, b_ref, b_isw, b_adv)
    for (int64_t t = 0; t < T; ++t) {
        const bool v = m[t] != 0.0f;
        const float lpi = lp[t], oi = old[t];
        b_lp += (v && !finite(lpi)) ? 1.0f : 0.0f;
        b_old += (v && !finite(oi)) ? 1.0f : 0.0f;
        b_isw += (v && !finite(isw[t])) ? 1.0f : 0.0f;
        b_adv += (v && tok_adv && !finite(adv[t])) ? 1.0f : 0.0f;
        if (KL) b_ref += (v && !finite(ref[t])) ? 1.0f : 0.0f;
        const float lr = (v ? lpi : 0.0f) - (v ? oi : 0.0f);
        ntok += v ? 1.0f : 0.0f;
        lr_s += lr;
        const float nlr = clampf(-lr, clamp);
        akl_s += v ? exp_f(nlr) - nlr - 1.0f : 0.0f;
    }
    const float ntok_c = ntok > 1.0f ? ntok : 1.0f;
    const float seq_lr = lr_s / ntok_c;
    const float sr = exp_f(clampf(seq_lr, clamp));
    const float src = sr < lo ? lo : (sr > hi ? hi : sr);
    const bool gate = std::fabs(seq_lr) <= clamp;

    float pg_s = 0, dpg_s = 0, kl_s = 0, klraw_s = 0, low = 0, high = 0, dual = 0;
#pragma omp simd reduction(+ : pg_s, dpg_s, kl_s, klraw_s, low, high, dual)
    for (int64_t t = 0; t < T; ++t) {
        const bool v = m[t] != 0.0f;
        const float a = v ? adv[t] : 0.0f;
        dual += v ? dual_active(c, sr, src, a) : 0.0f;
        low += (v && a < 0.0f && sr < lo) ? 1.0f : 0.0f;
        high += (v && a > 0.0f && sr > hi) ? 1.0f : 0.0f;
        const float wz = v ? isw[t] : 0.0f;
        const float w = wz > thr ? thr : wz;
        pg_s += v ? pg_value(c, sr, src, a) * w : 0.0f;
        dpg_s += v ? pg_grad(c, sr, src, a) * w : 0.0f;
        if (KL) {
            const float lpz = v ? lp[t] : 0.0f, rz = v ? ref[t] : 0.0f;
            const float kl = kl_value<KL>(lpz, rz, clamp), dkl = kl_grad<KL>(lpz, rz, clamp);
            klraw_s += v ? kl : 0.0f;
            kl_s += v ? (krw ? kl * sr : kl) : 0.0f;
            g[t] = v ? kc * (krw ? dkl * sr : dkl) : 0.0f;
        }
    }
    // d/dlogp[t] of sum_u (pg_u(s) w_u + kl_coef kl_u s) through s = exp(clamp(sum_u lr_u / |y|)): the same on
    // every valid token.
    float shared = dpg_s + (krw ? kc * klraw_s * sr : 0.0f);
    shared = gate ? shared / ntok_c : 0.0f;
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) {
        const bool v = m[t] != 0.0f;
        g[t] = v ? ((KL ? g[t] : 0.0f) + shared) * row_w : 0.0f;
    }
    s.ntok = ntok; s.pg = pg_s; s.kl = kl_s; s.akl = akl_s; s.low = low; s.high = high; s.dual = dual;
    s.bad_lp = b_lp; s.bad_old = b_old; s.bad_ref = b_ref; s.bad_isw = b_isw; s.bad_adv = b_adv;
}

struct Scratch {
    std::vector<float> buf;  // 7 rows of T floats: lp, old, mask, ref, isw (ones when absent), adv, gradient
    explicit Scratch(int64_t T) : buf(static_cast<size_t>(7 * T)) {}
    float *row(int k, int64_t T) { return buf.data() + k * T; }
};

// Row i's inputs as fp32 rows: pointers into the tensors where they are fp32 with unit stride, else converted into
// the scratch rows. Compiled once per instruction set, outside the loss variants (it holds every dtype's loop).
HADW_INLINE float load_row_inputs(const Ctx &c, int64_t i, Scratch &sc, Rows &r) {
    const int64_t T = c.T;
    r.lp = float_row(c.logp, i, T, sc.row(0, T));
    r.old = float_row(c.old, i, T, sc.row(1, T));
    r.m = mask_row(c.mask, i, T, sc.row(2, T));
    r.ref = c.has_ref ? float_row(c.ref, i, T, sc.row(3, T)) : nullptr;
    float *ones = sc.row(4, T);
    if (c.has_isw) {
        r.isw = float_row(c.isw, i, T, ones);
    } else {
        std::fill(ones, ones + T, 1.0f);
        r.isw = ones;
    }
    float a_row = 0.0f;
    if (c.adv_per_row) {
        a_row = float_at(c.adv, i);
        float *ab = sc.row(5, T);
        std::fill(ab, ab + T, a_row);
        r.adv = ab;
    } else {
        r.adv = float_row(c.adv, i, T, sc.row(5, T));
    }
    r.g = c.grad ? c.grad + i * T : sc.row(6, T);
    return a_row;
}

// Rows [r0, r1) of one chunk, added to `partial` [NUM_SLOTS] (float64) in row order.
template <int SEQ, int KL>
HADW_INLINE void rows_variant(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *partial) {
    const int64_t T = c.T;
    for (int64_t i = r0; i < r1; ++i) {
        Rows r;
        const float a_row = c.load(c, i, sc, r);
        RowSums s;
        float row_w = 1.0f;
        if (SEQ) {
            // seq-mean-token-mean's 1 / |y_i| needs the row's length, counted in the same sweep: the row weight
            // is applied to the gradient in the last sweep, so count the mask first only where it is needed.
            if (c.row_mean) {
                float n = 0;
                const float *m = r.m;
#pragma omp simd reduction(+ : n)
                for (int64_t t = 0; t < T; ++t) n += m[t] != 0.0f ? 1.0f : 0.0f;
                row_w = 1.0f / (n > 1.0f ? n : 1.0f);
            }
            seq_row<KL>(c, T, r, s, row_w);
        } else {
            token_row<KL>(c, T, r, s);
            if (c.row_mean) {
                row_w = 1.0f / (s.ntok > 1.0f ? s.ntok : 1.0f);
                float *g = r.g;
#pragma omp simd
                for (int64_t t = 0; t < T; ++t) g[t] *= row_w;
            }
        }
        const float ntok_c = s.ntok > 1.0f ? s.ntok : 1.0f;
        float loss_row = s.pg + c.kl_coef * s.kl;
        float pg_row = s.pg, kl_row = s.kl;
        if (c.row_mean) {  // the reference divides each row's sum by its length
            loss_row /= ntok_c;
            pg_row /= ntok_c;
            kl_row /= ntok_c;
        }
        if (c.adv_per_row) s.bad_adv = (s.ntok > 0.0f && !finite(a_row)) ? 1.0f : 0.0f;
        partial[S_LOSS] += loss_row;
        partial[S_PG] += pg_row;
        partial[S_KL_AGG] += kl_row;
        partial[S_TOKENS] += s.ntok;
        partial[S_SEQS] += s.ntok > 0.0f ? 1.0 : 0.0;
        partial[S_LOW] += s.low;
        partial[S_HIGH] += s.high;
        partial[S_DUAL] += s.dual;
        partial[S_APPROX_KL] += s.akl;
        partial[S_KL_TOK] += s.kl;
        partial[S_BAD + 0] += s.bad_lp;
        partial[S_BAD + 1] += s.bad_old;
        partial[S_BAD + 2] += s.bad_ref;
        partial[S_BAD + 3] += s.bad_adv;
        partial[S_BAD + 4] += s.bad_isw;
    }
}

HADW_INLINE void rows_impl(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *partial) {
    const int v = (c.seq_ratio ? 4 : 0) + c.kl_est;
    switch (v) {
    case 0: rows_variant<0, 0>(c, r0, r1, sc, partial); break;
    case 1: rows_variant<0, 1>(c, r0, r1, sc, partial); break;
    case 2: rows_variant<0, 2>(c, r0, r1, sc, partial); break;
    case 3: rows_variant<0, 3>(c, r0, r1, sc, partial); break;
    case 4: rows_variant<1, 0>(c, r0, r1, sc, partial); break;
    case 5: rows_variant<1, 1>(c, r0, r1, sc, partial); break;
    case 6: rows_variant<1, 2>(c, r0, r1, sc, partial); break;
    default: rows_variant<1, 3>(c, r0, r1, sc, partial); break;
    }
}

HADW_INLINE void scale_impl(const float *src, float scale, void *dst, int dtype, int64_t k0, int64_t k1) {
    if (dtype == HADW_F32) {
        float *d = static_cast<float *>(dst);
#pragma omp simd
        for (int64_t k = k0; k < k1; ++k) d[k] = src[k] * scale;
    } else if (dtype == HADW_BF16) {
        uint16_t *d = static_cast<uint16_t *>(dst);
#pragma omp simd
        for (int64_t k = k0; k < k1; ++k) d[k] = f_to_bf16(src[k] * scale);
    } else {
        uint16_t *d = static_cast<uint16_t *>(dst);
#pragma omp simd
        for (int64_t k = k0; k < k1; ++k) d[k] = f_to_f16(src[k] * scale);
    }
}

// -- one copy of the kernels per instruction set ----------------------------------------------------------------
using RowsFn = void (*)(const Ctx &, int64_t, int64_t, Scratch &, double *);
using ScaleFn = void (*)(const float *, float, void *, int, int64_t, int64_t);

void rows_default(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *p) { rows_impl(c, r0, r1, sc, p); }
float load_default(const Ctx &c, int64_t i, Scratch &sc, Rows &r) { return load_row_inputs(c, i, sc, r); }
void scale_default(const float *s, float f, void *d, int t, int64_t k0, int64_t k1) { scale_impl(s, f, d, t, k0, k1); }

#ifdef HADW_X86_DISPATCH
#define HADW_AVX2 __attribute__((target("avx2,fma")))
#define HADW_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")))
HADW_AVX2 void rows_avx2(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *p) { rows_impl(c, r0, r1, sc, p); }
HADW_AVX2 float load_avx2(const Ctx &c, int64_t i, Scratch &sc, Rows &r) { return load_row_inputs(c, i, sc, r); }
HADW_AVX2 void scale_avx2(const float *s, float f, void *d, int t, int64_t k0, int64_t k1) {
    scale_impl(s, f, d, t, k0, k1);
}
HADW_AVX512 void rows_avx512(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *p) {
    rows_impl(c, r0, r1, sc, p);
}
HADW_AVX512 float load_avx512(const Ctx &c, int64_t i, Scratch &sc, Rows &r) { return load_row_inputs(c, i, sc, r); }
HADW_AVX512 void scale_avx512(const float *s, float f, void *d, int t, int64_t k0, int64_t k1) {
    scale_impl(s, f, d, t, k0, k1);
}
#endif

struct Isa {
    const char *name;
    RowsFn rows;
    LoadFn load;
    ScaleFn scale;
};

Isa isa_named(const char *name) {  // name's code where this CPU runs it, else the best below it
    const bool only_default = name && std::strcmp(name, "default") == 0;
    const bool at_most_avx2 = name && std::strcmp(name, "avx2") == 0;
    (void)only_default;
    (void)at_most_avx2;
#ifdef HADW_X86_DISPATCH
    if (!only_default) {
        __builtin_cpu_init();
        if (!at_most_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
            return {"avx512", rows_avx512, load_avx512, scale_avx512};
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            return {"avx2", rows_avx2, load_avx2, scale_avx2};
    }
#endif
    return {"default", rows_default, load_default, scale_default};
}

// The instruction set in use: the best this CPU has, or a lower one named by HADW_CPU_ISA (read at first use) or
// by hadw_cpu_set_isa.
std::atomic<const Isa *> g_isa{nullptr};

const Isa &isa() {
    const Isa *p = g_isa.load(std::memory_order_acquire);
    if (p) return *p;
    static const Isa from_env = isa_named(std::getenv("HADW_CPU_ISA"));
    const Isa *expected = nullptr;
    g_isa.compare_exchange_strong(expected, &from_env);
    return *g_isa.load(std::memory_order_acquire);
}

// -- threads ------------------------------------------------------------------------------------------------------
// Measured on 2 shared cores (bench/RESULTS.md): a second thread pays from ~2^17 tokens; below that the call
// runs serially (and a small batch can never wait on a descheduled thread).
std::atomic<int64_t> g_chunk_tokens{16384};
std::atomic<int64_t> g_min_tokens_per_thread{131072};

struct Pool {  // shared with the helper threads; lives until the last of them lets go
    std::atomic<int64_t> next{0};
    int64_t n_chunks = 0;
    std::vector<std::atomic<int>> state;  // per helper: 0 pending, 1 running, 2 done, 3 cancelled
    const void *body = nullptr;
    void (*call)(const void *, int64_t) = nullptr;
    explicit Pool(int helpers) : state(helpers) {
        for (auto &s : state) s.store(0);
    }
    void work() {
        for (int64_t k; (k = next.fetch_add(1)) < n_chunks;) call(body, k);
    }
};

// Calls body(k) for every chunk k < n_chunks, on up to n_threads threads (the caller's included).
template <typename F>
void parallel_chunks(int64_t n_chunks, int n_threads, const F &body) {
    const int helpers = static_cast<int>(std::min<int64_t>(n_threads, n_chunks)) - 1;
    if (helpers <= 0) {
        for (int64_t k = 0; k < n_chunks; ++k) body(k);
        return;
    }
    auto pool = std::make_shared<Pool>(helpers);
    pool->n_chunks = n_chunks;
    pool->body = &body;
    pool->call = [](const void *b, int64_t k) { (*static_cast<const F *>(b))(k); };
    int started = 0;
    for (int h = 0; h < helpers; ++h) {
        try {
            std::thread([pool, h] {
                int expected = 0;
                if (!pool->state[h].compare_exchange_strong(expected, 1)) return;  // cancelled: touch nothing
                pool->work();
                pool->state[h].store(2, std::memory_order_release);
            }).detach();
            ++started;
        } catch (...) {  // no thread to be had: the caller does the work
            pool->state[h].store(3);
        }
    }
    pool->work();
    for (int h = 0; h < helpers; ++h) {
        int expected = 0;
        if (pool->state[h].compare_exchange_strong(expected, 3)) continue;  // never started: it will not
        for (int spin = 0; pool->state[h].load(std::memory_order_acquire) != 2; ++spin) {
            if (spin > 64) std::this_thread::yield();  // it holds a chunk: let it run
        }
    }
    (void)started;
}

bool float_dtype(int32_t d) { return d == HADW_F32 || d == HADW_F64 || d == HADW_F16 || d == HADW_BF16; }
bool any_dtype(int32_t d) { return d >= HADW_F32 && d <= HADW_I64; }
bool present(const hadw_view *v) { return v != nullptr && v->data != nullptr; }

}  // namespace

// -- exported -----------------------------------------------------------------------------------------------------
HADW_EXPORT int hadw_cpu_policy_loss(int64_t N, int64_t T, const hadw_view *logp, const hadw_view *old,
                                     const hadw_view *ref, const hadw_view *mask, const hadw_view *adv,
                                     const hadw_view *isw, const hadw_loss_cfg *cfg, float *grad, float *loss,
                                     float *denom, float *metrics, float *kl_metrics, int64_t *nonfinite,
                                     int32_t n_threads) {
    if (N <= 0 || T <= 0 || !cfg || !loss || !denom || !metrics || !nonfinite || !present(logp) || !present(old) || !present(mask) ||
        !present(adv) || !float_dtype(logp->dtype) || !float_dtype(old->dtype) || !any_dtype(mask->dtype) ||
        !float_dtype(adv->dtype) || cfg->kl_estimator < 0 || cfg->kl_estimator > 3 || cfg->loss_agg < 0 ||
        cfg->loss_agg > 3)
        return HADW_EBADARG;
    if (cfg->kl_estimator != 0 && (!present(ref) || !float_dtype(ref->dtype))) return HADW_EBADARG;
    if (present(isw) && !float_dtype(isw->dtype)) return HADW_EBADARG;

    Ctx c;
    c.load = isa().load;
    c.N = N;
    c.T = T;
    c.logp = *logp;
    c.old = *old;
    c.mask = *mask;
    c.adv = *adv;
    c.has_ref = cfg->kl_estimator != 0;
    if (c.has_ref) c.ref = *ref;
    c.has_isw = present(isw);
    if (c.has_isw) c.isw = *isw;
    c.adv_per_row = cfg->adv_per_row != 0;
    c.row_mean = cfg->loss_agg == HADW_SEQ_MEAN_TOKEN_MEAN;
    c.seq_ratio = cfg->seq_ratio != 0;
    c.kl_est = cfg->kl_estimator;
    c.lo = cfg->ratio_lo;
    c.hi = cfg->ratio_hi;
    c.clip_c = cfg->clip_c;
    c.kl_coef = (c.has_ref && cfg->kl_in_loss) ? cfg->kl_coef : 0.0f;
    c.clamp = cfg->log_ratio_clamp;
    c.is_thr = cfg->is_truncate ? cfg->is_threshold : INFINITY;
    c.dual = cfg->dual_clip != 0;
    c.krw = cfg->kl_ratio_weighted != 0;
    c.grad = grad;

    const int64_t chunk_tokens = std::max<int64_t>(1, g_chunk_tokens.load());
    const int64_t rows_per_chunk = std::max<int64_t>(1, chunk_tokens / T);
    const int64_t n_chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
    const int64_t per_thread = std::max<int64_t>(1, g_min_tokens_per_thread.load());
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, N * T / per_thread)));
    std::vector<double> partial(static_cast<size_t>(n_chunks * NUM_SLOTS), 0.0);
    const RowsFn rows = isa().rows;
    try {
        parallel_chunks(n_chunks, threads, [&](int64_t k) {
            thread_local std::unique_ptr<Scratch> scratch;
            if (!scratch || static_cast<int64_t>(scratch->buf.size()) < 7 * T) scratch.reset(new Scratch(T));
            const int64_t r0 = k * rows_per_chunk;
            rows(c, r0, std::min(N, r0 + rows_per_chunk), *scratch, partial.data() + k * NUM_SLOTS);
        });
    } catch (...) {
        return HADW_EBADARG;  // out of memory for the row buffers
    }
    double sum[NUM_SLOTS] = {0};
    for (int64_t k = 0; k < n_chunks; ++k)
        for (int j = 0; j < NUM_SLOTS; ++j) sum[j] += partial[k * NUM_SLOTS + j];

    // Finalize as the reference does: each sum rounded once to fp32, count.clamp(min=1) in fp32, total / denom.
    const double n_tokens = sum[S_TOKENS], n_seqs = sum[S_SEQS];
    float d;
    if (cfg->has_normalizer)
        d = static_cast<float>(cfg->normalizer);
    else if (cfg->loss_agg == HADW_TOKEN_MEAN)
        d = static_cast<float>(std::max(n_tokens, 1.0));
    else
        d = static_cast<float>(std::max(n_seqs, 1.0));
    if (cfg->loss_agg == HADW_SEQ_MEAN_TOKEN_SUM_NORM) d = d * cfg->norm_len;
    const float per_token = static_cast<float>(std::max(n_tokens, 1.0));
    const float l = static_cast<float>(sum[S_LOSS]) / d;
    *loss = l;
    *denom = d;
    metrics[0] = static_cast<float>(sum[S_LOW] + sum[S_HIGH]) / per_token;  // clipfrac
    metrics[1] = static_cast<float>(sum[S_LOW]) / per_token;
    metrics[2] = static_cast<float>(sum[S_HIGH]) / per_token;
    metrics[3] = static_cast<float>(sum[S_DUAL]) / per_token;
    metrics[4] = static_cast<float>(sum[S_APPROX_KL]) / per_token;
    metrics[5] = c.has_ref ? static_cast<float>(sum[S_PG]) / d : l;  // pg_loss
    metrics[6] = static_cast<float>(n_tokens) / static_cast<float>(N);  // response_len_mean
    metrics[7] = static_cast<float>(n_tokens);
    metrics[8] = static_cast<float>(n_seqs);
    if (c.has_ref && kl_metrics) {
        kl_metrics[0] = static_cast<float>(sum[S_KL_TOK]) / per_token;
        kl_metrics[1] = static_cast<float>(sum[S_KL_AGG]) / d;
    }
    for (int j = 0; j < HADW_NUM_NONFINITE; ++j) nonfinite[j] = static_cast<int64_t>(sum[S_BAD + j]);
    return HADW_OK;
}

HADW_EXPORT int hadw_cpu_advantages(int64_t N, int64_t G, const hadw_view *rewards, const hadw_adv_cfg *cfg,
                                    float *adv, float *phi, float *metrics) {
    if (N <= 0 || G <= 0 || N % G || !cfg || !adv || !phi || !metrics || !present(rewards) ||
        !any_dtype(rewards->dtype) || cfg->adv_norm < 0 || cfg->adv_norm > 2)
        return HADW_EBADARG;
    const int64_t P = N / G;
    const float corr = cfg->std_unbiased ? 1.0f : 0.0f;
    std::vector<float> r(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) r[i] = float_at(*rewards, i);

    float batch_denom = 1.0f;
    if (cfg->adv_norm == 1) {  // batch_std: (r - group mean) / (std of all scorable rewards + eps)
        double total = 0, n_sc = 0;
        for (int64_t i = 0; i < N; ++i)
            if (r[i] == r[i]) total += r[i], n_sc += 1;
        const float n_scf = static_cast<float>(n_sc);
        const float bmean = static_cast<float>(total) / std::max(n_scf, 1.0f);
        double ss = 0;
        for (int64_t i = 0; i < N; ++i)
            if (r[i] == r[i]) {
                const float d = r[i] - bmean;
                ss += static_cast<double>(d * d);
            }
        const float var = static_cast<float>(ss) / std::max(n_scf - corr, 1.0f);
        batch_denom = std::sqrt(var) + cfg->std_eps;
    }
    const float anchor = static_cast<float>(cfg->anchor);
    double phi_sum = 0, adv_abs = 0, n_degenerate = 0;
    float phi_min = INFINITY, phi_max = -INFINITY;
    for (int64_t p = 0; p < P; ++p) {
        const float *rg = r.data() + p * G;
        // sums in row order, in fp32, as the reference's index_add_ does
        float count = 0, sum = 0, hi = -INFINITY, lo = INFINITY;
        for (int64_t j = 0; j < G; ++j)
            if (rg[j] == rg[j]) {
                count += 1.0f;
                sum += rg[j];
                hi = std::max(hi, rg[j]);
                lo = std::min(lo, rg[j]);
            }
        const float mean = sum / std::max(count, 1.0f);
        float ss = 0;
        for (int64_t j = 0; j < G; ++j)
            if (rg[j] == rg[j]) ss += (rg[j] - mean) * (rg[j] - mean);
        const float std_ = count > corr ? std::sqrt(ss / std::max(count - corr, 1.0f)) : 0.0f;
        const bool degenerate = count < 2.0f || hi == lo;
        float denom = cfg->adv_norm == 0 ? std_ + cfg->std_eps : (cfg->adv_norm == 1 ? batch_denom : 1.0f);
        if (degenerate) denom = 1.0f;
        const float diff = (cfg->has_anchor && count > 0.0f) ? mean - anchor : 0.0f;
        const float sdiff = diff > 0.0f ? 1.0f : (diff < 0.0f ? -1.0f : 0.0f);
        n_degenerate += degenerate ? 1.0 : 0.0;
        for (int64_t j = 0; j < G; ++j) {
            const bool scorable = rg[j] == rg[j];
            const float raw = (degenerate || !scorable) ? 0.0f : (rg[j] - mean) / denom;
            float ph = 1.0f;
            if (cfg->has_anchor) {
                const float sraw = raw > 0.0f ? 1.0f : (raw < 0.0f ? -1.0f : 0.0f);
                ph = cfg->lambda_scale * exp_f((-sraw * sdiff) * std::fabs(diff));  // lambda exp(D |diff|)
            }
            const float a = raw * ph;
            adv[p * G + j] = a;
            phi[p * G + j] = ph;
            phi_sum += ph;
            adv_abs += std::fabs(a);
            phi_min = std::min(phi_min, ph);
            phi_max = std::max(phi_max, ph);
        }
    }
    metrics[0] = static_cast<float>(phi_sum) / static_cast<float>(N);
    metrics[1] = phi_min;
    metrics[2] = phi_max;
    metrics[3] = static_cast<float>(adv_abs) / static_cast<float>(N);
    metrics[4] = static_cast<float>(n_degenerate) / static_cast<float>(P);
    return HADW_OK;
}

HADW_EXPORT int hadw_cpu_scale_grad(int64_t n, const float *src, float scale, void *dst, int32_t dst_dtype,
                                    int32_t n_threads) {
    if (n < 0 || (n > 0 && (!src || !dst)) ||
        (dst_dtype != HADW_F32 && dst_dtype != HADW_BF16 && dst_dtype != HADW_F16))
        return HADW_EBADARG;
    const int64_t chunk = std::max<int64_t>(1, 4 * g_chunk_tokens.load());
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    const int64_t per_thread = std::max<int64_t>(1, 2 * g_min_tokens_per_thread.load());  // a lighter pass
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n / per_thread)));
    const ScaleFn fn = isa().scale;
    parallel_chunks(n_chunks, threads, [&](int64_t k) {
        fn(src, scale, dst, dst_dtype, k * chunk, std::min(n, (k + 1) * chunk));
    });
    return HADW_OK;
}

HADW_EXPORT void hadw_cpu_set_tuning(int64_t chunk_tokens, int64_t min_tokens_per_thread) {
    g_chunk_tokens.store(chunk_tokens > 0 ? chunk_tokens : 16384);
    g_min_tokens_per_thread.store(min_tokens_per_thread > 0 ? min_tokens_per_thread : 131072);
}

HADW_EXPORT const char *hadw_cpu_isa(void) { return isa().name; }

HADW_EXPORT const char *hadw_cpu_set_isa(const char *name) {
    static const Isa choices[3] = {isa_named("default"), isa_named("avx2"), isa_named(nullptr)};
    const Isa *p = &choices[2];
    if (name && std::strcmp(name, "default") == 0) p = &choices[0];
    if (name && std::strcmp(name, "avx2") == 0) p = &choices[1];
    g_isa.store(p, std::memory_order_release);
    return p->name;
}

HADW_EXPORT int hadw_cpu_abi_version(void) { return HADW_CPU_ABI_VERSION; }
