/*
 * Unit tests of the dense-model runtime (engine/nn): a hand-written two-layer safetensors file
 * gives the outputs worked out by hand below; F16 and BF16 give the same; every malformed file
 * (each truncation, bad JSON, wrong shapes, offsets outside the data, a huge header length,
 * ...) is a clear error; a batch of 32 gives the same rows as 32 batches of 1; and the Lua
 * module "moonserve.nn" (paths relative to its folder, forward/predict/info, its errors).
 */
#include <lauxlib.h>
#include <lualib.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nn/nn.h"
#include "test.h"

static char tmpdir[] = "/tmp/ms_test_nn_XXXXXX";

#define ASSERT_NEAR(a, b, tol)                                                                     \
    do {                                                                                           \
        double _a = (a), _b = (b);                                                                 \
        ms_test_checks++;                                                                          \
        if (!(fabs(_a - _b) <= (tol))) {                                                           \
            fprintf(stderr, "%s:%d: %s ~= %s failed: %.9g != %.9g\n", __FILE__, __LINE__, #a, #b,  \
                    _a, _b);                                                                       \
            ms_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

/* A safetensors file: the 8-byte little-endian header length, the header, then `data`. */
typedef struct st_file {
    unsigned char *p;
    size_t len;
} st_file_t;

static st_file_t st_build(const char *header, const void *data, size_t data_len)
{
    size_t n = strlen(header);
    st_file_t f = {malloc(8 + n + data_len + 1), 8 + n + data_len};
    for (int i = 0; i < 8; i++)
        f.p[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(f.p + 8, header, n);
    if (data_len)
        memcpy(f.p + 8 + n, data, data_len);
    return f;
}

/*
 * The tiny network, input 2 -> hidden 3 (ReLU) -> output 2 (softmax):
 *   W0 = [[1, 0], [0, 1], [1, -1]]   b0 = [0, 0.5, -1]
 *   W1 = [[1, 1, 1], [-1, 0, 2]]     b1 = [0, 0.5]
 * For x = [2, 1]:  W0.x + b0 = [2, 1.5, 0]  -> ReLU [2, 1.5, 0]  -> logits [3.5, -1.5]
 * For x = [-1, 3]: W0.x + b0 = [-1, 3.5, -5] -> ReLU [0, 3.5, 0] -> logits [3.5, 0.5]
 * and softmax of two logits is p0 = 1 / (1 + e^(z1 - z0)).
 */
static const float TINY[] = {1, 0, 0, 1,  1, -1, /* W0 */ 0, 0.5f, -1, /* b0 */
                             1, 1, 1, -1, 0, 2,  /* W1 */ 0, 0.5f /* b1 */};
static const char TINY_HEADER_FMT[] =
    "{\"layers.0.weight\":{\"dtype\":\"%s\",\"shape\":[3,2],\"data_offsets\":[0,%d]},"
    "\"layers.0.bias\":{\"dtype\":\"%s\",\"shape\":[3],\"data_offsets\":[%d,%d]},"
    "\"layers.1.weight\":{\"dtype\":\"%s\",\"shape\":[2,3],\"data_offsets\":[%d,%d]},"
    "\"layers.1.bias\":{\"dtype\":\"%s\",\"shape\":[2],\"data_offsets\":[%d,%d]}%s}";

static st_file_t tiny_file(const char *dtype, int esize, const char *extra)
{
    char header[1024];
    int o1 = 6 * esize, o2 = 9 * esize, o3 = 15 * esize, o4 = 17 * esize;
    snprintf(header, sizeof header, TINY_HEADER_FMT, dtype, o1, dtype, o1, o2, dtype, o2, o3, dtype,
             o3, o4, extra);
    unsigned char data[17 * 4];
    for (int i = 0; i < 17; i++) {
        uint32_t bits;
        memcpy(&bits, &TINY[i], 4);
        if (esize == 4) {
            for (int b = 0; b < 4; b++)
                data[4 * i + b] = (unsigned char)(bits >> (8 * b));
        } else {
            /* Every weight here is exact in both 16-bit formats: the bits are derived by hand
             * (sign, exponent rebiased from 127 to 15 for F16, the high half for BF16). */
            uint16_t h;
            if (strcmp(dtype, "BF16") == 0)
                h = (uint16_t)(bits >> 16);
            else
                h = bits == 0
                        ? 0
                        : (uint16_t)((bits >> 16 & 0x8000) | ((((bits >> 23) & 0xff) - 112) << 10) |
                                     ((bits >> 13) & 0x3ff));
            data[2 * i] = (unsigned char)h;
            data[2 * i + 1] = (unsigned char)(h >> 8);
        }
    }
    return st_build(header, data, (size_t)(17 * esize));
}

static ms_nn_t *load(st_file_t f, char *err, size_t errlen)
{
    return ms_nn_load_buffer(f.p, f.len, "t.safetensors", MS_NN_CPU, err, errlen);
}

static void check_tiny_outputs(ms_nn_t *m)
{
    const float in[4] = {2, 1, -1, 3};
    float out[4];
    char err[256];
    ASSERT_INT_EQ(ms_nn_forward(m, in, 2, out, err, sizeof err), 0);
    ASSERT_NEAR(out[0], 1 / (1 + exp(-1.5 - 3.5)), 1e-6);
    ASSERT_NEAR(out[1], 1 - 1 / (1 + exp(-1.5 - 3.5)), 1e-6);
    ASSERT_NEAR(out[2], 1 / (1 + exp(0.5 - 3.5)), 1e-6);
    ASSERT_NEAR(out[3], 1 - 1 / (1 + exp(0.5 - 3.5)), 1e-6);
}

static void test_tiny(void)
{
    char err[256] = "";
    st_file_t f = tiny_file("F32", 4, "");
    ms_nn_t *m = load(f, err, sizeof err);
    ASSERT_TRUE(m != NULL);
    if (!m) {
        fprintf(stderr, "load: %s\n", err);
        free(f.p);
        return;
    }
    ASSERT_INT_EQ(ms_nn_input_width(m), 2);
    ASSERT_INT_EQ(ms_nn_output_width(m), 2);
    ASSERT_INT_EQ(ms_nn_layer_count(m), 2);
    size_t in, out;
    ms_nn_layer_shape(m, 1, &in, &out);
    ASSERT_INT_EQ(in, 3);
    ASSERT_INT_EQ(out, 2);
    ASSERT_STR_EQ(ms_nn_device_name(m), "cpu");
    ASSERT_STR_EQ(ms_nn_activation_name(m), "relu");
    ASSERT_STR_EQ(ms_nn_output_name(m), "softmax");
    check_tiny_outputs(m);
    float none[1];
    ASSERT_INT_EQ(ms_nn_forward(m, NULL, 0, none, err, sizeof err), 0); /* empty batch */
    ms_nn_free(m);
    free(f.p);
}

static void test_half_formats(void)
{
    const char *dtypes[] = {"F16", "BF16"};
    for (int i = 0; i < 2; i++) {
        char err[256] = "";
        st_file_t f = tiny_file(dtypes[i], 2, "");
        ms_nn_t *m = load(f, err, sizeof err);
        ASSERT_TRUE(m != NULL);
        if (m)
            check_tiny_outputs(m);
        ms_nn_free(m);
        free(f.p);
    }
}

/* __metadata__ changes the activations: identity everywhere gives the raw affine maps. */
static void test_metadata(void)
{
    char err[256] = "";
    st_file_t f = tiny_file("F32", 4,
                            ",\"__metadata__\":{\"format\":\"pt\",\"activation\":\"identity\","
                            "\"output\":\"identity\"}");
    ms_nn_t *m = load(f, err, sizeof err);
    ASSERT_TRUE(m != NULL);
    if (m) {
        const float in[2] = {-1, 3};
        float out[2];
        ASSERT_INT_EQ(ms_nn_forward(m, in, 1, out, err, sizeof err), 0);
        /* h = [-1, 3.5, -5] unclipped: z0 = -1 + 3.5 - 5 = -2.5, z1 = 1 - 10 + 0.5 = -8.5 */
        ASSERT_NEAR(out[0], -2.5, 1e-6);
        ASSERT_NEAR(out[1], -8.5, 1e-6);
        ASSERT_STR_EQ(ms_nn_output_name(m), "identity");
    }
    ms_nn_free(m);
    free(f.p);
}

static void expect_error(st_file_t f, const char *needle)
{
    char err[512] = "";
    ms_nn_t *m = load(f, err, sizeof err);
    ASSERT_TRUE(m == NULL);
    ms_nn_free(m);
    ASSERT_CONTAINS(err, "t.safetensors: ");
    ASSERT_CONTAINS(err, needle);
    free(f.p);
}

static void expect_header_error(const char *header, size_t data_len, const char *needle)
{
    unsigned char data[256] = {0};
    expect_error(st_build(header, data, data_len), needle);
}

#define T(name, shape, b, e)                                                                       \
    "\"" name "\":{\"dtype\":\"F32\",\"shape\":" shape ",\"data_offsets\":[" #b "," #e "]}"

static void test_shape_errors(void)
{
    expect_header_error(
        "{" T("layers.0.weight", "[4,2]", 0, 32) "," T("layers.0.bias", "[4]", 32, 48) "," T(
            "layers.1.weight", "[3,5]", 48, 108) "," T("layers.1.bias", "[3]", 108, 120) "}",
        120, "layers.1.weight is [3,5] but layer 0 outputs 4");
    expect_header_error(
        "{" T("layers.0.weight", "[4,2]", 0, 32) "," T("layers.0.bias", "[3]", 32, 44) "}", 44,
        "layers.0.bias is [3] but layer 0 has 4 outputs");
    expect_header_error("{" T("layers.0.weight", "[4,2]", 0, 32) "}", 32,
                        "layers.0.bias is missing");
    expect_header_error(
        "{" T("layers.1.weight", "[4,2]", 0, 32) "," T("layers.1.bias", "[4]", 32, 48) "}", 48,
        "layers.0.weight is missing");
    expect_header_error(
        "{" T("layers.0.weight", "[8]", 0, 32) "," T("layers.0.bias", "[8]", 32, 64) "}", 64,
        "layers.0.weight is [8] but must be [out,in]");
    expect_header_error(
        "{" T("layers.0.weight", "[0,2]", 0, 0) "," T("layers.0.bias", "[0]", 0, 0) "}", 0,
        "layers.0.weight is [0,2] but must be [out,in] with out, in > 0");
    expect_header_error(
        "{" T("layers.0.weight", "[4,2]", 0, 30) "}", 32,
        "layers.0.weight: data_offsets span 30 bytes but the shape and dtype need 32");
    expect_header_error("{" T("layers.0.weight", "[4294967296,4294967296]", 0, 32) "}", 32,
                        "shape is too large");
    expect_header_error("{" T("layers.0.weight", "[4,-2]", 0, 32) "}", 32,
                        "shape[1] is not a non-negative integer");
    expect_header_error("{}", 0, "no layers (expected tensors layers.0.weight");
}

static void test_header_errors(void)
{
    expect_header_error("{not json", 0, "header is not valid JSON");
    expect_header_error("[1,2]", 0, "header must be a JSON object");
    expect_header_error("{" T("layers.0.weight", "[4,2]", 0, 32) "} trailing", 32,
                        "header is not valid JSON");
    expect_header_error(
        "{\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[0,4]},"
        "\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[0,4]}}",
        4, "duplicate object key");
    expect_header_error("{" T("layers.0.weight", "[4,2]", 0, 99999) "}", 32,
                        "layers.0.weight: data_offsets [0, 99999] are outside the 32 data bytes");
    expect_header_error("{" T("layers.0.weight", "[1,1]", -4, 0) "}", 32, "are outside");
    expect_header_error("{" T("layers.0.weight", "[1,1]", 8, 4) "}", 32, "are outside");
    expect_header_error(
        "{\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[0]}}", 4,
        "data_offsets must be [begin, end]");
    expect_header_error(
        "{\"layers.0.weight\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8,
        "dtype I64 is not supported (F32, F16, BF16)");
    expect_header_error("{\"layers.0.weight\":{\"shape\":[1],\"data_offsets\":[0,8]}}", 8,
                        "layers.0.weight: dtype must be a string");
    expect_header_error("{\"layers.0.weight\":7}", 0, "layers.0.weight: must be an object");
    expect_header_error(
        "{" T("encoder.weight", "[1,1]", 0, 4) "}", 4,
        "unexpected tensor 'encoder.weight' (expected layers.N.weight and layers.N.bias)");
    expect_header_error("{" T("layers.01.weight", "[1,1]", 0, 4) "}", 4, "unexpected tensor");
    expect_header_error("{" T("layers.99999.weight", "[1,1]", 0, 4) "}", 4,
                        "more than 1024 layers");
    expect_header_error("{\"__metadata__\":[]}", 0, "__metadata__ must be an object");
    expect_header_error("{\"__metadata__\":{\"activation\":\"softmax\"}}", 0,
                        "__metadata__.activation must be one of relu, tanh, sigmoid, identity");
    expect_header_error("{\"__metadata__\":{\"output\":\"gelu\"}}", 0,
                        "__metadata__.output must be one of");
}

static void test_length_errors(void)
{
    st_file_t f = tiny_file("F32", 4, "");
    /* Every truncation of a good file is refused with a message (and never read past). */
    for (size_t cut = 0; cut < f.len; cut++) {
        unsigned char *copy = malloc(cut ? cut : 1);
        memcpy(copy, f.p, cut);
        char err[512] = "";
        ms_nn_t *m = ms_nn_load_buffer(copy, cut, "t.safetensors", MS_NN_CPU, err, sizeof err);
        ASSERT_TRUE(m == NULL);
        ASSERT_TRUE(err[0] != '\0');
        ms_nn_free(m);
        free(copy);
    }
    char err[512] = "";
    ASSERT_TRUE(ms_nn_load_buffer(f.p, 5, "t.safetensors", MS_NN_CPU, err, sizeof err) == NULL);
    ASSERT_CONTAINS(err, "file is 5 bytes, too short for the 8-byte header length");
    ASSERT_TRUE(ms_nn_load_buffer(f.p, 20, "t.safetensors", MS_NN_CPU, err, sizeof err) == NULL);
    ASSERT_CONTAINS(err, "truncated: the header is");
    ASSERT_TRUE(ms_nn_load_buffer(f.p, f.len - 1, "t.safetensors", MS_NN_CPU, err, sizeof err) ==
                NULL);
    ASSERT_CONTAINS(err, "layers.1.bias: data_offsets [60, 68] are outside the 67 data bytes");
    /* A header length of 2^64 - 1, and one just over the 100 MB limit. */
    memset(f.p, 0xff, 8);
    ASSERT_TRUE(ms_nn_load_buffer(f.p, f.len, "t.safetensors", MS_NN_CPU, err, sizeof err) == NULL);
    ASSERT_CONTAINS(err, "header length 18446744073709551615 is over the 100000000-byte limit");
    uint64_t n = 100000001;
    for (int i = 0; i < 8; i++)
        f.p[i] = (unsigned char)(n >> (8 * i));
    ASSERT_TRUE(ms_nn_load_buffer(f.p, f.len, "t.safetensors", MS_NN_CPU, err, sizeof err) == NULL);
    ASSERT_CONTAINS(err, "is over the 100000000-byte limit");
    free(f.p);
}

/* A deterministic pseudo-random 16 -> 24 -> 5 network, written as F32. */
static st_file_t random_file(void)
{
    enum { IN = 16, H = 24, OUT = 5 };
    static float data[H * IN + H + OUT * H + OUT];
    uint32_t s = 12345;
    for (size_t i = 0; i < sizeof data / sizeof data[0]; i++) {
        s = s * 1664525u + 1013904223u;
        data[i] = (float)((int)(s >> 16 & 0xffff) - 32768) / 32768.0f;
    }
    char header[1024];
    int o1 = H * IN * 4, o2 = o1 + H * 4, o3 = o2 + OUT * H * 4, o4 = o3 + OUT * 4;
    snprintf(header, sizeof header,
             "{\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[%d,%d],\"data_offsets\":[0,%d]},"
             "\"layers.0.bias\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[%d,%d]},"
             "\"layers.1.weight\":{\"dtype\":\"F32\",\"shape\":[%d,%d],\"data_offsets\":[%d,%d]},"
             "\"layers.1.bias\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[%d,%d]}}",
             H, IN, o1, H, o1, o2, OUT, H, o2, o3, OUT, o3, o4);
    return st_build(header, data, sizeof data);
}

static void test_batch_sizes(void)
{
    enum { ROWS = 32, IN = 16, OUT = 5 };
    char err[256];
    st_file_t f = random_file();
    ms_nn_t *m = load(f, err, sizeof err);
    ASSERT_TRUE(m != NULL);
    if (!m) {
        free(f.p);
        return;
    }
    static float in[ROWS * IN], all[ROWS * OUT], one[ROWS * OUT];
    for (int i = 0; i < ROWS * IN; i++)
        in[i] = (float)((i * 7919) % 201 - 100) / 50.0f;
    ASSERT_INT_EQ(ms_nn_forward(m, in, ROWS, all, err, sizeof err), 0);
    for (int r = 0; r < ROWS; r++)
        ASSERT_INT_EQ(ms_nn_forward(m, in + r * IN, 1, one + r * OUT, err, sizeof err), 0);
    /* The same numbers to float rounding (BLAS may sum a lone row in another order). */
    for (int i = 0; i < ROWS * OUT; i++)
        ASSERT_NEAR(all[i], one[i], 1e-6);
    for (int r = 0; r < ROWS; r++) {
        float sum = 0;
        for (int c = 0; c < OUT; c++)
            sum += all[r * OUT + c];
        ASSERT_NEAR(sum, 1, 1e-5); /* softmax rows */
    }
    ms_nn_free(m);
    free(f.p);
}

static char *tmp_path(const char *name)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    return path;
}

static void write_file(const char *name, const void *p, size_t len)
{
    FILE *fp = fopen(tmp_path(name), "wb");
    fwrite(p, 1, len, fp);
    fclose(fp);
}

static void test_files(void)
{
    st_file_t f = tiny_file("F32", 4, "");
    write_file("tiny.safetensors", f.p, f.len);
    write_file("empty.safetensors", "", 0);
    char err[512] = "";
    ms_nn_t *m = ms_nn_load(tmp_path("tiny.safetensors"), MS_NN_CPU, err, sizeof err);
    ASSERT_TRUE(m != NULL);
    if (m)
        check_tiny_outputs(m);
    ms_nn_free(m);
    /* auto: the GPU when there is one, else the CPU; the numbers are the same either way. */
    m = ms_nn_load(tmp_path("tiny.safetensors"), MS_NN_AUTO, err, sizeof err);
    ASSERT_TRUE(m != NULL);
    if (m)
        check_tiny_outputs(m);
    ms_nn_free(m);
    ASSERT_TRUE(ms_nn_load(tmp_path("empty.safetensors"), MS_NN_CPU, err, sizeof err) == NULL);
    ASSERT_CONTAINS(err, "empty.safetensors: file is 0 bytes, too short");
    ASSERT_TRUE(ms_nn_load(tmp_path("missing.safetensors"), MS_NN_CPU, err, sizeof err) == NULL);
    ASSERT_CONTAINS(err, "missing.safetensors: No such file or directory");
    ASSERT_TRUE(ms_nn_load(tmpdir, MS_NN_CPU, err, sizeof err) == NULL);
    ASSERT_CONTAINS(err, ": not a regular file");
    ms_nn_device_t d;
    ASSERT_INT_EQ(ms_nn_parse_device("cuda", &d), 0);
    ASSERT_INT_EQ(d, MS_NN_CUDA);
    ASSERT_INT_EQ(ms_nn_parse_device("tpu", &d), -1);
    free(f.p);
}

/* Runs a Lua chunk in a state where require "moonserve.nn" resolves paths against tmpdir;
 * returns NULL when it ran, else its error message (valid until the next call). */
static const char *lua_run(const char *code)
{
    static char msg[1024];
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushstring(L, tmpdir);
    lua_pushcclosure(L, ms_nn_lua_open, 1);
    lua_setfield(L, -2, "moonserve.nn");
    lua_pop(L, 2);
    const char *res = NULL;
    if (luaL_dostring(L, code) != 0) {
        snprintf(msg, sizeof msg, "%s", lua_tostring(L, -1));
        res = msg;
    }
    lua_close(L);
    return res;
}

static void expect_lua_error(const char *code, const char *needle)
{
    const char *e = lua_run(code);
    ASSERT_TRUE(e != NULL);
    ASSERT_CONTAINS(e, needle);
}

static void test_lua(void)
{
    st_file_t f = tiny_file("F32", 4, "");
    write_file("tiny.safetensors", f.p, f.len);
    free(f.p);
    const char *e =
        lua_run("local nn = require 'moonserve.nn'\n"
                "local m = nn.load('tiny.safetensors', {device = 'cpu'})\n"
                "local s = m:forward({{2, 1}, {-1, 3}})\n"
                "local function near(a, b) assert(math.abs(a - b) < 1e-6, a .. ' vs ' .. b) end\n"
                "near(s[1][1], 1 / (1 + math.exp(-5))); near(s[2][2], 1 - 1 / (1 + math.exp(-3)))\n"
                "assert(#s == 2 and #s[1] == 2)\n"
                "local p = m:predict({{2, 1}, {-1, 3}, {-3, -3}})\n"
                "assert(p[1] == 0 and p[2] == 0 and #p == 3, 'predict')\n"
                "assert(#m:predict({}) == 0)\n"
                "local i = m:info()\n"
                "assert(i.input == 2 and i.output == 2 and i.device == 'cpu', 'info')\n"
                "assert(i.activation == 'relu' and i.output_activation == 'softmax')\n"
                "assert(#i.layers == 2 and i.layers[1].input == 2 and i.layers[1].output == 3)\n"
                "assert(i.layers[2].input == 3 and i.layers[2].output == 2)\n"
                "assert(tostring(m):find('nn model 2 -> 2, 2 layers, cpu', 1, true))\n"
                "assert(getmetatable(m) == 'moonserve.nn.model')\n");
    ASSERT_TRUE(e == NULL);
    if (e)
        fprintf(stderr, "lua: %s\n", e);
    e = lua_run("local nn = require 'moonserve.nn'\n"
                "local m = nn.load('tiny.safetensors')\n"
                "for i = 1, 50 do m:predict({{1, 2}}) end\n"
                "m = nil; collectgarbage(); collectgarbage()\n");
    ASSERT_TRUE(e == NULL);
    if (e)
        fprintf(stderr, "lua: %s\n", e);

    const char *pre = "local nn = require 'moonserve.nn'\nlocal m = nn.load('tiny.safetensors')\n";
    char code[1024];
#define LUA_ERR(body, needle)                                                                      \
    (snprintf(code, sizeof code, "%s%s", pre, body), expect_lua_error(code, needle))
    LUA_ERR("m:forward({{1, 2, 3}})", "model:forward: row 1 has 3 values but the model takes 2");
    LUA_ERR("m:predict({{1, 2}, {1}})", "model:predict: row 2 has 1 values but the model takes 2");
    LUA_ERR("m:forward({{1, 'x'}})", "model:forward: row 1, value 2 is a string, not a number");
    LUA_ERR("m:forward({7})", "model:forward: row 1 is a number, not a list of numbers");
    LUA_ERR("m:forward(5)", "bad argument #1 to 'forward' (table expected, got number)");
    LUA_ERR("m.forward({}, {})", "moonserve.nn.model expected");
    LUA_ERR("nn.load('tiny.safetensors', {device = 'tpu'})",
            "nn.load: device must be \"auto\", \"cpu\" or \"cuda\"");
    LUA_ERR("nn.load('tiny.safetensors', {devcie = 'cpu'})", "nn.load: unknown option 'devcie'");
    LUA_ERR("nn.load('nope.safetensors')", "/nope.safetensors: No such file or directory");
    LUA_ERR("nn.load('/dev/null')", "nn.load: /dev/null: not a regular file"); /* absolute: as is */
    /* Lua errors carry the caller's line. */
    LUA_ERR("\nm:forward({{1}})", "[string \"local nn");
    LUA_ERR("\nm:forward({{1}})", ":4: model:forward");
#undef LUA_ERR
}

/* Without a GPU, asking for one is an error that says why; with one, the numbers match. */
static void test_cuda_device(void)
{
    char err[512] = "";
    st_file_t f = tiny_file("F32", 4, "");
    ms_nn_t *m = ms_nn_load_buffer(f.p, f.len, "t.safetensors", MS_NN_CUDA, err, sizeof err);
    if (m) {
        ASSERT_STR_EQ(ms_nn_device_name(m), "cuda");
        check_tiny_outputs(m);
        printf("cuda: a device was found and gave the CPU's numbers\n");
    } else {
        ASSERT_CONTAINS(err, "t.safetensors: device \"cuda\" asked for but ");
        printf("cuda: %s\n", err);
    }
    ms_nn_free(m);
    free(f.p);
}

int main(void)
{
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    int blas_threads_unset = getenv("OPENBLAS_NUM_THREADS") == NULL;
    test_tiny();
    /* The CPU path opened OpenBLAS with one thread, the operator not having said otherwise. */
    if (blas_threads_unset)
        ASSERT_STR_EQ(getenv("OPENBLAS_NUM_THREADS"), "1");
    test_half_formats();
    test_metadata();
    test_shape_errors();
    test_header_errors();
    test_length_errors();
    test_batch_sizes();
    test_files();
    test_lua();
    test_cuda_device();
    const char *names[] = {"tiny.safetensors", "empty.safetensors"};
    for (int i = 0; i < 2; i++)
        unlink(tmp_path(names[i]));
    rmdir(tmpdir);
    return TEST_DONE();
}
