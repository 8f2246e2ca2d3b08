/*
 * history: the ring keeps the newest `capacity` entries in order, drops the oldest, and a query
 * filters by application, deployment and time and returns the newest `limit` oldest first.
 */
#include <stdlib.h>

#include "history/history.h"
#include "test.h"

static json_t *entry(double t, const char *app, const char *dep, int n)
{
    return json_pack("{s:f, s:s?, s:s?, s:i}", "time", t, "application", app, "deployment", dep,
                     "n", n);
}

static int nth(json_t *arr, size_t i)
{
    return (int)json_integer_value(json_object_get(json_array_get(arr, i), "n"));
}

static void test_ring_drops_oldest(void)
{
    ms_history_t *h = ms_history_new(3);
    ASSERT_INT_EQ(ms_history_capacity(h), 3);
    for (int i = 1; i <= 5; i++)
        ms_history_push(h, entry(i, "a", "D", i));
    ASSERT_INT_EQ(ms_history_len(h), 3);
    ASSERT_INT_EQ(ms_history_dropped(h), 2);
    json_t *all = ms_history_query(h, NULL);
    ASSERT_INT_EQ(json_array_size(all), 3);
    ASSERT_INT_EQ(nth(all, 0), 3); /* oldest kept first */
    ASSERT_INT_EQ(nth(all, 2), 5);
    json_decref(all);
    ms_history_free(h);
}

static void test_filters_and_limit(void)
{
    ms_history_t *h = ms_history_new(100);
    ms_history_push(h, entry(10, "a", "X", 1));
    ms_history_push(h, entry(11, "b", "X", 2));
    ms_history_push(h, entry(12, "a", "Y", 3));
    ms_history_push(h, entry(13, "a", NULL, 4));
    ms_history_push(h, entry(14, "a", "X", 5));

    ms_history_filter_t f = {.application = "a"};
    json_t *r = ms_history_query(h, &f);
    ASSERT_INT_EQ(json_array_size(r), 4);
    json_decref(r);

    f = (ms_history_filter_t){.application = "a", .deployment = "X"};
    r = ms_history_query(h, &f);
    ASSERT_INT_EQ(json_array_size(r), 2);
    ASSERT_INT_EQ(nth(r, 0), 1);
    ASSERT_INT_EQ(nth(r, 1), 5);
    json_decref(r);

    /* since is strictly after */
    f = (ms_history_filter_t){.has_since = 1, .since = 12};
    r = ms_history_query(h, &f);
    ASSERT_INT_EQ(json_array_size(r), 2);
    ASSERT_INT_EQ(nth(r, 0), 4);
    json_decref(r);

    /* limit: the newest N, still oldest first */
    f = (ms_history_filter_t){.limit = 2};
    r = ms_history_query(h, &f);
    ASSERT_INT_EQ(json_array_size(r), 2);
    ASSERT_INT_EQ(nth(r, 0), 4);
    ASSERT_INT_EQ(nth(r, 1), 5);
    json_decref(r);

    f = (ms_history_filter_t){.deployment = "nope"};
    r = ms_history_query(h, &f);
    ASSERT_INT_EQ(json_array_size(r), 0);
    json_decref(r);
    ms_history_free(h);
}

static void test_time_added_when_missing(void)
{
    ms_history_t *h = ms_history_new(2);
    ms_history_push(h, json_pack("{s:s}", "event", "x"));
    json_t *r = ms_history_query(h, NULL);
    ASSERT_TRUE(json_number_value(json_object_get(json_array_get(r, 0), "time")) > 1e9);
    json_decref(r);
    ms_history_push(h, NULL); /* ignored */
    ASSERT_INT_EQ(ms_history_len(h), 1);
    ms_history_free(h);
}

static void test_engine_histories(void)
{
    setenv("MOONSERVE_HISTORY_CAPACITY", "4", 1);
    for (int i = 0; i < 10; i++)
        ms_history_lifecycle("app", "D", "1", "D#1", "running", i % 2 ? NULL : "why");
    ms_history_t *h = ms_history_of(MS_HISTORY_LIFECYCLE);
    ASSERT_INT_EQ(ms_history_capacity(h), 4);
    ASSERT_INT_EQ(ms_history_len(h), 4);
    json_t *r = ms_history_query(h, NULL);
    json_t *e = json_array_get(r, 0);
    ASSERT_STR_EQ(json_string_value(json_object_get(e, "event")), "running");
    ASSERT_STR_EQ(json_string_value(json_object_get(e, "replica_tag")), "D#1");
    ASSERT_TRUE(json_object_get(e, "reason") != NULL);
    json_decref(r);
    ASSERT_STR_EQ(ms_history_kind_name(MS_HISTORY_RELOADS), "reloads");
    ASSERT_INT_EQ(ms_history_len(ms_history_of(MS_HISTORY_AUTOSCALING)), 0);
    ms_history_release_all();
    unsetenv("MOONSERVE_HISTORY_CAPACITY");
    ASSERT_INT_EQ(ms_history_capacity(ms_history_of(MS_HISTORY_LIFECYCLE)), MS_HISTORY_CAPACITY);
    ms_history_release_all();
}

int main(void)
{
    test_ring_drops_oldest();
    test_filters_and_limit();
    test_time_added_when_missing();
    test_engine_histories();
    return TEST_DONE();
}
