/*
 * Placement: GPU shares in fixed point (MS_GPU_UNITS per device, so 4 x 0.25 is exactly one
 * device and rounding never over-commits) and reserved memory, per device.
 *
 * Fractions go best fit: onto the device left fullest that still fits, which packs small shares
 * together and keeps whole devices free for whole-device requests. Whole-device requests take
 * devices nobody holds any share of.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/internal.h"

/* Devices named in a pending reason before "...": keeps the reason one readable line. */
#define REASON_DEVICES 8

struct ms_gpu_pool {
    const ms_gpu_t *g;
    int64_t used[MS_GPU_MAX_DEVICES];      /* units held */
    uint64_t reserved[MS_GPU_MAX_DEVICES]; /* memory bytes held */
};

int ms_gpu_request_check(const ms_gpu_request_t *req, char *err, size_t cap)
{
    double n = req->num_gpus;
    if (!isfinite(n) || n < 0 || n > MS_GPU_MAX_DEVICES) {
        snprintf(err, cap, "num_gpus %g: must be a number from 0 to %d", n, MS_GPU_MAX_DEVICES);
        return -1;
    }
    int64_t units = llround(n * MS_GPU_UNITS);
    if (n > 0 && units == 0) {
        snprintf(err, cap, "num_gpus %g: below the smallest share, 0.0001", n);
        return -1;
    }
    if (units > MS_GPU_UNITS && units % MS_GPU_UNITS != 0) {
        snprintf(err, cap, "num_gpus %g: above 1 it must be a whole number of GPUs", n);
        return -1;
    }
    return 0;
}

ms_gpu_pool_t *ms_gpu_pool_new(const ms_gpu_t *g)
{
    ms_gpu_pool_t *p = ms_calloc(1, sizeof *p);
    p->g = g;
    return p;
}

void ms_gpu_pool_free(ms_gpu_pool_t *p)
{
    free(p);
}

int64_t ms_gpu_pool_used_units(const ms_gpu_pool_t *p, int index)
{
    return index >= 0 && index < p->g->n ? p->used[index] : 0;
}

uint64_t ms_gpu_pool_reserved_bytes(const ms_gpu_pool_t *p, int index)
{
    return index >= 0 && index < p->g->n ? p->reserved[index] : 0;
}

/* ---- reasons -------------------------------------------------------------------------------- */

/* A share as the shortest decimal: 2500 -> "0.25", 10000 -> "1", 3333 -> "0.3333". */
static void append_units(ms_buf_t *b, int64_t units)
{
    char frac[8];
    ms_buf_appendf(b, "%lld", (long long)(units / MS_GPU_UNITS));
    if (units % MS_GPU_UNITS == 0)
        return;
    snprintf(frac, sizeof frac, "%04lld", (long long)(units % MS_GPU_UNITS));
    for (size_t n = strlen(frac); frac[n - 1] == '0'; n--)
        frac[n - 1] = '\0';
    ms_buf_appendf(b, ".%s", frac);
}

static unsigned long long mib(uint64_t bytes)
{
    return (unsigned long long)((bytes + (1u << 20) - 1) >> 20);
}

/* Appends " (device 0: 0.75 used, ...)" for the devices `blocking` picks (at most
 * REASON_DEVICES of them, then "..."). */
typedef int (*blocking_fn)(const ms_gpu_pool_t *p, int i, const ms_gpu_request_t *req, ms_buf_t *b);

static void append_devices(ms_buf_t *b, const ms_gpu_pool_t *p, const ms_gpu_request_t *req,
                           blocking_fn blocking)
{
    int shown = 0;
    ms_buf_append_str(b, " (");
    for (int i = 0; i < p->g->n; i++) {
        ms_buf_t one = {0};
        if (blocking(p, i, req, &one)) {
            if (shown < REASON_DEVICES)
                ms_buf_appendf(b, "%sdevice %d: %s", shown ? ", " : "", i, one.data);
            else if (shown == REASON_DEVICES)
                ms_buf_append_str(b, ", ...");
            shown++;
        }
        ms_buf_free(&one);
    }
    ms_buf_append_str(b, ")");
}

/* A fraction's view of a device: its share in use, and its memory when memory was asked for. */
static int share_state(const ms_gpu_pool_t *p, int i, const ms_gpu_request_t *req, ms_buf_t *b)
{
    append_units(b, p->used[i]);
    ms_buf_append_str(b, " used");
    if (req->memory_bytes)
        ms_buf_appendf(b, ", %llu of %llu MiB reserved", mib(p->reserved[i]),
                       mib(p->g->dev[i].memory_total_bytes));
    return 1;
}

/* A whole-device request's view: only the devices it cannot take. */
static int whole_blocker(const ms_gpu_pool_t *p, int i, const ms_gpu_request_t *req, ms_buf_t *b)
{
    if (p->used[i] > 0) {
        append_units(b, p->used[i]);
        ms_buf_append_str(b, " used");
        return 1;
    }
    if (p->g->dev[i].memory_total_bytes < req->memory_bytes) {
        ms_buf_appendf(b, "%llu MiB total", mib(p->g->dev[i].memory_total_bytes));
        return 1;
    }
    return 0;
}

static void set_reason(char reason[MS_GPU_REASON_MAX], ms_buf_t *b)
{
    ms_copy_str(reason, MS_GPU_REASON_MAX, b->data);
    ms_buf_free(b);
}

