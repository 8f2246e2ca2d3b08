/*
 * deployment: a deployment's queue, admission, replica choice, forwarding and replica-set upkeep.
 * See deployment.h.
 *
 * A request becomes a `call`. Calls are pooled per deployment (their timers and buffers are
 * made once and reused), so the steady-state request path allocates nothing here. A call is
 * either QUEUED (in the deployment's FIFO), SENT (a stream on its replica's link), CANCELLING
 * (its client has its answer or left, but the replica has not yet confirmed the stream's end:
 * the call still holds one of the replica's slots), or FREE. Every transition out of QUEUED,
 * SENT or CANCELLING releases the call exactly once.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "deployment/deployment.h"
#include "history/history.h"
#include "link/link.h"
#include "policy/policy.h"
#include "router/router.h"

/* Wall-clock budget of one choose_replicas call: routing is on every request's path. */
#define ROUTER_BUDGET_US         200
#define IMMEDIATE_CHOICE_RETRIES 2
/* Ray Serve's routing backoff: 0.025 s doubling up to 0.5 s while every ranked replica is full. */
#define BACKOFF_INITIAL_MS 25
#define BACKOFF_MAX_MS     500
/* A request that never reached a replica (its link broke first) is routed again this often. */
#define NEVER_SENT_RETRIES 3
/* Streamed body bytes a slow client may have queued before the replica is held back (the
 * replica's link window bounds what arrives meanwhile). */
#define CLIENT_QUEUE_LIMIT (256 * 1024)
/* Ray Serve: a deployment is DEPLOY_FAILED after min(3 * num_replicas, 20) constructor failures
 * with no replica running. */
#define CONSTRUCTOR_RETRIES_PER_REPLICA 3
#define CONSTRUCTOR_RETRIES_CAP         20

typedef enum { CALL_FREE, CALL_QUEUED, CALL_SENT, CALL_CANCELLING } call_state_t;

typedef struct call call_t;
typedef struct batch batch_t;
struct call {
    ms_deployment_t *dep;
    ms_http_request_t *req; /* NULL once CANCELLING */
    ms_replica_t *replica;
    uint32_t stream; /* on the replica's data link or upstream pool */
    uv_timer_t timer;
    call_t *prev, *next; /* queue links, or free-list link */
    call_state_t state;
    int retried;
    uint64_t queued_at_ms; /* loop time it joined the queue (first time) */
    uint64_t sent_at_us;   /* when it was sent to its replica, for the router's latency hook */
    int streaming;
    size_t owed; /* streamed bytes passed to a slow client, credited back once it drains */
    ms_http_header_t *fwd; /* the request's forwardable headers, and its deadline */
    size_t fwd_cap;
    uint64_t timeout_ms;    /* the hop's time limit: request_timeout_s or the deadline header */
    uint64_t deadline_ms;   /* loop time it runs out; both UINT64_MAX without a limit */
    char deadline_text[24]; /* the deadline header's value sent on */
    batch_t *batch;         /* the batch it was sent in (process.batch), else NULL */
};

/* Requests of a batched process deployment sent to one replica as one (process.batch): the
 * batch owns the stream, its calls each hold one of the replica's slots. */
struct batch {
    ms_deployment_t *dep;
    ms_replica_t *replica;
    uint32_t stream;
    call_t **calls;
    int n, cap;
    int status;
    ms_buf_t body; /* the request's JSON array, then the response's body */
    char size_text[16];
    ms_http_header_t head[2];
    batch_t *next_free, *next_all;
};

/* Per-slot bookkeeping that keeps admission and the fallback choice independent of the number of
 * replicas: a routable RUNNING replica below its cap is filed in the bucket of its in-flight
 * count (a list of slots), so "is any replica free" is a counter and "the least loaded one" is
 * the head of the lowest non-empty bucket. */
typedef struct slot_info {
    int prev, next; /* bucket list links (slots), -1 = none */
    int bucket;     /* the in-flight count it is filed under, -1 = not available */
    int running;    /* counted in n_running */
} slot_info_t;

struct ms_deployment {
    uv_loop_t *loop;
    char *app_name;
    char *name;
    int target_replicas;
    int max_ongoing_requests;
    int max_queued_requests;
    double request_timeout_s;
    double graceful_shutdown_timeout_s;
    double health_check_period_s;
    double health_check_timeout_s;
    double cold_start_timeout_s;
    void (*on_cold_start)(ms_deployment_t *d, void *data);
    void *owner_data;
    uv_timer_t cold_timer;  /* bounds how long requests wait with no replica running */
    ms_replica_spec_t spec; /* strings owned */
    const ms_gpu_t *gpus;   /* shared; NULL: no GPU placement */
    ms_gpu_pool_t *gpu_pool;
    unsigned generation;   /* bumped by a code update: older replicas are replaced */
    unsigned settings_seq; /* bumped by a lightweight update */
    ms_router_script_t *script;
    ms_replica_t **slots;    /* replica per router slot; NULL holes */
    unsigned char *routable; /* per slot: known to the Lua router (ready, not stopping) */
    slot_info_t *info;       /* per slot: see slot_info_t */
    int n_slots;
    int *bucket_head, *bucket_tail; /* per in-flight count: first and last slot filed there */
    int n_buckets;                  /* > every filed replica's in-flight count */
    int min_bucket;                 /* no bucket below this one holds a slot */
    int n_available;                /* slots filed in a bucket */
    int n_running;                  /* replicas in state RUNNING */
    /* The router's answer for one choice: one entry per slot, and as many ranks, so a router
     * listing each replica once is never cut short (sized with the slots, off the hot path). */
    int *cand_index, *cand_rank_end;
    int warned_long_answer; /* the router once listed more entries than that */
    /* Stats polls are spread over the period: a request to every replica at once would wake
     * a thousand processes within one control tick. */
    uint64_t polled_at_ms;
    double poll_due; /* fraction of a slot carried to the next call */
    int poll_cursor; /* next slot to poll */
    call_t *queue_head, *queue_tail;
    size_t queued;
    call_t *free_calls;
    call_t **all_calls; /* every call ever made, for teardown */
    size_t n_calls, calls_cap;
    batch_t *free_batches, *all_batches;
    uv_timer_t batch_timer; /* the oldest queued request's batch wait ends */
    uv_timer_t backoff_timer;
    int backoff_step;
    uv_timer_t restart_timer;
    uv_timer_t spawn_timer; /* continues a scale-up past SPAWN_STEP after a pause */
    uint64_t spawn_turn_ms; /* the loop time (one per loop turn) of the latest spawns */
    int spawned_in_turn;    /* replicas started at that loop time */
    int consecutive_failures;
    int constructor_failures; /* since the last replica became ready */
    char *last_failure;
    char spawn_error[MS_GPU_REASON_MAX]; /* why the latest replica could not start; "" = it did */
    int shutting_down;
    void (*shutdown_done)(void *);
    void *shutdown_data;
    int open_timers;
    int freed;
    ms_deployment_stats_t stats;
};

static void dispatch(ms_deployment_t *d);
static void reconcile(ms_deployment_t *d);
static void hold_for_cold_start(ms_deployment_t *d);
static void retire(ms_deployment_t *d, ms_replica_t *r, const char *why);

/* A lifecycle event of replica r (NULL: one not started yet) into the engine's history. */
static void lifecycle(const ms_deployment_t *d, const ms_replica_t *r, const char *event,
                      const char *reason)
{
    ms_history_lifecycle(d->app_name, d->name, r ? r->replica_id : NULL, r ? r->id : NULL, event,
                         reason);
}

/* ---- replica set --------------------------------------------------------------------------- */

static int is_live(const ms_replica_t *r)
{
    return r && (r->state == MS_REPLICA_STARTING || r->state == MS_REPLICA_RUNNING);
}

/* Live replicas of the current code generation: the ones that count toward the target. */
static int live_replicas(const ms_deployment_t *d)
{
    int n = 0;
    for (int i = 0; i < d->n_slots; i++)
        if (is_live(d->slots[i]) && d->slots[i]->generation == d->generation)
            n++;
    return n;
}

static int running_current(const ms_deployment_t *d)
{
    int n = 0;
    for (int i = 0; i < d->n_slots; i++)
        if (d->slots[i] && d->slots[i]->state == MS_REPLICA_RUNNING &&
            d->slots[i]->generation == d->generation)
            n++;
    return n;
}

static int any_replica_left(const ms_deployment_t *d)
{
    for (int i = 0; i < d->n_slots; i++)
        if (d->slots[i])
            return 1;
    return 0;
}

/* The current version cannot start: too many constructor failures in a row and none of its
 * replicas running. Replicas of an older version may still serve (a failed rolling update). */
static int version_failed(const ms_deployment_t *d)
{
    if (d->constructor_failures == 0)
        return 0; /* scaled to zero is not failed */
    int cap = (d->target_replicas > 0 ? d->target_replicas : 1) * CONSTRUCTOR_RETRIES_PER_REPLICA;
    if (cap > CONSTRUCTOR_RETRIES_CAP)
        cap = CONSTRUCTOR_RETRIES_CAP;
    return d->constructor_failures >= cap && running_current(d) == 0;
}

