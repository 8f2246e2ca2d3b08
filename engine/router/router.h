/*
 * router: the request-router kind of policy script (loaded, checked, reloaded and reported by
 * engine/policy). A router is a Lua script returning a class with `choose_replicas(self,
 * candidates, request)`; the built-in one is lua/router.lua (power of two choices). Scripts run in
 * a sandboxed environment (allow-listed globals; no io, os.execute, ffi, debug, loadfile, native
 * require) with the JIT off for policy chunks and an instruction+wall-clock budget armed through a
 * count hook on every call.
 *
 * Replica state lives in persistent Lua tables updated in place by C (no tables are built per
 * request): each candidate table has fields `id` (string), `index` (int, the C-side slot),
 * `ongoing` (int, in-flight requests), `max_ongoing_requests` (int), `routing_stats` (table),
 * `multiplexed_model_ids` (table). The candidates list passed to choose_replicas is the same
 * persistent array every call.
 *
 * Also: lazily built request fields (id, headers, body), completion feedback
 * (on_request_completed), and a two-phase hot reload that keeps the replicas' state and the
 * fields a class lists in `persist`. docs/routing.md is the reference for script authors.
 */
#ifndef MS_ROUTER_H
#define MS_ROUTER_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "http/http.h"

typedef struct ms_router_script ms_router_script_t;

/* What the router sees of a request; everything only needs to stay valid for the duration of
 * the call (choose / on_routed). Fields added later are zero in older positional initializers.
 * `method`, `path` and `multiplexed_model_id` are stored in the Lua request table on each call;
 * `id`, `headers` and `body` are materialized only if the script reads them (an __index
 * metamethod), so a router that never reads them does not pay for them. When
 * multiplexed_model_id is NULL or "", the `serve_multiplexed_model_id` header (any case) is
 * used, as Ray Serve does. */
typedef struct ms_route_request {
    const char *id;
    const char *method;
    const char *path;
    const char *multiplexed_model_id; /* "" or NULL if none */
    const ms_http_header_t *headers;  /* request.headers: {lower-case name = value}; repeated
                                       * names are joined with ", " */
    size_t n_headers;
    const char *body; /* request.body: a Lua string copy, made only when read; NULL = "" */
    size_t body_len;
} ms_route_request_t;

/* Loads a router class. `file` NULL means the built-in router (lua/router.lua). The file is a Lua
 * chunk that returns a table: with `attr` NULL or "", that table is the class; otherwise
 * `returned[attr]` must be the class (a table), as in `request_router_class: "file.lua:Class"`.
 * The class needs choose_replicas; initialize_state(self, kwargs) and self_test(self) run once
 * if defined (an error in either fails the load). `kwargs_json` (may be NULL) is decoded and
 * passed to initialize_state, and kept for reloads. budget_us bounds each call into the script
 * in wall-clock microseconds (also bounded by an instruction count). On failure returns NULL and
 * sets *err (malloc'd, `file:line: message`). The first successful load is version 1. */
ms_router_script_t *ms_router_script_new_class(const char *file, const char *attr,
                                               const char *kwargs_json, uint64_t budget_us,
                                               char **err);
/* The same with attr NULL (the chunk returns the class itself). */
ms_router_script_t *ms_router_script_new(const char *path, const char *kwargs_json,
                                         uint64_t budget_us, char **err);
void ms_router_script_free(ms_router_script_t *s);

/* Replica set maintenance; `index` is the caller's slot number for the replica. */
void ms_router_script_add_replica(ms_router_script_t *s, int index, const char *id,
                                  int max_ongoing_requests);
void ms_router_script_remove_replica(ms_router_script_t *s, int index);
void ms_router_script_set_ongoing(ms_router_script_t *s, int index, int ongoing);

/* Asks the router for ranked candidates. Fills out_index with replica indices rank by rank and
 * out_rank_end[r] with the end offset (exclusive) of rank r in out_index. Returns the number of
 * ranks (> 0 when there are candidates, 0 when there are none), or -1 if the script failed
 * (error, budget exceeded, a bad answer — one naming no current candidate included): the
 * caller then falls back to its own choice. */
int ms_router_script_choose(ms_router_script_t *s, const ms_route_request_t *req, int *out_index,
                            size_t out_cap, int *out_rank_end, size_t rank_cap);

/* Calls on_request_routed(self, request, replica) if the script defines it. */
void ms_router_script_on_routed(ms_router_script_t *s, const ms_route_request_t *req, int index);

/* Calls on_request_completed(self, replica, latency_s, ok) if the script defines it: the caller
 * reports each finished request (ok = 0 for an error or a failed upstream). Unknown index: no-op.
 */
void ms_router_script_on_completed(ms_router_script_t *s, int index, double latency_s, int ok);

/* The router's policy script (engine/policy): reload, status and metrics go through it. At a
 * committed reload the new version gets every replica with the state C set (id, limit, ongoing)
 * and the routing stats and model ids as the old version's script saw them, plus the fields the
 * new class's optional `persist` list names (the core's copy rule). */
struct ms_policy;
struct ms_policy *ms_router_script_policy(ms_router_script_t *s);

/* Status: the policy core's script object (ms_policy_info). New reference. */
json_t *ms_router_script_info(const ms_router_script_t *s);

/* Memory cap of the script's Lua state (bytes; 0 = the default, 32 MiB). It is enforced only
 * while script code runs; the state's footprint outside calls is the C side's own tables. */
void ms_router_script_set_memory_limit(ms_router_script_t *s, size_t bytes);

/* Replaces a replica's `multiplexed_model_ids` (a set: {[model_id] = true}) in place. */
void ms_router_script_set_model_ids(ms_router_script_t *s, int index, const char *const *ids,
                                    size_t n);

/* Replaces a replica's `routing_stats` table in place with the decoded JSON object (what the
 * replica's record_routing_stats returned). Returns 0, or -1 if the JSON is not an object. */
int ms_router_script_set_routing_stats(ms_router_script_t *s, int index, const char *json);

/* Counters for status and metrics. */
uint64_t ms_router_script_failures(const ms_router_script_t *s);
const char *ms_router_script_last_error(const ms_router_script_t *s); /* "" if none */

#endif
