/* The HA-DW loss on CPU: the C interface of the native kernel (hadw_cpu.cpp).
 *
 * A plain C ABI, called through ctypes by hadw_kernels/ops/cpu_loss.py (no torch or Python headers are needed to
 * build it). Tensors travel as `hadw_view`s: a data pointer, a dtype code and strides in elements, so every input
 * is read in place whatever its dtype and layout (a bool mask is never copied to another dtype).
 *
 * Semantics are those of hadw_kernels/reference.py (`compute_advantages`, `policy_loss_terms`); every value is
 * computed in fp32, the per-row sums are added up in float64, and the loss and metrics are rounded once to fp32.
 * Shapes: N rows, T tokens per row, G rows per group.
 */
#ifndef HADW_CPU_H
#define HADW_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HADW_CPU_ABI_VERSION 3

/* dtype codes of a view (bool and uint8 share HADW_U8) */
enum hadw_dtype {
    HADW_F32 = 0, HADW_F64 = 1, HADW_F16 = 2, HADW_BF16 = 3,
    HADW_U8 = 4, HADW_I8 = 5, HADW_I16 = 6, HADW_I32 = 7, HADW_I64 = 8
};

/* A [N, T] (or [N], with stride_t unused) tensor: element (i, t) at data + (i * stride_n + t * stride_t) elements.
 * data == NULL: the tensor is absent. */
typedef struct {
    const void *data;
    int64_t stride_n;
    int64_t stride_t;
    int32_t dtype;
    int32_t _pad;
} hadw_view;

/* loss_agg codes, verl's names */
enum hadw_agg { HADW_TOKEN_MEAN = 0, HADW_SEQ_MEAN_TOKEN_MEAN = 1, HADW_SEQ_MEAN_TOKEN_SUM = 2,
                HADW_SEQ_MEAN_TOKEN_SUM_NORM = 3 };

/* The policy loss's configuration (a LossConfig plus what the call gives), decided once in Python. */
typedef struct {
    int32_t seq_ratio;          /* 1: GSPO's sequence ratio exp(mean_t log-ratio); 0: token ratio */
    int32_t loss_agg;           /* enum hadw_agg */
    int32_t dual_clip;          /* 1: cap the token loss at -clip_c * A where A < 0 */
    int32_t kl_estimator;       /* 0: no ref_logprobs; 1, 2, 3: k1, k2, k3 (the kl metrics, and the penalty below) */
    int32_t kl_in_loss;         /* 1: add kl_coef * kl to the loss (ref given and kl_coef != 0) */
    int32_t kl_ratio_weighted;  /* 1: the per-token KL is multiplied by the (differentiable) ratio */
    int32_t is_truncate;        /* 1: rollout_is_weights clamped from above at is_threshold */
    int32_t adv_per_row;        /* 1: advantages [N] (stride_t ignored); 0: advantages [N, T] */
    int32_t has_normalizer;     /* 1: `normalizer` replaces the aggregation's count */
    int32_t _pad;
    float ratio_lo;             /* 1 - clip_low (computed in double, then rounded, as torch does) */
    float ratio_hi;             /* 1 + clip_high */
    float clip_c;
    float kl_coef;
    float log_ratio_clamp;
    float is_threshold;
    float norm_len;             /* seq-mean-token-sum-norm's constant length (config.norm_len, else T) */
    float _pad2;
    double normalizer;
} hadw_loss_cfg;

/* The advantages' configuration. */
typedef struct {
    int32_t adv_norm;           /* 0: group_std, 1: batch_std, 2: none */
    int32_t std_unbiased;
    int32_t has_anchor;         /* 0: Phi = 1 (no anchor, or HA-DW off) */
    int32_t _pad;
    float std_eps;
    float lambda_scale;
    double anchor;
} hadw_adv_cfg;

/* Sizes of the outputs. */
#define HADW_NUM_POLICY_METRICS 9  /* clipfrac, clipfrac_low, clipfrac_high, dual_clipfrac, approx_kl, pg_loss,
                                      response_len_mean, num_tokens, num_seqs */
