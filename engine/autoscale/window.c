/*
 * window: the look_back_period_s window of one deployment's samples and the aggregates policies
 * see. Every series (total requests, queued requests, each custom metric of each replica) is a
 * right-continuous step function: a sample's value holds until the next sample of that series, or
 * until `now` for the last one. Means are time-weighted over the part of the window each value
 * covers; max and min take every value that holds somewhere in the window.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>

#include "autoscale/internal.h"
#include "core/core.h"

/* ---- recording ------------------------------------------------------------------------------ */

static void drop_front(as_window_t *w)
{
    json_decref(w->s[w->head].custom);
    w->head++;
    w->len--;
}

static void push_sample(as_window_t *w, as_sample_t smp)
{
    if (w->head + w->len == w->cap) {
        /* Slide the live samples to the front before growing: the window holds a bounded
         * number of samples, so this settles at a fixed size. */
        if (w->head) {
            memmove(w->s, w->s + w->head, w->len * sizeof *w->s);
            w->head = 0;
        }
        if (w->len * 2 >= w->cap) {
            w->cap = w->cap ? w->cap * 2 : 64;
            w->s = ms_realloc(w->s, w->cap * sizeof *w->s);
        }
    }
    w->s[w->head + w->len++] = smp;
}

static void set_ids(as_window_t *w, const ms_autoscale_sample_t *s)
{
    for (size_t i = 0; i < w->n_ids; i++)
        free(w->ids[i]);
    w->ids = ms_realloc(w->ids, (s->n_replicas ? s->n_replicas : 1) * sizeof *w->ids);
    for (size_t i = 0; i < s->n_replicas; i++)
        w->ids[i] = ms_strdup(s->replica_ids[i]);
    w->n_ids = s->n_replicas;
}

void as_window_record(as_window_t *w, const ms_autoscale_sample_t *s, double look_back_s)
{
    double running = 0;
    for (size_t i = 0; i < s->n_replicas; i++)
        running += s->running_requests[i];
    as_sample_t smp = {s->now, s->queued_requests + running + s->pending_tasks, s->queued_requests,
                       s->pending_tasks,
                       s->custom_metrics ? json_deep_copy(s->custom_metrics) : NULL};
    push_sample(w, smp);
    set_ids(w, s);
    w->running = s->running_replicas;
    w->last_total = smp.total;
    /* Keep one sample at or before the window start: its value still holds there. */
    double start = s->now - look_back_s;
    while (w->len >= 2 && w->s[w->head + 1].t <= start)
        drop_front(w);
}

void as_window_free(as_window_t *w)
{
    while (w->len)
        drop_front(w);
    for (size_t i = 0; i < w->n_ids; i++)
        free(w->ids[i]);
    free(w->ids);
    free(w->s);
}

/* ---- step-function series ------------------------------------------------------------------- */

typedef struct series {
    double start; /* window start */
    double last_t, last_v;
    double wsum, vsum; /* seconds covered, integral of the value */
    double max, min;
    int has;
} series_t;

static void series_init(series_t *s, double start)
{
    memset(s, 0, sizeof *s);
    s->start = start;
    s->max = -INFINITY;
    s->min = INFINITY;
}

/* Closes the value in force at time `until`. */
static void series_hold(series_t *s, double until)
{
    double from = s->last_t > s->start ? s->last_t : s->start;
    if (until - from > 0) {
        s->wsum += until - from;
        s->vsum += (until - from) * s->last_v;
    }
    if (until > s->start || s->last_t >= s->start) {
        s->max = fmax(s->max, s->last_v);
        s->min = fmin(s->min, s->last_v);
    }
}

static void series_add(series_t *s, double t, double v)
{
    if (s->has)
        series_hold(s, t);
    s->last_t = t;
    s->last_v = v;
    s->has = 1;
}

static void series_finish(series_t *s, double now)
{
    if (s->has)
        series_hold(s, now);
}

static double series_mean(const series_t *s)
{
    if (!s->has)
        return 0;
    return s->wsum > 0 ? s->vsum / s->wsum : s->last_v;
}

static double series_value(const series_t *s, const char *fn)
{
    if (!s->has)
        return 0;
    if (fn && strcasecmp(fn, "max") == 0)
        return s->max;
    if (fn && strcasecmp(fn, "min") == 0)
        return s->min;
    return series_mean(s);
}