/* Nothing can serve: the current version failed and no older replica runs either, so requests
 * are refused instead of waiting. */
static int deploy_failed(const ms_deployment_t *d)
{
    return version_failed(d) && ms_deployment_running_replicas(d) == 0;
}

static void fail_queued(ms_deployment_t *d, int status, const char *message);

/* ---- availability: which replicas can take a request now ------------------------------------ */

static void bucket_unlink(ms_deployment_t *d, int slot)
{
    slot_info_t *si = &d->info[slot];
    if (si->prev >= 0)
        d->info[si->prev].next = si->next;
    else
        d->bucket_head[si->bucket] = si->next;
    if (si->next >= 0)
        d->info[si->next].prev = si->prev;
    else
        d->bucket_tail[si->bucket] = si->prev;
    si->prev = si->next = si->bucket = -1;
    d->n_available--;
}

/* Grows the bucket table to hold in-flight counts below n. It grows when a replica with a higher
 * max_ongoing_requests than any before is filed, never on a steady-state request. */
static void ensure_buckets(ms_deployment_t *d, int n)
{
    if (n <= d->n_buckets)
        return;
    d->bucket_head = ms_realloc(d->bucket_head, (size_t)n * sizeof *d->bucket_head);
    d->bucket_tail = ms_realloc(d->bucket_tail, (size_t)n * sizeof *d->bucket_tail);
    for (int b = d->n_buckets; b < n; b++)
        d->bucket_head[b] = d->bucket_tail[b] = -1;
    d->n_buckets = n;
}

/* Files at the tail: among equally loaded replicas the one that waited longest goes first. */
static void bucket_link(ms_deployment_t *d, int slot, int bucket)
{
    slot_info_t *si = &d->info[slot];
    si->bucket = bucket;
    si->next = -1;
    si->prev = d->bucket_tail[bucket];
    if (si->prev >= 0)
        d->info[si->prev].next = slot;
    else
        d->bucket_head[bucket] = slot;
    d->bucket_tail[bucket] = slot;
    if (bucket < d->min_bucket)
        d->min_bucket = bucket;
    d->n_available++;
}

/* Brings a slot's bookkeeping in line with its replica, in O(1). Called after every change to a
 * replica's state, routability, in-flight count or cap. */
static void refile(ms_deployment_t *d, int slot)
{
    ms_replica_t *r = d->slots[slot];
    slot_info_t *si = &d->info[slot];
    int running = r && r->state == MS_REPLICA_RUNNING;
    if (running != si->running) {
        d->n_running += running ? 1 : -1;
        si->running = running;
    }
    int bucket =
        running && d->routable[slot] && r->ongoing < r->max_ongoing_requests ? r->ongoing : -1;
    if (bucket == si->bucket)
        return;
    if (si->bucket >= 0)
        bucket_unlink(d, slot);
    if (bucket >= 0) {
        ensure_buckets(d, r->max_ongoing_requests);
        bucket_link(d, slot, bucket);
    }
}

/* The least loaded replica with a free slot, or NULL. The walk up from min_bucket is bounded by
 * max_ongoing_requests, not by the number of replicas. */
static ms_replica_t *least_loaded_available(ms_deployment_t *d)
{
    while (d->min_bucket < d->n_buckets && d->bucket_head[d->min_bucket] < 0)
        d->min_bucket++;
    return d->min_bucket < d->n_buckets ? d->slots[d->bucket_head[d->min_bucket]] : NULL;
}

/* Hands the replica's multiplexed model ids to the router (docs/routing.md: promptly, not a
 * stats period later). Ids that are not strings were dropped by the replica already. */
static void push_model_ids(ms_deployment_t *d, ms_replica_t *r)
{
    size_t n = r->model_ids ? json_array_size(r->model_ids) : 0;
    const char **ids = ms_calloc(n + 1, sizeof *ids);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const char *id = json_string_value(json_array_get(r->model_ids, i));
        if (id)
            ids[k++] = id;
    }
    ms_router_script_set_model_ids(d->script, r->slot, ids, k);
    free(ids);
}

static void on_replica_ready(ms_replica_t *r)
{
    ms_deployment_t *d = r->owner;
    if (r->generation == d->generation) {
        /* Only the current version's start clears its failure count: an older replica that
         * finishes starting during a failing update does not make the new code work. */
        d->consecutive_failures = 0;
        d->constructor_failures = 0;
    }
    if (r->settings_seq != d->settings_seq) {
        /* Started before the latest lightweight update: bring it up to date first. */
        ms_replica_configure(r, d->max_ongoing_requests, d->spec.graceful_shutdown_wait_loop_s);
        ms_replica_reconfigure(r, d->spec.user_config_json);
        r->settings_seq = d->settings_seq;
    }
    ms_router_script_add_replica(d->script, r->slot, r->id, r->max_ongoing_requests);
    d->routable[r->slot] = 1;
    if (r->model_ids) /* models its constructor loaded */
        push_model_ids(d, r);
    refile(d, r->slot);
    /* Its routing stats are wanted now, not a whole stats period later (Ray probes new replicas
     * at once too). */
    ms_replica_poll_stats(r, MS_REPLICA_STATS_TIMEOUT_S);
    ms_info("replica %s: ready (%zu of %d running)", r->id, ms_deployment_running_replicas(d),
            d->target_replicas);
    lifecycle(d, r, "running", NULL);
    reconcile(d); /* a rolling update retires an old replica now */
    dispatch(d);
}

static void on_replica_failed(ms_replica_t *r, const char *error)
{
    ms_deployment_t *d = r->owner;
    ms_error("replica %s: constructor failed: %s", r->id, error);
    char why[600];
    snprintf(why, sizeof why, "constructor failed: %s", error);
    lifecycle(d, r, "failed", why);
    if (r->generation == d->generation) /* an old version's failure says nothing of the new */
        d->constructor_failures++;
    free(d->last_failure);
    d->last_failure = ms_strdup(error);
    if (deploy_failed(d)) {
        char msg[512];
        snprintf(msg, sizeof msg, "deployment %s failed to start: %s", d->name, error);
        fail_queued(d, 503, msg);
    }
}

/* Takes a replica out of the Lua router's candidates (once). */
static void unroute(ms_deployment_t *d, int slot)
{
    if (!d->routable[slot])
        return;
    d->routable[slot] = 0;
    refile(d, slot);
    ms_router_script_remove_replica(d->script, slot);
}

static void on_restart_timer(uv_timer_t *t)
{
    reconcile(t->data);
}

static void maybe_finish_shutdown(ms_deployment_t *d)
{
    if (d->shutting_down && !any_replica_left(d) && d->shutdown_done) {
        void (*done)(void *) = d->shutdown_done;
        d->shutdown_done = NULL;
        done(d->shutdown_data);
    }
}

static void on_replica_exit(ms_replica_t *r, int64_t exit_status, int term_signal)
{
    ms_deployment_t *d = r->owner;
    unroute(d, r->slot);
    d->slots[r->slot] = NULL;
    refile(d, r->slot);
    /* A replica we stopped exiting is routine; any other exit is worth a warning. */
    ms_log_level_t level = d->shutting_down || r->stop_requested ? MS_LOG_INFO : MS_LOG_WARN;
    char how[64];
    if (term_signal)
        snprintf(how, sizeof how, "killed by signal %d", term_signal);
    else
        snprintf(how, sizeof how, "exited with status %d", (int)exit_status);
    ms_log(level, "replica %s: %s", r->id, how);
    int deliberate = r->stop_requested;
    /* A constructor failure was recorded when it was reported; its exit only ends it. */
    int failure_recorded = r->last_error != NULL;
    lifecycle(d, r, deliberate || d->shutting_down || failure_recorded ? "stopped" : "failed", how);
    char replaced_id[24], replaced_tag[96];
    ms_copy_str(replaced_id, sizeof replaced_id, r->replica_id);
    ms_copy_str(replaced_tag, sizeof replaced_tag, r->id);
    ms_gpu_pool_release(d->gpu_pool, &r->gpu);
    ms_replica_free(r);
    if (d->shutting_down) {
        maybe_finish_shutdown(d);
        return;
    }
    if (deliberate) { /* scaled down: nothing to replace */
        reconcile(d);
        return;
    }
    d->stats.replica_failures++;
    d->consecutive_failures++;
    /* Replacements back off exponentially so a crash loop cannot spin the machine. */
    uint64_t delay_ms = 100;
    for (int i = 1; i < d->consecutive_failures && delay_ms < 30000; i++)
        delay_ms *= 2;
    if (delay_ms > 30000)
        delay_ms = 30000;
    char why[96];
    snprintf(why, sizeof why, "replacement starts in %llu ms", (unsigned long long)delay_ms);
    ms_history_lifecycle(d->app_name, d->name, replaced_id, replaced_tag, "restarting", why);
    uv_timer_start(&d->restart_timer, on_restart_timer, delay_ms, 0);
}

