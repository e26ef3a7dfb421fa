// The HA-DW loss on CPU: forward and gradient in one pass over the tokens (interface and semantics: hadw_cpu.h).
//
// Layout of the work:
// - rows are split into fixed chunks of ~chunk_tokens tokens; each chunk writes its own float64 partial sums and
//   the chunks are added up in chunk order, so the result does not depend on the number of threads (bit for bit);
// - per row: the inputs are read in place (fp32 with unit stride) or converted into small fp32 row buffers (other
//   dtypes, strides, any mask dtype), which stay in L1; one vectorised sweep computes the ratio, the clipped
//   surrogate, the KL term, approx_kl, the clip counts, the NaN/Inf counts and the per-token gradient, reduced to
//   per-lane fp32 sums that are added up in float64 at the end of the row; GSPO needs the row's log-ratio sum
//   first, so it makes a second sweep over the (L1-resident) row;
// - the gradient is written final (dL/dlogp for an upstream gradient of 1): its denominator, where no normalizer
//   gives it, comes from a first, mask-only pass (for seq-mean-* it only finds each row's first valid token), and
//   a row's 1 / |y_i| from counting its mask just before its sweep; so the backward has nothing left to do but hand
//   the buffer over (or scale it by an upstream gradient other than 1).
//
// Vectorisation is explicit (GCC / Clang vector extensions, W lanes of fp32): gcc 12 left the `omp simd` version of
// the token loop on its scalar path (a reduction next to a select-and-store), 30 ms instead of ~2 ms per 1M tokens.
// Portability: GCC or Clang (for the vector extensions; elsewhere the optional build fails and the package falls
// back to torch.compile of the reference); no -march in the build. The kernels are compiled three times on x86-64 (AVX-512 with W = 16, AVX2 +
// FMA with W = 8, the SSE2 baseline with W = 4) by inlining one template body into functions with different
// `target` attributes; the CPU picks one at first use (__builtin_cpu_supports). Elsewhere the baseline (W = 4).
//
// Threads: only above a size where they pay (smaller batches run serially, so they never wait on a descheduled
// thread). Built with OpenMP (GCC's -fopenmp), the chunks run in a parallel region of the process's libgomp, the one
// torch's own ops run on, so the kernel gets the workers that still spin after the previous torch op rather than
// waiting for them to give up a core (measured: 1.65 vs 2.4 ms per 1M tokens on 2 cores after torch ops). Without
// OpenMP, or where the process runs another OpenMP runtime (see hadw_cpu_threading), helper std::threads take
// chunks from a shared counter, and a helper the scheduler has not started by the time the caller ran out of chunks
// is cancelled rather than waited for.

#include "hadw_cpu.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#define HADW_INLINE inline __attribute__((always_inline))
#define HADW_LAMBDA_INLINE __attribute__((always_inline))
#define HADW_EXPORT extern "C" __attribute__((visibility("default")))
#else
#define HADW_INLINE inline
#define HADW_LAMBDA_INLINE
#define HADW_EXPORT extern "C"
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HADW_X86_DISPATCH 1
#endif
#if defined(__GNUC__) && !defined(__clang__)
// Vectors wider than the baseline pass only between always-inlined functions of one instruction set.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

// -- scalar helpers (always inlined, so they are compiled for each instruction set) -------------------------------
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

// exp(x) in fp32 to ~1 ulp (Cephes' expf polynomial, as Vec::exp_in_range below), for the per-row scalars (GSPO's
// sequence ratio, Phi). Results below the smallest normal float (x < -87.34) are 0 rather than subnormal; x > 88.72
// gives +Inf; NaN gives NaN.
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

// -- W lanes of fp32 ---------------------------------------------------------------------------------------------
// (gcc drops a vector_size that depends on a template parameter, so each width is spelled out.)
template <int W>
struct VecTypes;
template <>
struct VecTypes<4> {
    typedef float F __attribute__((vector_size(16)));
    typedef int32_t I __attribute__((vector_size(16)));
};
template <>
struct VecTypes<8> {
    typedef float F __attribute__((vector_size(32)));
    typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct VecTypes<16> {
    typedef float F __attribute__((vector_size(64)));
    typedef int32_t I __attribute__((vector_size(64)));
};

template <int W>
struct Vec {
    using F = typename VecTypes<W>::F;
    using I = typename VecTypes<W>::I;

