/*
 * Unit tests for engine/gpu: the fake-GPU spec, discovery (fake, without the CUDA libraries, and
 * whatever the real libraries say on this host), placement (fractions in fixed point, best fit,
 * exhaustion and its reasons, release, whole devices, memory), sampling the fake metrics file,
 * the JSON / Lua / Prometheus shapes, and the shipped GPU-utilization policy fed a ctx built
 * from those shapes.
 */
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "autoscale/autoscale.h"
#include "core/core.h"
#include "gpu/gpu.h"
#include "sandbox/sandbox.h"
#include "test.h"

/* ---- helpers -------------------------------------------------------------------------------- */

static const char *const no_cudart[] = {"libmoonserve-test-no-such-cudart.so", NULL};

/* Fake devices from a spec, the environment ignored. */
static ms_gpu_t *fake(const char *spec, const char *metrics)
{
    ms_gpu_options_t o = {.ignore_env = 1, .fake_spec = spec, .fake_metrics = metrics};
    char *err = NULL;
    ms_gpu_t *g = ms_gpu_discover(&o, &err);
    if (!g)
        fprintf(stderr, "discover %s: %s\n", spec, err);
    free(err);
    return g;
}

/* Captures what the process writes to stderr between begin and end (the log goes there). */
typedef struct capture {
    int saved;
    char path[64];
} capture_t;

static void capture_begin(capture_t *c)
{
    snprintf(c->path, sizeof c->path, "/tmp/ms-test-gpu-log.XXXXXX");
    int fd = mkstemp(c->path);
    c->saved = dup(STDERR_FILENO);
    dup2(fd, STDERR_FILENO);
    close(fd);
}

static char *capture_end(capture_t *c)
{
    dup2(c->saved, STDERR_FILENO);
    close(c->saved);
    ms_buf_t b = {0};
    ms_read_file(c->path, &b);
    ms_buf_append_str(&b, "");
    unlink(c->path);
    return b.data;
}