static void on_replica_stats(ms_replica_t *r)
{
    ms_deployment_t *d = r->owner;
    if (!d->routable[r->slot] || !r->routing_stats)
        return;
    char *text = json_dumps(r->routing_stats, JSON_COMPACT);
    if (text)
        ms_router_script_set_routing_stats(d->script, r->slot, text);
    free(text);
}

static void on_replica_models(ms_replica_t *r)
{
    ms_deployment_t *d = r->owner;
    if (d->routable[r->slot])
        push_model_ids(d, r);
}

static void on_replica_unhealthy(ms_replica_t *r)
{
    ms_deployment_t *d = r->owner;
    ms_error("replica %s: unhealthy after %d failed health checks; replacing it", r->id,
             r->health_failures);
    char why[64];
    snprintf(why, sizeof why, "%d failed health checks", r->health_failures);
    lifecycle(d, r, "unhealthy", why);
    d->stats.replica_failures++;
    retire(d, r, "unhealthy: replaced");
    reconcile(d); /* the replacement starts now; the unhealthy one drains meanwhile */
}

/* The replica's link broke (it died, or sent garbage): it leaves routing at once, before the
 * requests on the link fail, so the ones never sent go to another replica; one still running is
 * killed and replaced, since nothing can reach it. */
static void on_replica_link_down(ms_replica_t *r)
{
    ms_deployment_t *d = r->owner;
    unroute(d, r->slot);
    if (r->state == MS_REPLICA_RUNNING) {
        ms_warn("replica %s: its data link broke; replacing it", r->id);
        ms_replica_kill(r);
    }
}

static const ms_replica_events_t replica_events = {
    .on_ready = on_replica_ready,
    .on_link_down = on_replica_link_down,
    .on_failed = on_replica_failed,
    .on_exit = on_replica_exit,
    .on_stats = on_replica_stats,
    .on_unhealthy = on_replica_unhealthy,
    .on_models = on_replica_models,
};

/* A slot for a new replica: a hole, or a new one. Every per-slot array grows here, so nothing on
 * a request's path allocates. */
static int free_slot(ms_deployment_t *d)
{
    for (int i = 0; i < d->n_slots; i++)
        if (!d->slots[i])
            return i;
    size_t n = (size_t)d->n_slots + 1;
    d->slots = ms_realloc(d->slots, n * sizeof *d->slots);
    d->routable = ms_realloc(d->routable, n);
    d->info = ms_realloc(d->info, n * sizeof *d->info);
    /* One spare entry tells "the router listed more entries than there are replicas" from an
     * exact fit. */
    d->cand_index = ms_realloc(d->cand_index, (n + 1) * sizeof *d->cand_index);
    d->cand_rank_end = ms_realloc(d->cand_rank_end, (n + 1) * sizeof *d->cand_rank_end);
    d->slots[d->n_slots] = NULL;
    d->routable[d->n_slots] = 0;
    d->info[d->n_slots] = (slot_info_t){.prev = -1, .next = -1, .bucket = -1, .running = 0};
    return d->n_slots++;
}

/* The replica to stop first when scaling down: one still starting (it serves nobody yet), else
 * the running one with the fewest requests in flight. */
static ms_replica_t *pick_victim(const ms_deployment_t *d, int current_generation)
{
    ms_replica_t *best = NULL;
    for (int i = 0; i < d->n_slots; i++) {
        ms_replica_t *r = d->slots[i];
        if (!is_live(r) || (r->generation == d->generation) != current_generation)
            continue;
        if (!best || (r->state == MS_REPLICA_STARTING && best->state != MS_REPLICA_STARTING) ||
            (r->state == best->state && r->ongoing < best->ongoing))
            best = r;
    }
    return best;
}

/* Out of routing at once (no new requests; those in flight finish), then a graceful stop. */
static void retire(ms_deployment_t *d, ms_replica_t *r, const char *why)
{
    lifecycle(d, r, "draining", why);
    unroute(d, r->slot);
    ms_replica_stop(r, d->graceful_shutdown_timeout_s);
    refile(d, r->slot); /* no longer RUNNING */
}

/* Rolling update: a replica of an older code generation stops once a current one can take its
 * place. Old ones still starting serve nobody and stop at once; old running ones keep serving
 * until enough current replicas run, then stop least busy first. */
static void retire_old_generation(ms_deployment_t *d)
{
    int keep = d->target_replicas - running_current(d);
    int old_running = 0;
    for (int i = 0; i < d->n_slots; i++) {
        ms_replica_t *r = d->slots[i];
        if (!is_live(r) || r->generation == d->generation)
            continue;
        if (r->state == MS_REPLICA_STARTING) {
            retire(d, r, "rolling update: an old version still starting");
            continue;
        }
        old_running++;
    }
    for (; old_running > (keep > 0 ? keep : 0); old_running--) {
        ms_replica_t *r = pick_victim(d, 0);
        if (!r)
            break;
        ms_info("replica %s: replaced by the new version", r->id);
        retire(d, r, "rolling update: replaced by the new version");
    }
}

/* Replica processes started per loop turn: each start is a fork and exec on the loop, so a
 * scale-up to thousands would otherwise stop the ingress for seconds. The rest follow after
 * SPAWN_PAUSE_MS, with the loop's I/O served in between (a 0 ms timer would not do: libuv runs
 * a timer re-armed for "now" again within the same pass). */
#define SPAWN_STEP     8
#define SPAWN_PAUSE_MS 1

static void on_spawn_timer(uv_timer_t *t)
{
    reconcile(t->data);
}

/* Whether another replica may start in this loop turn. The budget is per turn, not per call:
 * every replica that becomes ready reconciles too, and a turn may read many of them. The
 * loop's cached time marks the turn (libuv updates it once per turn). */
static int spawn_allowed(ms_deployment_t *d)
{
    uint64_t now = uv_now(d->loop);
    if (now != d->spawn_turn_ms) {
        d->spawn_turn_ms = now;
        d->spawned_in_turn = 0;
    }
    if (d->spawned_in_turn < SPAWN_STEP)
        return 1;
    uv_timer_start(&d->spawn_timer, on_spawn_timer, SPAWN_PAUSE_MS, 0);
    return 0;
}

/* A GPU share for the next replica (none when it needs none). Returns -1 when it cannot be placed
 * now, with the reason ("needs 0.5 GPU, 0.25 free ...") as the deployment's spawn error. */
static int place_gpus(ms_deployment_t *d, ms_gpu_placement_t *out)
{
    memset(out, 0, sizeof *out);
    if (!d->gpu_pool || d->spec.num_gpus <= 0)
        return 0;
    ms_gpu_request_t rq = {.num_gpus = d->spec.num_gpus};
    char reason[MS_GPU_REASON_MAX];
    if (ms_gpu_pool_place(d->gpu_pool, &rq, out, reason) == 0)
        return 0;
    if (strcmp(d->spawn_error, reason) != 0) {
        ms_warn("deployment %s: a replica stays pending: %s", d->name, reason);
        lifecycle(d, NULL, "pending", reason);
    }
    ms_copy_str(d->spawn_error, sizeof d->spawn_error, reason);
    return -1;
}

/* Spawns a replica that holds `gpu`: on a host with GPUs it sees only its own devices (none for a
 * CPU replica), and learns their indices. */
static ms_replica_t *spawn_placed(ms_deployment_t *d, const ms_gpu_placement_t *gpu)
{
    ms_replica_spec_t spec = d->spec;
    char *visible = NULL;
    ms_buf_t ids = {0};
    if (d->gpus && ms_gpu_count(d->gpus) > 0) {
        visible = ms_gpu_visible_devices(d->gpus, gpu);
        for (int i = 0; i < gpu->n_devices; i++)
            ms_buf_appendf(&ids, "%s%d", i ? "," : "", gpu->devices[i]);
        spec.cuda_visible_devices = visible;
        spec.gpu_ids = ids.data ? ids.data : "";
    }
    ms_replica_t *r =
        ms_replica_spawn(d->loop, &spec, &replica_events, d, d->spawn_error, sizeof d->spawn_error);
    free(visible);
    ms_buf_free(&ids);
    return r;
}

/* Starts replicas (SPAWN_STEP per loop turn) until the live count reaches the target, or stops
 * the surplus. */
