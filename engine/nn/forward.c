/*
 * nn/forward: the batched forward pass. Each layer is one sgemm over the whole batch (the bias
 * broadcast into the output first, so the product adds onto it), then the activation; the
 * activations ping-pong between two scratch buffers the model keeps, so a pass allocates
 * nothing once the largest batch has been seen. cblas.h gives the BLAS prototypes only.
 */
#include "nn/internal.h"

#include <cblas.h>
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void softmax_row(float *v, size_t width)
{
    float max = v[0], sum = 0;
    for (size_t j = 1; j < width; j++)
        max = v[j] > max ? v[j] : max;
    for (size_t j = 0; j < width; j++) {
        v[j] = expf(v[j] - max); /* shifted by the max: no overflow, same ratios */
        sum += v[j];
    }
    for (size_t j = 0; j < width; j++)
        v[j] /= sum;
}

void nn_activate(nn_act_t act, float *v, size_t rows, size_t width)
{
    size_t n = rows * width;
    switch (act) {
    case NN_RELU:
        for (size_t i = 0; i < n; i++)
            v[i] = v[i] > 0 ? v[i] : 0;
        break;
    case NN_TANH:
        for (size_t i = 0; i < n; i++)
            v[i] = tanhf(v[i]);
        break;
    case NN_SIGMOID:
        for (size_t i = 0; i < n; i++)
            v[i] = 1 / (1 + expf(-v[i]));
        break;
    case NN_SOFTMAX:
        for (size_t r = 0; r < rows; r++)
            softmax_row(v + r * width, width);
        break;
    case NN_IDENTITY:
        break;
    }
}

int nn_scratch_reserve(ms_nn_t *m, size_t rows)
{
    if (rows <= m->scratch_rows)
        return 0;
    size_t n;
    if (__builtin_mul_overflow(rows, m->max_width * sizeof(float), &n))
        return -1;
    for (int i = 0; i < 2; i++) {
        float *p = realloc(m->scratch[i], n);
        if (!p)
            return -1;
        m->scratch[i] = p;
    }
    m->scratch_rows = rows;
    return 0;
}

/* OpenBLAS is opened on first use, not linked: its threaded build starts a pool of nproc - 1
 * threads in every process it is loaded into, which would be every replica of every kind.
 * Replicas are the unit of parallelism, so unless the operator set OPENBLAS_NUM_THREADS, a
 * replica's BLAS gets one thread, set in the environment its constructor reads at load. */
static __typeof__(cblas_sgemm) *sgemm;
/* A single row goes through sgemv: OpenBLAS's sgemm with one row reads the weights the slow
 * way (measured 2.5x slower than sgemv on a 64-2048-2048-10 model). */
static __typeof__(cblas_sgemv) *sgemv;

int nn_blas_load(char *err, size_t errlen)
{
    static const char *const names[] = {"libopenblas.so.0", "libopenblas.so", "libcblas.so.3",
                                        NULL};
    if (sgemm)
        return 0;
    setenv("OPENBLAS_NUM_THREADS", "1", 0);
    for (size_t i = 0; names[i] && !sgemm; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        void *p = lib ? dlsym(lib, "cblas_sgemm") : NULL;
        void *q = lib ? dlsym(lib, "cblas_sgemv") : NULL;
        if (!p || !q)
            p = q = NULL;
        memcpy(&sgemm, &p, sizeof p); /* object pointer to function pointer, as dlsym requires */
        memcpy(&sgemv, &q, sizeof q);
    }
    if (!sgemm)
        return nn_errf(err, errlen, "no BLAS library (libopenblas.so.0 not found)");
    return 0;
}

static int cpu_forward(ms_nn_t *m, const float *in, size_t rows, float *out)
{
    const float *cur = in;
    for (size_t i = 0; i < m->n_layers; i++) {
        const nn_layer_t *l = &m->layers[i];
        int last = i + 1 == m->n_layers;
        float *dst = last ? out : m->scratch[i % 2];
        for (size_t r = 0; r < rows; r++)
            memcpy(dst + r * l->out, l->b, l->out * sizeof(float));
        /* dst[rows,out] += cur[rows,in] . W[out,in]^T */
        if (rows == 1)
            sgemv(CblasRowMajor, CblasNoTrans, (int)l->out, (int)l->in, 1.0f, l->w, (int)l->in, cur,
                  1, 1.0f, dst, 1);
        else
            sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)l->out, (int)l->in, 1.0f,
                  cur, (int)l->in, l->w, (int)l->in, 1.0f, dst, (int)l->out);
        nn_activate(last ? m->output : m->hidden, dst, rows, l->out);
        cur = dst;
    }
    return 0;
}

int ms_nn_forward(ms_nn_t *m, const float *in, size_t rows, float *out, char *err, size_t errlen)
{
    if (rows == 0)
        return 0;
    /* BLAS takes int dimensions: refuse a batch whose matrices it could not index. */
    if (rows > (size_t)INT32_MAX / m->max_width || rows > (size_t)INT32_MAX / ms_nn_input_width(m))
        return nn_errf(err, errlen, "batch of %zu rows is too large", rows);
    if (nn_scratch_reserve(m, rows) != 0)
        return nn_errf(err, errlen, "out of memory for a batch of %zu rows", rows);
    if (m->gpu)
        return nn_cuda_forward(m, in, rows, out, err, errlen);
    return cpu_forward(m, in, rows, out);
}