static int count(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ASSERT_TRUE(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static int place(ms_gpu_pool_t *p, double num_gpus, uint64_t mib, ms_gpu_placement_t *pl,
                 char reason[MS_GPU_REASON_MAX])
{
    ms_gpu_request_t req = {.num_gpus = num_gpus, .memory_bytes = mib << 20};
    return ms_gpu_pool_place(p, &req, pl, reason);
}

static void assert_visible(const ms_gpu_t *g, const ms_gpu_placement_t *pl, const char *want)
{
    char *v = ms_gpu_visible_devices(g, pl);
    ASSERT_STR_EQ(v, want);
    free(v);
}

/* ---- the fake spec -------------------------------------------------------------------------- */

static void test_fake_spec_good(void)
{
    ms_gpu_device_t d[MS_GPU_MAX_DEVICES];
    char err[256] = "";
    ASSERT_INT_EQ(
        ms_gpu_parse_fake("2xA100:81920,T4:16384", d, MS_GPU_MAX_DEVICES, err, sizeof err), 3);
    ASSERT_STR_EQ(d[0].name, "A100");
    ASSERT_STR_EQ(d[1].name, "A100");
    ASSERT_STR_EQ(d[2].name, "T4");
    ASSERT_INT_EQ(d[1].index, 1);
    ASSERT_INT_EQ(d[0].memory_total_bytes, 81920ULL << 20);
    ASSERT_INT_EQ(d[2].memory_total_bytes, 16384ULL << 20);
    ASSERT_INT_EQ(ms_gpu_parse_fake("none", d, MS_GPU_MAX_DEVICES, err, sizeof err), 0);
    /* The memory follows the last colon; a name may hold colons and spaces. */
    ASSERT_INT_EQ(ms_gpu_parse_fake("NVIDIA H100 80GB HBM3:81559", d, 4, err, sizeof err), 1);
    ASSERT_STR_EQ(d[0].name, "NVIDIA H100 80GB HBM3");
    ASSERT_INT_EQ(ms_gpu_parse_fake("a:b:1", d, 4, err, sizeof err), 1);
    ASSERT_STR_EQ(d[0].name, "a:b");
    ASSERT_INT_EQ(ms_gpu_parse_fake("64xA:1", d, MS_GPU_MAX_DEVICES, err, sizeof err), 64);
}

static void test_fake_spec_bad(void)
{
    static const struct {
        const char *spec, *error;
    } cases[] = {
        {"A100", "MOONSERVE_FAKE_GPUS entry 1 \"A100\": expected NAME:MEMORY_MIB, e.g. A100:81920"},
        {"A100:abc", "entry 1 \"A100:abc\": memory must be a whole number of MiB"},
        {"A100:0", "memory must be a whole number of MiB from 1"},
        {"A100:-5", "memory must be a whole number of MiB"},
        {"A100:1.5", "memory must be a whole number of MiB"},
        {"A100:99999999999", "memory must be a whole number of MiB"},
        {"A100:81920,", "MOONSERVE_FAKE_GPUS entry 2 is empty: expected [COUNTx]NAME:MEMORY_MIB"},
        {",A100:1", "entry 1 is empty"},
        {"", "entry 1 is empty"},
        {"T4:1,,T4:1", "entry 2 is empty"},
        {"0xA100:1", "entry 1 \"0xA100:1\": the count before 'x' must be 1 to 64 devices"},
        {"65xA100:1", "the count before 'x' must be 1 to 64"},
        {"40xA:1,40xB:1", "entry 2 \"40xB:1\": more than 64 devices in all"},
        {":1024", "entry 1 \":1024\": empty device name"},
        {"2x:1024", "empty device name"},
        {"T4:1,A100", "entry 2 \"A100\": expected NAME:MEMORY_MIB"},
    };
    ms_gpu_device_t d[MS_GPU_MAX_DEVICES];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char err[256] = "";
        ASSERT_INT_EQ(ms_gpu_parse_fake(cases[i].spec, d, MS_GPU_MAX_DEVICES, err, sizeof err), -1);
        ASSERT_CONTAINS(err, cases[i].error);
    }
    char longname[200];
    memset(longname, 'n', 120);
    snprintf(longname + 120, sizeof longname - 120, ":1024");
    char err[256] = "";
    ASSERT_INT_EQ(ms_gpu_parse_fake(longname, d, MS_GPU_MAX_DEVICES, err, sizeof err), -1);
    ASSERT_CONTAINS(err, "device name longer than 95 bytes");
}

/* ---- discovery ------------------------------------------------------------------------------ */

static void test_discover_fake(void)
{
    capture_t c;
    capture_begin(&c);
    ms_gpu_t *g = fake("2xA100:81920", NULL);
    char *log = capture_end(&c);
    ASSERT_TRUE(g != NULL);
    if (!g) {
        free(log);
        return;
    }
    ASSERT_INT_EQ(ms_gpu_count(g), 2);
    ASSERT_STR_EQ(ms_gpu_source_name(g), "fake");
    ASSERT_STR_EQ(ms_gpu_message(g), "");
    ASSERT_STR_EQ(ms_gpu_device(g, 1)->name, "A100");
    ASSERT_TRUE(ms_gpu_device(g, 2) == NULL);
    ASSERT_CONTAINS(log, "2 GPUs (fake): 0 A100 (81920 MiB), 1 A100 (81920 MiB)");
    ASSERT_INT_EQ(count(log, "\n"), 1);
    free(log);
    ms_gpu_free(g);

    /* A bad spec is an error for the caller (the controller refuses to start). */
    ms_gpu_options_t o = {.ignore_env = 1, .fake_spec = "A100"};
    char *err = NULL;
    ASSERT_TRUE(ms_gpu_discover(&o, &err) == NULL);
    ASSERT_CONTAINS(err, "MOONSERVE_FAKE_GPUS entry 1 \"A100\"");
    free(err);

    /* "none" forces the CPU path even where a GPU exists. */
    capture_begin(&c);
    g = fake("none", NULL);
    log = capture_end(&c);
    ASSERT_INT_EQ(ms_gpu_count(g), 0);
    ASSERT_STR_EQ(ms_gpu_source_name(g), "none");
    ASSERT_CONTAINS(log, "no GPU found (MOONSERVE_FAKE_GPUS=none); replicas run on CPU");
    free(log);
    ms_gpu_free(g);
}

static void test_discover_from_env(void)
{
    setenv("MOONSERVE_FAKE_GPUS", "T4:16384", 1);
    char *err = NULL;
    capture_t c;
    capture_begin(&c);
    ms_gpu_t *g = ms_gpu_discover(NULL, &err);
    ASSERT_TRUE(g != NULL);
    ASSERT_INT_EQ(g ? ms_gpu_count(g) : -1, 1);
    ms_gpu_free(g);
    /* ignore_env: the variable is not read, so this takes the CUDA path (no libraries here). */
    ms_gpu_options_t o = {.ignore_env = 1, .cudart = no_cudart};
    g = ms_gpu_discover(&o, &err);
    char *log = capture_end(&c);
    ASSERT_INT_EQ(ms_gpu_count(g), 0);
    ASSERT_CONTAINS(log, "1 GPU (fake): 0 T4 (16384 MiB)");
    ASSERT_CONTAINS(log, "no GPU found (libcudart not loadable");
    free(log);
    ms_gpu_free(g);
    unsetenv("MOONSERVE_FAKE_GPUS");
}

static void test_discover_without_cuda_libs(void)
{
    ms_gpu_options_t o = {.ignore_env = 1, .cudart = no_cudart};
    char *err = NULL;
    capture_t c;
    capture_begin(&c);
    ms_gpu_t *g = ms_gpu_discover(&o, &err);
    for (int i = 0; i < 5; i++)
        ms_gpu_sample(g);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    ms_gpu_placement_t pl;
    char reason[MS_GPU_REASON_MAX];
    ASSERT_INT_EQ(place(p, 0.5, 0, &pl, reason), 1);
    char *log = capture_end(&c);
    ASSERT_INT_EQ(ms_gpu_count(g), 0);
    ASSERT_INT_EQ(ms_gpu_source(g), MS_GPU_SOURCE_NONE);
    ASSERT_CONTAINS(ms_gpu_message(g), "libcudart not loadable: libmoonserve-test-no-such-cudart");
    ASSERT_CONTAINS(reason, "needs 0.5 GPU, no GPU found (libcudart not loadable");
    /* Said once, at discovery; sampling and placing add nothing. */
    ASSERT_INT_EQ(count(log, "no GPU found (libcudart not loadable: "), 1);
    ASSERT_CONTAINS(log, "); replicas run on CPU");
    ASSERT_INT_EQ(count(log, "\n"), 1);
    /* A CPU replica (num_gpus 0) places on nothing and sees no GPU. */
    ASSERT_INT_EQ(place(p, 0, 0, &pl, reason), 0);
    ASSERT_INT_EQ(pl.n_devices, 0);
    assert_visible(g, &pl, "");
    json_t *j = ms_gpu_devices_json(g, p);
    ASSERT_INT_EQ(json_array_size(j), 0);
    json_decref(j);
    ms_buf_t b = {0};
    ms_gpu_metrics_text(g, &b);
    ASSERT_INT_EQ(b.len, 0);
    ms_buf_free(&b);
    free(log);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
}

/* The real libraries, whatever this host has: the toolkit without a driver fails
 * cudaGetDeviceCount (0 devices, said once); a GPU host lists named devices with their memory. */
static void test_discover_real_libraries(void)
{
    ms_gpu_options_t o = {.ignore_env = 1};
    char *err = NULL;
    capture_t c;
    capture_begin(&c);
    ms_gpu_t *g = ms_gpu_discover(&o, &err);
    ms_gpu_sample(g);
    ms_gpu_sample(g);
    char *log = capture_end(&c);
    ASSERT_TRUE(g != NULL);
    if (ms_gpu_count(g) == 0) {
        ASSERT_TRUE(ms_gpu_message(g)[0] != '\0');
        ASSERT_INT_EQ(count(log, "no GPU found ("), 1);
        ASSERT_INT_EQ(count(log, "\n"), 1);
        printf("real discovery: no GPU (%s)\n", ms_gpu_message(g));
    } else {
        ASSERT_STR_EQ(ms_gpu_source_name(g), "cuda");
        for (int i = 0; i < ms_gpu_count(g); i++) {
            ASSERT_TRUE(ms_gpu_device(g, i)->name[0] != '\0');
            ASSERT_TRUE(ms_gpu_device(g, i)->memory_total_bytes > 0);
        }
        printf("real discovery: %s", log);
    }
    free(log);
    ms_gpu_free(g);
}

/* ---- placement ------------------------------------------------------------------------------ */

static void test_fractions_pack_exactly(void)
{
    ms_gpu_t *g = fake("A100:81920", NULL);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    ms_gpu_placement_t pl[10];
    char reason[MS_GPU_REASON_MAX];
    for (int i = 0; i < 4; i++) {
        ASSERT_INT_EQ(place(p, 0.25, 0, &pl[i], reason), 0);
        ASSERT_INT_EQ(pl[i].n_devices, 1);
        assert_visible(g, &pl[i], "0");
    }
    ASSERT_INT_EQ(ms_gpu_pool_used_units(p, 0), MS_GPU_UNITS);
    /* Exhausted: the fifth stays pending, and says why. */
    ms_gpu_placement_t extra;
    ASSERT_INT_EQ(place(p, 0.25, 0, &extra, reason), 1);
    ASSERT_STR_EQ(reason, "needs 0.25 GPU, 0 free (device 0: 1 used)");
    /* A stopped replica frees its share; the pending one then fits. */
    ms_gpu_pool_release(p, &pl[2]);
    ASSERT_INT_EQ(pl[2].n_devices, 0);
    ms_gpu_pool_release(p, &pl[2]); /* zeroed: a no-op */
    ASSERT_INT_EQ(ms_gpu_pool_used_units(p, 0), 3 * MS_GPU_UNITS / 4);
    ASSERT_INT_EQ(place(p, 0.25, 0, &extra, reason), 0);
    for (int i = 0; i < 4; i++)
        ms_gpu_pool_release(p, i == 2 ? &extra : &pl[i]);
    ASSERT_INT_EQ(ms_gpu_pool_used_units(p, 0), 0);
    /* Ten tenths: in floating point they would sum past 1. */
    for (int i = 0; i < 10; i++)
        ASSERT_INT_EQ(place(p, 0.1, 0, &pl[i], reason), 0);
    ASSERT_INT_EQ(place(p, 0.0001, 0, &extra, reason), 1);
    for (int i = 0; i < 10; i++)
        ms_gpu_pool_release(p, &pl[i]);
    /* Thirds round to 0.3333 each: three fit, with 0.0001 left. */
    for (int i = 0; i < 3; i++)
        ASSERT_INT_EQ(place(p, 1.0 / 3, 0, &pl[i], reason), 0);
    ASSERT_INT_EQ(ms_gpu_pool_used_units(p, 0), 9999);
    ASSERT_INT_EQ(place(p, 0.5, 0, &extra, reason), 1);
    ASSERT_STR_EQ(reason, "needs 0.5 GPU, 0.0001 free (device 0: 0.9999 used)");
    for (int i = 0; i < 3; i++)
        ms_gpu_pool_release(p, &pl[i]);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
}

static void test_best_fit_and_reasons(void)
{
    ms_gpu_t *g = fake("2xA100:81920", NULL);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    ms_gpu_placement_t a, b, c, d, e;
    char reason[MS_GPU_REASON_MAX];
    ASSERT_INT_EQ(place(p, 0.5, 0, &a, reason), 0);
    ASSERT_INT_EQ(a.devices[0], 0); /* a tie: the lowest index */
    ASSERT_INT_EQ(place(p, 0.25, 0, &b, reason), 0);
    ASSERT_INT_EQ(b.devices[0], 0); /* the fullest that still fits */
    ASSERT_INT_EQ(place(p, 0.5, 0, &c, reason), 0);
    ASSERT_INT_EQ(c.devices[0], 1); /* 0.25 left on device 0: too little */
    ASSERT_INT_EQ(place(p, 0.25, 0, &d, reason), 0);
    ASSERT_INT_EQ(d.devices[0], 0); /* fills device 0 rather than eat into device 1 */
    ASSERT_INT_EQ(place(p, 1, 0, &e, reason), 1);
    ASSERT_STR_EQ(reason, "needs 1 GPU, 0 free (device 0: 1 used, device 1: 0.5 used)");
    ASSERT_INT_EQ(place(p, 0.75, 0, &e, reason), 1);
    ASSERT_STR_EQ(reason, "needs 0.75 GPU, 0.5 free at most on one device (device 0: 1 used, "
                          "device 1: 0.5 used)");
    ms_gpu_pool_release(p, &b);
    ASSERT_INT_EQ(place(p, 0.5, 0, &e, reason), 0);
    ASSERT_INT_EQ(e.devices[0], 1); /* 0.25 free on device 0 again: still too little */
    ms_gpu_pool_release(p, &e);
    ms_gpu_pool_release(p, &a);
    ms_gpu_pool_release(p, &c);
    ms_gpu_pool_release(p, &d);
    ASSERT_INT_EQ(place(p, 2, 0, &e, reason), 0);
    ms_gpu_pool_release(p, &e);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);

    g = fake("A100:81920", NULL);
    p = ms_gpu_pool_new(g);
    ASSERT_INT_EQ(place(p, 0.75, 0, &a, reason), 0);
    ASSERT_INT_EQ(place(p, 0.5, 0, &b, reason), 1);
    ASSERT_STR_EQ(reason, "needs 0.5 GPU, 0.25 free (device 0: 0.75 used)");
    ms_gpu_pool_release(p, &a);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
}

