/*
 * GPU discovery: the fake spec, or the CUDA runtime and NVML through dlopen.
 *
 * Device numbering follows the CUDA runtime (the ordinals CUDA_VISIBLE_DEVICES speaks of); NVML
 * enumerates in PCI order, which may differ, so each CUDA device is matched to its NVML handle by
 * PCI bus id. The CUDA runtime is only asked for the count and the bus ids: cudaDeviceProp's
 * layout changes between CUDA versions, and any runtime version may be the one found.
 */
#define _GNU_SOURCE /* memrchr */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/internal.h"

static const char *const default_cudart[] = {
    "libcudart.so",
    "libcudart.so.13",
    "libcudart.so.12",
    "libcudart.so.11.0",
    "/usr/local/cuda/lib64/libcudart.so",
    "/usr/local/cuda/lib64/libcudart.so.13",
    "/usr/local/cuda/lib64/libcudart.so.12",
    "/usr/local/cuda/lib64/libcudart.so.11.0",
    NULL,
};
static const char *const default_nvml[] = {"libnvidia-ml.so.1", "libnvidia-ml.so", NULL};

/* The CUDA runtime calls discovery makes (cudaError_t is an int-sized enum, 0 = success). */
typedef struct cudart_api {
    int (*get_device_count)(int *count);
    const char *(*error_string)(int err);
    int (*pci_bus_id)(char *bus_id, int len, int device);
    int (*set_device)(int device);
    int (*mem_get_info)(size_t *free_bytes, size_t *total_bytes);
    int (*device_reset)(void);
} cudart_api_t;

/* ---- fake spec ------------------------------------------------------------------------------ */

static int fake_error(char *err, size_t cap, int entry, const char *text, size_t len,
                      const char *what)
{
    snprintf(err, cap, "MOONSERVE_FAKE_GPUS entry %d \"%.*s\": %s", entry, (int)len, text, what);
    return -1;
}

/* Reads a positive decimal from s[0..len) into *out; 0 when it is not one. */
static int parse_positive(const char *s, size_t len, unsigned long long max,
                          unsigned long long *out)
{
    unsigned long long v = 0;
    if (len == 0)
        return 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (unsigned long long)(s[i] - '0');
        if (v > max)
            return 0;
    }
    *out = v;
    return v > 0;
}

/* One `[COUNTx]NAME:MEMORY_MIB` entry appended to out[*n]. */
static int parse_fake_entry(const char *s, size_t len, int entry, ms_gpu_device_t *out, int cap,
                            int *n, char *err, size_t errcap)
{
    const char *colon = memrchr(s, ':', len);
    if (!colon)
        return fake_error(err, errcap, entry, s, len, "expected NAME:MEMORY_MIB, e.g. A100:81920");
    unsigned long long count = 1, mib;
    const char *name = s;
    size_t digits = strspn(s, "0123456789");
    if (digits > 0 && s + digits < colon && s[digits] == 'x') {
        if (!parse_positive(s, digits, MS_GPU_MAX_DEVICES, &count))
            return fake_error(err, errcap, entry, s, len,
                              "the count before 'x' must be 1 to 64 devices");
        name = s + digits + 1;
    }
    size_t name_len = (size_t)(colon - name);
    if (name_len == 0)
        return fake_error(err, errcap, entry, s, len, "empty device name");
    if (name_len >= sizeof out->name)
        return fake_error(err, errcap, entry, s, len, "device name longer than 95 bytes");
    /* 1 PiB in MiB: far beyond any device, well inside uint64_t bytes. */
    if (!parse_positive(colon + 1, (size_t)(s + len - colon - 1), 1ULL << 30, &mib))
        return fake_error(err, errcap, entry, s, len,
                          "memory must be a whole number of MiB from 1 to 1073741824");
    if (*n + (int)count > cap)
        return fake_error(err, errcap, entry, s, len, "more than 64 devices in all");
    for (unsigned long long i = 0; i < count; i++) {
        ms_gpu_device_t *d = &out[(*n)++];
        memset(d, 0, sizeof *d);
        d->index = *n - 1;
        memcpy(d->name, name, name_len);
        d->memory_total_bytes = mib << 20;
    }
    return 0;
}

int ms_gpu_parse_fake(const char *spec, ms_gpu_device_t *out, int cap, char *err, size_t errcap)
{
    if (strcmp(spec, "none") == 0)
        return 0;
    int n = 0, entry = 1;
    const char *s = spec;
    for (;; entry++) {
        size_t len = strcspn(s, ",");
        if (len == 0) {
            snprintf(err, errcap,
                     "MOONSERVE_FAKE_GPUS entry %d is empty: expected [COUNTx]NAME:MEMORY_MIB "
                     "entries separated by commas, e.g. 2xA100:81920,T4:16384, or none",
                     entry);
            return -1;
        }
        if (parse_fake_entry(s, len, entry, out, cap, &n, err, errcap) != 0)
            return -1;
        if (s[len] == '\0')
            return n;
        s += len + 1;
    }
}