void as_window_aggregate(const as_window_t *w, double now, double look_back_s, const char *fn,
                         as_agg_t *out)
{
    series_t total, queued, pending;
    series_init(&total, now - look_back_s);
    series_init(&queued, now - look_back_s);
    series_init(&pending, now - look_back_s);
    for (size_t i = 0; i < w->len; i++) {
        const as_sample_t *smp = &w->s[w->head + i];
        series_add(&total, smp->t, smp->total);
        series_add(&queued, smp->t, smp->queued);
        series_add(&pending, smp->t, smp->pending);
    }
    series_finish(&total, now);
    series_finish(&queued, now);
    series_finish(&pending, now);
    out->total = series_value(&total, fn);
    out->queued = series_value(&queued, fn);
    out->pending = series_value(&pending, fn);
}

/* ---- custom metrics ------------------------------------------------------------------------- */

typedef struct metric_series {
    const char *metric, *replica; /* borrowed from the samples */
    series_t s;
} metric_series_t;

static int is_running(const as_window_t *w, const char *id)
{
    for (size_t i = 0; i < w->n_ids; i++)
        if (strcmp(w->ids[i], id) == 0)
            return 1;
    return 0;
}

static series_t *find_series(metric_series_t **v, size_t *n, const char *metric,
                             const char *replica, double start)
{
    for (size_t i = 0; i < *n; i++)
        if (strcmp((*v)[i].metric, metric) == 0 && strcmp((*v)[i].replica, replica) == 0)
            return &(*v)[i].s;
    *v = ms_realloc(*v, (*n + 1) * sizeof **v);
    metric_series_t *m = &(*v)[(*n)++];
    m->metric = metric;
    m->replica = replica;
    series_init(&m->s, start);
    return &m->s;
}

/* Sets t[a][b] = the value on top of the stack (pops it), creating t[a] as needed; t at `t`. */
static void set2(lua_State *L, int t, const char *a, const char *b)
{
    lua_getfield(L, t, a);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, t, a);
    }
    lua_insert(L, -2);
    lua_setfield(L, -2, b);
    lua_pop(L, 1);
}

/* Runs `body` with metric, replica and value bound for each number a sample reports for a replica
 * still running (metrics of replicas gone are dropped, as Ray Serve's are). */
#define FOREACH_METRIC(w, smp, metric, replica, value, body)                                       \
    do {                                                                                           \
        const char *replica;                                                                       \
        json_t *_per;                                                                              \
        json_object_foreach((smp)->custom, replica, _per)                                          \
        {                                                                                          \
            const char *metric;                                                                    \
            json_t *_v;                                                                            \
            if (!json_is_object(_per) || !is_running((w), replica))                                \
                continue;                                                                          \
            json_object_foreach(_per, metric, _v)                                                  \
            {                                                                                      \
                if (!json_is_number(_v))                                                           \
                    continue;                                                                      \
                double value = json_number_value(_v);                                              \
                body;                                                                              \
            }                                                                                      \
        }                                                                                          \
    } while (0)

void as_window_push_aggregated(const as_window_t *w, lua_State *L, double now, double look_back_s)
{
    double start = now - look_back_s;
    metric_series_t *v = NULL;
    size_t n = 0;
    for (size_t i = 0; i < w->len; i++) {
        const as_sample_t *smp = &w->s[w->head + i];
        if (smp->custom)
            FOREACH_METRIC(w, smp, metric, replica, value,
                           series_add(find_series(&v, &n, metric, replica, start), smp->t, value));
    }
    luaL_checkstack(L, 6, "aggregated_metrics");
    lua_newtable(L);
    int t = lua_gettop(L);
    for (size_t i = 0; i < n; i++) {
        series_finish(&v[i].s, now);
        lua_pushnumber(L, series_mean(&v[i].s));
        set2(L, t, v[i].metric, v[i].replica);
    }
    free(v);
}

/* Appends {t, value} to t[metric][replica]. */
static void append_point(lua_State *L, int t, const char *metric, const char *replica, double ts,
                         double value)
{
    lua_getfield(L, t, metric);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, t, metric);
    }
    lua_getfield(L, -1, replica);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, replica);
    }
    lua_createtable(L, 2, 0);
    lua_pushnumber(L, ts);
    lua_rawseti(L, -2, 1);
    lua_pushnumber(L, value);
    lua_rawseti(L, -2, 2);
    lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
    lua_pop(L, 2);
}

void as_window_push_raw(const as_window_t *w, lua_State *L, double now, double look_back_s)
{
    double start = now - look_back_s;
    luaL_checkstack(L, 8, "raw_metrics");
    lua_newtable(L);
    int t = lua_gettop(L);
    for (size_t i = 0; i < w->len; i++) {
        const as_sample_t *smp = &w->s[w->head + i];
        if (smp->custom && smp->t >= start && smp->t <= now)
            FOREACH_METRIC(w, smp, metric, replica, value,
                           append_point(L, t, metric, replica, smp->t, value));
    }
}