    static HADW_INLINE F splat(float x) { return F{} + x; }
    static HADW_INLINE I splat_i(int32_t x) { return I{} + x; }
    static HADW_INLINE F load(const float *p) {
        F v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
    static HADW_INLINE F load_n(const float *p, int n) {  // the first n lanes from p, the rest 0
        float buf[W] = {};
        std::memcpy(buf, p, sizeof(float) * n);
        return load(buf);
    }
    static HADW_INLINE F ld(const float *p, std::integral_constant<int, W>) { return load(p); }
    static HADW_INLINE F ld(const float *p, int n) { return load_n(p, n); }
    static HADW_INLINE void st(float *p, F v, std::integral_constant<int, W>) { std::memcpy(p, &v, sizeof v); }
    static HADW_INLINE void st(float *p, F v, int n) { store_n(p, v, n); }
    static HADW_INLINE void store_n(float *p, F v, int n) {
        if (n == W) {
            std::memcpy(p, &v, sizeof v);
        } else {
            float buf[W];
            std::memcpy(buf, &v, sizeof v);
            std::memcpy(p, buf, sizeof(float) * n);
        }
    }
    static HADW_INLINE F sel(I m, F a, F b) { return (F)(((I)a & m) | ((I)b & ~m)); }  // m ? a : b per lane
    static HADW_INLINE I sel_i(I m, I a, I b) { return (a & m) | (b & ~m); }
    static HADW_INLINE F keep(I m, F a) { return (F)((I)a & m); }                     // m ? a : 0
    static HADW_INLINE F one_if(I m) { return keep(m, splat(1.0f)); }
    static HADW_INLINE F abs(F x) { return (F)((I)x & 0x7fffffff); }
    static HADW_INLINE I finite(F x) { return abs(x) <= FLT_MAX; }  // false for NaN and +-Inf
    static HADW_INLINE F clamp(F x, F lo, F hi) {  // to [lo, hi]; NaN stays NaN
        x = sel(x < lo, lo, x);
        return sel(x > hi, hi, x);
    }
    // exp for |x| <= 86 (or NaN): Cephes' expf polynomial; 2^n added to the exponent bits. ~1 ulp.
    static HADW_INLINE F exp_in_range(F x) {
        const F t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: t's low mantissa bits hold round(x/ln2)
        const F n = t - 12582912.0f;
        const I ni = (I)t - 0x4b400000;
        F r = x - n * 0.693359375f;
        r = r + n * 2.12194440e-4f;
        F p = splat(1.9875691500e-4f);
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        const F y = p * (r * r) + r + 1.0f;
        return sel(x != x, x, (F)((I)y + (ni << 23)));
    }
    // exp(x) and exp(-x) for |x| <= 86 (or NaN) from one range reduction: e^r = E + O (even and odd parts of the
    // same polynomial), e^-r = E - O; ~1 ulp each, cheaper than a second exp or a division.
    static HADW_INLINE void exp_pair_in_range(F x, F &ep, F &em) {
        const F t = x * 1.44269504088896341f + 12582912.0f;
        const F n = t - 12582912.0f;
        const I ni = (I)t - 0x4b400000;
        F r = x - n * 0.693359375f;
        r = r + n * 2.12194440e-4f;
        const F r2 = r * r;
        // p(r) = c0 + c1 r + ... + c5 r^5 = pe(r^2) + r po(r^2)
        const F pe = (r2 * 1.3981999507e-3f + 4.1665795894e-2f) * r2 + 5.0000001201e-1f;
        const F po = ((r2 * 1.9875691500e-4f + 8.3334519073e-3f) * r2 + 1.6666665459e-1f) * r;
        const F yp = (pe + po) * r2 + r + 1.0f;
        const F ym = (pe - po) * r2 - r + 1.0f;
        const I nan = x != x;
        ep = sel(nan, x, (F)((I)yp + (ni << 23)));
        em = sel(nan, x, (F)((I)ym - (ni << 23)));
    }
    // exp for any x: 0 below -86.6 (where exp_f still gives tiny normals: < 2.6e-38 apart), +Inf above 88.72,
    // and exp(88.37) ~ 2.4e38 in between (exp_f: up to 3.4e38); only a log-ratio clamp above 86 reaches these.
    static HADW_INLINE F exp(F x) {
        const float lo = -86.6f, hi = 88.37f;
        const F y = exp_in_range(sel(x < lo, splat(lo), sel(x > hi, splat(hi), x)));
        return keep(~(x < lo), sel(x > 88.7228317f, splat(INFINITY), y));
    }
    static HADW_INLINE double sum(F x) {  // lanes in order, in float64
        double s = 0;
        for (int l = 0; l < W; ++l) s += x[l];
        return s;
    }
    static HADW_INLINE double sum(I x) {  // counts (int32 per lane: exact)
        int64_t s = 0;
        for (int l = 0; l < W; ++l) s += x[l];
        return static_cast<double>(s);
    }
};

// -- reading rows -------------------------------------------------------------------------------------------------
template <typename E>
HADW_INLINE const E *row_ptr(const hadw_view &v, int64_t i) {
    return static_cast<const E *>(v.data) + i * v.stride_n;
}

// Row i of a float view as fp32: the data itself when it is fp32 with unit stride, else converted into `buf`.
template <int W>
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
        for (int64_t t = 0; t < T; ++t) buf[t] = bf16_to_f(p[t * st]);
        return buf;
    }
    case HADW_F16: {
        const uint16_t *p = row_ptr<uint16_t>(v, i);
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
    for (int64_t t = 0; t < T; ++t) buf[t] = p[t * st] != 0 ? 1.0f : 0.0f;
}

// Row i of the mask, read in place: nonzero = valid (NaN counts as nonzero, as `mask != 0` does in torch). A
// contiguous bool / uint8 mask (the common case with a float one) is widened W bytes at a time.
template <int W>
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
        for (int64_t t = 0; t < T; ++t) buf[t] = (p[t * st] & 0x7fffu) != 0 ? 1.0f : 0.0f;
        return buf;
    }
    case HADW_U8: {
        if (v.stride_t != 1) {
            nonzero_row<uint8_t>(v, i, T, buf);
            return buf;
        }
        // contiguous bool / uint8: a loop the compiler widens to W lanes (~1 operation per 8 tokens; in-register
        // widening of the bytes in the kernel compiled to byte-by-byte inserts with gcc 12)
        const uint8_t *p = row_ptr<uint8_t>(v, i);
        for (int64_t t = 0; t < T; ++t) buf[t] = p[t] != 0 ? 1.0f : 0.0f;
        return buf;
    }
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
    float *grad;           // NULL: not wanted
    float inv_denom;       // 1 / the aggregation's denominator (1 without a gradient)
};

struct RowSums {  // one row's sums, in float64
    double ntok = 0, pg = 0, kl = 0, akl = 0, low = 0, high = 0, dual = 0, suspect = 0;
};

struct Rows {  // one row's inputs as fp32 (pointers into the tensors or into the scratch buffers) and its gradient
    const float *lp, *old, *ref, *isw, *adv;  // ref NULL without KL, isw NULL without weights, adv NULL for [N]
    const float *m;                           // the mask as fp32, nonzero = valid
    float a_row;                              // the row's advantage where adv is [N]
    float gf;                                 // dL/d(row's numerator): 1 / denominator (/ |y_i| for row means)
    float *g;
};

// The blocks of W tokens of a row: body(t, n) with n = Full<W> (a compile-time W: plain vector loads and stores) for
// every whole block, then once with the run-time n < W for the rest. The loop body thus has no tail branches (gcc
// kept the accumulators in memory and re-broadcast constants in every iteration when it had them).
template <int W>
using Full = std::integral_constant<int, W>;

