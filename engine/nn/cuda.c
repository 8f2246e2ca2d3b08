/*
 * nn/cuda: the GPU path. libcudart and libcublas are opened with dlopen on first use (never at
 * link time: one binary runs with or without CUDA), cudart first so a machine without a device
 * never maps the large cuBLAS. The few entry points used are declared here with their C ABI
 * (handles as pointers, enums as int), so building needs no CUDA headers.
 *
 * Weights and biases live on the device for the model's lifetime. A pass copies the batch in,
 * and per layer runs one sgemm and one sger (the bias: a rank-1 update with a vector of ones),
 * then copies the layer's output back, where the activation runs on the host (cuBLAS has no
 * element-wise ReLU or softmax, and a kernel of our own would need nvcc or NVRTC).
 */
#include "nn/internal.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

enum { OP_N = 0, OP_T = 1, H2D = 1, D2H = 2 }; /* cublasOperation_t, cudaMemcpyKind */

typedef struct cuda_api {
    int (*get_device_count)(int *);
    int (*malloc)(void **, size_t);
    int (*free)(void *);
    int (*memcpy)(void *, const void *, size_t, int);
    const char *(*error_string)(int);
    int (*create)(void **);
    int (*destroy)(void *);
    int (*sgemm)(void *, int, int, int, int, int, const float *, const float *, int, const float *,
                 int, const float *, float *, int);
    int (*sger)(void *, int, int, const float *, const float *, int, const float *, int, float *,
                int);
} cuda_api_t;

struct nn_cuda {
    void *blas;
    float **w, **b; /* per layer, on the device */
    size_t n_layers;
    float *x, *y, *ones; /* per-pass buffers on the device, for `rows` rows */
    size_t rows, width;  /* width: the widest input or output of any layer */
};

static cuda_api_t api;
static int api_state; /* 0 untried, 1 loaded, -1 failed (why in api_why) */
static char api_why[200];

static void *open_first(const char *const *names)
{
    for (; *names; names++) {
        void *h = dlopen(*names, RTLD_NOW | RTLD_LOCAL);
        if (h)
            return h;
    }
    return NULL;
}

static int sym(void *lib, const char *name, void *slot)
{
    void *p = dlsym(lib, name);
    if (!p)
        return nn_errf(api_why, sizeof api_why, "%s has no %s", "the CUDA library", name);
    memcpy(slot, &p, sizeof p); /* object pointer to function pointer, as dlsym requires */
    return 0;
}

static int load_cudart(void)
{
    static const char *const names[] = {"libcudart.so",
                                        "libcudart.so.13",
                                        "libcudart.so.12",
                                        "libcudart.so.11.0",
                                        "/usr/local/cuda/lib64/libcudart.so",
                                        NULL};
    void *rt = open_first(names);
    if (!rt)
        return nn_errf(api_why, sizeof api_why, "no CUDA runtime (libcudart.so not found)");
    if (sym(rt, "cudaGetDeviceCount", &api.get_device_count) ||
        sym(rt, "cudaMalloc", &api.malloc) || sym(rt, "cudaFree", &api.free) ||
        sym(rt, "cudaMemcpy", &api.memcpy) || sym(rt, "cudaGetErrorString", &api.error_string))
        return -1;
    int n = 0, rc = api.get_device_count(&n);
    if (rc != 0)
        return nn_errf(api_why, sizeof api_why, "no CUDA device (cudaGetDeviceCount: %s)",
                       api.error_string(rc));
    if (n == 0)
        return nn_errf(api_why, sizeof api_why, "no CUDA device");
    return 0;
}

static int load_cublas(void)
{
    static const char *const names[] = {"libcublas.so",
                                        "libcublas.so.13",
                                        "libcublas.so.12",
                                        "libcublas.so.11",
                                        "/usr/local/cuda/lib64/libcublas.so",
                                        NULL};
    void *blas = open_first(names);
    if (!blas)
        return nn_errf(api_why, sizeof api_why,
                       "a CUDA device but no cuBLAS (libcublas.so not found)");
    if (sym(blas, "cublasCreate_v2", &api.create) || sym(blas, "cublasDestroy_v2", &api.destroy) ||
        sym(blas, "cublasSgemm_v2", &api.sgemm) || sym(blas, "cublasSger_v2", &api.sger))
        return -1;
    return 0;
}

/* Loaded once per process and kept: the libraries stay mapped until exit. */
static int load_api(char *err, size_t errlen)
{
    if (api_state == 0)
        api_state = load_cudart() == 0 && load_cublas() == 0 ? 1 : -1;
    if (api_state < 0)
        return nn_errf(err, errlen, "%s", api_why);
    return 0;
}

static int cuda_check(int rc, const char *what, char *err, size_t errlen)
{
    if (rc == 0)
        return 0;
    return nn_errf(err, errlen, "%s: %s", what, api.error_string(rc));
}