/* A long device list is cut after 8 devices: the reason stays one readable line. */
static void test_reason_lists_at_most_8_devices(void)
{
    ms_gpu_t *g = fake("10xA100:81920", NULL);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    ms_gpu_placement_t pl[10], extra;
    char reason[MS_GPU_REASON_MAX];
    for (int i = 0; i < 10; i++)
        ASSERT_INT_EQ(place(p, 0.75, 0, &pl[i], reason), 0);
    ASSERT_INT_EQ(place(p, 0.5, 0, &extra, reason), 1);
    ASSERT_CONTAINS(reason,
                    "needs 0.5 GPU, 0.25 free at most on one device (device 0: 0.75 used, ");
    ASSERT_CONTAINS(reason, "device 7: 0.75 used, ...)");
    ASSERT_TRUE(strstr(reason, "device 8") == NULL);
    for (int i = 0; i < 10; i++)
        ms_gpu_pool_release(p, &pl[i]);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
}

static void test_whole_devices(void)
{
    ms_gpu_t *g = fake("4xH100:81559", NULL);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    ms_gpu_placement_t a, b, c, d;
    char reason[MS_GPU_REASON_MAX];
    ASSERT_INT_EQ(place(p, 2, 0, &a, reason), 0);
    ASSERT_INT_EQ(a.n_devices, 2);
    assert_visible(g, &a, "0,1");
    ASSERT_INT_EQ(place(p, 0.5, 0, &b, reason), 0);
    ASSERT_INT_EQ(b.devices[0], 2);
    /* A whole-device request never shares: device 2 holds 0.5, so only device 3 is free. */
    ASSERT_INT_EQ(place(p, 2, 0, &c, reason), 1);
    ASSERT_STR_EQ(reason,
                  "needs 2 GPUs, 1 free (device 0: 1 used, device 1: 1 used, device 2: 0.5 used)");
    ASSERT_INT_EQ(place(p, 1, 0, &c, reason), 0);
    assert_visible(g, &c, "3");
    ms_gpu_pool_release(p, &a);
    ASSERT_INT_EQ(place(p, 2, 0, &d, reason), 0);
    assert_visible(g, &d, "0,1");
    ASSERT_INT_EQ(place(p, 8, 0, &a, reason), 1);
    ASSERT_CONTAINS(reason, "needs 8 GPUs, 0 free (device 0: 1 used");
    json_t *ids = ms_gpu_placement_json(&d);
    char *text = json_dumps(ids, JSON_COMPACT);
    ASSERT_STR_EQ(text, "[0,1]");
    free(text);
    json_decref(ids);
    ms_gpu_pool_release(p, &b);
    ms_gpu_pool_release(p, &c);
    ms_gpu_pool_release(p, &d);
    for (int i = 0; i < 4; i++)
        ASSERT_INT_EQ(ms_gpu_pool_used_units(p, i), 0);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
}

