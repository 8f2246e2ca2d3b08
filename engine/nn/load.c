/*
 * nn/load: a dense network from a safetensors file. The file is mapped and parsed in place;
 * every offset and size in the header is checked against the bytes that are really there
 * before anything is read, so a malformed or truncated file is an error message, never a
 * crash. Tensors are copied out (converted to F32) into aligned buffers the model owns, because
 * safetensors data need not be 4-byte aligned, and the mapping is dropped.
 */
#include "nn/internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/core.h"

/* safetensors' own reader refuses headers over 100 MB; so do we, before parsing any of it. */
#define NN_MAX_HEADER (100u * 1000u * 1000u)
#define NN_MAX_LAYERS 1024
#define NN_MAX_RANK   8
#define NN_SHAPE_TEXT 96

typedef enum { DT_F32, DT_F16, DT_BF16 } nn_dtype_t;

/* A tensor as the header describes it, already checked against the data section. */
typedef struct nn_tensor {
    int present;
    nn_dtype_t dtype;
    size_t rank;
    size_t shape[NN_MAX_RANK];
    size_t count; /* elements */
    const unsigned char *data;
} nn_tensor_t;

typedef struct nn_parse {
    const char *name;
    char *err;
    size_t errlen;
    const unsigned char *data; /* the data section, after the header */
    size_t data_len;
    nn_tensor_t weight[NN_MAX_LAYERS], bias[NN_MAX_LAYERS];
    size_t n_layers; /* highest layer index seen + 1 */
    nn_act_t hidden, output;
} nn_parse_t;

int nn_errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

const char *nn_act_name(nn_act_t act)
{
    static const char *const names[] = {"relu", "tanh", "sigmoid", "identity", "softmax"};
    return names[act];
}

static void shape_text(const nn_tensor_t *t, char *out, size_t cap)
{
    size_t n = (size_t)snprintf(out, cap, "[");
    for (size_t i = 0; i < t->rank && n < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, "%s%zu", i ? "," : "", t->shape[i]);
    if (n < cap)
        snprintf(out + n, cap - n, "]");
}

/* "layers.<i>.weight" or "layers.<i>.bias": the index, or -1 when the name is neither. */
static long layer_index(const char *key, int *is_bias)
{
    if (strncmp(key, "layers.", 7) != 0)
        return -1;
    const char *p = key + 7;
    long idx = 0;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9'))
        return -1;
    for (; *p >= '0' && *p <= '9'; p++) {
        idx = idx * 10 + (*p - '0');
        if (idx >= NN_MAX_LAYERS)
            return -2;
    }
    if (strcmp(p, ".weight") == 0)
        *is_bias = 0;
    else if (strcmp(p, ".bias") == 0)
        *is_bias = 1;
    else
        return -1;
    return idx;
}

static int parse_dtype(nn_parse_t *ps, const char *key, json_t *v, nn_dtype_t *dt, size_t *esize)
{
    const char *s = json_string_value(v);
    if (!s)
        return nn_errf(ps->err, ps->errlen, "%s: %s: dtype must be a string", ps->name, key);
    if (strcmp(s, "F32") == 0)
        *dt = DT_F32, *esize = 4;
    else if (strcmp(s, "F16") == 0)
        *dt = DT_F16, *esize = 2;
    else if (strcmp(s, "BF16") == 0)
        *dt = DT_BF16, *esize = 2;
    else
        return nn_errf(ps->err, ps->errlen, "%s: %s: dtype %.20s is not supported (F32, F16, BF16)",
                       ps->name, key, s);
    return 0;
}