/* ---- CUDA ----------------------------------------------------------------------------------- */

/* dlopens the first name that loads; on failure *why holds the first name's dlerror. */
static void *open_first(const char *const *names, char *why, size_t cap)
{
    why[0] = '\0';
    for (const char *const *p = names; *p; p++) {
        void *h = dlopen(*p, RTLD_NOW | RTLD_LOCAL);
        if (h)
            return h;
        if (!why[0]) {
            const char *e = dlerror();
            ms_copy_str(why, cap, e ? e : *p);
        }
    }
    return NULL;
}

#define LOAD(lib, field, sym) (*(void **)(&(field)) = dlsym((lib), (sym)), (field) != NULL)

static int load_cudart(void *lib, cudart_api_t *c)
{
    return LOAD(lib, c->get_device_count, "cudaGetDeviceCount") &&
           LOAD(lib, c->error_string, "cudaGetErrorString") &&
           LOAD(lib, c->pci_bus_id, "cudaDeviceGetPCIBusId") &&
           LOAD(lib, c->set_device, "cudaSetDevice") &&
           LOAD(lib, c->mem_get_info, "cudaMemGetInfo") &&
           LOAD(lib, c->device_reset, "cudaDeviceReset");
}

static int load_nvml(void *lib, nvml_api_t *v)
{
    return LOAD(lib, v->init, "nvmlInit_v2") && LOAD(lib, v->shutdown, "nvmlShutdown") &&
           LOAD(lib, v->error_string, "nvmlErrorString") &&
           LOAD(lib, v->by_pci_bus_id, "nvmlDeviceGetHandleByPciBusId_v2") &&
           LOAD(lib, v->name, "nvmlDeviceGetName") &&
           LOAD(lib, v->memory, "nvmlDeviceGetMemoryInfo") &&
           LOAD(lib, v->utilization, "nvmlDeviceGetUtilizationRates");
}

/* NVML is optional: without it devices get a generic name, cudaMemGetInfo's total, and no
 * utilization. *why says what failed, for the discovery line. */
static void open_nvml(ms_gpu_t *g, const char *const *names, char *why, size_t cap)
{
    void *lib = open_first(names, why, cap);
    if (!lib)
        return;
    /* The library stays loaded for the process's life: NVML keeps threads and state. */
    if (!load_nvml(lib, &g->nvml)) {
        snprintf(why, cap, "libnvidia-ml lacks an NVML v2 function");
        return;
    }
    nvml_return_t r = g->nvml.init();
    if (r != 0) {
        snprintf(why, cap, "nvmlInit_v2: %s", g->nvml.error_string(r));
        return;
    }
    g->have_nvml = 1;
}

/* Name and total memory of device i: NVML by PCI bus id, or the runtime's own view, which needs
 * a context on the device (created, measured, destroyed again). */
static void describe_device(ms_gpu_t *g, const cudart_api_t *c, int i)
{
    ms_gpu_device_t *d = &g->dev[i];
    char bus[32] = "?";
    nvml_device_t h = NULL;
    d->index = i;
    snprintf(d->name, sizeof d->name, "CUDA device %d", i);
    if (g->have_nvml &&
        (c->pci_bus_id(bus, (int)sizeof bus, i) != 0 || g->nvml.by_pci_bus_id(bus, &h) != 0 || !h))
        ms_warn("GPU %d: NVML has no device at PCI bus id %s; no metrics for it", i, bus);
    if (h) {
        g->handle[i] = h;
        nvml_memory_t m;
        char name[sizeof d->name];
        if (g->nvml.name(h, name, (unsigned)sizeof name) == 0)
            ms_utf8_copy(d->name, sizeof d->name, name, strnlen(name, sizeof name));
        if (g->nvml.memory(h, &m) == 0) {
            d->memory_total_bytes = m.total;
            return;
        }
    }
    size_t free_b = 0, total_b = 0;
    if (c->set_device(i) == 0 && c->mem_get_info(&free_b, &total_b) == 0)
        d->memory_total_bytes = total_b;
    c->device_reset();
}

/* The controller's CUDA_VISIBLE_DEVICES entries, kept so that a child's list names the same
 * physical devices (device 0 here may be physical GPU 3). */
static void keep_visible_ids(ms_gpu_t *g)
{
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    if (!v || !*v)
        return;
    for (int i = 0; i < g->n && *v; i++) {
        size_t len = strcspn(v, ",");
        g->visible[i] = ms_strndup(v, len);
        v += len + (v[len] == ',');
    }
}