static void test_memory(void)
{
    ms_gpu_t *g = fake("T4:16384,A100:81920", NULL);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    ms_gpu_placement_t a, b, c, d;
    char reason[MS_GPU_REASON_MAX];
    /* Device 0 would win the tie, but has too little memory. */
    ASSERT_INT_EQ(place(p, 0.25, 40960, &a, reason), 0);
    ASSERT_INT_EQ(a.devices[0], 1);
    ASSERT_INT_EQ(place(p, 0.25, 40960, &b, reason), 0);
    ASSERT_INT_EQ(b.devices[0], 1);
    ASSERT_INT_EQ(ms_gpu_pool_reserved_bytes(p, 1), 81920ULL << 20);
    /* Device 1 has share left but no memory. */
    ASSERT_INT_EQ(place(p, 0.25, 1, &c, reason), 0);
    ASSERT_INT_EQ(c.devices[0], 0);
    ASSERT_INT_EQ(place(p, 0.25, 40960, &d, reason), 1);
    ASSERT_STR_EQ(reason, "needs 0.25 GPU and 40960 MiB, no device has both free (device 0: 0.25 "
                          "used, 1 of 16384 MiB reserved, device 1: 0.5 used, 81920 of 81920 MiB "
                          "reserved)");
    ASSERT_INT_EQ(place(p, 1, 20000, &d, reason), 1);
    ASSERT_STR_EQ(reason, "needs 1 GPU of 20000 MiB, 0 free (device 0: 0.25 used, device 1: 0.5 "
                          "used)");
    ms_gpu_pool_release(p, &a);
    ms_gpu_pool_release(p, &b);
    ms_gpu_pool_release(p, &c);
    ASSERT_INT_EQ(ms_gpu_pool_reserved_bytes(p, 1), 0);
    /* A whole device too small for the memory is passed over. */
    ASSERT_INT_EQ(place(p, 1, 20000, &d, reason), 0);
    assert_visible(g, &d, "1");
    ASSERT_INT_EQ(place(p, 1, 20000, &a, reason), 1);
    ASSERT_STR_EQ(reason, "needs 1 GPU of 20000 MiB, 0 free (device 0: 16384 MiB total, device 1: "
                          "1 used)");
    ms_gpu_pool_release(p, &d);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
}

