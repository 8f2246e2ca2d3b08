/*
 * autoscale: autoscaling decisions, as Ray Serve makes them (../shared/reference/
 * ray-serve-semantics.md §2, the newer form with wall-clock delays).
 *
 * One ms_autoscaler_t per autoscaling deployment keeps the look_back_period_s window of metric
 * samples, runs its policy in a sandbox (the built-in lua/autoscaling.lua, or the user's
 * autoscaling_config.policy.policy_function) and applies the factors, the bounds and the delays on
 * top of the policy's raw answer. An ms_app_policy_t runs an application-level policy over several
 * deployments at once (it takes precedence over their own policies). A policy that fails (error,
 * budget, memory, a bad answer) is replaced for that tick by the built-in one; a counter goes up
 * and the error shows in status.
 *
 * Nothing here starts or stops replicas: the controller feeds samples, asks for decisions and
 * applies the targets (unless dry_run).
 */
#ifndef MS_AUTOSCALE_H
#define MS_AUTOSCALE_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "config/config.h"
#include "gpu/gpu.h"
#include "watch/watch.h"

typedef struct ms_autoscaler ms_autoscaler_t;
typedef struct ms_app_policy ms_app_policy_t;

/* One observation of a deployment, taken by the controller every control-loop tick. */
typedef struct ms_autoscale_sample {
    double now;           /* wall-clock seconds */
    int running_replicas; /* replicas RUNNING (current_num_replicas) */
    size_t n_replicas;    /* entries in the two arrays below (the running replicas) */
    const char *const *replica_ids;
    const double *running_requests; /* requests in flight at each replica */
    double queued_requests;         /* requests waiting in the controller's queue */
    double pending_tasks; /* tasks waiting in its task queue (Ray's total_pending_async_requests) */
    /* {replica_id: {metric: number}} from record_autoscaling_stats, or NULL. Borrowed. */
    json_t *custom_metrics;
} ms_autoscale_sample_t;

/* What one decision saw and did; kept in a short history for status. */
typedef struct ms_autoscale_decision {
    double now;
    int current_replicas;
    int previous_target;
    double total_requests;  /* total_num_requests: look-back aggregate of queued + running */
    double queued_requests; /* total_queued_requests */
    double raw_target;      /* the policy's own answer, before factors, bounds and delays */
    int target;             /* after factors, bounds and delays */
    int applied;            /* 0 under dry_run */
    char reason[200];       /* e.g. "upscale 2 -> 3 after upscale_delay_s 30s" */
    /* For the decision history (docs/admin-api.md): the rule that settled the target, one of
     * "policy", "cold start", "upscale delay pending", "downscale delay pending",
     * "clamped to min_replicas", "clamped to max_replicas", "target kept" (a static string). */
    const char *outcome;
    int policy_failed;       /* the policy failed this decision (the built-in answered, or kept) */
    char failure[300];       /* its message (file:line: message) when policy_failed */
    int app_scope;           /* decided by the application's policy */
    uint64_t policy_version; /* of the policy asked (the application's at app scope) */
    int min_replicas, max_replicas;
    double upscaling_factor, downscaling_factor; /* in force (smoothing_factor when unset) */
} ms_autoscale_decision_t;

/* Loads the deployment's policy (cfg->policy, or the built-in) into a fresh sandbox. Budgets:
 * `budget_us` wall-clock per call (milliseconds are typical), `mem_limit` bytes per VM. Returns
 * NULL with *err (malloc'd, `file:line: message`) when the script does not load or lacks the
 * function. `cfg` is copied. */
ms_autoscaler_t *ms_autoscaler_new(const char *app, const char *deployment,
                                   const ms_autoscaling_config_t *cfg, double budget_us,
                                   size_t mem_limit, char **err);
void ms_autoscaler_free(ms_autoscaler_t *a);

/* initial_replicas, or min_replicas when unset. */
int ms_autoscaler_initial_replicas(const ms_autoscaler_t *a);

/* The host's GPUs, for ctx.gpus (docs/gpu.md); NULL or none: the ctx has no GPU fields. */
void ms_autoscaler_set_gpus(ms_autoscaler_t *a, const ms_gpu_t *g);
/* Gives the policy ctx.redis (watch.h, from autoscaling_config.policy.redis_url); w stays the
 * caller's. */
void ms_autoscaler_set_watch(ms_autoscaler_t *a, ms_watch_t *w);
/* The devices each running replica holds now (ids are replica tags), for ctx.replica_gpu_ids;
 * copied (ignored without GPUs). */
void ms_autoscaler_set_replica_gpus(ms_autoscaler_t *a, size_t n, const char *const *ids,
                                    const ms_gpu_placement_t *const *placements);

/* Adds a sample to the look-back window (older samples fall out). */
void ms_autoscaler_record(ms_autoscaler_t *a, const ms_autoscale_sample_t *s);

/* Decides the target at `now` given the target in force. Runs the policy, then factors, bounds
 * and wall-clock delays (policy_state keeps the first-decision timestamp). At 0 running replicas
 * with requests waiting, the answer is >= 1 at once, delays skipped (cold start). Fills *out
 * (also kept in the history) and returns out->target; under dry_run the caller must keep the
 * current target (out->applied is 0). */
int ms_autoscaler_decide(ms_autoscaler_t *a, double now, int current_target,
                         ms_autoscale_decision_t *out);

/* The latest decision, or NULL before the first. */
const ms_autoscale_decision_t *ms_autoscaler_last_decision(const ms_autoscaler_t *a);

/* Status: {"policy": {the policy core's script object}, "dry_run": bool,
 *          "recent_decisions": [{now, current_replicas, previous_target, total_requests,
 *          queued_requests, raw_target, target, applied, reason}, ...]}. New reference. */
json_t *ms_autoscaler_status(const ms_autoscaler_t *a);

/* ---- application-level policies ------------------------------------------------------------- */

/* Loads applications[].autoscaling_policy.policy_function. Same budgets and errors as above. */
ms_app_policy_t *ms_app_policy_new(const char *app, const ms_config_lua_ref_t *fn, json_t *kwargs,
                                   int dry_run, double budget_us, size_t mem_limit, char **err);
void ms_app_policy_free(ms_app_policy_t *p);

/* Runs policy(ctxs) once over the application's autoscalers (each keeps its own window, config
 * and state) and fills out[i] for deps[i]; deployments the policy leaves out keep their current
 * target. Factors, bounds and delays are applied per deployment. */
void ms_app_policy_decide(ms_app_policy_t *p, double now, ms_autoscaler_t *const *deps,
                          const int *current_targets, size_t n, ms_autoscale_decision_t *out);
/* Status: {"policy": {script object}, "dry_run": bool}. New reference. */
json_t *ms_app_policy_status(const ms_app_policy_t *p);

/* ---- policy scripts ---------------------------------------------------------------------------
 * Each autoscaler's and application policy's script is an engine/policy script of the kind
 * "autoscaling_policy" or "application_policy": reload, status and metrics go through it. A
 * committed reload hands the policy_state over (application level: every deployment's). */
struct ms_policy;
struct ms_policy *ms_autoscaler_policy(ms_autoscaler_t *a);
struct ms_policy *ms_app_policy_policy(ms_app_policy_t *p);

#endif