template <int W, typename Body>
HADW_INLINE void for_blocks(int64_t T, Body &&body) {
    int64_t t = 0;
    for (; t + W <= T; t += W) body(t, Full<W>());
    if (t < T) body(t, static_cast<int>(T - t));
}

// The validity mask, the advantage and the (truncated) importance weight of the W tokens at t.
template <int W, typename N>
struct Lanes {
    using V = Vec<W>;
    typename V::I v;
    typename V::F a, w;
    HADW_INLINE Lanes(const Ctx &c, const Rows &r, int64_t t, N n, typename V::F a_row, typename V::F thr) {
        v = V::ld(r.m + t, n) != 0.0f;
        a = r.adv ? V::ld(r.adv + t, n) : a_row;
        if (r.isw) {
            const typename V::F wz = V::keep(v, V::ld(r.isw + t, n));
            w = V::sel(wz > thr, thr, wz);  // clamp(max=threshold); +Inf without truncation
        }
        (void)c;
    }
};

// The clipped surrogate per lane at ratio r: pg = -min(r A, clip(r) A) = -A * (A >= 0 ? min(r, hi) : max(r, lo))
// (the same products, so the same bits), with the optional dual clip (cap at -c A where A < 0); its derivative with
// respect to log r before the log-ratio clamp's gate; where the clip arms and the dual clip are active. Ties follow
// torch's autograd of the reference: where both arms are equal (r inside the clip range) the unclipped arm's
// gradient; a dual-clip tie (torch.minimum) gets half.
template <int W>
struct Surrogate {
    using V = Vec<W>;
    typename V::F pg, dpg;
    typename V::I low, high, dual;
    HADW_INLINE Surrogate(const Ctx &c, typename V::F r, typename V::F a, typename V::F lo, typename V::F hi) {
        const typename V::F na = -a;
        const typename V::I neg = a < 0.0f;
        low = r < lo;
        high = r > hi;
        pg = na * V::sel(neg, V::sel(low, lo, r), V::sel(high, hi, r));
        dpg = V::keep(V::sel_i(neg, ~low, ~high), na * r);  // the unclipped arm's gradient where it is active
        if (c.dual) {
            const typename V::F pd = na * c.clip_c;
            dual = neg & (pg > pd);
            dpg = V::sel(neg, V::sel(pg < pd, dpg, V::keep(pg == pd, 0.5f * dpg)), dpg);
            pg = V::sel(dual, pd, pg);
        } else {
            dual = typename V::I{};
        }
        low &= neg;
        high &= a > 0.0f;
    }
};

// KL(policy || ref) per lane and its derivative w.r.t. logp; KL: 1 = k1, 2 = k2, 3 = k3.
template <int W, int KL>
HADW_INLINE void kl_term(typename Vec<W>::F lpz, typename Vec<W>::F refz, float clamp, typename Vec<W>::F &kl,
                         typename Vec<W>::F &dkl) {
    using V = Vec<W>;
    const typename V::F delta = refz - lpz;
    if (KL == 1) {
        kl = -delta;
        dkl = V::splat(1.0f);
    } else if (KL == 2) {
        kl = 0.5f * delta * delta;
        dkl = -delta;
    } else {
        const typename V::F dc = V::clamp(delta, V::splat(-clamp), V::splat(clamp));
        const typename V::F e = V::exp(dc);
        kl = e - dc - 1.0f;
        dkl = V::keep(V::abs(delta) <= clamp, 1.0f - e);
    }
}

// exp(clamp(lr)) and exp(-clamp(lr)): the in-range polynomial where the clamp keeps it in range (always, but for
// clamps above 86).
template <int W>
HADW_INLINE void exp_pair(typename Vec<W>::F clr, bool in_range, typename Vec<W>::F &ep, typename Vec<W>::F &em) {
    if (in_range) {
        Vec<W>::exp_pair_in_range(clr, ep, em);
    } else {
        ep = Vec<W>::exp(clr);
        em = Vec<W>::exp(-clr);
    }
}

// Token ratio, the common case (an advantage per row, no KL, dual clip or importance weights, a log-ratio clamp
// <= 86): the row's sign decides the clip arm once for the whole row (NEG: A < 0). Padding lanes compute garbage
// that every sum and the gradient mask out (the inputs are not zeroed first: 2 fewer operations per block).
template <int W, bool NEG>
HADW_INLINE void token_row_signed(const Ctx &c, int64_t T, const Rows &r, RowSums &s) {
    using V = Vec<W>;
    using F = typename V::F;
    using I = typename V::I;
    I ntok{}, clipped{}, suspect{};
    F pg_s{}, akl_s{};
    const F clamp = V::splat(c.clamp), nclamp = V::splat(-c.clamp), bound = V::splat(NEG ? c.lo : c.hi);
    const F na = V::splat(-r.a_row), nag = V::splat(-r.a_row * r.gf), big = V::splat(FLT_MAX);
    const I count = V::splat_i(NEG || r.a_row > 0.0f ? -1 : 0);  // clipfrac_high counts A > 0 only
    for_blocks<W>(T, [&](int64_t t, auto n) HADW_LAMBDA_INLINE {
        const I v = V::ld(r.m + t, n) != 0.0f;
        const F lr = V::ld(r.lp + t, n) - V::ld(r.old + t, n);
        const F alr = V::abs(lr);
        suspect -= v & ~(alr <= big);
        ntok -= v;
        const F clr = V::clamp(lr, nclamp, clamp);
        F ratio, inv;
        V::exp_pair_in_range(clr, ratio, inv);
        akl_s += V::keep(v, inv + clr - 1.0f);  // k3(old || new), exp(-clamp(lr)) = exp(clamp(-lr))
        // -min(r A, clip(r) A): A < 0 -> -A max(r, lo), the clipped arm active below lo; A >= 0 -> -A min(r, hi)
        const I out = NEG ? ratio < bound : ratio > bound;
        pg_s += V::keep(v, na * V::sel(out, bound, ratio));
        clipped -= v & out & count;
        const I active = v & ~out & (alr <= clamp);  // the unclipped arm, inside the log-ratio clamp
        V::st(r.g + t, V::keep(active, nag * ratio), n);
    });
    s.ntok = V::sum(ntok); s.pg = V::sum(pg_s); s.akl = V::sum(akl_s); s.suspect = V::sum(suspect);
    (NEG ? s.low : s.high) = V::sum(clipped);
}