static void test_request_check(void)
{
    static const struct {
        double n;
        const char *error;
    } bad[] = {
        {-1, "num_gpus -1: must be a number from 0 to 64"},
        {NAN, "must be a number from 0 to 64"},
        {INFINITY, "must be a number from 0 to 64"},
        {65, "num_gpus 65: must be a number from 0 to 64"},
        {1.5, "num_gpus 1.5: above 1 it must be a whole number of GPUs"},
        {0.00001, "num_gpus 1e-05: below the smallest share, 0.0001"},
    };
    ms_gpu_t *g = fake("A100:81920", NULL);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char err[MS_GPU_REASON_MAX] = "";
        ms_gpu_request_t req = {.num_gpus = bad[i].n};
        ASSERT_INT_EQ(ms_gpu_request_check(&req, err, sizeof err), -1);
        ASSERT_CONTAINS(err, bad[i].error);
        ms_gpu_placement_t pl;
        ASSERT_INT_EQ(ms_gpu_pool_place(p, &req, &pl, err), -1);
        ASSERT_CONTAINS(err, bad[i].error);
    }
    static const double good[] = {0, 0.0001, 0.5, 1, 2, 64};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        char err[MS_GPU_REASON_MAX] = "";
        ms_gpu_request_t req = {.num_gpus = good[i], .memory_bytes = 1};
        ASSERT_INT_EQ(ms_gpu_request_check(&req, err, sizeof err), 0);
    }
    ASSERT_INT_EQ(ms_gpu_pool_used_units(p, 0), 0);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
}

/* ---- sampling and shapes -------------------------------------------------------------------- */

