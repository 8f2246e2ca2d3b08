/*
 * metrics: see metrics.h.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics/metrics.h"

const double ms_metrics_latency_bounds_ms[MS_METRICS_LATENCY_BOUNDS] = {
    1,   2,    5,    10,   20,    50,    100,    200,    300,   400,
    500, 1000, 2000, 5000, 10000, 60000, 120000, 300000, 600000};

static const char *const METHOD_NAMES[MS_METHODS] = {"GET",    "HEAD",  "POST",    "PUT",
                                                     "DELETE", "PATCH", "OPTIONS", "OTHER"};
static const char *const CLASS_NAMES[MS_STATUS_CLASSES] = {"1xx", "2xx", "3xx",
                                                           "4xx", "5xx", "disconnection"};

void ms_histogram_observe(ms_histogram_t *h, double value_ms)
{
    int i = 0;
    while (i < MS_METRICS_LATENCY_BOUNDS && value_ms > ms_metrics_latency_bounds_ms[i])
        i++;
    h->buckets[i]++;
    h->count++;
    h->sum += value_ms;
}

void ms_histogram_text(ms_buf_t *b, const char *name, const char *labels, const ms_histogram_t *h)
{
    const char *sep = labels[0] ? "," : "";
    uint64_t cumulative = 0;
    for (int i = 0; i <= MS_METRICS_LATENCY_BOUNDS; i++) {
        cumulative += h->buckets[i];
        if (i < MS_METRICS_LATENCY_BOUNDS)
            ms_buf_appendf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep,
                           ms_metrics_latency_bounds_ms[i] / 1000.0,
                           (unsigned long long)cumulative);
        else
            ms_buf_appendf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
                           (unsigned long long)cumulative);
    }
    ms_buf_appendf(b, "%s_sum{%s} %.9g\n", name, labels, h->sum / 1000.0);
    ms_buf_appendf(b, "%s_count{%s} %llu\n", name, labels, (unsigned long long)h->count);
}

const char *ms_metrics_number(char *buf, size_t cap, double v)
{
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    return buf;
}

void ms_metrics_family(ms_buf_t *b, const char *name, const char *type, const char *help)
{
    ms_buf_appendf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Method names come from the HTTP parser's table, so a few comparisons place them. */
static int method_index(const char *method)
{
    for (int i = 0; i < MS_METHOD_OTHER; i++)
        if (strcmp(method, METHOD_NAMES[i]) == 0)
            return i;
    return MS_METHOD_OTHER;
}

int ms_metrics_status_class(int status, int disconnected)
{
    if (disconnected)
        return MS_STATUS_CLASSES - 1;
    int k = status / 100 - 1;
    return k < 0 || k > 4 ? 4 : k;
}

void ms_request_stats_record(ms_request_stats_t *s, const char *method, int status,
                             int disconnected, double latency_ms)
{
    int k = ms_metrics_status_class(status, disconnected);
    s->count[method_index(method ? method : "")][k]++;
    ms_histogram_observe(&s->latency[k], latency_ms);
}

const char *ms_metrics_status_class_name(int k)
{
    return CLASS_NAMES[k];
}

int ms_metrics_class_is_error(int k)
{
    return k != 1 && k != 2;
}

static void counts_text(ms_buf_t *b, int errors_only, const char *labels,
                        const ms_request_stats_t *s)
{
    for (int m = 0; m < MS_METHODS; m++)
        for (int k = 0; k < MS_STATUS_CLASSES; k++)
            if (s->count[m][k] && (!errors_only || ms_metrics_class_is_error(k)))
                ms_buf_appendf(b,
                               "moonserve_http_%srequests_total{%s,method=\"%s\","
                               "status_class=\"%s\"} %llu\n",
                               errors_only ? "error_" : "", labels, METHOD_NAMES[m], CLASS_NAMES[k],
                               (unsigned long long)s->count[m][k]);
}

void ms_request_stats_text(ms_buf_t *b, ms_request_family_t f, const char *labels,
                           const ms_request_stats_t *s)
{
    if (f != MS_REQUEST_LATENCY) {
        counts_text(b, f == MS_ERROR_REQUESTS_TOTAL, labels, s);
        return;
    }
    ms_buf_t with_class = {0};
    for (int k = 0; k < MS_STATUS_CLASSES; k++) {
        if (!s->latency[k].count)
            continue;
        ms_buf_reset(&with_class);
        ms_buf_appendf(&with_class, "%s,status_class=\"%s\"", labels, CLASS_NAMES[k]);
        ms_histogram_text(b, "moonserve_http_request_duration_seconds", with_class.data,
                          &s->latency[k]);
    }
    ms_buf_free(&with_class);
}

void ms_request_stats_type(ms_buf_t *b, ms_request_family_t f)
{
    static const char *const FAMILY[MS_REQUEST_FAMILIES][3] = {
        {"moonserve_http_requests_total", "counter",
         "HTTP requests answered or given up, by route, method and status class."},
        {"moonserve_http_error_requests_total", "counter",
         "HTTP requests whose status is not 2xx or 3xx, or whose client left first."},
        {"moonserve_http_request_duration_seconds", "histogram",
         "Time from a request's arrival to its last response byte queued (Ray's buckets)."}};
    ms_metrics_family(b, FAMILY[f][0], FAMILY[f][1], FAMILY[f][2]);
}
