/*
 * Unit tests for metrics: bucket edges (a bound is inclusive, as Prometheus's `le`), the
 * cumulative text in seconds, and the placing of methods and statuses into bounded sets.
 */
#include "metrics/metrics.h"
#include "test.h"

static void test_bucket_edges(void)
{
    ms_histogram_t h = {0};
    ms_histogram_observe(&h, 0.2);    /* <= 1 ms */
    ms_histogram_observe(&h, 1.0);    /* on the bound: still the first bucket */
    ms_histogram_observe(&h, 1.0001); /* the next */
    ms_histogram_observe(&h, 1e9);    /* past every bound: +Inf */
    ASSERT_INT_EQ(h.buckets[0], 2);
    ASSERT_INT_EQ(h.buckets[1], 1);
    ASSERT_INT_EQ(h.buckets[MS_METRICS_LATENCY_BOUNDS], 1);
    ASSERT_INT_EQ(h.count, 4);

    ms_buf_t b = {0};
    ms_histogram_text(&b, "x_seconds", "a=\"1\"", &h);
    ASSERT_CONTAINS(b.data, "x_seconds_bucket{a=\"1\",le=\"0.001\"} 2\n");
    ASSERT_CONTAINS(b.data, "x_seconds_bucket{a=\"1\",le=\"0.002\"} 3\n");
    ASSERT_CONTAINS(b.data, "x_seconds_bucket{a=\"1\",le=\"600\"} 3\n");
    ASSERT_CONTAINS(b.data, "x_seconds_bucket{a=\"1\",le=\"+Inf\"} 4\n");
    ASSERT_CONTAINS(b.data, "x_seconds_count{a=\"1\"} 4\n");
    ms_buf_reset(&b);
    ms_histogram_t empty = {0};
    ms_histogram_text(&b, "y", "", &empty);
    ASSERT_CONTAINS(b.data, "y_bucket{le=\"+Inf\"} 0\n");
    ms_buf_free(&b);
}

static void test_request_stats(void)
{
    ms_request_stats_t s = {0};
    ms_request_stats_record(&s, "GET", 200, 0, 3);
    ms_request_stats_record(&s, "BREW", 204, 0, 3); /* any other method is OTHER */
    ms_request_stats_record(&s, "POST", 42, 0, 3);  /* a status outside 1xx..5xx: 5xx */
    ms_request_stats_record(&s, "GET", 499, 1, 3);  /* the client left */
    ms_request_stats_record(&s, "GET", 302, 0, 3);
    ms_buf_t b = {0};
    ms_request_stats_text(&b, MS_REQUESTS_TOTAL, "r=\"/\"", &s);
    ASSERT_CONTAINS(b.data, "moonserve_http_requests_total{r=\"/\",method=\"GET\","
                            "status_class=\"2xx\"} 1\n");
    ASSERT_CONTAINS(b.data, "method=\"OTHER\",status_class=\"2xx\"} 1\n");
    ASSERT_CONTAINS(b.data, "method=\"POST\",status_class=\"5xx\"} 1\n");
    ASSERT_CONTAINS(b.data, "method=\"GET\",status_class=\"disconnection\"} 1\n");
    ms_buf_reset(&b);
    ms_request_stats_text(&b, MS_ERROR_REQUESTS_TOTAL, "r=\"/\"", &s);
    ASSERT_TRUE(strstr(b.data, "2xx") == NULL);
    ASSERT_TRUE(strstr(b.data, "3xx") == NULL);
    ASSERT_CONTAINS(b.data, "moonserve_http_error_requests_total{r=\"/\",method=\"POST\","
                            "status_class=\"5xx\"} 1\n");
    ASSERT_CONTAINS(b.data, "status_class=\"disconnection\"} 1\n");
    ms_buf_reset(&b);
    ms_request_stats_text(&b, MS_REQUEST_LATENCY, "r=\"/\"", &s);
    ASSERT_CONTAINS(b.data, "moonserve_http_request_duration_seconds_count{r=\"/\","
                            "status_class=\"2xx\"} 2\n");
    ASSERT_CONTAINS(b.data, "moonserve_http_request_duration_seconds_sum{r=\"/\","
                            "status_class=\"2xx\"} 0.006\n");
    ASSERT_TRUE(strstr(b.data, "1xx") == NULL); /* classes never seen have no series */
    ms_buf_free(&b);
}

int main(void)
{
    test_bucket_edges();
    test_request_stats();
    return TEST_DONE();
}
