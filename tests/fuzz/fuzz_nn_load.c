/*
 * Fuzz harness of the safetensors loader (engine/nn/load.c): any bytes must give a model or an
 * error message, never a crash, an out-of-bounds read or a leak; a model that loads must run a
 * forward pass. Built as a libFuzzer binary with -DMS_FUZZ=ON (clang), else linked with
 * replay.c so ctest runs the corpus (tests/fuzz/corpus/nn_load) through it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nn/nn.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512];
    ms_nn_t *m = ms_nn_load_buffer(data, size, "fuzz", MS_NN_CPU, err, sizeof err);
    if (!m) {
        if (!memchr(err, '\0', sizeof err) || strncmp(err, "fuzz: ", 6) != 0)
            abort(); /* every failure must say why, prefixed by the file's name */
        return 0;
    }
    enum { ROWS = 3 };
    float *in = calloc(ROWS * ms_nn_input_width(m), sizeof(float));
    float *out = malloc(ROWS * ms_nn_output_width(m) * sizeof(float));
    for (size_t i = 0; in && i < ROWS * ms_nn_input_width(m); i++)
        in[i] = (float)(i % 7) - 3.0f;
    if (in && out && ms_nn_forward(m, in, ROWS, out, err, sizeof err) != 0)
        abort(); /* the CPU path has no reason to fail on a model that loaded */
    free(in);
    free(out);
    ms_nn_free(m);
    return 0;
}