static void reconcile(ms_deployment_t *d)
{
    if (d->shutting_down)
        return;
    int live = live_replicas(d);
    for (; live > d->target_replicas; live--) {
        ms_replica_t *r = pick_victim(d, 1);
        if (!r)
            break;
        ms_info("replica %s: stopping (scaling %d -> %d)", r->id, live, d->target_replicas);
        char why[64];
        snprintf(why, sizeof why, "scale down %d -> %d", live, d->target_replicas);
        retire(d, r, why);
    }
    for (; live < d->target_replicas && spawn_allowed(d); live++) {
        ms_gpu_placement_t gpu;
        if (place_gpus(d, &gpu) != 0) {
            /* Pending until a share is released: status shows why; look again in a second. */
            uv_timer_start(&d->restart_timer, on_restart_timer, 1000, 0);
            return;
        }
        int slot = free_slot(d);
        char before[sizeof d->spawn_error];
        memcpy(before, d->spawn_error, sizeof before);
        ms_replica_t *r = spawn_placed(d, &gpu);
        if (!r) {
            /* Retried every second: a new reason is news, the same one again is not. */
            if (strcmp(before, d->spawn_error) != 0)
                lifecycle(d, NULL, "failed", d->spawn_error);
            ms_gpu_pool_release(d->gpu_pool, &gpu);
            d->consecutive_failures++;
            uv_timer_start(&d->restart_timer, on_restart_timer, 1000, 0);
            return;
        }
        d->spawn_error[0] = '\0';
        d->spawned_in_turn++;
        d->stats.replica_starts++;
        r->gpu = gpu;
        r->slot = slot;
        r->generation = d->generation;
        r->settings_seq = d->settings_seq;
        d->slots[slot] = r;
        char why[64];
        if (d->consecutive_failures > 0)
            snprintf(why, sizeof why, "replacing a lost replica (target %d)", d->target_replicas);
        else
            snprintf(why, sizeof why, "target %d", d->target_replicas);
        lifecycle(d, r, "starting", why);
    }
    retire_old_generation(d);
}

/* ---- calls --------------------------------------------------------------------------------- */

static void on_call_timeout(uv_timer_t *t);

/* The hop's time limit in ms (UINT64_MAX: none): request_timeout_s (an HTTP setting: not for task
 * calls, whose limit is their queue's task_timeout_s, sent as the deadline header) or the deadline,
 * the sooner. */
static uint64_t hop_timeout_ms(const ms_deployment_t *d, const ms_http_request_t *req,
                               int has_deadline, uint64_t left_ms)
{
    int task = ms_http_request_header(req, "x-moonserve-task", NULL) != NULL;
    uint64_t ms =
        d->request_timeout_s > 0 && !task ? (uint64_t)(d->request_timeout_s * 1000.0) : UINT64_MAX;
    return has_deadline && left_ms < ms ? left_ms : ms;
}

static call_t *call_acquire(ms_deployment_t *d, ms_http_request_t *req, uint64_t timeout_ms)
{
    call_t *c = d->free_calls;
    if (c) {
        d->free_calls = c->next;
    } else {
        c = ms_calloc(1, sizeof *c);
        c->dep = d;
        uv_timer_init(d->loop, &c->timer);
        c->timer.data = c;
        d->open_timers++;
        if (d->n_calls == d->calls_cap) {
            d->calls_cap = d->calls_cap ? d->calls_cap * 2 : 16;
            d->all_calls = ms_realloc(d->all_calls, d->calls_cap * sizeof *d->all_calls);
        }
        d->all_calls[d->n_calls++] = c;
    }
    c->req = req;
    c->replica = NULL;
    c->stream = 0;
    c->prev = c->next = NULL;
    c->retried = 0;
    c->streaming = 0;
    c->batch = NULL;
    c->queued_at_ms = uv_now(d->loop);
    c->timeout_ms = timeout_ms;
    c->deadline_ms = timeout_ms == UINT64_MAX ? UINT64_MAX : c->queued_at_ms + timeout_ms;
    req->user = c;
    if (timeout_ms != UINT64_MAX)
        uv_timer_start(&c->timer, on_call_timeout, timeout_ms, 0);
    return c;
}

static void call_release(call_t *c)
{
    ms_deployment_t *d = c->dep;
    uv_timer_stop(&c->timer);
    if (c->req)
        c->req->user = NULL;
    c->req = NULL;
    c->state = CALL_FREE;
    c->next = d->free_calls;
    d->free_calls = c;
}

static void queue_push(ms_deployment_t *d, call_t *c, int at_front)
{
    c->state = CALL_QUEUED;
    if (at_front) {
        c->prev = NULL;
        c->next = d->queue_head;
        if (d->queue_head)
            d->queue_head->prev = c;
        else
            d->queue_tail = c;
        d->queue_head = c;
    } else {
        c->next = NULL;
        c->prev = d->queue_tail;
        if (d->queue_tail)
            d->queue_tail->next = c;
        else
            d->queue_head = c;
        d->queue_tail = c;
    }
    d->queued++;
}

static void queue_remove(ms_deployment_t *d, call_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        d->queue_head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        d->queue_tail = c->prev;
    c->prev = c->next = NULL;
    d->queued--;
}

static void fail_queued(ms_deployment_t *d, int status, const char *message)
{
    while (d->queue_head) {
        call_t *c = d->queue_head;
        queue_remove(d, c);
        ms_http_request_t *req = c->req;
        call_release(c);
        ms_http_respond_error(req, status, message);
    }
}

/* The call leaves its replica: bookkeeping for in-flight counts. ok: the replica answered
 * (a 5xx counts as a failure for the router's outcome hook all the same). */
static void call_detach(call_t *c, int ok, int status)
{
    ms_replica_t *r = c->replica;
    ms_deployment_t *d = c->dep;
    if (!r)
        return;
    double took_s = (double)(ms_now_us() - c->sent_at_us) / 1e6;
    d->stats.requests[ms_metrics_status_class(status, !ok && status == MS_HTTP_DISCONNECTED)]++;
    ms_histogram_observe(&d->stats.processing, took_s * 1e3);
    if (d->routable[r->slot])
        ms_router_script_on_completed(d->script, r->slot, took_s, ok && status < 500);
    r->ongoing--;
    refile(d, r->slot);
    if (d->routable[r->slot])
        ms_router_script_set_ongoing(d->script, r->slot, r->ongoing);
    c->stream = 0;
    c->replica = NULL;
}

/* The client has its answer (or left) while the replica still works on the request: the
 * stream is cancelled, and the call keeps its slot on the replica until the replica confirms
 * (on_link_released). A replica stuck on it thus gets nothing more to be stuck on. */
static void call_cancel(call_t *c)
{
    uv_timer_stop(&c->timer);
    if (c->req)
        c->req->user = NULL;
    c->req = NULL;
    c->state = CALL_CANCELLING;
    /* A batch's other requests still want their answers: this one just gets none. */
    if (!c->batch)
        ms_replica_cancel(c->replica, c->stream);
}

static void on_call_timeout(uv_timer_t *t)
{
    call_t *c = t->data;
    ms_deployment_t *d = c->dep;
    ms_http_request_t *req = c->req;
    double after_s = (double)c->timeout_ms / 1000.0;
    ms_info("request %s: timed out after %gs", req->request_id, after_s);
    int started = ms_http_response_started(req);
    if (c->state == CALL_QUEUED) {
        queue_remove(d, c);
        call_release(c);
    } else {
        call_cancel(c);
    }
    if (started) {
        ms_http_response_abort(req);
    } else {
        char msg[160];
        snprintf(msg, sizeof msg, "Request %s timed out after %gs.", req->request_id, after_s);
        ms_http_respond_error(req, 408, msg);
    }
    dispatch(d);
}

/* ---- relaying the replica's response -------------------------------------------------------- */

static void on_link_response(void *data, int status, const ms_http_header_t *headers, size_t n,
                             const char *body, size_t body_len)
{
    call_t *c = data;
    ms_deployment_t *d = c->dep;
    ms_http_request_t *req = c->req;
    call_detach(c, 1, status);
    /* Released before responding: a pipelined request handed over synchronously by the
     * response may reuse this call. Headers and body live in the link's input meanwhile. */
    call_release(c);
    ms_http_respond(req, status, headers, n, body, body_len);
    dispatch(d);
}

/* A Content-Length among the head's headers, as a number; -1 when absent or not a number. */
static int64_t head_length(const ms_http_header_t *headers, size_t n, size_t *at)
{
    for (size_t i = 0; i < n; i++) {
        const ms_http_header_t *h = &headers[i];
        if (!ms_http_header_is(h, "content-length"))
            continue;
        int64_t v = 0;
        if (h->value_len == 0 || h->value_len > 18)
            return -1;
        for (size_t k = 0; k < h->value_len; k++) {
            if (h->value[k] < '0' || h->value[k] > '9')
                return -1;
            v = v * 10 + (h->value[k] - '0');
        }
        *at = i;
        return v;
    }
    return -1;
}

/* A streamed response keeps the replica's Content-Length when it gave one (a process replica's
 * download keeps its length, so clients see progress and truncation); otherwise it is chunked.
 * The header itself is left to the HTTP layer, which writes the framing. */
