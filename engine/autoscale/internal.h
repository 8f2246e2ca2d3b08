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
#include "sandbox/sandbox.h"

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
    double total; /* queued + sum of running over replicas */
    double queued;
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
    double total;  /* total_num_requests, per aggregation_function */
    double queued; /* total_queued_requests, same aggregation */
} as_agg_t;

void as_window_record(as_window_t *w, const ms_autoscale_sample_t *s, double look_back_s);
void as_window_aggregate(const as_window_t *w, double now, double look_back_s, const char *fn,
                         as_agg_t *out);
/* Push {metric = {replica_id = value}}: time-weighted means / timestamped points. */
void as_window_push_aggregated(const as_window_t *w, lua_State *L, double now, double look_back_s);
void as_window_push_raw(const as_window_t *w, lua_State *L, double now, double look_back_s);
void as_window_free(as_window_t *w);

/* ---- policy.c ------------------------------------------------------------------------------- */

/* ctx tables in flight, so the lazy ctx.raw_metrics knows whose window to read. */
typedef struct as_bind {
    const void *ctx;
    const ms_autoscaler_t *a;
    double now;
} as_bind_t;

typedef struct as_script {
    ms_sandbox_t *sb;
    char *file;
    char *attr;
    int builtin;
    int version;
    char sha256[65];
    int fn_ref;
    int kwargs_ref; /* LUA_NOREF: no kwargs */
    int meta_ref;   /* metatable of every ctx: lazy raw_metrics */
    int ctx_ref;    /* the one ctx of a deployment-level use; LUA_NOREF until first used */
    int state_ref;  /* its policy_state */
    as_bind_t *bind;
    size_t nbind, cap_bind;
} as_script_t;

char *as_builtin_path(void);
/* Loads file, checks the function `attr`, runs self_test. NULL with *err (malloc'd) on failure;
 * *sha (if given) gets the content's hash even then, when the file could be read. */
as_script_t *as_script_load(const char *file, const char *attr, json_t *kwargs, size_t mem_limit,
                            char sha_out[65], char **err);
void as_script_free(as_script_t *s);
json_t *as_script_info(const as_script_t *s);
/* Moves the deployment-level policy_state of `from` into `to` (plain data only). */
void as_script_hand_over(as_script_t *from, as_script_t *to);

/* Creates a ctx table (with its metatable and reused subtables); returns its registry ref. */
int as_ctx_new(as_script_t *s);
/* Pushes the ctx `ctx_ref` refreshed for `a` at `now`; *state_ref is created when unset.
 * `with_config` rebuilds ctx.config (first use, or another autoscaler bound). */
void as_ctx_push(as_script_t *s, int ctx_ref, int *state_ref, const ms_autoscaler_t *a, double now,
                 int current_target, const as_agg_t *agg, int with_config);
void as_bind_add(as_script_t *s, const void *ctx, const ms_autoscaler_t *a, double now);
/* Calls the policy on the stack under the budget (<= 0: AS_DEFAULT_BUDGET_US) and clears the
 * bindings. */
int as_script_call(as_script_t *s, int nargs, int nres, double budget_us);
/* Checks a target returned by a policy: a finite number >= 0. */
int as_check_target(lua_State *L, int idx, double *out);

/* Runs a deployment-level policy on `a`. 0 with *raw, or -1 with the message in err. */
int as_run_deployment(as_script_t *s, ms_autoscaler_t *a, double now, int current_target,
                      const as_agg_t *agg, double *raw, char *err, size_t errlen);

/* ---- autoscale.c ---------------------------------------------------------------------------- */
struct ms_autoscaler {
    char *app;
    char *deployment;
    uint64_t serial; /* distinguishes autoscalers that reuse an address */
    ms_autoscaling_config_t cfg;
    double budget_us;
    size_t mem_limit;
    as_window_t win;
    as_script_t *script;   /* its own policy: the user's or the built-in */
    as_script_t *pending;  /* prepared by reload, not yet committed */
    as_script_t *fallback; /* built-in, loaded on the first failure of a custom policy */
    char *reload_error;    /* last failed prepare, NULL after a success */

    /* Delay state: direction (+1 up, -1 down, 0 none), the target the run started from, and the
     * time of its first decision (mirrored into policy_state.__decision_timestamp). */
    int decision_dir;
    int decision_from;
    double decision_ts;
    double last_scale_up, last_scale_down; /* < 0: never */

    uint64_t failures;
    char last_error[512];
    ms_autoscale_decision_t hist[AS_HISTORY];
    size_t hist_len, hist_next;
};

/* The built-in answer for `a` (its own script when built-in, else the lazily loaded fallback).
 * -1 (err filled) only if even the built-in fails. */
int as_builtin_raw(ms_autoscaler_t *a, double now, int current_target, const as_agg_t *agg,
                   double *raw, char *err, size_t errlen);
/* Counts a policy failure on `failures`/`last_error`, logging only a changed message. */
void as_note_failure(const char *who, uint64_t *failures, char *last_error, size_t cap,
                     const char *msg);
/* Applies cold start, factors, bounds and delays to `raw` (or keeps the target when `keep`),
 * records the decision in a's history and *out, and returns the target to put in force. */
int as_finalize(ms_autoscaler_t *a, double now, int current_target, double raw, int keep,
                int dry_run, const as_agg_t *agg, const char *note, ms_autoscale_decision_t *out);

#endif