static void discover_cuda(ms_gpu_t *g, const ms_gpu_options_t *o)
{
    char why[200];
    void *lib = open_first(o && o->cudart ? o->cudart : default_cudart, why, sizeof why);
    if (!lib) {
        snprintf(g->message, sizeof g->message, "libcudart not loadable: %s", why);
        return;
    }
    /* Never dlclosed: the runtime registers exit handlers once it has started. */
    cudart_api_t c;
    if (!load_cudart(lib, &c)) {
        snprintf(g->message, sizeof g->message, "libcudart lacks cudaGetDeviceCount and friends");
        return;
    }
    int n = 0, r = c.get_device_count(&n);
    if (r != 0 || n <= 0) {
        snprintf(g->message, sizeof g->message, "cudaGetDeviceCount: %s (error %d)",
                 r != 0 ? c.error_string(r) : "no device", r);
        return;
    }
    if (n > MS_GPU_MAX_DEVICES) {
        ms_warn("%d CUDA devices: only the first %d are used", n, MS_GPU_MAX_DEVICES);
        n = MS_GPU_MAX_DEVICES;
    }
    g->source = MS_GPU_SOURCE_CUDA;
    g->n = n;
    open_nvml(g, o && o->nvml ? o->nvml : default_nvml, why, sizeof why);
    if (!g->have_nvml)
        ms_warn("NVML unavailable (%s): GPUs without names or utilization metrics", why);
    for (int i = 0; i < n; i++)
        describe_device(g, &c, i);
    keep_visible_ids(g);
}

/* ---- discovery ------------------------------------------------------------------------------ */

static void log_result(const ms_gpu_t *g)
{
    if (g->n == 0) {
        ms_info("no GPU found (%s); replicas run on CPU", g->message);
        return;
    }
    ms_buf_t b = {0};
    for (int i = 0; i < g->n; i++)
        ms_buf_appendf(&b, "%s%d %s (%llu MiB)", i ? ", " : "", i, g->dev[i].name,
                       (unsigned long long)(g->dev[i].memory_total_bytes >> 20));
    ms_info("%d GPU%s (%s): %s", g->n, g->n == 1 ? "" : "s", ms_gpu_source_name(g), b.data);
    ms_buf_free(&b);
}

static const char *option_or_env(int ignore_env, const char *opt, const char *var)
{
    if (opt)
        return opt;
    const char *v = ignore_env ? NULL : getenv(var);
    return v && *v ? v : NULL;
}

ms_gpu_t *ms_gpu_discover(const ms_gpu_options_t *opts, char **err)
{
    int ignore_env = opts && opts->ignore_env;
    const char *fake =
        option_or_env(ignore_env, opts ? opts->fake_spec : NULL, "MOONSERVE_FAKE_GPUS");
    ms_gpu_t *g = ms_calloc(1, sizeof *g);
    if (fake) {
        char msg[256];
        g->n = ms_gpu_parse_fake(fake, g->dev, MS_GPU_MAX_DEVICES, msg, sizeof msg);
        if (g->n < 0) {
            *err = ms_strndup(msg, strlen(msg));
            free(g);
            return NULL;
        }
        g->source = g->n ? MS_GPU_SOURCE_FAKE : MS_GPU_SOURCE_NONE;
        snprintf(g->message, sizeof g->message, "MOONSERVE_FAKE_GPUS=%s", fake);
        const char *m = option_or_env(ignore_env, opts ? opts->fake_metrics : NULL,
                                      "MOONSERVE_FAKE_GPU_METRICS");
        g->fake_metrics = m ? ms_strdup(m) : NULL;
    } else {
        discover_cuda(g, opts);
    }
    if (g->n > 0)
        g->message[0] = '\0';
    log_result(g);
    return g;
}

void ms_gpu_free(ms_gpu_t *g)
{
    if (!g)
        return;
    if (g->have_nvml)
        g->nvml.shutdown();
    for (int i = 0; i < g->n; i++)
        free(g->visible[i]);
    free(g->fake_metrics);
    free(g);
}

ms_gpu_source_t ms_gpu_source(const ms_gpu_t *g)
{
    return g->source;
}

const char *ms_gpu_source_name(const ms_gpu_t *g)
{
    static const char *const names[] = {"none", "cuda", "fake"};
    return names[g->source];
}

const char *ms_gpu_message(const ms_gpu_t *g)
{
    return g->message;
}

int ms_gpu_count(const ms_gpu_t *g)
{
    return g->n;
}

const ms_gpu_device_t *ms_gpu_device(const ms_gpu_t *g, int index)
{
    return index >= 0 && index < g->n ? &g->dev[index] : NULL;
}
