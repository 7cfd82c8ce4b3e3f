/* Soft-Min-Max R2 in three passes over the weights (see ../native.py and
 * ../softminmax_function.py for the formulas and the eager equivalent).
 *
 * Eager PyTorch writes one weight-sized temporary per operation: about 17 passes per
 * training step. Here the forward reads the weights twice (extremes; then both
 * softmax sides, their sums and weighted sums) and writes the two exponentials the
 * backward needs; the backward reads them once and writes the gradient.
 *
 * Work is split into chunks of a fixed size, whatever the thread count, and partial
 * sums are added in chunk order, so a result does not depend on how many threads ran.
 * Inside a chunk, float partial sums over short blocks are added into doubles.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 16384
#define BLOCK 256

/* exp(x) for x <= 0, to about one ulp; 0 below float32's normal range (exp(-87.34)).
 * Written out (a Cody-Waite reduction and a degree-6 polynomial) so the loops that
 * call it vectorise without -ffast-math (with -fno-trapping-math; see native.py). */
static inline float exp_nonpositive(float x) {
    const float lowest = -87.3365448f;
    const float y = x > lowest ? x : lowest;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float n = (y * 1.44269504088896341f + magic) - magic;
    float r = y - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    /* 2^n, and 0 below the range, as bit patterns: selects, not branches, vectorise. */
    const int32_t raw = ((int32_t)n + 127) << 23; /* n >= -126: computed from y, in range */
    const int32_t bits = x > lowest ? raw : 0;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static int64_t chunks_per_row(int64_t row_len) { return (row_len + CHUNK - 1) / CHUNK; }

/* Pass 1: each chunk's largest and smallest weight. */
static void chunk_extremes(const float *w, int64_t n, float *out_max, float *out_min) {
    float hi = w[0], lo = w[0];
#pragma omp simd reduction(max : hi) reduction(min : lo)
    for (int64_t i = 0; i < n; ++i) {
        hi = w[i] > hi ? w[i] : hi;
        lo = w[i] < lo ? w[i] : lo;
    }
    *out_max = hi;
    *out_min = lo;
}

/* Pass 2: e_max = exp(a (w - max)), e_min = exp(-a (w - min)); their sums and
 * their sums weighted by w. */
static void chunk_softmax(const float *w, int64_t n, float a, float row_max, float row_min,
                          float *e_max, float *e_min, double out[4]) {
    double s_max = 0, s_min = 0, d_max = 0, d_min = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t end = start + BLOCK < n ? start + BLOCK : n;
        float bs_max = 0, bs_min = 0, bd_max = 0, bd_min = 0;
#pragma omp simd reduction(+ : bs_max, bs_min, bd_max, bd_min)
        for (int64_t i = start; i < end; ++i) {
            const float x = w[i];
            const float up = exp_nonpositive((x - row_max) * a);
            const float down = exp_nonpositive((x - row_min) * -a);
            e_max[i] = up;
            e_min[i] = down;
            bs_max += up;
            bs_min += down;
            bd_max += up * x;
            bd_min += down * x;
        }
        s_max += bs_max;
        s_min += bs_min;
        d_max += bd_max;
        d_min += bd_min;
    }
    out[0] = s_max;
    out[1] = s_min;
    out[2] = d_max;
    out[3] = d_min;
}

/* Pass 3: with d = s a (w - soft extreme) and term = e (1 + d) per side,
 * grad = scale_max term_max + scale_min term_min, and sum e d^2 per side: S a^2 Var,
 * alpha's gradient. (The eager path's <term, d> adds sum e d, which is 0 in exact
 * arithmetic; left out, the rounding of the soft extreme to float32 cannot leak into
 * a variance that is tiny once alpha is large.) */
static void chunk_backward(const float *w, int64_t n, const float *c, const float *e_max,
                           const float *e_min, float *grad, double out[2]) {
    const float a = c[0], soft_max = c[1], soft_min = c[2], scale_max = c[3], scale_min = c[4];
    double cent_max = 0, cent_min = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t end = start + BLOCK < n ? start + BLOCK : n;
        float b_max = 0, b_min = 0;
#pragma omp simd reduction(+ : b_max, b_min)
        for (int64_t i = start; i < end; ++i) {
            const float x = w[i];
            const float dev_max = (x - soft_max) * a;
            const float dev_min = (x - soft_min) * -a;
            const float term_max = e_max[i] + e_max[i] * dev_max;
            const float term_min = e_min[i] + e_min[i] * dev_min;
            b_max += e_max[i] * dev_max * dev_max;
            b_min += e_min[i] * dev_min * dev_min;
            grad[i] = term_max * scale_max + term_min * scale_min;
        }
        cent_max += b_max;
        cent_min += b_min;
    }
    out[0] = cent_max;
    out[1] = cent_min;
}