// Token ratio: everything in one sweep. NaN / Inf at a valid position make the log-ratio (or the weight, the
// advantage, the KL's delta) non-finite: such tokens are only counted here ("suspect"); rows with any are then
// recounted exactly, per tensor, by exact_nonfinite (rare: hadw_loss raises on them).
template <int W, int KL>
HADW_INLINE void token_row(const Ctx &c, int64_t T, const Rows &r, RowSums &s) {
    if (KL == 0 && !r.adv && !r.isw && !c.dual && c.clamp <= 86.0f) {
        if (r.a_row < 0.0f)
            token_row_signed<W, true>(c, T, r, s);
        else
            token_row_signed<W, false>(c, T, r, s);
        return;
    }
    using V = Vec<W>;
    using F = typename V::F;
    using I = typename V::I;
    I ntok{}, low{}, high{}, dual{}, suspect{};
    F pg_s{}, kl_s{}, akl_s{};
    const float kc = c.kl_coef;
    const bool in_range = c.clamp <= 86.0f;
    const F clamp = V::splat(c.clamp), nclamp = V::splat(-c.clamp), lo = V::splat(c.lo), hi = V::splat(c.hi);
    const F a_row = V::splat(r.a_row), thr = V::splat(c.is_thr), big = V::splat(FLT_MAX), gf = V::splat(r.gf);
    for_blocks<W>(T, [&](int64_t t, auto n) HADW_LAMBDA_INLINE {
        const Lanes<W, decltype(n)> L(c, r, t, n, a_row, thr);
        const I v = L.v;
        // padding may hold NaN / -inf: zeroed before any arithmetic
        const F lpz = V::keep(v, V::ld(r.lp + t, n));
        const F lr = lpz - V::keep(v, V::ld(r.old + t, n));
        const F alr = V::abs(lr);
        I bad = ~(alr <= big);
        ntok -= v;
        const F clr = V::clamp(lr, nclamp, clamp);
        F ratio, inv;
        exp_pair<W>(clr, in_range, ratio, inv);
        akl_s += V::keep(v, inv + clr - 1.0f);  // k3(old || new), exp(-clamp(lr)) = exp(clamp(-lr))
        const Surrogate<W> su(c, ratio, V::keep(v, L.a), lo, hi);
        dual -= v & su.dual;
        low -= v & su.low;
        high -= v & su.high;
        F pg = su.pg, dpg = su.dpg;
        if (r.isw) {
            pg = pg * L.w;
            dpg = dpg * L.w;
            bad |= ~(V::abs(L.w) <= big);
        }
        if (r.adv) bad |= ~(V::abs(L.a) <= big);
        pg_s += V::keep(v, pg);
        const I gate = alr <= clamp;  // the log-ratio clamp passes the gradient inside [-c, c]
        F gr = V::keep(gate, dpg);
        if (KL) {
            const F rz = V::keep(v, V::ld(r.ref + t, n));
            bad |= ~(V::abs(rz - lpz) <= big);
            F kl, dkl;
            kl_term<W, KL>(lpz, rz, c.clamp, kl, dkl);
            if (c.krw) {  // kl * rho, whose derivative is dkl * rho + kl * d rho / d logp
                dkl = dkl * ratio + V::keep(gate, kl * ratio);
                kl = kl * ratio;
            }
            kl_s += V::keep(v, kl);
            gr += kc * dkl;
        }
        suspect -= v & bad;
        V::st(r.g + t, V::keep(v, gr * gf), n);
    });
    s.ntok = V::sum(ntok); s.pg = V::sum(pg_s); s.kl = V::sum(kl_s); s.akl = V::sum(akl_s);
    s.low = V::sum(low); s.high = V::sum(high); s.dual = V::sum(dual); s.suspect = V::sum(suspect);
}

