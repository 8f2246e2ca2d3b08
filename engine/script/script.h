/*
 * script: policy Lua inside the controller. In this version: request routers. A router is a Lua
 * script returning a class with `choose_replicas(self, candidates, request)`; the built-in one is
 * lua/router.lua (power of two choices). Scripts run in a sandboxed environment (allow-listed
 * globals; no io, os.execute, ffi, debug, loadfile, native require) with the JIT off for policy
 * chunks and an instruction+wall-clock budget armed through a count hook on every call.
 *
 * Replica state lives in persistent Lua tables updated in place by C (no tables are built per
 * request): each candidate table has fields `id` (string), `index` (int, the C-side slot),
 * `ongoing` (int, in-flight requests), `max_ongoing_requests` (int), `routing_stats` (table),
 * `multiplexed_model_ids` (table). The candidates list passed to choose_replicas is the same
 * persistent array every call.
 */
#ifndef MS_SCRIPT_H
#define MS_SCRIPT_H

#include <stddef.h>
#include <stdint.h>

typedef struct ms_router_script ms_router_script_t;

/* What the router sees of a request; strings valid for the duration of the call. The header
 * table handed to Lua is built lazily, only if the script reads `request.headers`. */
typedef struct ms_route_request {
    const char *id;
    const char *method;
    const char *path;
    const char *multiplexed_model_id; /* "" if none */
} ms_route_request_t;

/* Loads a router. `path` NULL means the built-in router (lua/router.lua). `kwargs_json` (may be
 * NULL) is decoded and passed to initialize_state. budget_us bounds each choose call in
 * wall-clock microseconds (also bounded by an instruction count). On failure returns NULL and
 * sets *err (malloc'd, `file:line: message`). */
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
 * ranks (>= 0), or -1 if the script failed (error, bad return value, budget exceeded): the
 * caller then falls back to its own choice. */
int ms_router_script_choose(ms_router_script_t *s, const ms_route_request_t *req, int *out_index,
                            size_t out_cap, int *out_rank_end, size_t rank_cap);

/* Calls on_request_routed(self, request, replica) if the script defines it. */
void ms_router_script_on_routed(ms_router_script_t *s, const ms_route_request_t *req, int index);

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