static void test_fake_metrics_file(void)
{
    char path[] = "/tmp/ms-test-gpu-metrics.XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    unlink(path); /* no file yet: idle devices */
    ms_gpu_t *g = fake("2xA100:81920", path);
    const ms_gpu_device_t *d0 = ms_gpu_device(g, 0), *d1 = ms_gpu_device(g, 1);
    ASSERT_INT_EQ(d0->has_sample, 0); /* nothing sampled yet */
    ms_gpu_sample(g);
    ASSERT_INT_EQ(d0->has_sample, 1);
    ASSERT_TRUE(d0->utilization == 0 && d0->memory_used_bytes == 0);

    write_text(path, "[{\"utilization\": 0.75, \"memory_used_bytes\": 1048576}]");
    ms_gpu_sample(g);
    ASSERT_TRUE(d0->utilization == 0.75);
    ASSERT_INT_EQ(d0->memory_used_bytes, 1048576);
    ASSERT_TRUE(d1->utilization == 0 && d1->has_sample);

    /* Re-read on every sample. */
    write_text(path, "[{}, {\"utilization\": 1}]");
    ms_gpu_sample(g);
    ASSERT_TRUE(d0->utilization == 0 && d1->utilization == 1);

    /* Bad files: the previous values stay; warned once until it reads again. */
    static const struct {
        const char *text, *warning;
    } bad[] = {
        {"[{\"utilization\": 1.5}]", "entry 0: utilization must be a number from 0 to 1"},
        {"[{}, {\"memory_used_bytes\": 99999999999999}]",
         "entry 1: memory_used_bytes must be a whole number from 0 to the device's 85899345920 "
         "bytes"},
        {"[{}, {}, {}]", "expected a list of at most 2 objects, one per fake GPU"},
        {"{\"utilization\": 1}", "expected a list"},
        {"[1]", "entry 0 is not an object"},
        {"[{\"utilization\": \"high\"}]", "utilization must be a number"},
        {"[{", "line 1: "},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_text(path, bad[i].text);
        capture_t c;
        capture_begin(&c);
        ms_gpu_sample(g);
        ms_gpu_sample(g);
        char *log = capture_end(&c);
        ASSERT_CONTAINS(log, "MOONSERVE_FAKE_GPU_METRICS ");
        ASSERT_CONTAINS(log, bad[i].warning);
        ASSERT_INT_EQ(count(log, "\n"), 1);
        free(log);
        ASSERT_TRUE(d1->utilization == 1);
        write_text(path, "[{}, {\"utilization\": 1}]");
        ms_gpu_sample(g); /* reads again: the next bad file warns again */
    }
    unlink(path);
    ms_gpu_free(g);
}