#define HADW_NUM_KL_METRICS 2      /* kl, kl_loss */
#define HADW_NUM_ADV_METRICS 5  /* phi_mean, phi_min, phi_max, adv_abs_mean, degenerate_group_frac */
#define HADW_NUM_NONFINITE 5       /* NaN/Inf at valid positions of logprobs, old_logprobs, ref_logprobs,
                                      advantages ([N]: rows with a valid token), rollout_is_weights */

/* Return codes. */
#define HADW_OK 0
#define HADW_EBADARG 1          /* unsupported dtype, missing tensor, or sizes out of range */

/* The clipped policy loss on given advantages, forward and gradient in one pass over the tokens.
 *   logp, old, mask: [N, T]; ref: [N, T] or absent (kl_estimator == 0); isw: [N, T] rollout importance weights or
 *   absent; adv: [N] (adv_per_row) or [N, T].
 *   grad: NULL, or [N, T] contiguous fp32: dL/dlogp for an upstream gradient of 1 (a first pass over the mask finds
 *         the denominator and the rows' lengths where the gradient needs them).
 *   loss, denom: fp32 scalars; metrics: [HADW_NUM_POLICY_METRICS] fp32; kl_metrics: [HADW_NUM_KL_METRICS] fp32 or
 *   NULL (written only with ref); nonfinite: [HADW_NUM_NONFINITE] exact counts.
 *   n_threads: at most this many threads (1 = serial). Results do not depend on it (bit for bit). */
int hadw_cpu_policy_loss(int64_t N, int64_t T, const hadw_view *logp, const hadw_view *old, const hadw_view *ref,
                         const hadw_view *mask, const hadw_view *adv, const hadw_view *isw, const hadw_loss_cfg *cfg,
                         float *grad, float *loss, float *denom, float *metrics, float *kl_metrics,
                         int64_t *nonfinite, int32_t n_threads);

/* Group-relative advantages with HA-DW weights for contiguous groups of G rows (N = P * G), NaN = unscorable.
 *   rewards: [N] (stride_n; any dtype). adv, phi: [N] fp32 outputs. metrics: [HADW_NUM_ADV_METRICS] fp32. */
int hadw_cpu_advantages(int64_t N, int64_t G, const hadw_view *rewards, const hadw_adv_cfg *cfg, float *adv,
                        float *phi, float *metrics);

/* The backward, from the gradient the forward wrote: dst[i, t] = src[i, t] * scale ([N, T] contiguous; dst may
 * be src), rounded to dst_dtype (HADW_F32, HADW_BF16 or HADW_F16; round to nearest even). */
int hadw_cpu_scale_grad(int64_t N, int64_t T, const float *src, float scale, void *dst, int32_t dst_dtype,
                        int32_t n_threads);

/* Tuning, for tests: tokens per work chunk (results are bitwise reproducible for a fixed chunk size) and the
 * fewest tokens per thread before a second thread is used. Values <= 0 restore the defaults. Also clears the
 * back-off after a stall (a call that waited on a descheduled thread makes the next ones serial). */
void hadw_cpu_set_tuning(int64_t chunk_tokens, int64_t min_tokens_per_thread);

/* The instruction set the kernels run with ("avx512", "avx2" or "default") and the ABI version. HADW_CPU_ISA in
 * the environment (read at first use) can force a lower one: "avx2" or "default". */
const char *hadw_cpu_isa(void);

/* Tests and comparisons: run with `name` ("default", "avx2"; NULL or anything else = the best this CPU has), or
 * the best below it where this CPU lacks it. Returns the name now in use. Not to be called during a computation. */
const char *hadw_cpu_set_isa(const char *name);

/* Where the threads come from: 1 = the OpenMP runtime this library was linked with (built with -fopenmp: the
 * libgomp.so.1 of a Linux torch, so that the kernel runs on the workers torch's own ops run on), 0 = helper
 * threads of this library's own (the only mode of a build without OpenMP; the loader chooses it where the process
 * already had another OpenMP runtime loaded, so that two pools never compete for the cores). use_openmp < 0 only
 * asks; 0 or 1 sets the mode (1 is ignored without OpenMP). Returns the mode in use. Not to be called during a
 * computation. */
int hadw_cpu_threading(int use_openmp);
int hadw_cpu_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* HADW_CPU_H */
