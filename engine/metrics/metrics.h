/*
 * metrics: fixed-shape counters and latency histograms for the Prometheus text format
 * (docs/metrics.md). Everything is sized at compile time, so recording a request is a few
 * increments with no allocation and no lock, and the number of series is bounded by the config
 * (routes and deployments), never by what clients send.
 */
#ifndef MS_METRICS_H
#define MS_METRICS_H

#include <stdint.h>

#include "core/core.h"

/* Ray Serve's DEFAULT_LATENCY_BUCKET_MS; a last, implicit bucket is +Inf. */
#define MS_METRICS_LATENCY_BOUNDS 19
extern const double ms_metrics_latency_bounds_ms[MS_METRICS_LATENCY_BOUNDS];

typedef struct ms_histogram {
    uint64_t buckets[MS_METRICS_LATENCY_BOUNDS + 1]; /* per bucket, not cumulative */
    uint64_t count;
    double sum;
} ms_histogram_t;

void ms_histogram_observe(ms_histogram_t *h, double value_ms);
/* NAME_bucket{LABELS,le=...} (cumulative), NAME_sum and NAME_count lines, in seconds (the
 * Prometheus base unit; values are observed in ms). `labels` is a ready label list without
 * braces ("" for none). */
void ms_histogram_text(ms_buf_t *b, const char *name, const char *labels, const ms_histogram_t *h);

/* The shortest text that reads back as v (0.1 is "0.1", not 0.10000000000000001), for label
 * values such as `le`. buf holds at least 32 bytes. */
const char *ms_metrics_number(char *buf, size_t cap, double v);

/* A family's # HELP and # TYPE lines; its samples must follow together. */
void ms_metrics_family(ms_buf_t *b, const char *name, const char *type, const char *help);

/* Methods kept apart in request counters; any other method counts as OTHER. */
enum {
    MS_METHOD_GET,
    MS_METHOD_HEAD,
    MS_METHOD_POST,
    MS_METHOD_PUT,
    MS_METHOD_DELETE,
    MS_METHOD_PATCH,
    MS_METHOD_OPTIONS,
    MS_METHOD_OTHER,
    MS_METHODS
};
/* Status classes 1xx..5xx, and "disconnection": the client left before its answer. */
enum { MS_STATUS_CLASSES = 6 };

/* The class of a status: 0..4 for 1xx..5xx (anything else counts as 5xx), 5 for a
 * disconnection; and its label value. */
int ms_metrics_status_class(int status, int disconnected);
const char *ms_metrics_status_class_name(int k);
/* Ray Serve: 2xx and 3xx are not errors; every other class is. */
int ms_metrics_class_is_error(int k);

/* One route's HTTP requests: counts by method and status class, latency by status class. */
typedef struct ms_request_stats {
    uint64_t count[MS_METHODS][MS_STATUS_CLASSES];
    ms_histogram_t latency[MS_STATUS_CLASSES];
} ms_request_stats_t;

/* `disconnected`: the client left before the answer (counted apart from the status). */
void ms_request_stats_record(ms_request_stats_t *s, const char *method, int status,
                             int disconnected, double latency_ms);
/* The Prometheus text format wants each family's lines together, so several routes are written
 * family by family: its # TYPE line once, then each route's lines. */
typedef enum {
    MS_REQUESTS_TOTAL,       /* moonserve_http_requests_total */
    MS_ERROR_REQUESTS_TOTAL, /* moonserve_http_error_requests_total */
    MS_REQUEST_LATENCY,      /* moonserve_http_request_duration_seconds */
    MS_REQUEST_FAMILIES
} ms_request_family_t;
void ms_request_stats_type(ms_buf_t *b, ms_request_family_t f);
/* One route's lines of family f; `labels` names the route (no braces). */
void ms_request_stats_text(ms_buf_t *b, ms_request_family_t f, const char *labels,
                           const ms_request_stats_t *s);

#endif
