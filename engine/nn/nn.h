/*
 * nn: the built-in dense-model runtime for Lua replicas. A model is a stack of fully connected
 * layers read from a safetensors file (docs/nn.md: format, naming convention, errors); a forward
 * pass runs a whole batch at once, through OpenBLAS on the CPU or cuBLAS on a GPU (libcudart and
 * libcublas opened with dlopen, so one binary runs with or without CUDA).
 *
 * A model is used from one thread at a time (a replica's loop): it owns scratch buffers.
 */
#ifndef MS_NN_H
#define MS_NN_H

#include <lua.h>
#include <stddef.h>

typedef struct ms_nn ms_nn_t;

typedef enum {
    MS_NN_AUTO, /* the GPU when one can be used, else the CPU (said once in the log) */
    MS_NN_CPU,
    MS_NN_CUDA, /* the GPU or an error */
} ms_nn_device_t;

/* Parses "auto", "cpu" or "cuda". 0, or -1 for anything else. */
int ms_nn_parse_device(const char *name, ms_nn_device_t *out);

/* Loads the model in the safetensors file at `path` (mapped, parsed, its tensors copied out and
 * converted to F32) and puts it on `device`. NULL on failure with a message in err that starts
 * with `path: `. */
ms_nn_t *ms_nn_load(const char *path, ms_nn_device_t device, char *err, size_t errlen);
/* The same from bytes in memory; `name` prefixes messages. The bytes are not kept. */
ms_nn_t *ms_nn_load_buffer(const void *data, size_t len, const char *name, ms_nn_device_t device,
                           char *err, size_t errlen);
void ms_nn_free(ms_nn_t *m);

size_t ms_nn_input_width(const ms_nn_t *m);
size_t ms_nn_output_width(const ms_nn_t *m);
size_t ms_nn_layer_count(const ms_nn_t *m);
/* Layer i's weight is [out, in]. */
void ms_nn_layer_shape(const ms_nn_t *m, size_t i, size_t *in, size_t *out);
const char *ms_nn_device_name(const ms_nn_t *m);     /* "cpu" or "cuda" */
const char *ms_nn_activation_name(const ms_nn_t *m); /* between layers: "relu", ... */
const char *ms_nn_output_name(const ms_nn_t *m);     /* after the last layer: "softmax", ... */

/* Runs `rows` inputs (row-major, rows x input width) through the network into `out` (rows x
 * output width). 0, or -1 with a message in err (a failing GPU call; out of memory). */
int ms_nn_forward(ms_nn_t *m, const float *in, size_t rows, float *out, char *err, size_t errlen);

/* The "moonserve.nn" Lua module (docs/nn.md). Upvalue 1 of the C closure is the folder that
 * relative model paths are resolved against (the application file's). */
int ms_nn_lua_open(lua_State *L);

#endif