static int blas_check(int rc, const char *what, char *err, size_t errlen)
{
    if (rc == 0)
        return 0;
    return nn_errf(err, errlen, "%s failed (cublasStatus %d)", what, rc);
}

static int upload(float **dst, const float *src, size_t n, char *err, size_t errlen)
{
    if (cuda_check(api.malloc((void **)dst, n * sizeof(float)), "cudaMalloc", err, errlen) != 0) {
        *dst = NULL;
        return -1;
    }
    return cuda_check(api.memcpy(*dst, src, n * sizeof(float), H2D), "cudaMemcpy", err, errlen);
}

void nn_cuda_close(nn_cuda_t *g)
{
    if (!g)
        return;
    for (size_t i = 0; i < g->n_layers; i++) {
        api.free(g->w[i]);
        api.free(g->b[i]);
    }
    api.free(g->x);
    api.free(g->y);
    api.free(g->ones);
    if (g->blas)
        api.destroy(g->blas);
    free(g->w);
    free(g->b);
    free(g);
}

nn_cuda_t *nn_cuda_open(const ms_nn_t *m, char *err, size_t errlen)
{
    if (load_api(err, errlen) != 0)
        return NULL;
    nn_cuda_t *g = calloc(1, sizeof *g);
    if (!g || !(g->w = calloc(m->n_layers, sizeof *g->w)) ||
        !(g->b = calloc(m->n_layers, sizeof *g->b))) {
        nn_cuda_close(g);
        nn_errf(err, errlen, "out of memory");
        return NULL;
    }
    g->n_layers = m->n_layers;
    if (blas_check(api.create(&g->blas), "cublasCreate", err, errlen) != 0) {
        g->blas = NULL;
        nn_cuda_close(g);
        return NULL;
    }
    for (size_t i = 0; i < m->n_layers; i++) {
        const nn_layer_t *l = &m->layers[i];
        if (upload(&g->w[i], l->w, l->in * l->out, err, errlen) != 0 ||
            upload(&g->b[i], l->b, l->out, err, errlen) != 0) {
            nn_cuda_close(g);
            return NULL;
        }
        g->width = l->in > g->width ? l->in : g->width;
        g->width = l->out > g->width ? l->out : g->width;
    }
    return g;
}

/* Device buffers for `rows` rows: x and y of rows x width, and `rows` ones for the bias. */
static int reserve(nn_cuda_t *g, size_t rows, char *err, size_t errlen)
{
    if (rows <= g->rows)
        return 0;
    api.free(g->x);
    api.free(g->y);
    api.free(g->ones);
    g->x = g->y = g->ones = NULL;
    g->rows = 0;
    float *ones = malloc(rows * sizeof(float));
    if (!ones)
        return nn_errf(err, errlen, "out of memory");
    for (size_t i = 0; i < rows; i++)
        ones[i] = 1.0f;
    size_t bytes = rows * g->width * sizeof(float);
    int rc = cuda_check(api.malloc((void **)&g->x, bytes), "cudaMalloc", err, errlen);
    if (rc == 0)
        rc = cuda_check(api.malloc((void **)&g->y, bytes), "cudaMalloc", err, errlen);
    if (rc == 0)
        rc = upload(&g->ones, ones, rows, err, errlen);
    free(ones);
    if (rc == 0)
        g->rows = rows;
    return rc;
}

int nn_cuda_forward(ms_nn_t *m, const float *in, size_t rows, float *out, char *err, size_t errlen)
{
    nn_cuda_t *g = m->gpu;
    const float one = 1.0f, zero = 0.0f;
    int n = (int)rows;
    if (reserve(g, rows, err, errlen) != 0)
        return -1;
    const float *cur = in;
    for (size_t i = 0; i < m->n_layers; i++) {
        const nn_layer_t *l = &m->layers[i];
        int last = i + 1 == m->n_layers, k = (int)l->in, o = (int)l->out;
        float *dst = last ? out : m->scratch[i % 2];
        /* Column-major view of the row-major batch: y^T[o,n] = W[o,k] . x^T[k,n], where W is
         * the row-major [o,k] weight read as a column-major [k,o] matrix and transposed. */
        if (cuda_check(api.memcpy(g->x, cur, rows * l->in * sizeof(float), H2D), "cudaMemcpy", err,
                       errlen) != 0 ||
            blas_check(
                api.sgemm(g->blas, OP_T, OP_N, o, n, k, &one, g->w[i], k, g->x, k, &zero, g->y, o),
                "cublasSgemm", err, errlen) != 0 ||
            blas_check(api.sger(g->blas, o, n, &one, g->b[i], 1, g->ones, 1, g->y, o), "cublasSger",
                       err, errlen) != 0 ||
            cuda_check(api.memcpy(dst, g->y, rows * l->out * sizeof(float), D2H), "cudaMemcpy", err,
                       errlen) != 0)
            return -1;
        nn_activate(last ? m->output : m->hidden, dst, rows, l->out);
        cur = dst;
    }
    return 0;
}