// GSPO: the sequence ratio s = exp(mean_t log-ratio) needs the whole row first, then a second sweep (from L1)
// evaluates the surrogate at s per token and writes the gradient: the same d/d log s share on every valid token
// plus the KL term's own (added in a third sweep).
template <int W, int KL>
HADW_INLINE void seq_row(const Ctx &c, int64_t T, const Rows &r, RowSums &s) {
    using V = Vec<W>;
    using F = typename V::F;
    using I = typename V::I;
    const float kc = c.kl_coef;
    const bool in_range = c.clamp <= 86.0f;
    const F clamp = V::splat(c.clamp), nclamp = V::splat(-c.clamp), lo = V::splat(c.lo), hi = V::splat(c.hi);
    const F a_row = V::splat(r.a_row), thr = V::splat(c.is_thr), big = V::splat(FLT_MAX);
    I ntok{}, suspect{};
    F lr_s{}, akl_s{};
    for_blocks<W>(T, [&](int64_t t, auto n) HADW_LAMBDA_INLINE {
        const Lanes<W, decltype(n)> L(c, r, t, n, a_row, thr);
        const F lpz = V::keep(L.v, V::ld(r.lp + t, n));
        const F lr = lpz - V::keep(L.v, V::ld(r.old + t, n));
        I bad = ~(V::abs(lr) <= big);
        if (r.isw) bad |= ~(V::abs(L.w) <= big);
        if (r.adv) bad |= ~(V::abs(L.a) <= big);
        if (KL) bad |= ~(V::abs(V::keep(L.v, V::ld(r.ref + t, n)) - lpz) <= big);
        suspect -= L.v & bad;
        ntok -= L.v;
        lr_s += lr;
        const F clr = V::clamp(lr, nclamp, clamp);
        F ep, em;
        exp_pair<W>(clr, in_range, ep, em);
        akl_s += V::keep(L.v, em + clr - 1.0f);
    });
    s.ntok = V::sum(ntok); s.akl = V::sum(akl_s); s.suspect = V::sum(suspect);
    const float ntok_c = s.ntok > 1.0 ? static_cast<float>(s.ntok) : 1.0f;
    const float seq_lr = static_cast<float>(V::sum(lr_s)) / ntok_c;
    const float sr = exp_f(clampf(seq_lr, c.clamp));
    const bool gate = std::fabs(seq_lr) <= c.clamp;

    const F srv = V::splat(sr);
    I low{}, high{}, dual{};
    F pg_s{}, dpg_s{}, kl_s{}, klraw_s{};
    for_blocks<W>(T, [&](int64_t t, auto n) HADW_LAMBDA_INLINE {
        const Lanes<W, decltype(n)> L(c, r, t, n, a_row, thr);
        const I v = L.v;
        const Surrogate<W> su(c, srv, V::keep(v, L.a), lo, hi);
        dual -= v & su.dual;
        low -= v & su.low;
        high -= v & su.high;
        F pg = su.pg, dpg = su.dpg;
        if (r.isw) {
            pg = pg * L.w;
            dpg = dpg * L.w;
        }
        pg_s += V::keep(v, pg);
        dpg_s += V::keep(v, dpg);
        if (KL) {
            F kl, dkl;
            kl_term<W, KL>(V::keep(v, V::ld(r.lp + t, n)), V::keep(v, V::ld(r.ref + t, n)), c.clamp, kl, dkl);
            klraw_s += V::keep(v, kl);
            if (c.krw) {
                kl = kl * sr;
                dkl = dkl * sr;
            }
            kl_s += V::keep(v, kl);
            V::st(r.g + t, V::keep(v, kc * dkl), n);
        }
    });
    s.pg = V::sum(pg_s); s.kl = V::sum(kl_s);
    s.low = V::sum(low); s.high = V::sum(high); s.dual = V::sum(dual);
    // d/dlogp[t] of sum_u (pg_u(s) w_u + kl_coef kl_u s) through s = exp(clamp(sum_u lr_u / |y|)): the same on
    // every valid token.
    float shared = static_cast<float>(V::sum(dpg_s));
    if (c.krw) shared += kc * static_cast<float>(V::sum(klraw_s)) * sr;
    const F sh = V::splat(gate ? shared / ntok_c : 0.0f), gf = V::splat(r.gf);
    for_blocks<W>(T, [&](int64_t t, auto n) HADW_LAMBDA_INLINE {
        const I v = V::ld(r.m + t, n) != 0.0f;
        const F own = KL ? V::ld(r.g + t, n) : F{};
        V::st(r.g + t, V::keep(v, (own + sh) * gf), n);
    });
}

// Exact NaN / Inf counts at the valid positions of one row, per tensor (logp, old, ref, adv, isw): only for rows
// whose fast check found a suspect token.
HADW_INLINE void exact_nonfinite(const Ctx &c, const Rows &r, double *bad) {
    for (int64_t t = 0; t < c.T; ++t) {
        const bool v = r.m[t] != 0.0f;
        if (!v) continue;
        bad[0] += finite(r.lp[t]) ? 0 : 1;
        bad[1] += finite(r.old[t]) ? 0 : 1;
        if (r.ref) bad[2] += finite(r.ref[t]) ? 0 : 1;
        if (r.adv) bad[3] += finite(r.adv[t]) ? 0 : 1;
        if (r.isw) bad[4] += finite(r.isw[t]) ? 0 : 1;
    }
}

// Valid tokens in a row of the mask (as fp32: nonzero = valid).
template <int W>
HADW_INLINE float row_length(const float *m, int64_t T) {
    using V = Vec<W>;
    typename V::I n{};
    for_blocks<W>(T, [&](int64_t t, auto w) HADW_LAMBDA_INLINE { n -= V::ld(m + t, w) != 0.0f; });
    return static_cast<float>(V::sum(n));
}

struct Scratch {
    std::vector<float> buf;  // 7 rows of T floats: lp, old, mask, ref, isw, adv, gradient
    explicit Scratch(int64_t T) : buf(static_cast<size_t>(7 * T)) {}
    float *row(int k, int64_t T) { return buf.data() + k * T; }
};

// Row i's inputs: pointers into the tensors where they are fp32 with unit stride (or a contiguous bool / uint8
// mask), else converted into the scratch rows. Compiled once per instruction set, outside the loss variants.
template <int W>
HADW_INLINE float load_row_inputs(const Ctx &c, int64_t i, Scratch &sc, Rows &r) {
    const int64_t T = c.T;
    r.lp = float_row<W>(c.logp, i, T, sc.row(0, T));
    r.old = float_row<W>(c.old, i, T, sc.row(1, T));
    r.m = mask_row<W>(c.mask, i, T, sc.row(2, T));
    r.ref = c.has_ref ? float_row<W>(c.ref, i, T, sc.row(3, T)) : nullptr;
    r.isw = c.has_isw ? float_row<W>(c.isw, i, T, sc.row(4, T)) : nullptr;
    r.a_row = c.adv_per_row ? float_at(c.adv, i) : 0.0f;
    r.adv = c.adv_per_row ? nullptr : float_row<W>(c.adv, i, T, sc.row(5, T));
    r.g = c.grad ? c.grad + i * T : sc.row(6, T);
    return r.a_row;
}