/* rows x row_len weights w (contiguous), alpha per row; exps is (rows, 2, row_len):
 * side 0 e_max, side 1 e_min. stats (rows x 6 doubles) receives per row:
 * max, min, S_max, S_min, D_max, D_min. Returns 0, or -1 when out of memory. */
int r2_softminmax_forward(const float *w, int64_t rows, int64_t row_len, const float *alpha,
                          float *exps, double *stats, int threads) {
    const int64_t per_row = chunks_per_row(row_len), total = rows * per_row;
    float *extremes = malloc(sizeof(float) * 2 * total);
    double *partial = malloc(sizeof(double) * 4 * total);
    if (!extremes || !partial) {
        free(extremes);
        free(partial);
        return -1;
    }
    const int parallel = rows * row_len >= 2 * CHUNK && threads > 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t k = 0; k < total; ++k) {
        const int64_t row = k / per_row, start = (k % per_row) * CHUNK;
        const int64_t n = row_len - start < CHUNK ? row_len - start : CHUNK;
        chunk_extremes(w + row * row_len + start, n, extremes + 2 * k, extremes + 2 * k + 1);
    }
    for (int64_t row = 0; row < rows; ++row) {
        float hi = extremes[2 * row * per_row], lo = extremes[2 * row * per_row + 1];
        for (int64_t k = row * per_row; k < (row + 1) * per_row; ++k) {
            hi = extremes[2 * k] > hi ? extremes[2 * k] : hi;
            lo = extremes[2 * k + 1] < lo ? extremes[2 * k + 1] : lo;
        }
        stats[6 * row] = hi;
        stats[6 * row + 1] = lo;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t k = 0; k < total; ++k) {
        const int64_t row = k / per_row, start = (k % per_row) * CHUNK;
        const int64_t n = row_len - start < CHUNK ? row_len - start : CHUNK;
        float *side_max = exps + row * 2 * row_len + start;
        chunk_softmax(w + row * row_len + start, n, alpha[row], (float)stats[6 * row],
                      (float)stats[6 * row + 1], side_max, side_max + row_len, partial + 4 * k);
    }
    for (int64_t row = 0; row < rows; ++row) {
        double sums[4] = {0, 0, 0, 0};
        for (int64_t k = row * per_row; k < (row + 1) * per_row; ++k)
            for (int j = 0; j < 4; ++j) sums[j] += partial[4 * k + j];
        for (int j = 0; j < 4; ++j) stats[6 * row + 2 + j] = sums[j];
    }
    free(extremes);
    free(partial);
    return 0;
}

/* consts (rows x 5 floats) per row: a, smax, smin, scale_max, scale_min. grad is
 * rows x row_len; centred (rows x 2 doubles) receives <term, d> per side. */
int r2_softminmax_backward(const float *w, int64_t rows, int64_t row_len, const float *exps,
                           const float *consts, float *grad, double *centred, int threads) {
    const int64_t per_row = chunks_per_row(row_len), total = rows * per_row;
    double *partial = malloc(sizeof(double) * 2 * total);
    if (!partial) return -1;
    const int parallel = rows * row_len >= 2 * CHUNK && threads > 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t k = 0; k < total; ++k) {
        const int64_t row = k / per_row, start = (k % per_row) * CHUNK;
        const int64_t n = row_len - start < CHUNK ? row_len - start : CHUNK;
        const float *side_max = exps + row * 2 * row_len + start;
        chunk_backward(w + row * row_len + start, n, consts + 5 * row, side_max, side_max + row_len,
                       grad + row * row_len + start, partial + 2 * k);
    }
    for (int64_t row = 0; row < rows; ++row) {
        double sums[2] = {0, 0};
        for (int64_t k = row * per_row; k < (row + 1) * per_row; ++k) {
            sums[0] += partial[2 * k];
            sums[1] += partial[2 * k + 1];
        }
        centred[2 * row] = sums[0];
        centred[2 * row + 1] = sums[1];
    }
    free(partial);
    return 0;
}