static void on_link_head(void *data, int status, const ms_http_header_t *headers, size_t n)
{
    call_t *c = data;
    c->streaming = 1;
    c->owed = 0;
    size_t at = 0;
    int64_t len = head_length(headers, n, &at);
    if (len < 0) {
        ms_http_response_start(c->req, status, headers, n);
        return;
    }
    if (c->fwd_cap < n) {
        c->fwd_cap = n;
        c->fwd = ms_realloc(c->fwd, c->fwd_cap * sizeof *c->fwd);
    }
    /* The request's forwarded headers are no longer needed: the array is reused. */
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (i != at)
            c->fwd[k++] = headers[i];
    ms_http_response_start_length(c->req, status, c->fwd, k, (uint64_t)len);
}

/* The slow client took everything queued: the replica may send what it held back. */
static void on_client_drained(ms_http_request_t *req, void *data)
{
    call_t *c = data;
    (void)req;
    if (c->state == CALL_SENT && c->owed) {
        ms_replica_credit(c->replica, c->stream, c->owed);
        c->owed = 0;
    }
}

/* Body bytes are credited back at once while the client keeps up; past CLIENT_QUEUE_LIMIT
 * queued for it, the credit waits for the client to drain, so the replica's window closes and
 * the controller holds at most the window plus that limit for one slow reader. */
static void on_link_data(void *data, const char *p, size_t n)
{
    call_t *c = data;
    ms_http_response_chunk(c->req, p, n);
    if (!c->owed && ms_http_response_queued(c->req) <= CLIENT_QUEUE_LIMIT) {
        ms_replica_credit(c->replica, c->stream, n);
        return;
    }
    c->owed += n;
    ms_http_response_on_drain(c->req, on_client_drained, c);
}

static void on_link_end(void *data)
{
    call_t *c = data;
    ms_deployment_t *d = c->dep;
    ms_http_request_t *req = c->req;
    call_detach(c, 1, 200);
    call_release(c);
    ms_http_response_end(req);
    dispatch(d);
}

/* The call's replica failed it. never_sent: the request surely never reached the replica, so
 * it may be routed again without running twice. */
static void call_failed(call_t *c, int never_sent, const char *why)
{
    ms_deployment_t *d = c->dep;
    ms_http_request_t *req = c->req;
    ms_replica_t *r = c->replica;
    ms_warn("request %s: replica %s failed: %s", req->request_id, r ? r->id : "?", why);
    call_detach(c, 0, 502);
    if (ms_http_response_started(req)) {
        call_release(c);
        ms_http_response_abort(req);
    } else if (never_sent && c->retried < NEVER_SENT_RETRIES) {
        /* The request never reached the replica (its link broke first): route it again; the
         * replica has left routing already, so another one takes it. */
        c->retried++;
        queue_push(d, c, 1);
    } else {
        char msg[256];
        snprintf(msg, sizeof msg, "replica %s of deployment %s failed while handling the request",
                 r ? r->id : "?", d->name);
        call_release(c);
        ms_http_respond_error(req, 502, msg);
    }
    dispatch(d);
}

static void on_link_error(void *data, ms_link_error_t err, int never_sent)
{
    call_failed(data, never_sent, ms_link_error_text(err));
}

/* A cancelled stream is over at the replica: its slot is free again. */
static void on_link_released(void *data)
{
    call_t *c = data;
    ms_deployment_t *d = c->dep;
    call_detach(c, 0, MS_HTTP_DISCONNECTED);
    call_release(c);
    dispatch(d);
}

static const ms_link_callbacks_t relay_callbacks = {
    .on_response = on_link_response,
    .on_head = on_link_head,
    .on_data = on_link_data,
    .on_end = on_link_end,
    .on_error = on_link_error,
    .on_released = on_link_released,
};

/* Hop-by-hop and framing headers are the hop's own business and are not forwarded; nor is the
 * deadline as it arrived: the time left is sent instead. */
static int forwardable(const ms_http_header_t *h)
{
    static const char *const skip[] = {"connection",        "keep-alive",
                                       "transfer-encoding", "content-length",
                                       "x-request-id",      "te",
                                       "upgrade",           "expect",
                                       "proxy-connection",  "x-moonserve-timeout-ms"};
    for (size_t i = 0; i < sizeof skip / sizeof *skip; i++)
        if (ms_http_header_is(h, skip[i]))
            return 0;
    return 1;
}

static int is_route_prefix_header(const ms_http_header_t *h)
{
    return ms_http_header_is(h, MS_ROUTE_PREFIX_HEADER);
}

/* The request as the link carries it; the header array is the call's, reused. A request from
 * the ingress tells the replica the route_prefix it matched (ingress routes match below it,
 * docs/lua-api.md), unless it is "/", which is what no header means (one header fewer to copy,
 * parse and intern on the commonest route); a client's own copy of that header is dropped. A handle
 * call keeps the header its caller forwarded. */
static ms_link_request_t link_request(call_t *c)
{
    ms_http_request_t *req = c->req;
    if (c->fwd_cap < req->n_headers + 2) {
        c->fwd_cap = req->n_headers + 2;
        c->fwd = ms_realloc(c->fwd, c->fwd_cap * sizeof *c->fwd);
    }
    size_t n = 0;
    for (size_t i = 0; i < req->n_headers; i++)
        if (forwardable(&req->headers[i]) &&
            !(req->route_prefix && is_route_prefix_header(&req->headers[i])))
            c->fwd[n++] = req->headers[i];
    if (req->route_prefix && strcmp(req->route_prefix, "/") != 0)
        c->fwd[n++] = (ms_http_header_t){MS_ROUTE_PREFIX_HEADER, MS_ROUTE_PREFIX_HEADER_LEN,
                                         req->route_prefix, strlen(req->route_prefix)};
    if (c->deadline_ms != UINT64_MAX) {
        uint64_t now = uv_now(c->dep->loop);
        uint64_t left = c->deadline_ms > now ? c->deadline_ms - now : 0;
        int len =
            snprintf(c->deadline_text, sizeof c->deadline_text, "%llu", (unsigned long long)left);
        c->fwd[n++] = (ms_http_header_t){MS_LINK_DEADLINE_HEADER, MS_LINK_DEADLINE_HEADER_LEN,
                                         c->deadline_text, (size_t)len};
    }
    return (ms_link_request_t){
        .method = req->method,
        .target = req->target,
        .target_len = req->target_len,
        .request_id = req->request_id,
        .headers = c->fwd,
        .n_headers = n,
        .body = req->body,
        .body_len = req->body_len,
    };
}

/* The call leaves the queue for replica r: its wait is measured and its replica noted. */
static void note_sent(ms_deployment_t *d, const call_t *c, const ms_replica_t *r)
{
    ms_histogram_observe(&d->stats.queue_wait, (double)(uv_now(d->loop) - c->queued_at_ms));
    ms_copy_str(c->req->served_by, sizeof c->req->served_by, r->id);
}

static void send_call(ms_deployment_t *d, call_t *c, ms_replica_t *r)
{
    note_sent(d, c, r);
    c->state = CALL_SENT;
    c->sent_at_us = ms_now_us();
    c->replica = r;
    c->streaming = 0;
    r->ongoing++;
    refile(d, r->slot);
    ms_router_script_set_ongoing(d->script, r->slot, r->ongoing);
    ms_link_request_t lr = link_request(c);
    c->stream = ms_replica_send(r, &lr, c->req->body_streamed ? c->req : NULL, &relay_callbacks, c);
    if (!c->stream)
        call_failed(c, 1, "the link to the replica is down");
}

/* ---- batches (process.batch) ----------------------------------------------------------------- */

static int batched(const ms_deployment_t *d)
{
    return d->spec.process && d->spec.process->batch_max_size > 0;
}

static batch_t *batch_acquire(ms_deployment_t *d)
{
    int cap = d->spec.process->batch_max_size;
    batch_t *b = d->free_batches;
    if (b) {
        d->free_batches = b->next_free;
    } else {
        b = ms_calloc(1, sizeof *b);
        b->dep = d;
        b->next_all = d->all_batches;
        d->all_batches = b;
    }
    if (b->cap < cap) {
        b->cap = cap;
        b->calls = ms_realloc(b->calls, (size_t)cap * sizeof *b->calls);
    }
    b->n = 0;
    b->status = 0;
    ms_buf_reset(&b->body);
    return b;
}

static void batch_release(batch_t *b)
{
    ms_deployment_t *d = b->dep;
    b->replica = NULL;
    b->next_free = d->free_batches;
    d->free_batches = b;
}

/* Why the replica's answer cannot be split among the batch's callers; NULL when it can. */
static const char *batch_answer_problem(const batch_t *b, json_t *results, char *buf, size_t cap)
{
    if (b->status != 200)
        snprintf(buf, cap, "it answered status %d", b->status);
    else if (!json_is_array(results))
        snprintf(buf, cap, "its answer is not a JSON array");
    else if (json_array_size(results) != (size_t)b->n)
        snprintf(buf, cap, "it answered %zu results for %d requests", json_array_size(results),
                 b->n);
    else
        return NULL;
    return buf;
}