// Rows [r0, r1) of one chunk, added to `partial` [NUM_SLOTS] (float64) in row order.
template <int W, int SEQ, int KL>
HADW_INLINE void rows_variant(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *partial) {
    const int64_t T = c.T;
    for (int64_t i = r0; i < r1; ++i) {
        Rows r;
        const float a_row = c.load(c, i, sc, r);
        // d loss / d (row's sum) as autograd forms it: (1 / denominator) / |y_i| for row means (the mask row is
        // counted here, from memory into L1, where the sweep then reads it)
        r.gf = c.inv_denom;
        if (c.grad && c.row_mean) r.gf = c.inv_denom / std::max(row_length<W>(r.m, T), 1.0f);
        RowSums s;
        if (SEQ)
            seq_row<W, KL>(c, T, r, s);
        else
            token_row<W, KL>(c, T, r, s);
        // Rounded to fp32 per row as the reference's row sums are, then added up in float64.
        const float ntok_c = s.ntok > 1.0 ? static_cast<float>(s.ntok) : 1.0f;
        const float pg = static_cast<float>(s.pg), kl = static_cast<float>(s.kl);
        float loss_row = pg + c.kl_coef * kl;
        float pg_row = pg, kl_row = kl;
        if (c.row_mean) {  // the reference divides each row's sum by its length
            loss_row /= ntok_c;
            pg_row /= ntok_c;
            kl_row /= ntok_c;
        }
        partial[S_LOSS] += loss_row;
        partial[S_PG] += pg_row;
        partial[S_KL_AGG] += kl_row;
        partial[S_TOKENS] += s.ntok;
        partial[S_SEQS] += s.ntok > 0.0 ? 1.0 : 0.0;
        partial[S_LOW] += s.low;
        partial[S_HIGH] += s.high;
        partial[S_DUAL] += s.dual;
        partial[S_APPROX_KL] += s.akl;
        partial[S_KL_TOK] += s.kl;
        if (s.suspect > 0) exact_nonfinite(c, r, partial + S_BAD);
        if (c.adv_per_row && s.ntok > 0.0 && !finite(a_row)) partial[S_BAD + 3] += 1;
    }
}

template <int W>
HADW_INLINE void rows_impl(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *partial) {
    switch ((c.seq_ratio ? 4 : 0) + c.kl_est) {
    case 0: rows_variant<W, 0, 0>(c, r0, r1, sc, partial); break;
    case 1: rows_variant<W, 0, 1>(c, r0, r1, sc, partial); break;
    case 2: rows_variant<W, 0, 2>(c, r0, r1, sc, partial); break;
    case 3: rows_variant<W, 0, 3>(c, r0, r1, sc, partial); break;
    case 4: rows_variant<W, 1, 0>(c, r0, r1, sc, partial); break;
    case 5: rows_variant<W, 1, 1>(c, r0, r1, sc, partial); break;
    case 6: rows_variant<W, 1, 2>(c, r0, r1, sc, partial); break;
    default: rows_variant<W, 1, 3>(c, r0, r1, sc, partial); break;
    }
}

// The backward for rows [i0, i1): dst[i, t] = src[i, t] * scale, rounded to dst's dtype (dst may be src).
template <int W>
HADW_INLINE void scale_impl(int64_t T, const float *src, float scale, void *dst, int dtype, int64_t i0, int64_t i1) {
    using V = Vec<W>;
    for (int64_t i = i0; i < i1; ++i) {
        const float f = scale;
        const float *s = src + i * T;
        if (dtype == HADW_F32) {
            float *d = static_cast<float *>(dst) + i * T;
            int64_t t = 0;
            for (; t + W <= T; t += W) V::store_n(d + t, V::load(s + t) * f, W);
            for (; t < T; ++t) d[t] = s[t] * f;
        } else {
            uint16_t *d = static_cast<uint16_t *>(dst) + i * T;
            for (int64_t t = 0; t < T; ++t) d[t] = dtype == HADW_BF16 ? f_to_bf16(s[t] * f) : f_to_f16(s[t] * f);
        }
    }
}

// The aggregation's denominator, as the reference forms it: the normalizer, or count.clamp(min=1) in fp32 (valid
// tokens for token-mean, non-empty rows otherwise), times norm_len for seq-mean-token-sum-norm.
float denominator(const hadw_loss_cfg &cfg, double n_tokens, double n_seqs) {
    float d;
    if (cfg.has_normalizer)
        d = static_cast<float>(cfg.normalizer);
    else if (cfg.loss_agg == HADW_TOKEN_MEAN)
        d = static_cast<float>(std::max(n_tokens, 1.0));
    else
        d = static_cast<float>(std::max(n_seqs, 1.0));
    if (cfg.loss_agg == HADW_SEQ_MEAN_TOKEN_SUM_NORM) d = d * cfg.norm_len;
    return d;
}

// The mask pass for rows [r0, r1), for the denominator when no normalizer gives it: counts[0] += valid tokens
// (token-mean: whole rows), counts[1] += rows with a valid token (seq-mean-*: up to each row's first one).
template <int W>
HADW_INLINE void count_impl(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, bool tokens, double *counts) {
    using V = Vec<W>;
    for (int64_t i = r0; i < r1; ++i) {
        const float *m = mask_row<W>(c.mask, i, c.T, sc.row(2, c.T));
        if (tokens) {
            counts[0] += row_length<W>(m, c.T);
            continue;
        }
        bool any = false;
        for (int64_t t = 0; t < c.T && !any; t += W) {
            const int n = c.T - t < W ? static_cast<int>(c.T - t) : W;
            const typename V::I v = V::ld(m + t, n) != 0.0f;
            for (int l = 0; l < W; ++l) any = any || v[l] != 0;
        }
        counts[1] += any ? 1.0 : 0.0;
    }
}

// -- one copy of the kernels per instruction set ----------------------------------------------------------------
using RowsFn = void (*)(const Ctx &, int64_t, int64_t, Scratch &, double *);
using CountFn = void (*)(const Ctx &, int64_t, int64_t, Scratch &, bool, double *);
using ScaleFn = void (*)(int64_t, const float *, float, void *, int, int64_t, int64_t);

void rows_default(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *p) { rows_impl<4>(c, r0, r1, sc, p); }
float load_default(const Ctx &c, int64_t i, Scratch &sc, Rows &r) { return load_row_inputs<4>(c, i, sc, r); }
void count_default(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, bool tokens, double *n) {
    count_impl<4>(c, r0, r1, sc, tokens, n);
}
void scale_default(int64_t T, const float *s, float f, void *d, int t, int64_t i0, int64_t i1) {
    scale_impl<4>(T, s, f, d, t, i0, i1);
}

