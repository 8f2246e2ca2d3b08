/*
 * autoscale internals shared by its files: the look-back window (window.c), policy scripts and
 * the ctx tables handed to them (policy.c), the rules applied on top of a policy's answer and the
 * deployment-level API (autoscale.c), application-level policies (app_policy.c).
 */
#ifndef MS_AUTOSCALE_INTERNAL_H
#define MS_AUTOSCALE_INTERNAL_H

#include <stdint.h>

#include <jansson.h>
#include <lua.h>

#include "autoscale/autoscale.h"
#include "policy/policy.h"

/* Decisions kept per autoscaler for status. */
#define AS_HISTORY 20
/* Budget of one policy call when the caller gives none: policies run 10 times a second per
 * deployment, so a few milliseconds is already generous. */
#define AS_DEFAULT_BUDGET_US 5000.0
/* Loading a chunk and its self_test may build tables: a longer budget than one tick's call. */
#define AS_INIT_BUDGET_US 1000000.0
/* Name of the built-in policy function in lua/autoscaling.lua. */
#define AS_BUILTIN_FUNCTION "default_autoscaling_policy"

/* ---- window.c ------------------------------------------------------------------------------- */
typedef struct as_sample {
    double t;
    double total; /* queued + sum of running over replicas + pending tasks */
    double queued;
    double pending; /* tasks waiting in the deployment's task queue */
    json_t *custom; /* {replica: {metric: number}} (own copy) or NULL */
} as_sample_t;

/* Samples in time order; the oldest one may lie before the window start, since its value still
 * holds at the start (the series are right-continuous step functions). */
typedef struct as_window {
    as_sample_t *s;
    size_t head, len, cap; /* live samples are s[head .. head+len) */
    char **ids;            /* running replicas of the latest sample */
    size_t n_ids;
    int running;
    double last_total; /* queued + running of the latest sample, for the cold start */
} as_window_t;

typedef struct as_agg {
    double total;   /* total_num_requests, per aggregation_function */
    double queued;  /* total_queued_requests, same aggregation */
    double pending; /* total_pending_async_requests, same aggregation */
} as_agg_t;

void as_window_record(as_window_t *w, const ms_autoscale_sample_t *s, double look_back_s);
void as_window_aggregate(const as_window_t *w, double now, double look_back_s, const char *fn,
                         as_agg_t *out);
/* Push {metric = {replica_id = value}}: time-weighted means / timestamped points. */
void as_window_push_aggregated(const as_window_t *w, lua_State *L, double now, double look_back_s);
void as_window_push_raw(const as_window_t *w, lua_State *L, double now, double look_back_s);
void as_window_free(as_window_t *w);

/* ---- policy.c -------------------------------------------------------------------------------
 * The two autoscaling kinds of policy script (engine/policy does loading, checks, versions,
 * failures and reload): a deployment-level policy(ctx, kwargs) -> target, state, and an
 * application-level policy(ctxs, kwargs) -> {deployment = target}, {deployment = state}. */

extern const ms_policy_kind_t as_deployment_kind;
extern const ms_policy_kind_t as_app_kind;

char *as_builtin_path(void);
/* Loads `file` with the policy function `fn` as one of the two kinds. NULL with *err. */
ms_policy_t *as_policy_load(const ms_policy_kind_t *kind, const char *file, const char *fn,
                            json_t *kwargs, size_t mem_limit, double budget_us, int builtin,
                            const char *app, const char *deployment, char **err);

/* Pushes the ctx of `a` (one persistent table per deployment and version, keyed by its name),
 * refreshed at `now` with raw stores; `state` (an index, or 0 for none) becomes
 * ctx.policy_state. The ctx's metatable is protected and builds raw_metrics on first read. */
void as_ctx_push(ms_policy_t *p, const ms_autoscaler_t *a, double now, int current_target,
                 const as_agg_t *agg, int state);
/* Calls the policy on the stack (the function and nargs arguments) and forgets the ctx bindings
 * raw_metrics uses. 0 with nres results, or -1 with the failure counted. */
int as_policy_call(ms_policy_t *p, int nargs, int nres);
/* Checks a target returned by a policy: a finite number >= 0. */
int as_check_target(lua_State *L, int idx, double *out);

/* Runs a deployment-level policy on `a`: 0 with *raw, or -1 with the failure counted. */
int as_run_deployment(ms_policy_t *p, ms_autoscaler_t *a, double now, int current_target,
                      const as_agg_t *agg, double *raw);

/* ---- autoscale.c ---------------------------------------------------------------------------- */
struct ms_autoscaler {
    char *app;
    char *deployment;
    uint64_t serial; /* distinguishes autoscalers that reuse an address */
    ms_autoscaling_config_t cfg;
    double budget_us;
    size_t mem_limit;
    as_window_t win;
    ms_policy_t *script;   /* its own policy: the user's or the built-in */
    int builtin;           /* script is the built-in */
    ms_policy_t *fallback; /* built-in, loaded on the first failure of a custom policy */
    ms_watch_t *watch;     /* ctx.redis, or NULL */

    /* Delay state: direction (+1 up, -1 down, 0 none), the target the run started from, and the
     * time of its first decision (mirrored into policy_state.__decision_timestamp). */
    int decision_dir;
    int decision_from;
    double decision_ts;
    double last_scale_up, last_scale_down; /* < 0: never */

    ms_autoscale_decision_t hist[AS_HISTORY];
    size_t hist_len, hist_next;

    const ms_gpu_t *gpus; /* NULL: no GPU fields in the ctx */
    char **gpu_ids;       /* replica tags and the devices they hold, as of the latest sample */
    ms_gpu_placement_t *gpu_placements;
    size_t n_gpu, cap_gpu;
};

/* The built-in answer for `a` (its own script when built-in, else the lazily loaded fallback).
 * -1 only if even the built-in fails. */
int as_builtin_raw(ms_autoscaler_t *a, double now, int current_target, const as_agg_t *agg,
                   double *raw);
/* Applies cold start, factors, bounds and delays to `raw` (or keeps the target when `keep`),
 * records the decision in a's history and *out, and returns the target to put in force. */
/* `failed` (may be NULL): the policy that failed this decision, whose last error the decision
 * keeps; `scope` the policy asked (the deployment's, or the application's), for its version. */
int as_finalize(ms_autoscaler_t *a, double now, int current_target, double raw, int keep,
                int dry_run, const as_agg_t *agg, const char *note, const ms_policy_t *scope,
                const ms_policy_t *failed, ms_autoscale_decision_t *out);

#endif