static void respond_result(ms_http_request_t *req, json_t *result)
{
    static const ms_http_header_t type = {"Content-Type", 12, "application/json", 16};
    char *text = json_dumps(result, JSON_COMPACT | JSON_ENCODE_ANY);
    ms_http_respond(req, 200, &type, 1, text, strlen(text));
    free(text);
}

/* The replica answered the batch: caller i gets element i of the JSON array, as JSON with 200;
 * an answer that does not split (not 200, not an array, another length) fails every caller. */
static void batch_finish(batch_t *b, const char *body, size_t len)
{
    ms_deployment_t *d = b->dep;
    json_t *results = b->status == 200 ? json_loadb(body, len, 0, NULL) : NULL;
    char why[96];
    const char *problem = batch_answer_problem(b, results, why, sizeof why);
    if (problem)
        ms_warn("deployment %s: replica %s failed a batch of %d: %s", d->name, b->replica->id, b->n,
                problem);
    for (int i = 0; i < b->n; i++) {
        call_t *c = b->calls[i];
        ms_http_request_t *req = c->req;
        call_detach(c, !problem, problem ? 502 : 200);
        c->batch = NULL;
        call_release(c);
        if (!req)
            continue; /* timed out or left while the batch ran */
        if (!problem) {
            respond_result(req, json_array_get(results, (size_t)i));
            continue;
        }
        char msg[256];
        snprintf(msg, sizeof msg, "replica %s of deployment %s failed a batch of %d: %s",
                 b->replica->id, d->name, b->n, problem);
        ms_http_respond_error(req, 502, msg);
    }
    json_decref(results);
    batch_release(b);
    dispatch(d);
}

static void on_batch_response(void *data, int status, const ms_http_header_t *headers, size_t n,
                              const char *body, size_t body_len)
{
    batch_t *b = data;
    (void)headers, (void)n;
    b->status = status;
    batch_finish(b, body, body_len);
}

static void on_batch_head(void *data, int status, const ms_http_header_t *headers, size_t n)
{
    batch_t *b = data;
    (void)headers, (void)n;
    b->status = status;
    ms_buf_reset(&b->body);
}

static void on_batch_data(void *data, const char *p, size_t n)
{
    batch_t *b = data;
    ms_buf_append(&b->body, p, n);
    ms_replica_credit(b->replica, b->stream, n);
}

static void on_batch_end(void *data)
{
    batch_t *b = data;
    batch_finish(b, b->body.data ? b->body.data : "", b->body.len);
}

/* The batch never got an answer. Requests that surely never reached the replica are routed
 * again, in their order; the rest fail with 502. */
static void batch_failed(batch_t *b, int never_sent, const char *why)
{
    ms_deployment_t *d = b->dep;
    ms_warn("deployment %s: replica %s failed a batch of %d: %s", d->name, b->replica->id, b->n,
            why);
    char msg[256];
    snprintf(msg, sizeof msg, "replica %s of deployment %s failed while handling the request",
             b->replica->id, d->name);
    for (int i = b->n - 1; i >= 0; i--) {
        call_t *c = b->calls[i];
        ms_http_request_t *req = c->req;
        call_detach(c, 0, 502);
        c->batch = NULL;
        if (req && never_sent && c->retried < NEVER_SENT_RETRIES) {
            c->retried++;
            queue_push(d, c, 1);
            continue;
        }
        call_release(c);
        if (req)
            ms_http_respond_error(req, 502, msg);
    }
    batch_release(b);
    dispatch(d);
}

static void on_batch_error(void *data, ms_link_error_t err, int never_sent)
{
    batch_failed(data, never_sent, ms_link_error_text(err));
}

static const ms_link_callbacks_t batch_callbacks = {
    .on_response = on_batch_response,
    .on_head = on_batch_head,
    .on_data = on_batch_data,
    .on_end = on_batch_end,
    .on_error = on_batch_error,
};

/* Takes the queue's first requests, as many as the batch and the replica's free slots allow,
 * and sends their bodies to r as one JSON array. */
static void send_batch(ms_deployment_t *d, ms_replica_t *r)
{
    const ms_process_config_t *pc = d->spec.process;
    batch_t *b = batch_acquire(d);
    b->replica = r;
    int room = r->max_ongoing_requests - r->ongoing;
    uint64_t now = ms_now_us();
    ms_buf_append(&b->body, "[", 1);
    while (d->queue_head && b->n < pc->batch_max_size && b->n < room) {
        call_t *c = d->queue_head;
        queue_remove(d, c);
        note_sent(d, c, r);
        c->state = CALL_SENT;
        c->sent_at_us = now;
        c->replica = r;
        c->batch = b;
        c->stream = 0;
        b->calls[b->n++] = c;
        if (b->n > 1)
            ms_buf_append(&b->body, ",", 1);
        if (c->req->body_len)
            ms_buf_append(&b->body, c->req->body, c->req->body_len);
        else
            ms_buf_append(&b->body, "null", 4);
    }
    ms_buf_append(&b->body, "]", 1);
    r->ongoing += b->n;
    refile(d, r->slot);
    ms_router_script_set_ongoing(d->script, r->slot, r->ongoing);
    int len = snprintf(b->size_text, sizeof b->size_text, "%d", b->n);
    b->head[0] = (ms_http_header_t){"Content-Type", 12, "application/json", 16};
    b->head[1] = (ms_http_header_t){"X-Moonserve-Batch-Size", 22, b->size_text, (size_t)len};
    ms_link_request_t lr = {
        .method = "POST",
        .target = pc->batch_path,
        .target_len = strlen(pc->batch_path),
        .request_id = b->calls[0]->req->request_id,
        .headers = b->head,
        .n_headers = 2,
        .body = b->body.data,
        .body_len = b->body.len,
    };
    b->stream = ms_replica_send(r, &lr, NULL, &batch_callbacks, b);
    if (!b->stream)
        batch_failed(b, 1, "the link to the replica is down");
}

static void on_batch_timer(uv_timer_t *t)
{
    dispatch(t->data);
}

/* A batch leaves once it is full or its oldest request has waited batch_wait_timeout_s (Ray
 * Serve's rule: the wait counts from the batch's first item). */
static int batch_should_wait(ms_deployment_t *d)
{
    const ms_process_config_t *pc = d->spec.process;
    if (d->queued >= (size_t)pc->batch_max_size)
        return 0;
    uint64_t due = d->queue_head->queued_at_ms + (uint64_t)(pc->batch_wait_timeout_s * 1000.0);
    uint64_t now = uv_now(d->loop);
    if (now >= due)
        return 0;
    uv_timer_start(&d->batch_timer, on_batch_timer, due - now, 0);
    return 1;
}

/* ---- choosing a replica ---------------------------------------------------------------------- */

static ms_replica_t *usable(const ms_deployment_t *d, int slot)
{
    if (slot < 0 || slot >= d->n_slots)
        return NULL;
    ms_replica_t *r = d->slots[slot];
    if (!r || r->state != MS_REPLICA_RUNNING || r->ongoing >= r->max_ongoing_requests)
        return NULL;
    return r;
}

/* The candidate with the fewest in-flight requests below its cap, first one on ties. */
static ms_replica_t *least_loaded(const ms_deployment_t *d, const int *slots, int n)
{
    ms_replica_t *best = NULL;
    for (int i = 0; i < n; i++) {
        ms_replica_t *r = usable(d, slots[i]);
        if (r && (!best || r->ongoing < best->ongoing))
            best = r;
    }
    return best;
}

/* Asks the deployment's Lua router for ranked candidates and takes, rank by rank, the one with
 * the fewest in-flight requests below its cap. A failing router falls back to least-loaded. */
static ms_replica_t *choose(ms_deployment_t *d, call_t *c)
{
    ms_route_request_t rr = {
        .id = c->req->request_id,
        .method = c->req->method,
        .path = c->req->path,
        .multiplexed_model_id = "", /* the script reads serve_multiplexed_model_id itself */
        .headers = c->req->headers,
        .n_headers = c->req->n_headers,
        .body = c->req->body,
        .body_len = c->req->body_len,
    };
    int *idx = d->cand_index, *ends = d->cand_rank_end;
    size_t cap = (size_t)d->n_slots + 1;
    for (int attempt = 0; attempt <= IMMEDIATE_CHOICE_RETRIES; attempt++) {
        int ranks = ms_router_script_choose(d->script, &rr, idx, cap, ends, cap);
        if (ranks < 0) {
            ms_replica_t *r = least_loaded_available(d);
            d->stats.fallbacks += r != NULL;
            return r;
        }
        if (ranks > 0 && (size_t)ends[ranks - 1] == cap && !d->warned_long_answer) {
            d->warned_long_answer = 1;
            ms_warn("deployment %s: the router listed more than %zu candidate entries (replicas "
                    "repeated across ranks); entries past that are ignored",
                    d->name, cap);
        }
        int start = 0;
        for (int k = 0; k < ranks; k++) {
            ms_replica_t *r = least_loaded(d, idx + start, ends[k] - start);
            if (r) {
                d->stats.rank_served[k < 2 ? k : 2]++;
                ms_router_script_on_routed(d->script, &rr, r->slot);
                return r;
            }
            start = ends[k];
        }
    }
    return NULL;
}