#ifdef HADW_X86_DISPATCH
#define HADW_AVX2 __attribute__((target("avx2,fma")))
#define HADW_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
HADW_AVX2 void rows_avx2(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *p) {
    rows_impl<8>(c, r0, r1, sc, p);
}
HADW_AVX2 float load_avx2(const Ctx &c, int64_t i, Scratch &sc, Rows &r) { return load_row_inputs<8>(c, i, sc, r); }
HADW_AVX2 void count_avx2(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, bool tokens, double *n) {
    count_impl<8>(c, r0, r1, sc, tokens, n);
}
HADW_AVX2 void scale_avx2(int64_t T, const float *s, float f, void *d, int t, int64_t i0, int64_t i1) {
    scale_impl<8>(T, s, f, d, t, i0, i1);
}
HADW_AVX512 void rows_avx512(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, double *p) {
    rows_impl<16>(c, r0, r1, sc, p);
}
HADW_AVX512 float load_avx512(const Ctx &c, int64_t i, Scratch &sc, Rows &r) {
    return load_row_inputs<16>(c, i, sc, r);
}
HADW_AVX512 void count_avx512(const Ctx &c, int64_t r0, int64_t r1, Scratch &sc, bool tokens, double *n) {
    count_impl<16>(c, r0, r1, sc, tokens, n);
}
HADW_AVX512 void scale_avx512(int64_t T, const float *s, float f, void *d, int t, int64_t i0, int64_t i1) {
    scale_impl<16>(T, s, f, d, t, i0, i1);
}
#endif

struct Isa {
    const char *name;
    RowsFn rows;
    LoadFn load;
    ScaleFn scale;
    CountFn count;
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
            return {"avx512", rows_avx512, load_avx512, scale_avx512, count_avx512};
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            return {"avx2", rows_avx2, load_avx2, scale_avx2, count_avx2};
    }
#endif
    return {"default", rows_default, load_default, scale_default, count_default};
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
// When a second thread pays (2 cores, T = 256, fwd + bwd through hadw_loss right after a torch matmul, min / median
// of 150 calls, one vs two threads; ~0.3 ms of each call is the Python around the kernel):
// - on torch's OpenMP pool, quiet machine: 32K tokens 0.38 / 0.39 vs 0.35 / 0.37 ms, 128K 0.53 / 0.55 vs 0.44 /
//   0.45, 256K 0.75 / 0.77 vs 0.56 / 0.58, 1M 2.0 / 2.1 vs 1.3 / 1.3: from ~64K tokens; a second thread starts
//   from 2 x 64K;
// - on threads of its own (torch's workers still spin on the other core): 128K 0.53 / 0.56 vs 0.50-0.58 /
//   0.59-0.62 ms, 512K 1.17 / 1.21 vs 1.05-1.09 / 1.25-1.27, 1M 2.03 / 2.09 vs 1.52-1.56 / 2.13-2.18: from 2 x 256K.
// Below that a call runs serially, so a small batch never waits on a descheduled thread. Chunks of 16K tokens:
// ~20 us of work each. Under load (two busy processes on the 2 cores) the stall back-off of parallel_chunks keeps
// the median of two threads at that of one (e.g. 1M: 2.07 / 2.17 vs 2.06 / 2.19 ms; without it 1.26 / 5.6 ms).
std::atomic<int64_t> g_chunk_tokens{16384};
std::atomic<int64_t> g_min_tokens_per_thread{0};  // 0: by where the threads come from (above)

#ifdef _OPENMP
std::atomic<int> g_openmp{1};
#if defined(__unix__) || defined(__APPLE__)
// libgomp's pool does not survive fork(): a child that opens a parallel region after its parent did waits forever
// for the parent's workers (torch's own ops too, unless the child calls torch.set_num_threads(1), as DataLoader
// workers do). A forked child of this library therefore runs on threads of its own.
const int g_fork_handler = pthread_atfork(nullptr, nullptr, [] { g_openmp.store(0); });
#endif
#else
std::atomic<int> g_openmp{0};
#endif

// How many threads a pass over `tokens` tokens gets (at most n_threads).
int threads_for(int64_t tokens, int32_t n_threads) {
    int64_t per_thread = g_min_tokens_per_thread.load();
    if (per_thread <= 0) per_thread = g_openmp.load(std::memory_order_relaxed) ? 65536 : 262144;
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, tokens / per_thread)));
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

#ifdef _OPENMP
// Calls body(k) for every chunk k < n_chunks, on up to n_threads threads (the caller's included), on the OpenMP
// runtime torch runs its own ops on (libgomp.so.1: the process has loaded torch's copy by the time this library is
// loaded, and the loader reuses it, so there is one runtime and one pool of workers). Right after a torch op those
// workers still spin, waiting for the next parallel region: this is that region, so the kernel starts on both cores
// at once instead of waiting for the spinning worker to give its core up. A worker that starts late finds the
// chunks taken and only joins the barrier.
template <typename F>
double openmp_chunks(int64_t n_chunks, int threads, const F &body) {
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};  // an exception must not leave a parallel region
    Clock::time_point done;
#pragma omp parallel num_threads(threads)
    {
        try {
            for (int64_t k; (k = next.fetch_add(1)) < n_chunks;) body(k);
        } catch (...) {
            failed.store(true);
            next.store(n_chunks);
        }
        if (omp_get_thread_num() == 0) done = Clock::now();
    }
    const double waited = seconds_since(done);
    if (failed.load()) throw std::bad_alloc();
    return waited;
}
#endif

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

// Calls body(k) for every chunk k < n_chunks, on the caller's thread and `helpers` threads of this library's own
// (a build without OpenMP, or a process whose torch runs on another OpenMP runtime than the one this library was
// linked with, see hadw_cpu_threading).
template <typename F>
double own_thread_chunks(int64_t n_chunks, int helpers, const F &body) {
    auto pool = std::make_shared<Pool>(helpers);
    pool->n_chunks = n_chunks;
    pool->body = &body;
    pool->call = [](const void *b, int64_t k) { (*static_cast<const F *>(b))(k); };
    for (int h = 0; h < helpers; ++h) {
        try {
            std::thread([pool, h] {
                int expected = 0;
                if (!pool->state[h].compare_exchange_strong(expected, 1)) return;  // cancelled: touch nothing
                pool->work();
                pool->state[h].store(2, std::memory_order_release);
            }).detach();
        } catch (...) {  // no thread to be had: the caller does the work
            pool->state[h].store(3);
        }
    }
    pool->work();
    const Clock::time_point done = Clock::now();
    for (int h = 0; h < helpers; ++h) {
        int expected = 0;
        if (pool->state[h].compare_exchange_strong(expected, 3)) continue;  // never started: it will not
        for (int spin = 0; pool->state[h].load(std::memory_order_acquire) != 2; ++spin) {
            if (spin > 64) std::this_thread::yield();  // it holds a chunk: let it run
        }
    }
    return seconds_since(done);
}