static void test_json_and_metrics_text(void)
{
    char path[] = "/tmp/ms-test-gpu-metrics.XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    write_text(path, "[{\"utilization\": 0.5, \"memory_used_bytes\": 2048}]");
    ms_gpu_t *g = fake("A100:81920,x\"y\\z:1024", path);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    ms_gpu_placement_t pl;
    char reason[MS_GPU_REASON_MAX];
    ASSERT_INT_EQ(place(p, 0.25, 1024, &pl, reason), 0);

    /* Before any sample, the measured fields are unknown (null), not zero. */
    json_t *j = ms_gpu_devices_json(g, NULL);
    char *text = json_dumps(json_array_get(j, 0), JSON_COMPACT);
    ASSERT_STR_EQ(text, "{\"index\":0,\"name\":\"A100\",\"utilization\":null,"
                        "\"memory_used_bytes\":null,\"memory_total_bytes\":85899345920}");
    free(text);
    json_decref(j);

    ms_gpu_sample(g);
    j = ms_gpu_devices_json(g, p);
    text = json_dumps(json_array_get(j, 0), JSON_COMPACT);
    ASSERT_STR_EQ(text, "{\"index\":0,\"name\":\"A100\",\"utilization\":0.5,"
                        "\"memory_used_bytes\":2048,\"memory_total_bytes\":85899345920,"
                        "\"allocated\":0.0,\"memory_reserved_bytes\":0}");
    free(text);
    /* Both devices fit; the one left with the least memory wins the tie. */
    text = json_dumps(json_array_get(j, 1), JSON_COMPACT);
    ASSERT_CONTAINS(text, "\"allocated\":0.25,\"memory_reserved_bytes\":1073741824}");
    free(text);
    ASSERT_INT_EQ(json_array_size(j), 2);
    json_decref(j);

    ms_buf_t b = {0};
    ms_gpu_metrics_text(g, &b);
    ASSERT_CONTAINS(b.data, "# TYPE moonserve_gpu_utilization gauge\n");
    ASSERT_CONTAINS(b.data, "moonserve_gpu_utilization{gpu=\"0\",name=\"A100\"} 0.5\n");
    ASSERT_CONTAINS(b.data, "moonserve_gpu_memory_used_bytes{gpu=\"0\",name=\"A100\"} 2048\n");
    ASSERT_CONTAINS(b.data,
                    "moonserve_gpu_memory_total_bytes{gpu=\"0\",name=\"A100\"} 85899345920\n");
    ASSERT_CONTAINS(b.data, "moonserve_gpu_utilization{gpu=\"1\",name=\"x\\\"y\\\\z\"} 0\n");
    ms_buf_free(&b);
    ms_gpu_pool_release(p, &pl);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
    unlink(path);
}

static void test_lua_fill(void)
{
    lua_State *L = luaL_newstate();
    ms_gpu_t *g3 = fake("3xA100:81920", NULL), *g1 = fake("T4:16384", NULL);
    ms_gpu_sample(g3);
    lua_newtable(L);
    ms_gpu_lua_fill(L, -1, g3);
    ASSERT_INT_EQ(lua_gettop(L), 1);
    ASSERT_INT_EQ(lua_objlen(L, 1), 3);
    lua_rawgeti(L, 1, 1);
    const void *first = lua_topointer(L, -1);
    lua_getfield(L, -1, "index");
    ASSERT_INT_EQ(lua_tointeger(L, -1), 0);
    lua_getfield(L, -2, "utilization");
    ASSERT_TRUE(lua_isnumber(L, -1) && lua_tonumber(L, -1) == 0);
    lua_getfield(L, -3, "memory_total_bytes");
    ASSERT_TRUE(lua_tonumber(L, -1) == 81920.0 * 1048576);
    lua_settop(L, 1);

    /* Refilled in place from a smaller list without samples: the first entry table is reused,
     * the rest cut, the unknown fields nil. */
    ms_gpu_lua_fill(L, 1, g1);
    ASSERT_INT_EQ(lua_gettop(L), 1);
    ASSERT_INT_EQ(lua_objlen(L, 1), 1);
    lua_rawgeti(L, 1, 1);
    ASSERT_TRUE(lua_topointer(L, -1) == first);
    lua_getfield(L, -1, "name");
    ASSERT_STR_EQ(lua_tostring(L, -1), "T4");
    lua_getfield(L, -2, "utilization");
    ASSERT_TRUE(lua_isnil(L, -1));
    lua_settop(L, 0);

    ms_gpu_placement_t pl = {.n_devices = 2, .devices = {0, 2}, .units = MS_GPU_UNITS};
    ms_gpu_lua_push_ids(L, &pl);
    ASSERT_INT_EQ(lua_objlen(L, -1), 2);
    lua_rawgeti(L, -1, 2);
    ASSERT_INT_EQ(lua_tointeger(L, -1), 2);
    lua_close(L);
    ms_gpu_free(g3);
    ms_gpu_free(g1);
}

/* ---- the shipped policy --------------------------------------------------------------------- */

static char *policy_path(void)
{
    const char *root = getenv("MS_SOURCE_DIR");
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/scripts/policies/gpu_utilization.lua",
                   root && *root ? root : MS_SOURCE_DIR);
    return b.data;
}

/* Runs policy(ctx, kwargs) once in a sandbox, with ctx built from the module's own shapes: n
 * running replicas r0..r(n-1) holding pls[0..n-1]. Returns the answer, or -1 when it failed. */
static double run_policy(ms_sandbox_t *sb, int module, const ms_gpu_t *g,
                         const ms_gpu_placement_t *pls, int n, const char *kwargs)
{
    lua_State *L = sb->L;
    lua_getfield(L, module, "gpu_utilization_policy");
    lua_createtable(L, 0, 8);
    lua_pushinteger(L, n);
    lua_setfield(L, -2, "current_num_replicas");
    lua_pushinteger(L, n);
    lua_setfield(L, -2, "target_num_replicas");
    lua_newtable(L);
    ms_gpu_lua_fill(L, -1, g);
    lua_setfield(L, -2, "gpus");
    lua_newtable(L); /* running_replicas */
    lua_newtable(L); /* replica_gpu_ids */
    for (int i = 0; i < n; i++) {
        char id[16];
        snprintf(id, sizeof id, "r%d", i);
        lua_pushstring(L, id);
        lua_rawseti(L, -3, i + 1);
        ms_gpu_lua_push_ids(L, &pls[i]);
        lua_setfield(L, -2, id);
    }
    lua_setfield(L, -3, "replica_gpu_ids");
    lua_setfield(L, -2, "running_replicas");
    ms_sandbox_push_json(sb, kwargs);
    if (ms_sandbox_call(sb, 2, 1, 1000000) != 0)
        return -1;
    double want = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return want;
}