static void on_backoff_timer(uv_timer_t *t)
{
    dispatch(t->data);
}

static void dispatch(ms_deployment_t *d)
{
    while (d->queue_head && d->n_available > 0) {
        if (batched(d) && batch_should_wait(d))
            return;
        call_t *c = d->queue_head;
        ms_replica_t *r = choose(d, c);
        if (!r) {
            /* Every ranked replica is full although some replica has room: retry later, as
             * Ray Serve backs off, and sooner if a replica frees a slot. */
            uint64_t ms = BACKOFF_INITIAL_MS << (d->backoff_step < 5 ? d->backoff_step : 5);
            d->backoff_step++;
            d->stats.backoffs++;
            uv_timer_start(&d->backoff_timer, on_backoff_timer,
                           ms > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : ms, 0);
            return;
        }
        d->backoff_step = 0;
        if (batched(d)) {
            send_batch(d, r);
            continue;
        }
        queue_remove(d, c);
        send_call(d, c, r);
    }
}

/* ---- cold start ------------------------------------------------------------------------------ */

/* Answers 503 with Retry-After to requests that waited cold_start_timeout_s with no replica
 * running, and keeps watching while others wait. */
static void on_cold_timer(uv_timer_t *t)
{
    ms_deployment_t *d = t->data;
    if (ms_deployment_running_replicas(d) > 0)
        return; /* dispatch serves the queue from here */
    uint64_t now = uv_now(d->loop), limit = (uint64_t)(d->cold_start_timeout_s * 1000.0);
    static const ms_http_header_t retry_after = {"Retry-After", 11, "1", 1};
    call_t *next;
    for (call_t *c = d->queue_head; c; c = next) {
        next = c->next;
        if (now - c->queued_at_ms < limit)
            continue;
        ms_http_request_t *req = c->req;
        queue_remove(d, c);
        call_release(c);
        char msg[200];
        snprintf(msg, sizeof msg, "deployment %s has no replica running yet; retry shortly",
                 d->name);
        ms_http_respond_error_headers(req, 503, msg, &retry_after, 1);
    }
    if (d->queue_head)
        uv_timer_start(&d->cold_timer, on_cold_timer, 100, 0);
}

/* A request is waiting and no replica runs: ask the owner to scale up from zero at once, and
 * bound the wait. */
static void hold_for_cold_start(ms_deployment_t *d)
{
    if (d->target_replicas == 0 && d->on_cold_start)
        d->on_cold_start(d, d->owner_data);
    if (!uv_is_active((uv_handle_t *)&d->cold_timer))
        uv_timer_start(&d->cold_timer, on_cold_timer, 100, 0);
}

/* ---- public API ------------------------------------------------------------------------------ */

void ms_deployment_set_target(ms_deployment_t *d, int n)
{
    if (n < 0 || n == d->target_replicas)
        return;
    ms_info("deployment %s: target %d -> %d replicas", d->name, d->target_replicas, n);
    d->target_replicas = n;
    reconcile(d);
}

static void replace_string(const char **field, const char *value)
{
    free((char *)*field);
    *field = ms_strdup(value ? value : "");
}

void ms_deployment_update(ms_deployment_t *d, const ms_deployment_settings_t *s)
{
    int user_config_changed = strcmp(d->spec.user_config_json, s->spec.user_config_json) != 0;
    int cap_changed =
        d->max_ongoing_requests != s->max_ongoing_requests ||
        d->spec.graceful_shutdown_wait_loop_s != s->spec.graceful_shutdown_wait_loop_s;
    d->max_queued_requests = s->max_queued_requests;
    d->request_timeout_s = s->request_timeout_s;
    d->graceful_shutdown_timeout_s = s->graceful_shutdown_timeout_s;
    d->health_check_period_s = s->health_check_period_s;
    d->health_check_timeout_s = s->health_check_timeout_s;
    if (!user_config_changed && !cap_changed)
        return;
    d->max_ongoing_requests = s->max_ongoing_requests;
    d->spec.max_ongoing_requests = s->max_ongoing_requests;
    d->spec.graceful_shutdown_wait_loop_s = s->spec.graceful_shutdown_wait_loop_s;
    replace_string(&d->spec.user_config_json, s->spec.user_config_json);
    d->settings_seq++;
    ms_info("deployment %s: updating in place%s%s", d->name,
            user_config_changed ? " (user_config -> reconfigure)" : "",
            cap_changed ? " (max_ongoing_requests / drain step)" : "");
    for (int i = 0; i < d->n_slots; i++) {
        ms_replica_t *r = d->slots[i];
        if (!r || r->state != MS_REPLICA_RUNNING)
            continue; /* starting ones catch up when ready */
        if (cap_changed) {
            ms_replica_configure(r, d->max_ongoing_requests, d->spec.graceful_shutdown_wait_loop_s);
            refile(d, r->slot);
            if (d->routable[r->slot]) { /* the router sees the new cap too */
                ms_router_script_remove_replica(d->script, r->slot);
                ms_router_script_add_replica(d->script, r->slot, r->id, r->max_ongoing_requests);
                ms_router_script_set_ongoing(d->script, r->slot, r->ongoing);
            }
        }
        if (user_config_changed)
            ms_replica_reconfigure(r, d->spec.user_config_json);
        r->settings_seq = d->settings_seq;
    }
    dispatch(d); /* a higher cap may let queued requests through */
}

void ms_deployment_roll(ms_deployment_t *d, const ms_replica_spec_t *spec)
{
    replace_string(&d->spec.import_path, spec->import_path);
    replace_string(&d->spec.args_json, spec->args_json);
    /* ray_actor_options changes roll the replicas too: the new ones get the new cap and share. */
    d->spec.memory_bytes = spec->memory_bytes;
    d->spec.num_gpus = spec->num_gpus;
    ms_config_process_free((ms_process_config_t *)d->spec.process);
    d->spec.process = ms_config_process_copy(spec->process);
    memcpy(d->spec.log_level, spec->log_level, sizeof d->spec.log_level);
    d->spec.log_json = spec->log_json;
    memcpy(d->spec.logs_dir, spec->logs_dir, sizeof d->spec.logs_dir);
    d->spec.log_rotation_max_bytes = spec->log_rotation_max_bytes;
    d->spec.log_rotation_backup_count = spec->log_rotation_backup_count;
    d->generation++;
    /* New code gets a fresh count of constructor failures and no backoff left from the old. */
    d->constructor_failures = 0;
    d->consecutive_failures = 0;
    ms_info("deployment %s: code or replica settings changed; replacing replicas (new ones "
            "first)",
            d->name);
    reconcile(d);
}

int ms_deployment_target(const ms_deployment_t *d)
{
    return d->target_replicas;
}

size_t ms_deployment_replicas(const ms_deployment_t *d, ms_replica_t **out, size_t cap)
{
    size_t n = 0;
    for (int i = 0; i < d->n_slots; i++) {
        if (!d->slots[i])
            continue;
        if (n < cap)
            out[n] = d->slots[i];
        n++;
    }
    return n;
}

void ms_deployment_check_health(ms_deployment_t *d)
{
    if (d->shutting_down || d->health_check_period_s <= 0)
        return;
    for (int i = 0; i < d->n_slots; i++)
        if (d->slots[i])
            ms_replica_check_health(d->slots[i], d->health_check_period_s,
                                    d->health_check_timeout_s);
}

void ms_deployment_poll_stats(ms_deployment_t *d, double period_s, double timeout_s)
{
    uint64_t now = uv_now(d->loop);
    double elapsed_s = (double)(now - d->polled_at_ms) / 1000.0;
    d->polled_at_ms = now;
    /* The share of the slots due since the last call; the fraction left over carries on, so
     * each slot comes round once per period. */
    double due = d->poll_due + (period_s > 0 ? d->n_slots * elapsed_s / period_s : d->n_slots);
    if (due > d->n_slots)
        due = d->n_slots;
    int k = (int)due;
    d->poll_due = due - k;
    for (; k > 0; k--) {
        ms_replica_t *r = d->slots[d->poll_cursor];
        if (r)
            ms_replica_poll_stats(r, timeout_s);
        d->poll_cursor = (d->poll_cursor + 1) % d->n_slots;
    }
}

/* A batch carries its requests' bodies as the elements of one JSON array. */
static int body_is_json(const ms_http_request_t *req)
{
    if (req->body_len == 0)
        return 1;
    json_t *j = json_loadb(req->body, req->body_len, JSON_DECODE_ANY, NULL);
    int ok = j != NULL;
    json_decref(j);
    return ok;
}