// Calls body(k) for every chunk k < n_chunks, on up to n_threads threads (the caller's included). A call whose
// caller, out of chunks, then waited over STALL_SECONDS for another thread (one the scheduler took off its core:
// the machine is loaded) makes the next calls serial: 8 of them, doubling with each stall in a row up to 1024,
// and back to 8 after a parallel call without one. Results do not depend on it (chunk sums in chunk order).
constexpr double STALL_SECONDS = 5e-4;  // a chunk takes ~20 us; the scheduler hands a core back after ~1-15 ms
std::atomic<int64_t> g_serial_calls{0};  // calls still to run serially after a stall
std::atomic<int64_t> g_backoff{8};       // how many the next stall makes serial

template <typename F>
void parallel_chunks(int64_t n_chunks, int n_threads, const F &body) {
    int threads = static_cast<int>(std::min<int64_t>(n_threads, n_chunks));
    if (threads > 1 && g_serial_calls.load(std::memory_order_relaxed) > 0) {
        g_serial_calls.fetch_sub(1, std::memory_order_relaxed);
        threads = 1;
    }
    if (threads <= 1) {
        for (int64_t k = 0; k < n_chunks; ++k) body(k);
        return;
    }
#ifdef _OPENMP
    const double waited = g_openmp.load(std::memory_order_relaxed) ? openmp_chunks(n_chunks, threads, body)
                                                                   : own_thread_chunks(n_chunks, threads - 1, body);
#else
    const double waited = own_thread_chunks(n_chunks, threads - 1, body);
#endif
    if (waited > STALL_SECONDS) {
        const int64_t backoff = g_backoff.load(std::memory_order_relaxed);
        g_serial_calls.store(backoff, std::memory_order_relaxed);
        g_backoff.store(std::min<int64_t>(2 * backoff, 1024), std::memory_order_relaxed);
    } else {
        g_backoff.store(8, std::memory_order_relaxed);
    }
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
    if (N <= 0 || T <= 0 || !cfg || !loss || !denom || !metrics || !nonfinite || !present(logp) || !present(old) ||
        !present(mask) ||
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
    c.inv_denom = 1.0f;

    const int64_t chunk_tokens = std::max<int64_t>(1, g_chunk_tokens.load());
    const int64_t rows_per_chunk = std::max<int64_t>(1, chunk_tokens / T);
    const int64_t n_chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
    const int threads = threads_for(N * T, n_threads);
    std::vector<double> partial(static_cast<size_t>(n_chunks * NUM_SLOTS), 0.0);
    const RowsFn rows = isa().rows;
    try {
        if (grad && !cfg->has_normalizer) {
            // The mask pass for the denominator (a bool mask: 1 B per valid token read for token-mean, a few per
            // row otherwise; the backward's pass over the gradient, 8 B per token, is what it saves).
            const bool tokens = cfg->loss_agg == HADW_TOKEN_MEAN;
            std::vector<double> counts(static_cast<size_t>(2 * n_chunks), 0.0);
            const CountFn count = isa().count;
            parallel_chunks(n_chunks, threads, [&](int64_t k) {
                thread_local std::unique_ptr<Scratch> scratch;
                if (!scratch || static_cast<int64_t>(scratch->buf.size()) < 7 * T) scratch.reset(new Scratch(T));
                const int64_t r0 = k * rows_per_chunk;
                count(c, r0, std::min(N, r0 + rows_per_chunk), *scratch, tokens, counts.data() + 2 * k);
            });
            double n_tok = 0, n_seq = 0;
            for (int64_t k = 0; k < n_chunks; ++k) n_tok += counts[2 * k], n_seq += counts[2 * k + 1];
            c.inv_denom = 1.0f / denominator(*cfg, n_tok, n_seq);
        } else if (grad) {
            c.inv_denom = 1.0f / denominator(*cfg, 0, 0);
        }
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
    const float d = denominator(*cfg, n_tokens, n_seqs);
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

HADW_EXPORT int hadw_cpu_scale_grad(int64_t N, int64_t T, const float *src, float scale, void *dst,
                                    int32_t dst_dtype, int32_t n_threads) {
    if (N < 0 || T < 0 || (N * T > 0 && (!src || !dst)) ||
        (dst_dtype != HADW_F32 && dst_dtype != HADW_BF16 && dst_dtype != HADW_F16))
        return HADW_EBADARG;
    if (N * T == 0) return HADW_OK;
    const int64_t rows_per_chunk = std::max<int64_t>(1, 4 * g_chunk_tokens.load() / T);
    const int64_t n_chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
    const int threads = threads_for(N * T / 2, n_threads);  // a lighter pass
    const ScaleFn fn = isa().scale;
    parallel_chunks(n_chunks, threads, [&](int64_t k) {
        fn(T, src, scale, dst, dst_dtype, k * rows_per_chunk, std::min(N, (k + 1) * rows_per_chunk));
    });
    return HADW_OK;
}

HADW_EXPORT void hadw_cpu_set_tuning(int64_t chunk_tokens, int64_t min_tokens_per_thread) {
    g_chunk_tokens.store(chunk_tokens > 0 ? chunk_tokens : 16384);
    g_min_tokens_per_thread.store(std::max<int64_t>(min_tokens_per_thread, 0));
    g_serial_calls.store(0);
    g_backoff.store(8);
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

HADW_EXPORT int hadw_cpu_threading(int use_openmp) {
#ifdef _OPENMP
    if (use_openmp >= 0) g_openmp.store(use_openmp != 0);
#else
    (void)use_openmp;
#endif
    return g_openmp.load();
}

HADW_EXPORT int hadw_cpu_abi_version(void) { return HADW_CPU_ABI_VERSION; }