static void test_gpu_utilization_policy(void)
{
    char *err = NULL, *path = policy_path();
    ms_sandbox_t *sb = ms_sandbox_new(MS_SANDBOX_DEFAULT_MEM_LIMIT, &err);
    ms_buf_t src = {0};
    ASSERT_INT_EQ(ms_read_file(path, &src), 0);
    ASSERT_INT_EQ(ms_sandbox_load(sb, src.data, src.len, path), 0);
    ASSERT_INT_EQ(ms_sandbox_call(sb, 0, 1, 1000000), 0);
    int module = lua_gettop(sb->L);
    lua_getfield(sb->L, module, "self_test");
    if (ms_sandbox_call(sb, 0, 0, 1000000) != 0) {
        fprintf(stderr, "self_test: %s\n", sb->err);
        ASSERT_TRUE(0);
    }

    char mpath[] = "/tmp/ms-test-gpu-metrics.XXXXXX";
    int fd = mkstemp(mpath);
    close(fd);
    write_text(mpath, "[{\"utilization\": 0.9}, {\"utilization\": 0.9}, {\"utilization\": 0}]");
    ms_gpu_t *g = fake("3xA100:81920", mpath);
    ms_gpu_sample(g);
    ms_gpu_pool_t *p = ms_gpu_pool_new(g);
    ms_gpu_placement_t pls[2];
    char reason[MS_GPU_REASON_MAX];
    ASSERT_INT_EQ(place(p, 1, 0, &pls[0], reason), 0);
    ASSERT_INT_EQ(place(p, 1, 0, &pls[1], reason), 0);
    /* Devices 0 and 1 at 0.9, the idle device 2 held by nobody: 2 x 0.9 / 0.6 = 3. */
    ASSERT_TRUE(run_policy(sb, module, g, pls, 2, "{\"target_utilization\": 0.6}") == 3);
    ASSERT_TRUE(run_policy(sb, module, g, pls, 2, "{\"target_utilization\": 0.9}") == 2);
    ASSERT_TRUE(run_policy(sb, module, g, pls, 2, "") == 3); /* the default target, 0.6 */
    /* Utilization drops: fewer replicas wanted. */
    write_text(mpath, "[{\"utilization\": 0.15}, {\"utilization\": 0.15}]");
    ms_gpu_sample(g);
    ASSERT_TRUE(run_policy(sb, module, g, pls, 2, "{\"target_utilization\": 0.6}") == 0.5);
    /* A bad kwarg is the policy's error (the engine counts it and falls back). */
    ASSERT_TRUE(run_policy(sb, module, g, pls, 2, "{\"target_utilization\": 2}") == -1);
    ASSERT_CONTAINS(sb->err, "target_utilization must be a number in (0, 1]");
    ms_gpu_pool_release(p, &pls[0]);
    ms_gpu_pool_release(p, &pls[1]);
    ms_gpu_pool_free(p);
    ms_gpu_free(g);
    unlink(mpath);
    ms_buf_free(&src);
    ms_sandbox_free(sb);
    free(path);
    free(err);
}

/* Through today's autoscaler (the real policy kind, self_test at load), whose ctx has no GPU
 * fields yet: the policy keeps the target in force and nothing counts as a failure. */
static void test_policy_in_the_autoscaler(void)
{
    char *path = policy_path(), *err = NULL;
    ms_config_lua_ref_t ref = {.path = path, .file = path, .attr = "gpu_utilization_policy"};
    ms_autoscaling_config_t c = {
        .min_replicas = 1,
        .initial_replicas = -1,
        .max_replicas = 10,
        .target_ongoing_requests = 2,
        .metrics_interval_s = 10,
        .look_back_period_s = 30,
        .smoothing_factor = 1,
        .upscale_smoothing_factor = -1,
        .downscale_smoothing_factor = -1,
        .upscaling_factor = -1,
        .downscaling_factor = -1,
        .downscale_to_zero_delay_s = -1,
        .aggregation_function = "mean",
        .policy = &ref,
    };
    ms_autoscaler_t *a = ms_autoscaler_new("app", "Model", &c, 20000, 8u << 20, &err);
    if (!a)
        fprintf(stderr, "autoscaler_new: %s\n", err);
    ASSERT_TRUE(a != NULL);
    if (a) {
        static const char *ids[] = {"r0", "r1"};
        static const double reqs[] = {5, 5};
        ms_autoscale_sample_t s = {0, 2, 2, ids, reqs, 0, 0, NULL};
        ms_autoscaler_record(a, &s);
        ms_autoscale_decision_t d;
        ASSERT_INT_EQ(ms_autoscaler_decide(a, 1, 2, &d), 2);
        json_t *st = ms_autoscaler_status(a);
        json_t *failures = json_object_get(json_object_get(st, "policy"), "failures");
        ASSERT_INT_EQ(json_integer_value(failures), 0);
        json_decref(st);
        ms_autoscaler_free(a);
    }
    free(err);
    free(path);
}

int main(void)
{
    test_fake_spec_good();
    test_fake_spec_bad();
    test_discover_fake();
    test_discover_from_env();
    test_discover_without_cuda_libs();
    test_discover_real_libraries();
    test_fractions_pack_exactly();
    test_best_fit_and_reasons();
    test_reason_lists_at_most_8_devices();
    test_whole_devices();
    test_memory();
    test_request_check();
    test_fake_metrics_file();
    test_json_and_metrics_text();
    test_lua_fill();
    test_gpu_utilization_policy();
    test_policy_in_the_autoscaler();
    return TEST_DONE();
}
