/*
 * history: rings of JSON entries (see history.h).
 */
#include "history/history.h"

#include <stdlib.h>
#include <string.h>

#include "core/core.h"

struct ms_history {
    json_t **items; /* items[(head + i) % cap] is the i-th oldest */
    size_t cap, head, len;
    uint64_t dropped;
};

ms_history_t *ms_history_new(size_t capacity)
{
    ms_history_t *h = ms_calloc(1, sizeof *h);
    h->cap = capacity ? capacity : 1;
    h->items = ms_calloc(h->cap, sizeof *h->items);
    return h;
}

void ms_history_free(ms_history_t *h)
{
    if (!h)
        return;
    for (size_t i = 0; i < h->len; i++)
        json_decref(h->items[(h->head + i) % h->cap]);
    free(h->items);
    free(h);
}

void ms_history_push(ms_history_t *h, json_t *entry)
{
    if (!entry)
        return;
    if (!json_object_get(entry, "time"))
        json_object_set_new(entry, "time", json_real(ms_wall_time()));
    if (h->len == h->cap) {
        json_decref(h->items[h->head]);
        h->items[h->head] = entry;
        h->head = (h->head + 1) % h->cap;
        h->dropped++;
        return;
    }
    h->items[(h->head + h->len) % h->cap] = entry;
    h->len++;
}

size_t ms_history_len(const ms_history_t *h)
{
    return h->len;
}

size_t ms_history_capacity(const ms_history_t *h)
{
    return h->cap;
}

uint64_t ms_history_dropped(const ms_history_t *h)
{
    return h->dropped;
}

static int field_is(json_t *e, const char *key, const char *want)
{
    if (!want)
        return 1;
    const char *v = json_string_value(json_object_get(e, key));
    return v && strcmp(v, want) == 0;
}

static int matches(json_t *e, const ms_history_filter_t *f)
{
    if (!f)
        return 1;
    if (f->has_since && !(json_number_value(json_object_get(e, "time")) > f->since))
        return 0;
    return field_is(e, "application", f->application) && field_is(e, "deployment", f->deployment);
}

json_t *ms_history_query(const ms_history_t *h, const ms_history_filter_t *f)
{
    size_t limit = f && f->limit ? f->limit : h->len;
    /* Newest first up to the limit, then turned around: the answer is oldest first. */
    json_t **picked = ms_malloc((h->len ? h->len : 1) * sizeof *picked);
    size_t n = 0;
    for (size_t i = h->len; i-- > 0 && n < limit;) {
        json_t *e = h->items[(h->head + i) % h->cap];
        if (matches(e, f))
            picked[n++] = e;
    }
    json_t *out = json_array();
    while (n-- > 0)
        json_array_append(out, picked[n]);
    free(picked);
    return out;
}

/* ---- the engine's histories ------------------------------------------------------------------ */

static ms_history_t *engine_histories[MS_HISTORY_KINDS];

const char *ms_history_kind_name(ms_history_kind_t k)
{
    static const char *const names[MS_HISTORY_KINDS] = {"autoscaling", "reloads", "lifecycle"};
    return k < MS_HISTORY_KINDS ? names[k] : "?";
}

/* MS_HISTORY_CAPACITY, or MOONSERVE_HISTORY_CAPACITY when it is a whole number in 1..1000000. */
static size_t configured_capacity(void)
{
    const char *env = getenv("MOONSERVE_HISTORY_CAPACITY");
    if (env && *env) {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 1 && v <= 1000000)
            return (size_t)v;
        ms_warn("MOONSERVE_HISTORY_CAPACITY=%s ignored (want 1 to 1000000); keeping %d", env,
                MS_HISTORY_CAPACITY);
    }
    return MS_HISTORY_CAPACITY;
}

ms_history_t *ms_history_of(ms_history_kind_t k)
{
    if (!engine_histories[k])
        engine_histories[k] = ms_history_new(configured_capacity());
    return engine_histories[k];
}

void ms_history_record(ms_history_kind_t k, json_t *entry)
{
    ms_history_push(ms_history_of(k), entry);
}

void ms_history_release_all(void)
{
    for (int k = 0; k < MS_HISTORY_KINDS; k++) {
        ms_history_free(engine_histories[k]);
        engine_histories[k] = NULL;
    }
}

void ms_history_lifecycle(const char *application, const char *deployment, const char *replica,
                          const char *replica_tag, const char *event, const char *reason)
{
    json_t *e = json_pack("{s:f, s:s?, s:s?, s:s?, s:s?, s:s, s:s?}", "time", ms_wall_time(),
                          "application", application, "deployment", deployment, "replica", replica,
                          "replica_tag", replica_tag, "event", event, "reason", reason);
    if (!e) /* a reason that is not valid UTF-8 (a constructor's message): keep the event */
        e = json_pack("{s:f, s:s?, s:s?, s:s?, s:s?, s:s, s:n}", "time", ms_wall_time(),
                      "application", application, "deployment", deployment, "replica", replica,
                      "replica_tag", replica_tag, "event", event, "reason");
    ms_history_record(MS_HISTORY_LIFECYCLE, e);
}
