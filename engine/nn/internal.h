/*
 * nn internals shared by the module's files: the model (load.c builds it from safetensors),
 * the CPU forward pass (forward.c), the cuBLAS path (cuda.c) and the Lua binding (lua.c).
 */
#ifndef MS_NN_INTERNAL_H
#define MS_NN_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>

#include "nn/nn.h"

typedef enum { NN_RELU, NN_TANH, NN_SIGMOID, NN_IDENTITY, NN_SOFTMAX } nn_act_t;

typedef struct nn_layer {
    size_t in, out;
    float *w; /* [out, in], row-major */
    float *b; /* [out] */
} nn_layer_t;

typedef struct nn_cuda nn_cuda_t;

struct ms_nn {
    nn_layer_t *layers;
    size_t n_layers;
    size_t max_width; /* widest layer output: the scratch row size */
    nn_act_t hidden, output;
    float *scratch[2]; /* ping-pong activations between layers, scratch_rows x max_width */
    size_t scratch_rows;
    nn_cuda_t *gpu; /* NULL: the CPU path */
};

/* Formats into err (never more than errlen, always terminated). Returns -1 for tail calls. */
int nn_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Applies `act` in place to rows x width values (softmax: per row). */
void nn_activate(nn_act_t act, float *v, size_t rows, size_t width);
const char *nn_act_name(nn_act_t act);
/* Opens the CPU BLAS (once per process). 0, or -1 with the reason in err. */
int nn_blas_load(char *err, size_t errlen);
/* Makes m->scratch hold `rows` rows. 0, or -1 when memory runs out. */
int nn_scratch_reserve(ms_nn_t *m, size_t rows);

/* ---- GPU (cuda.c) ---------------------------------------------------------------------------
 * nn_cuda_open copies every layer to the device; NULL with the reason in err when there is no
 * CUDA runtime, no cuBLAS, no device, or a failing call. */
nn_cuda_t *nn_cuda_open(const ms_nn_t *m, char *err, size_t errlen);
void nn_cuda_close(nn_cuda_t *g);
/* The forward pass with the matrix products on the device (ms_nn_forward's contract). */
int nn_cuda_forward(ms_nn_t *m, const float *in, size_t rows, float *out, char *err, size_t errlen);

#endif
