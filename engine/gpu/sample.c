/*
 * Sampling: per-device utilization and memory in use, from NVML or from the fake metrics file.
 * A failure is logged once, when it starts, not on every tick.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/internal.h"

static void sample_nvml(ms_gpu_t *g)
{
    for (int i = 0; i < g->n; i++) {
        ms_gpu_device_t *d = &g->dev[i];
        nvml_utilization_t u;
        nvml_memory_t m;
        if (!g->handle[i])
            continue; /* warned about at discovery; never sampled */
        nvml_return_t r = g->nvml.utilization(g->handle[i], &u);
        if (r == 0)
            r = g->nvml.memory(g->handle[i], &m);
        d->has_sample = r == 0;
        if (r != 0) {
            if (!g->sample_failing[i])
                ms_warn("GPU %d: NVML read failed (%s); its metrics are unknown until it reads "
                        "again",
                        i, g->nvml.error_string(r));
            g->sample_failing[i] = 1;
            continue;
        }
        g->sample_failing[i] = 0;
        d->utilization = u.gpu / 100.0;
        d->memory_used_bytes = m.used;
    }
}

/* One entry of the fake metrics file into *u and *used; -1 with err when it is not valid. */
static int fake_entry(json_t *e, const ms_gpu_device_t *d, double *u, uint64_t *used, char *err,
                      size_t cap)
{
    if (!json_is_object(e)) {
        snprintf(err, cap, "entry %d is not an object", d->index);
        return -1;
    }
    json_t *ju = json_object_get(e, "utilization"), *jm = json_object_get(e, "memory_used_bytes");
    *u = ju ? json_number_value(ju) : 0;
    if (ju && (!json_is_number(ju) || *u < 0 || *u > 1)) {
        snprintf(err, cap, "entry %d: utilization must be a number from 0 to 1", d->index);
        return -1;
    }
    json_int_t m = jm ? json_integer_value(jm) : 0;
    if (jm && (!json_is_integer(jm) || m < 0 || (uint64_t)m > d->memory_total_bytes)) {
        snprintf(err, cap,
                 "entry %d: memory_used_bytes must be a whole number from 0 to the device's "
                 "%llu bytes",
                 d->index, (unsigned long long)d->memory_total_bytes);
        return -1;
    }
    *used = (uint64_t)m;
    return 0;
}

/* Parses the file's text into u[] and used[] for every device (devices past the list are idle). */
static int fake_parse(const ms_gpu_t *g, const ms_buf_t *text, double *u, uint64_t *used, char *err,
                      size_t cap)
{
    json_error_t je;
    json_t *doc = json_loadb(text->data ? text->data : "", text->len, 0, &je);
    if (!doc) {
        snprintf(err, cap, "line %d: %s", je.line, je.text);
        return -1;
    }
    int rc = 0;
    if (!json_is_array(doc) || json_array_size(doc) > (size_t)g->n) {
        snprintf(err, cap, "expected a list of at most %d objects, one per fake GPU", g->n);
        rc = -1;
    }
    for (int i = 0; rc == 0 && i < g->n; i++) {
        json_t *e = json_array_get(doc, (size_t)i);
        u[i] = 0;
        used[i] = 0;
        if (e)
            rc = fake_entry(e, &g->dev[i], &u[i], &used[i], err, cap);
    }
    json_decref(doc);
    return rc;
}

static void sample_fake(ms_gpu_t *g)
{
    double u[MS_GPU_MAX_DEVICES] = {0};
    uint64_t used[MS_GPU_MAX_DEVICES] = {0};
    char err[200] = "";
    int rc = 0;
    if (g->fake_metrics) {
        ms_buf_t text = {0};
        if (ms_read_file(g->fake_metrics, &text) != 0) {
            /* No file yet is idle devices; any other failure is an error. */
            if (errno != ENOENT) {
                ms_copy_str(err, sizeof err, strerror(errno));
                rc = -1;
            }
        } else {
            rc = fake_parse(g, &text, u, used, err, sizeof err);
        }
        ms_buf_free(&text);
    }
    if (rc != 0) {
        if (!g->fake_failing)
            ms_warn("MOONSERVE_FAKE_GPU_METRICS %s: %s; the previous values stay until it reads "
                    "again",
                    g->fake_metrics, err);
        g->fake_failing = 1;
        return;
    }
    g->fake_failing = 0;
    for (int i = 0; i < g->n; i++) {
        g->dev[i].has_sample = 1;
        g->dev[i].utilization = u[i];
        g->dev[i].memory_used_bytes = used[i];
    }
}

void ms_gpu_sample(ms_gpu_t *g)
{
    if (g->source == MS_GPU_SOURCE_FAKE)
        sample_fake(g);
    else if (g->source == MS_GPU_SOURCE_CUDA && g->have_nvml)
        sample_nvml(g);
}