void ms_deployment_submit(ms_deployment_t *d, ms_http_request_t *req)
{
    if (d->shutting_down) {
        ms_http_respond_error(req, 503, "deployment is shutting down");
        return;
    }
    if (deploy_failed(d)) {
        char msg[512];
        snprintf(msg, sizeof msg, "deployment %s failed to start: %s", d->name,
                 d->last_failure ? d->last_failure : "unknown error");
        ms_http_respond_error(req, 503, msg);
        return;
    }
    if (d->max_queued_requests >= 0 && d->queued >= (size_t)d->max_queued_requests) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "Request dropped due to backpressure (num_queued_requests=%zu, "
                 "max_queued_requests=%d).",
                 d->queued, d->max_queued_requests);
        ms_http_respond_error(req, 503, msg);
        return;
    }
    if (batched(d) && !body_is_json(req)) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "deployment %s batches its requests: the request body must be JSON (or empty)",
                 d->name);
        ms_http_respond_error(req, 400, msg);
        return;
    }
    uint64_t left_ms = 0;
    int has_deadline = ms_link_deadline(req->headers, req->n_headers, &left_ms);
    if (has_deadline < 0) {
        ms_http_respond_error(req, 400,
                              MS_LINK_DEADLINE_HEADER " must be a whole number of milliseconds");
        return;
    }
    if (has_deadline && left_ms == 0) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "Request %s timed out: its deadline had passed before it "
                 "reached deployment %s.",
                 req->request_id, d->name);
        ms_http_respond_error(req, 408, msg);
        return;
    }
    call_t *c = call_acquire(d, req, hop_timeout_ms(d, req, has_deadline, left_ms));
    queue_push(d, c, 0);
    dispatch(d);
    if (c->state == CALL_QUEUED && ms_deployment_running_replicas(d) == 0)
        hold_for_cold_start(d);
}

int ms_deployment_streams_body(const ms_deployment_t *d, int64_t body_length)
{
    const ms_process_config_t *p = d->spec.process;
    return p && !p->batch_max_size && (body_length < 0 || body_length > p->stream_body_bytes);
}

void ms_deployment_abort(ms_http_request_t *req)
{
    call_t *c = req->user;
    if (!c)
        return;
    ms_deployment_t *d = c->dep;
    ms_debug("request %s: client went away; cancelling", req->request_id);
    if (c->state == CALL_QUEUED) {
        queue_remove(d, c);
        call_release(c);
    } else {
        call_cancel(c);
    }
    dispatch(d);
}

static char *dup_or_empty(const char *s)
{
    return ms_strdup(s ? s : "");
}

ms_deployment_t *ms_deployment_new(uv_loop_t *loop, const ms_deployment_settings_t *s, char **err)
{
    ms_router_script_t *script = ms_router_script_new_class(
        s->router_file, s->router_attr, s->router_kwargs_json, ROUTER_BUDGET_US, err);
    if (!script)
        return NULL;
    ms_policy_set_labels(ms_router_script_policy(script), s->app_name, s->name, NULL);
    ms_deployment_t *d = ms_calloc(1, sizeof *d);
    d->loop = loop;
    d->script = script;
    d->app_name = ms_strdup(s->app_name);
    d->name = ms_strdup(s->name);
    d->target_replicas = s->num_replicas;
    d->max_ongoing_requests = s->max_ongoing_requests;
    d->max_queued_requests = s->max_queued_requests;
    d->request_timeout_s = s->request_timeout_s;
    d->graceful_shutdown_timeout_s = s->graceful_shutdown_timeout_s;
    d->health_check_period_s = s->health_check_period_s;
    d->health_check_timeout_s = s->health_check_timeout_s;
    d->cold_start_timeout_s = s->cold_start_timeout_s > 0 ? s->cold_start_timeout_s : 30.0;
    d->on_cold_start = s->on_cold_start;
    d->owner_data = s->owner_data;
    d->spec = s->spec;
    d->spec.exe_path = dup_or_empty(s->spec.exe_path);
    d->spec.run_dir = dup_or_empty(s->spec.run_dir);
    d->spec.controller_socket = dup_or_empty(s->spec.controller_socket);
    d->spec.app_name = d->app_name;
    d->spec.deployment_name = d->name;
    d->spec.import_path = dup_or_empty(s->spec.import_path);
    d->spec.args_json = dup_or_empty(s->spec.args_json);
    d->spec.user_config_json = dup_or_empty(s->spec.user_config_json);
    d->spec.max_ongoing_requests = s->max_ongoing_requests;
    d->spec.cuda_visible_devices = d->spec.gpu_ids = NULL; /* set per spawn */
    d->spec.process = ms_config_process_copy(s->spec.process);
    d->gpus = s->gpus;
    d->gpu_pool = s->gpu_pool;
    uv_timer_init(loop, &d->backoff_timer);
    d->backoff_timer.data = d;
    uv_timer_init(loop, &d->restart_timer);
    d->restart_timer.data = d;
    uv_timer_init(loop, &d->cold_timer);
    d->cold_timer.data = d;
    uv_timer_init(loop, &d->spawn_timer);
    d->spawn_timer.data = d;
    uv_timer_init(loop, &d->batch_timer);
    d->batch_timer.data = d;
    d->open_timers = 5;
    reconcile(d);
    return d;
}

void ms_deployment_shutdown(ms_deployment_t *d, void (*done)(void *), void *data)
{
    d->shutting_down = 1;
    d->shutdown_done = done;
    d->shutdown_data = data;
    uv_timer_stop(&d->backoff_timer);
    uv_timer_stop(&d->restart_timer);
    uv_timer_stop(&d->cold_timer);
    uv_timer_stop(&d->spawn_timer);
    uv_timer_stop(&d->batch_timer);
    fail_queued(d, 503, "deployment is shutting down");
    for (int i = 0; i < d->n_slots; i++) {
        ms_replica_t *r = d->slots[i];
        if (!r)
            continue;
        lifecycle(d, r, "draining", "shutdown");
        unroute(d, r->slot);
        ms_replica_stop(r, d->graceful_shutdown_timeout_s);
        refile(d, r->slot);
    }
    maybe_finish_shutdown(d);
}

static void timer_closed(ms_deployment_t *d)
{
    if (--d->open_timers > 0)
        return;
    for (size_t i = 0; i < d->n_calls; i++) {
        call_t *c = d->all_calls[i];
        free(c->fwd);
        free(c);
    }
    free(d->all_calls);
    for (batch_t *b = d->all_batches, *next; b; b = next) {
        next = b->next_all;
        free(b->calls);
        ms_buf_free(&b->body);
        free(b);
    }
    free(d->slots);
    free(d->routable);
    free(d->info);
    free(d->bucket_head);
    free(d->bucket_tail);
    free(d->cand_index);
    free(d->cand_rank_end);
    free((char *)d->spec.exe_path);
    free((char *)d->spec.run_dir);
    free((char *)d->spec.controller_socket);
    free((char *)d->spec.import_path);
    free((char *)d->spec.args_json);
    free((char *)d->spec.user_config_json);
    ms_config_process_free((ms_process_config_t *)d->spec.process);
    free(d->last_failure);
    free(d->app_name);
    free(d->name);
    free(d);
}

static void on_deployment_timer_closed(uv_handle_t *h)
{
    timer_closed(h->data);
}

static void on_call_timer_closed(uv_handle_t *h)
{
    timer_closed(((call_t *)h->data)->dep);
}

void ms_deployment_free(ms_deployment_t *d)
{
    ms_router_script_free(d->script);
    d->script = NULL;
    uv_close((uv_handle_t *)&d->backoff_timer, on_deployment_timer_closed);
    uv_close((uv_handle_t *)&d->restart_timer, on_deployment_timer_closed);
    uv_close((uv_handle_t *)&d->cold_timer, on_deployment_timer_closed);
    uv_close((uv_handle_t *)&d->spawn_timer, on_deployment_timer_closed);
    uv_close((uv_handle_t *)&d->batch_timer, on_deployment_timer_closed);
    for (size_t i = 0; i < d->n_calls; i++)
        uv_close((uv_handle_t *)&d->all_calls[i]->timer, on_call_timer_closed);
}

ms_router_script_t *ms_deployment_router_script(ms_deployment_t *d)
{
    return d->script;
}

const char *ms_deployment_failure(const ms_deployment_t *d)
{
    return version_failed(d) ? (d->last_failure ? d->last_failure : "unknown error") : NULL;
}

const ms_deployment_stats_t *ms_deployment_stats(const ms_deployment_t *d)
{
    return &d->stats;
}

int ms_deployment_updating(const ms_deployment_t *d)
{
    for (int i = 0; i < d->n_slots; i++)
        if (is_live(d->slots[i]) && d->slots[i]->generation != d->generation)
            return 1;
    return 0;
}

const char *ms_deployment_spawn_error(const ms_deployment_t *d)
{
    return d->spawn_error[0] ? d->spawn_error : NULL;
}

const char *ms_deployment_name(const ms_deployment_t *d)
{
    return d->name;
}

size_t ms_deployment_running_replicas(const ms_deployment_t *d)
{
    return (size_t)d->n_running;
}

size_t ms_deployment_queued(const ms_deployment_t *d)
{
    return d->queued;
}