static int parse_shape(nn_parse_t *ps, const char *key, json_t *v, nn_tensor_t *t)
{
    if (!json_is_array(v) || json_array_size(v) > NN_MAX_RANK)
        return nn_errf(ps->err, ps->errlen, "%s: %s: shape must be an array of at most %d sizes",
                       ps->name, key, NN_MAX_RANK);
    t->rank = json_array_size(v);
    t->count = 1;
    for (size_t i = 0; i < t->rank; i++) {
        json_t *d = json_array_get(v, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return nn_errf(ps->err, ps->errlen, "%s: %s: shape[%zu] is not a non-negative integer",
                           ps->name, key, i);
        t->shape[i] = (size_t)json_integer_value(d);
        if (__builtin_mul_overflow(t->count, t->shape[i], &t->count))
            return nn_errf(ps->err, ps->errlen, "%s: %s: shape is too large", ps->name, key);
    }
    return 0;
}

/* data_offsets [begin, end] are relative to the data section and must lie inside it. */
static int parse_offsets(nn_parse_t *ps, const char *key, json_t *v, size_t want, nn_tensor_t *t)
{
    json_t *jb = json_array_get(v, 0), *je = json_array_get(v, 1);
    if (!json_is_array(v) || json_array_size(v) != 2 || !json_is_integer(jb) ||
        !json_is_integer(je))
        return nn_errf(ps->err, ps->errlen, "%s: %s: data_offsets must be [begin, end]", ps->name,
                       key);
    json_int_t b = json_integer_value(jb), e = json_integer_value(je);
    if (b < 0 || e < b || (uint64_t)e > ps->data_len)
        return nn_errf(ps->err, ps->errlen,
                       "%s: %s: data_offsets [%" JSON_INTEGER_FORMAT ", %" JSON_INTEGER_FORMAT
                       "] are outside the %zu data bytes (file truncated?)",
                       ps->name, key, b, e, ps->data_len);
    if ((uint64_t)(e - b) != want)
        return nn_errf(ps->err, ps->errlen,
                       "%s: %s: data_offsets span %" JSON_INTEGER_FORMAT
                       " bytes but the shape and dtype need %zu",
                       ps->name, key, e - b, want);
    t->data = ps->data + b;
    return 0;
}

static int parse_tensor(nn_parse_t *ps, const char *key, json_t *v)
{
    int is_bias = 0;
    long idx = layer_index(key, &is_bias);
    if (idx == -2)
        return nn_errf(ps->err, ps->errlen, "%s: %s: more than %d layers", ps->name, key,
                       NN_MAX_LAYERS);
    if (idx < 0)
        return nn_errf(ps->err, ps->errlen,
                       "%s: unexpected tensor '%.80s' (expected layers.N.weight and layers.N.bias)",
                       ps->name, key);
    if (!json_is_object(v))
        return nn_errf(ps->err, ps->errlen,
                       "%s: %s: must be an object {dtype, shape, data_offsets}", ps->name, key);
    nn_tensor_t *t = is_bias ? &ps->bias[idx] : &ps->weight[idx];
    size_t esize, bytes;
    if (parse_dtype(ps, key, json_object_get(v, "dtype"), &t->dtype, &esize) != 0 ||
        parse_shape(ps, key, json_object_get(v, "shape"), t) != 0)
        return -1;
    if (__builtin_mul_overflow(t->count, esize, &bytes))
        return nn_errf(ps->err, ps->errlen, "%s: %s: shape is too large", ps->name, key);
    if (parse_offsets(ps, key, json_object_get(v, "data_offsets"), bytes, t) != 0)
        return -1;
    t->present = 1;
    if ((size_t)idx + 1 > ps->n_layers)
        ps->n_layers = (size_t)idx + 1;
    return 0;
}

static int parse_act(nn_parse_t *ps, json_t *meta, const char *key, int allow_softmax,
                     nn_act_t *out)
{
    json_t *v = json_object_get(meta, key);
    if (!v)
        return 0;
    const char *s = json_string_value(v);
    static const nn_act_t acts[] = {NN_RELU, NN_TANH, NN_SIGMOID, NN_IDENTITY, NN_SOFTMAX};
    for (size_t i = 0; s && i < sizeof acts / sizeof acts[0]; i++) {
        if (strcmp(s, nn_act_name(acts[i])) == 0 && (acts[i] != NN_SOFTMAX || allow_softmax)) {
            *out = acts[i];
            return 0;
        }
    }
    return nn_errf(ps->err, ps->errlen, "%s: __metadata__.%s must be one of %s", ps->name, key,
                   allow_softmax ? "softmax, identity, sigmoid, relu, tanh"
                                 : "relu, tanh, sigmoid, identity");
}

/* __metadata__ is a string -> string map (safetensors); we read two keys and ignore the rest. */
static int parse_metadata(nn_parse_t *ps, json_t *meta)
{
    if (!json_is_object(meta))
        return nn_errf(ps->err, ps->errlen, "%s: __metadata__ must be an object", ps->name);
    if (parse_act(ps, meta, "activation", 0, &ps->hidden) != 0 ||
        parse_act(ps, meta, "output", 1, &ps->output) != 0)
        return -1;
    return 0;
}

/* Every layer 0..n-1 has a [out, in] weight and an [out] bias, and each takes what the one
 * before it gives. */
static int check_layers(nn_parse_t *ps)
{
    if (ps->n_layers == 0)
        return nn_errf(ps->err, ps->errlen,
                       "%s: no layers (expected tensors layers.0.weight, layers.0.bias, ...)",
                       ps->name);
    char a[NN_SHAPE_TEXT], b[NN_SHAPE_TEXT];
    for (size_t i = 0; i < ps->n_layers; i++) {
        nn_tensor_t *w = &ps->weight[i], *bs = &ps->bias[i];
        if (!w->present || !bs->present)
            return nn_errf(ps->err, ps->errlen, "%s: layers.%zu.%s is missing", ps->name, i,
                           w->present ? "bias" : "weight");
        shape_text(w, a, sizeof a);
        shape_text(bs, b, sizeof b);
        if (w->rank != 2 || w->shape[0] == 0 || w->shape[1] == 0)
            return nn_errf(ps->err, ps->errlen,
                           "%s: layers.%zu.weight is %s but must be [out,in] with out, in > 0",
                           ps->name, i, a);
        if (bs->rank != 1 || bs->shape[0] != w->shape[0])
            return nn_errf(ps->err, ps->errlen,
                           "%s: layers.%zu.bias is %s but layer %zu has %zu outputs", ps->name, i,
                           b, i, w->shape[0]);
        if (i > 0 && w->shape[1] != ps->weight[i - 1].shape[0])
            return nn_errf(ps->err, ps->errlen,
                           "%s: layers.%zu.weight is %s but layer %zu outputs %zu", ps->name, i, a,
                           i - 1, ps->weight[i - 1].shape[0]);
    }
    return 0;
}

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) { /* inf, nan */
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Little-endian bytes to host floats, whatever the host's byte order and the data's alignment. */
static void convert(const nn_tensor_t *t, float *dst)
{
    const unsigned char *p = t->data;
    for (size_t i = 0; i < t->count; i++) {
        uint32_t bits;
        if (t->dtype == DT_F32) {
            bits = (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 | (uint32_t)p[4 * i + 2] << 16 |
                   (uint32_t)p[4 * i + 3] << 24;
        } else {
            uint16_t h = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
            if (t->dtype == DT_F16) {
                dst[i] = half_to_float(h);
                continue;
            }
            bits = (uint32_t)h << 16;
        }
        memcpy(&dst[i], &bits, 4);
    }
}

static float *copy_tensor(const nn_tensor_t *t)
{
    float *dst = malloc(t->count * sizeof(float));
    if (dst)
        convert(t, dst);
    return dst;
}

static ms_nn_t *build(nn_parse_t *ps)
{
    ms_nn_t *m = calloc(1, sizeof *m);
    if (!m || !(m->layers = calloc(ps->n_layers, sizeof *m->layers))) {
        free(m);
        nn_errf(ps->err, ps->errlen, "%s: out of memory", ps->name);
        return NULL;
    }
    m->n_layers = ps->n_layers;
    m->hidden = ps->hidden;
    m->output = ps->output;
    for (size_t i = 0; i < m->n_layers; i++) {
        nn_layer_t *l = &m->layers[i];
        l->out = ps->weight[i].shape[0];
        l->in = ps->weight[i].shape[1];
        l->w = copy_tensor(&ps->weight[i]);
        l->b = copy_tensor(&ps->bias[i]);
        if (l->out > m->max_width)
            m->max_width = l->out;
        if (!l->w || !l->b) {
            ms_nn_free(m);
            nn_errf(ps->err, ps->errlen, "%s: out of memory", ps->name);
            return NULL;
        }
    }
    return m;
}

static int parse_header(nn_parse_t *ps, const unsigned char *p, size_t len)
{
    if (len < 8)
        return nn_errf(ps->err, ps->errlen,
                       "%s: file is %zu bytes, too short for the 8-byte header length", ps->name,
                       len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | p[i];
    if (n > NN_MAX_HEADER)
        return nn_errf(ps->err, ps->errlen,
                       "%s: header length %" PRIu64
                       " is over the %u-byte limit (not a safetensors file?)",
                       ps->name, n, NN_MAX_HEADER);
    if (n > len - 8)
        return nn_errf(ps->err, ps->errlen,
                       "%s: truncated: the header is %" PRIu64 " bytes but only %zu follow",
                       ps->name, n, len - 8);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)p + 8, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return nn_errf(ps->err, ps->errlen, "%s: header is not valid JSON: %s (byte %d)", ps->name,
                       jerr.text, jerr.position);
    ps->data = p + 8 + n;
    ps->data_len = len - 8 - (size_t)n;
    int rc = 0;
    if (!json_is_object(root))
        rc = nn_errf(ps->err, ps->errlen, "%s: header must be a JSON object", ps->name);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
    {
        if (rc != 0)
            break;
        rc = strcmp(key, "__metadata__") == 0 ? parse_metadata(ps, v) : parse_tensor(ps, key, v);
    }
    json_decref(root);
    return rc != 0 ? -1 : check_layers(ps);
}

int ms_nn_parse_device(const char *name, ms_nn_device_t *out)
{
    static const char *const names[] = {"auto", "cpu", "cuda"};
    for (int i = 0; i < 3; i++) {
        if (name && strcmp(name, names[i]) == 0) {
            *out = (ms_nn_device_t)i;
            return 0;
        }
    }
    return -1;
}

/* Puts the model on the device asked for. "auto" without a usable GPU says why once per process
 * (every model of a replica would otherwise repeat it) and stays on the CPU. */
static int place(ms_nn_t *m, ms_nn_device_t device, const char *name, char *err, size_t errlen)
{
    static int said;
    char why[256];
    if (device != MS_NN_CPU) {
        m->gpu = nn_cuda_open(m, why, sizeof why);
        if (m->gpu)
            return 0;
        if (device == MS_NN_CUDA)
            return nn_errf(err, errlen, "%s: device \"cuda\" asked for but %s", name, why);
        if (!said++)
            ms_info("nn: %s; dense models run on the CPU", why);
    }
    if (nn_blas_load(why, sizeof why) != 0)
        return nn_errf(err, errlen, "%s: %s", name, why);
    return 0;
}

ms_nn_t *ms_nn_load_buffer(const void *data, size_t len, const char *name, ms_nn_device_t device,
                           char *err, size_t errlen)
{
    /* The per-layer tables are large: keep them off the (coroutine-sized) stack. */
    nn_parse_t *ps = calloc(1, sizeof *ps);
    if (!ps) {
        nn_errf(err, errlen, "%s: out of memory", name);
        return NULL;
    }
    ps->name = name;
    ps->err = err;
    ps->errlen = errlen;
    ps->hidden = NN_RELU;
    ps->output = NN_SOFTMAX;
    ms_nn_t *m = parse_header(ps, data, len) == 0 ? build(ps) : NULL;
    free(ps);
    if (m && place(m, device, name, err, errlen) != 0) {
        ms_nn_free(m);
        m = NULL;
    }
    return m;
}

ms_nn_t *ms_nn_load(const char *path, ms_nn_device_t device, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        nn_errf(err, errlen, "%s: %s", path, fd < 0 ? strerror(errno) : "not a regular file");
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    size_t len = (size_t)st.st_size;
    ms_nn_t *m;
    if (len == 0) { /* mmap refuses an empty mapping; the parser gives the real message */
        m = ms_nn_load_buffer("", 0, path, device, err, errlen);
    } else {
        void *p = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            nn_errf(err, errlen, "%s: cannot map: %s", path, strerror(errno));
            close(fd);
            return NULL;
        }
        m = ms_nn_load_buffer(p, len, path, device, err, errlen);
        munmap(p, len);
    }
    close(fd);
    return m;
}

void ms_nn_free(ms_nn_t *m)
{
    if (!m)
        return;
    nn_cuda_close(m->gpu);
    for (size_t i = 0; i < m->n_layers; i++) {
        free(m->layers[i].w);
        free(m->layers[i].b);
    }
    free(m->layers);
    free(m->scratch[0]);
    free(m->scratch[1]);
    free(m);
}

size_t ms_nn_input_width(const ms_nn_t *m)
{
    return m->layers[0].in;
}

size_t ms_nn_output_width(const ms_nn_t *m)
{
    return m->layers[m->n_layers - 1].out;
}

size_t ms_nn_layer_count(const ms_nn_t *m)
{
    return m->n_layers;
}

void ms_nn_layer_shape(const ms_nn_t *m, size_t i, size_t *in, size_t *out)
{
    *in = m->layers[i].in;
    *out = m->layers[i].out;
}

const char *ms_nn_device_name(const ms_nn_t *m)
{
    return m->gpu ? "cuda" : "cpu";
}

const char *ms_nn_activation_name(const ms_nn_t *m)
{
    return nn_act_name(m->hidden);
}

const char *ms_nn_output_name(const ms_nn_t *m)
{
    return nn_act_name(m->output);
}