static void fraction_reason(const ms_gpu_pool_t *p, const ms_gpu_request_t *req, int64_t units,
                            char reason[MS_GPU_REASON_MAX])
{
    ms_buf_t b = {0};
    ms_buf_append_str(&b, "needs ");
    append_units(&b, units);
    if (req->memory_bytes) {
        ms_buf_appendf(&b, " GPU and %llu MiB, no device has both free", mib(req->memory_bytes));
    } else {
        int64_t most = 0;
        for (int i = 0; i < p->g->n; i++)
            most = MS_GPU_UNITS - p->used[i] > most ? MS_GPU_UNITS - p->used[i] : most;
        ms_buf_append_str(&b, " GPU, ");
        append_units(&b, most);
        ms_buf_append_str(&b, p->g->n > 1 ? " free at most on one device" : " free");
    }
    append_devices(&b, p, req, share_state);
    set_reason(reason, &b);
}

static void whole_reason(const ms_gpu_pool_t *p, const ms_gpu_request_t *req, int want, int free_n,
                         char reason[MS_GPU_REASON_MAX])
{
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "needs %d GPU%s", want, want == 1 ? "" : "s");
    if (req->memory_bytes)
        ms_buf_appendf(&b, " of %llu MiB%s", mib(req->memory_bytes), want == 1 ? "" : " each");
    ms_buf_appendf(&b, ", %d free", free_n);
    if (free_n < p->g->n)
        append_devices(&b, p, req, whole_blocker);
    set_reason(reason, &b);
}

/* ---- placing -------------------------------------------------------------------------------- */

/* The best-fit device for a fraction, or -1: least share left after it, then least memory left,
 * then the lowest index. */
static int best_fit(const ms_gpu_pool_t *p, int64_t units, uint64_t mem)
{
    int best = -1;
    int64_t best_left = 0;
    uint64_t best_mem_left = 0;
    for (int i = 0; i < p->g->n; i++) {
        uint64_t total = p->g->dev[i].memory_total_bytes;
        int64_t left = MS_GPU_UNITS - p->used[i] - units;
        if (left < 0 || (mem && p->reserved[i] + mem > total))
            continue;
        uint64_t mem_left = total - p->reserved[i] - mem;
        if (best < 0 || left < best_left || (left == best_left && mem_left < best_mem_left)) {
            best = i;
            best_left = left;
            best_mem_left = mem_left;
        }
    }
    return best;
}

static void take(ms_gpu_pool_t *p, ms_gpu_placement_t *out, int i)
{
    p->used[i] += out->units;
    p->reserved[i] += out->memory_bytes;
    out->devices[out->n_devices++] = i;
}

int ms_gpu_pool_place(ms_gpu_pool_t *p, const ms_gpu_request_t *req, ms_gpu_placement_t *out,
                      char reason[MS_GPU_REASON_MAX])
{
    memset(out, 0, sizeof *out);
    reason[0] = '\0';
    if (ms_gpu_request_check(req, reason, MS_GPU_REASON_MAX) != 0)
        return -1;
    int64_t units = llround(req->num_gpus * MS_GPU_UNITS);
    if (units == 0)
        return 0;
    if (p->g->n == 0) {
        ms_buf_t b = {0};
        ms_buf_append_str(&b, "needs ");
        append_units(&b, units);
        ms_buf_appendf(&b, " GPU, no GPU found (%s)", p->g->message);
        set_reason(reason, &b);
        return 1;
    }
    if (units < MS_GPU_UNITS) {
        int i = best_fit(p, units, req->memory_bytes);
        if (i < 0) {
            fraction_reason(p, req, units, reason);
            return 1;
        }
        out->units = units;
        out->memory_bytes = req->memory_bytes;
        take(p, out, i);
        return 0;
    }
    int want = (int)(units / MS_GPU_UNITS), free_n = 0, pick[MS_GPU_MAX_DEVICES];
    for (int i = 0; i < p->g->n; i++)
        if (p->used[i] == 0 && p->g->dev[i].memory_total_bytes >= req->memory_bytes)
            pick[free_n++] = i;
    if (free_n < want) {
        whole_reason(p, req, want, free_n, reason);
        return 1;
    }
    out->units = MS_GPU_UNITS;
    out->memory_bytes = req->memory_bytes;
    for (int k = 0; k < want; k++)
        take(p, out, pick[k]);
    return 0;
}

void ms_gpu_pool_release(ms_gpu_pool_t *p, ms_gpu_placement_t *pl)
{
    for (int k = 0; k < pl->n_devices; k++) {
        int i = pl->devices[k];
        if (i < 0 || i >= p->g->n || p->used[i] < pl->units || p->reserved[i] < pl->memory_bytes)
            ms_fatal("GPU placement released twice or into the wrong pool (device %d)", i);
        p->used[i] -= pl->units;
        p->reserved[i] -= pl->memory_bytes;
    }
    memset(pl, 0, sizeof *pl);
}

char *ms_gpu_visible_devices(const ms_gpu_t *g, const ms_gpu_placement_t *pl)
{
    ms_buf_t b = {0};
    ms_buf_append_str(&b, ""); /* allocates: no devices is "", never NULL */
    for (int k = 0; k < pl->n_devices; k++) {
        int i = pl->devices[k];
        if (k)
            ms_buf_append_str(&b, ",");
        if (g->visible[i])
            ms_buf_append_str(&b, g->visible[i]);
        else
            ms_buf_append_uint(&b, (uint64_t)i);
    }
    return b.data;
}
