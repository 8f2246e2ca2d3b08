/*
 * history: bounded histories of the controller's rare events, for GET /api/v1/history
 * (docs/admin-api.md): autoscaling decisions, reloads and replica lifecycle events.
 *
 * A history is a ring of JSON objects, oldest first: once full, each new entry drops the oldest.
 * Every entry has "time" (unix seconds) and, where it concerns one, "application" and
 * "deployment"; the rest of its shape is the recorder's (see the docs). Entries are never
 * changed once recorded, so a query shares them with its answer instead of copying them.
 *
 * The engine keeps three process-wide histories (one controller per process), of
 * MS_HISTORY_CAPACITY entries each; MOONSERVE_HISTORY_CAPACITY overrides the bound (tests use it
 * to see the oldest entries go). Recording is off every request's path: only decisions that
 * change something, reloads and replica state changes are recorded. Use from the loop thread.
 */
#ifndef MS_HISTORY_H
#define MS_HISTORY_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define MS_HISTORY_CAPACITY 1000

typedef struct ms_history ms_history_t;

/* Which entries a query returns. NULL strings match anything; an entry without the field (or
 * with null there) does not match a given name. */
typedef struct ms_history_filter {
    const char *application;
    const char *deployment;
    int has_since;
    double since; /* with has_since: entries whose time is strictly after it */
    size_t limit; /* the newest `limit` matching entries; 0: all */
} ms_history_filter_t;

/* A ring of at most `capacity` entries (>= 1). */
ms_history_t *ms_history_new(size_t capacity);
void ms_history_free(ms_history_t *h);
/* Appends entry (a JSON object; the reference is taken), dropping the oldest when full. A
 * missing "time" is set to now. */
void ms_history_push(ms_history_t *h, json_t *entry);
size_t ms_history_len(const ms_history_t *h);
size_t ms_history_capacity(const ms_history_t *h);
/* Entries dropped so far to make room. */
uint64_t ms_history_dropped(const ms_history_t *h);
/* The matching entries, oldest first (new array; the entries are shared, not copied). */
json_t *ms_history_query(const ms_history_t *h, const ms_history_filter_t *f);

/* ---- the engine's histories ------------------------------------------------------------------ */

typedef enum {
    MS_HISTORY_AUTOSCALING,
    MS_HISTORY_RELOADS,
    MS_HISTORY_LIFECYCLE,
    MS_HISTORY_KINDS
} ms_history_kind_t;

/* "autoscaling", "reloads", "lifecycle": the keys of the API's answer. */
const char *ms_history_kind_name(ms_history_kind_t k);
/* The history of kind k, made on first use. */
ms_history_t *ms_history_of(ms_history_kind_t k);
/* ms_history_push into the history of kind k. */
void ms_history_record(ms_history_kind_t k, json_t *entry);
/* Frees the engine's histories (at controller exit; a later record starts afresh). */
void ms_history_release_all(void);

/* A replica lifecycle entry: {time, application, deployment, replica (the replica_id of status),
 * replica_tag ("Deployment#N"), event, reason}. replica, replica_tag and reason may be NULL (null
 * in JSON). */
void ms_history_lifecycle(const char *application, const char *deployment, const char *replica,
                          const char *replica_tag, const char *event, const char *reason);

#endif
