/*
 * deployment: one deployment's request path inside the controller — its queue, admission
 * (max_queued_requests -> 503, request_timeout_s -> 408), the choice of replica (the
 * deployment's Lua router ranks candidates; within a rank the replica with the fewest in-flight
 * requests below max_ongoing_requests wins), forwarding over pooled replica connections,
 * relaying the response, and cancellation when the client goes away.
 *
 * It also keeps the replica set at its target size: starting replicas, replacing dead ones
 * with exponential backoff, and stopping them all on shutdown.
 */
#ifndef MS_DEPLOYMENT_H
#define MS_DEPLOYMENT_H

#include <uv.h>

#include "gpu/gpu.h"
#include "http/http.h"
#include "metrics/metrics.h"
#include "replica/replica.h"

typedef struct ms_deployment ms_deployment_t;

typedef struct ms_deployment_settings {
    const char *app_name;
    const char *name;
    int num_replicas;
    int max_ongoing_requests;
    int max_queued_requests;  /* -1 = unlimited */
    double request_timeout_s; /* 0 = none */
    double graceful_shutdown_timeout_s;
    double health_check_period_s;
    double health_check_timeout_s;
    /* How long a request may wait while the deployment has no replica running (scaled to zero,
     * or all starting) before it gets 503 with Retry-After. */
    double cold_start_timeout_s;
    /* The request router: request_router_class `router_file:router_attr` with its kwargs
     * (JSON text), or the built-in power-of-two-choices router when router_file is NULL. */
    const char *router_file;
    const char *router_attr;
    const char *router_kwargs_json;
    ms_replica_spec_t spec; /* how to start a replica (strings copied) */
    /* The host's GPUs and the engine-wide pool replicas with spec.num_gpus > 0 are placed in
     * (shared, owned by the caller; NULL: no placement). */
    const ms_gpu_t *gpus;
    ms_gpu_pool_t *gpu_pool;
    /* A request arrived while the target is 0 replicas: the owner should scale up now, without
     * waiting for its next control tick. May be NULL. */
    void (*on_cold_start)(ms_deployment_t *d, void *data);
    void *owner_data;
} ms_deployment_settings_t;

/* Creates the deployment and starts its replicas. On failure (the router script) returns NULL
 * with *err set (malloc'd). */
ms_deployment_t *ms_deployment_new(uv_loop_t *loop, const ms_deployment_settings_t *settings,
                                   char **err);

/* Takes a request for this deployment. The response is always finished, one way or another;
 * set the server's on_abort to ms_deployment_abort so client disconnects cancel it. */
void ms_deployment_submit(ms_deployment_t *d, ms_http_request_t *req);
/* The client of a submitted request went away: drop it from the queue or cancel it at its
 * replica. Requests not owned by any deployment are ignored. */
void ms_deployment_abort(ms_http_request_t *req);

/* Stops every replica gracefully; `done` runs once all replica processes are gone and the
 * deployment has released them (the deployment itself is freed by ms_deployment_free). */
void ms_deployment_shutdown(ms_deployment_t *d, void (*done)(void *), void *data);
void ms_deployment_free(ms_deployment_t *d);

/* Sets the number of replicas to keep. Scaling up starts replicas; scaling down stops the
 * surplus gracefully — STARTING ones first, then the least busy; each is taken out of routing
 * first, drains its in-flight requests, then stops. */
void ms_deployment_set_target(ms_deployment_t *d, int n);
int ms_deployment_target(const ms_deployment_t *d);

/* A redeploy's lightweight changes, applied in place: max_ongoing_requests, max_queued_requests,
 * request and shutdown timeouts, the drain step, and user_config (running replicas'
 * reconfigure() is called; none restarts). Fields not listed are ignored. */
void ms_deployment_update(ms_deployment_t *d, const ms_deployment_settings_t *s);
/* A redeploy's code change (import path, args, the application's code): every replica is
 * replaced by one of the new version, each new one ready before an old one stops. */
void ms_deployment_roll(ms_deployment_t *d, const ms_replica_spec_t *spec);

/* Lists the replicas (every state but gone) into out; returns how many there are (may exceed
 * cap, in which case only cap are written; out may be NULL with cap 0, to count them). */
size_t ms_deployment_replicas(const ms_deployment_t *d, ms_replica_t **out, size_t cap);

/* Polls running replicas' stats (see ms_replica_poll_stats); routing stats that arrive are
 * handed to the deployment's router script. Call it every control tick: each call polls the
 * replicas that fell due since the last, in turn, so each one is polled once per period_s and the
 * polls are spread evenly over it (the first call polls them all). */
void ms_deployment_poll_stats(ms_deployment_t *d, double period_s, double timeout_s);

/* Runs the replicas' health checks (call every control tick). A replica that fails
 * MS_REPLICA_UNHEALTHY_THRESHOLD in a row leaves routing, stops gracefully and is replaced. */
void ms_deployment_check_health(ms_deployment_t *d);

/* The deployment's router script, for reload and status. */
struct ms_router_script *ms_deployment_router_script(ms_deployment_t *d);

/* The constructor error when the current version failed to start (Ray's DEPLOY_FAILED: repeated
 * constructor failures and none of its replicas running), else NULL. Replicas of the previous
 * version may still be running and serving (ms_deployment_updating). */
const char *ms_deployment_failure(const ms_deployment_t *d);

/* Whether a rolling update is under way: replicas of an older version are still live. */
int ms_deployment_updating(const ms_deployment_t *d);

/* Why the latest attempt to start a replica process failed (the open-files or process limit, say),
 * or NULL when it started; attempts repeat every second while replicas are missing. */
const char *ms_deployment_spawn_error(const ms_deployment_t *d);

/* Whether a request whose head is all that has arrived should have its body streamed to the
 * replica as it arrives rather than read whole first (ms_http_server_config_t.stream_body): a
 * process deployment streams chunked bodies and those longer than its
 * process.stream_body_bytes. body_length is -1 for a chunked body. */
int ms_deployment_streams_body(const ms_deployment_t *d, int64_t body_length);

/* What a deployment counted since it was made (docs/metrics.md): every request that left a
 * replica (answered, failed, or cancelled: "disconnection"), by status class; the time from
 * sending to its end and from arrival to sending (Ray's router fulfillment time); replicas
 * started and replicas lost without being asked to stop (crashes, constructor failures,
 * unhealthy replacements). */
typedef struct ms_deployment_stats {
    uint64_t requests[MS_STATUS_CLASSES];
    ms_histogram_t processing;
    ms_histogram_t queue_wait;
    uint64_t replica_starts;
    uint64_t replica_failures;
    /* Placements (a request, or a batch of them): by the rank of the router's answer that
     * placed it (1, 2, 3 and beyond), by the engine's least-loaded choice after the router
     * failed (fallbacks), and the times every ranked replica was full so dispatch backed off. */
    uint64_t rank_served[3];
    uint64_t fallbacks;
    uint64_t backoffs;
} ms_deployment_stats_t;
const ms_deployment_stats_t *ms_deployment_stats(const ms_deployment_t *d);

/* Introspection for status and tests. */
const char *ms_deployment_name(const ms_deployment_t *d);
size_t ms_deployment_running_replicas(const ms_deployment_t *d);
size_t ms_deployment_queued(const ms_deployment_t *d);

#endif
