/*
 * autoscale: one autoscaler per autoscaling deployment. A tick applies Ray Serve's wrapper: the
 * cold start, decided before any policy is asked, or else the policy's raw answer through the
 * scaling factors, the bounds and the wall-clock delays. Every decision lands in a short history
 * shown by status.
 */
#include "autoscale/autoscale.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "autoscale/internal.h"
#include "core/core.h"

/* Ray Serve compares elapsed time to the delays with this slack. */
#define DELAY_EPSILON 1e-6

static uint64_t next_serial;

/* ---- configuration -------------------------------------------------------------------------- */

static void copy_config(ms_autoscaling_config_t *dst, const ms_autoscaling_config_t *src)
{
    *dst = *src;
    dst->aggregation_function =
        ms_strdup(src->aggregation_function ? src->aggregation_function : "mean");
    dst->policy = ms_config_lua_ref_copy(src->policy);
    dst->policy_kwargs = src->policy_kwargs ? json_deep_copy(src->policy_kwargs) : NULL;
    dst->redis_url = src->redis_url ? ms_strdup(src->redis_url) : NULL;
}

/* Effective factors: upscaling_factor or upscale_smoothing_factor or smoothing_factor. */
static double up_factor(const ms_autoscaling_config_t *c)
{
    if (c->upscaling_factor >= 0)
        return c->upscaling_factor;
    return c->upscale_smoothing_factor >= 0 ? c->upscale_smoothing_factor : c->smoothing_factor;
}

static double down_factor(const ms_autoscaling_config_t *c)
{
    if (c->downscaling_factor >= 0)
        return c->downscaling_factor;
    return c->downscale_smoothing_factor >= 0 ? c->downscale_smoothing_factor : c->smoothing_factor;
}

/* ---- lifecycle ------------------------------------------------------------------------------ */

/* The deployment's own policy, or the built-in one when the config names none. */
static ms_policy_t *load_policy(const ms_autoscaler_t *a, const ms_autoscaling_config_t *cfg,
                                int builtin, char **err)
{
    if (!builtin)
        return as_policy_load(&as_deployment_kind, cfg->policy->file, cfg->policy->attr,
                              cfg->policy_kwargs, a->mem_limit, a->budget_us, 0, a->app,
                              a->deployment, err);
    char *path = as_builtin_path();
    ms_policy_t *s = as_policy_load(&as_deployment_kind, path, AS_BUILTIN_FUNCTION, NULL,
                                    a->mem_limit, a->budget_us, 1, a->app, a->deployment, err);
    free(path);
    return s;
}

ms_autoscaler_t *ms_autoscaler_new(const char *app, const char *deployment,
                                   const ms_autoscaling_config_t *cfg, double budget_us,
                                   size_t mem_limit, char **err)
{
    ms_autoscaler_t *a = ms_calloc(1, sizeof *a);
    a->app = ms_strdup(app);
    a->deployment = ms_strdup(deployment);
    a->budget_us = budget_us;
    a->mem_limit = mem_limit;
    a->builtin = cfg->policy == NULL;
    a->script = load_policy(a, cfg, a->builtin, err);
    if (!a->script) {
        free(a->app);
        free(a->deployment);
        free(a);
        return NULL;
    }
    a->serial = ++next_serial;
    copy_config(&a->cfg, cfg);
    a->last_scale_up = a->last_scale_down = -1;
    return a;
}

void ms_autoscaler_free(ms_autoscaler_t *a)
{
    if (!a)
        return;
    ms_policy_free(a->script);
    ms_policy_free(a->fallback);
    as_window_free(&a->win);
    ms_autoscaler_set_replica_gpus(a, 0, NULL, NULL);
    free(a->gpu_ids);
    free(a->gpu_placements);
    free(a->cfg.aggregation_function);
    ms_config_lua_ref_free(a->cfg.policy);
    json_decref(a->cfg.policy_kwargs);
    free(a->cfg.redis_url);
    free(a->app);
    free(a->deployment);
    free(a);
}

int ms_autoscaler_initial_replicas(const ms_autoscaler_t *a)
{
    return a->cfg.initial_replicas >= 0 ? a->cfg.initial_replicas : a->cfg.min_replicas;
}

void ms_autoscaler_set_watch(ms_autoscaler_t *a, ms_watch_t *w)
{
    a->watch = w;
}

void ms_autoscaler_set_gpus(ms_autoscaler_t *a, const ms_gpu_t *g)
{
    a->gpus = g && ms_gpu_count(g) > 0 ? g : NULL;
}

void ms_autoscaler_set_replica_gpus(ms_autoscaler_t *a, size_t n, const char *const *ids,
                                    const ms_gpu_placement_t *const *placements)
{
    for (size_t i = 0; i < a->n_gpu; i++)
        free(a->gpu_ids[i]);
    a->n_gpu = 0;
    if (!a->gpus)
        return; /* no GPU fields in the ctx: nothing to keep */
    if (n > a->cap_gpu) {
        a->cap_gpu = n;
        a->gpu_ids = ms_realloc(a->gpu_ids, n * sizeof *a->gpu_ids);
        a->gpu_placements = ms_realloc(a->gpu_placements, n * sizeof *a->gpu_placements);
    }
    for (size_t i = 0; i < n; i++) {
        a->gpu_ids[i] = ms_strdup(ids[i]);
        a->gpu_placements[i] = *placements[i];
    }
    a->n_gpu = n;
}

void ms_autoscaler_record(ms_autoscaler_t *a, const ms_autoscale_sample_t *s)
{
    as_window_record(&a->win, s, a->cfg.look_back_period_s);
}

/* ---- the built-in --------------------------------------------------------------------------- */

int as_builtin_raw(ms_autoscaler_t *a, double now, int current_target, const as_agg_t *agg,
                   double *raw)
{
    ms_policy_t *b = a->builtin ? a->script : a->fallback;
    if (!b) {
        char *err = NULL;
        b = a->fallback = load_policy(a, &a->cfg, 1, &err);
        if (!b) {
            ms_error("autoscaling of %s: the built-in policy does not load: %s", a->deployment,
                     err);
            free(err);
            return -1;
        }
    }
    return as_run_deployment(b, a, now, current_target, agg, raw);
}

/* ---- the wrapper: cold start, factors, bounds, delays --------------------------------------- */

/* Factors relative to the running replicas, with Ray's fix for a small downscaling factor that
 * ceil() would otherwise pin at the current count forever. Skipped at 0 replicas. */
static int apply_factors(const ms_autoscaling_config_t *c, int running, double raw)
{
    if (running == 0)
        return (int)ceil(raw);
    double f = raw > running ? up_factor(c) : down_factor(c);
    int scaled = (int)ceil(running + f * (raw - running));
    if (raw < running && scaled == running && ceil(raw) < running)
        scaled--;
    return scaled;
}

static int clamp(int v, int lo, int hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static void reset_delay(ms_autoscaler_t *a)
{
    a->decision_dir = 0;
    a->decision_ts = 0;
}

/* Wall-clock delays: a change in one direction happens once it has been wanted continuously for
 * the delay; N -> 0 goes N -> 1 (downscale_delay_s) then 1 -> 0 (downscale_to_zero_delay_s). */
static int apply_delays(ms_autoscaler_t *a, double now, int current_target, int desired, char *why,
                        size_t cap)
{
    const ms_autoscaling_config_t *c = &a->cfg;
    if (desired == current_target) {
        reset_delay(a);
        snprintf(why, cap, "hold at %d", current_target);
        return current_target;
    }
    int dir = desired > current_target ? 1 : -1;
    double delay;
    const char *name;
    if (dir > 0) {
        delay = c->upscale_delay_s, name = "upscale_delay_s";
    } else if (current_target == 1) {
        int to_zero = c->downscale_to_zero_delay_s >= 0;
        delay = to_zero ? c->downscale_to_zero_delay_s : c->downscale_delay_s;
        name = to_zero ? "downscale_to_zero_delay_s" : "downscale_delay_s";
    } else {
        desired = desired < 1 ? 1 : desired;
        delay = c->downscale_delay_s, name = "downscale_delay_s";
    }
    /* A run is consecutive decisions in one direction from one target: a change of either (the
     * controller may have moved the target itself) starts a new one. */
    if (a->decision_dir != dir || a->decision_from != current_target) {
        a->decision_dir = dir;
        a->decision_from = current_target;
        a->decision_ts = now;
    }
    const char *verb = dir > 0 ? "upscale" : "downscale";
    double waited = now - a->decision_ts;
    if (waited >= delay - DELAY_EPSILON) {
        reset_delay(a);
        snprintf(why, cap, "%s %d -> %d after %s %gs", verb, current_target, desired, name, delay);
        return desired;
    }
    snprintf(why, cap, "%s %d -> %d waiting: %.1fs of %s %gs", verb, current_target, desired,
             waited, name, delay);
    return current_target;
}

/* Requests waiting for the deployment: the window aggregate, or the latest sample, since a
 * request that just arrived weighs nothing yet in a time-weighted mean. */
static double waiting_requests(const ms_autoscaler_t *a, const as_agg_t *agg)
{
    return fmax(fmax(agg->total, agg->queued), a->win.last_total);
}

/* Ray's cold start (_get_cold_start_scale_up_replicas): with no replica running and requests
 * waiting, the answer is max(ceil(1 * upscaling factor), target) before any policy is asked,
 * so replicas already starting are never scaled down by it. -1 when it does not apply. */
static int cold_start(const ms_autoscaler_t *a, int current_target, const as_agg_t *agg)
{
    if (a->win.running != 0 || !(waiting_requests(a, agg) > 0))
        return -1;
    int t = (int)ceil(1 * up_factor(&a->cfg));
    return t > current_target ? t : current_target;
}

/* The paths that take an answer at once, and a kept target, leave the delay run alone, as Ray's
 * wrapper returns the policy state untouched there: a run in progress goes on afterwards. */
static const char *clamped(int desired, const ms_autoscaling_config_t *c)
{
    return desired > c->max_replicas ? "clamped to max_replicas" : "clamped to min_replicas";
}

static int decide_target(ms_autoscaler_t *a, double now, int current_target, double raw, int keep,
                         const as_agg_t *agg, char *why, size_t cap, const char **outcome)
{
    const ms_autoscaling_config_t *c = &a->cfg;
    int running = a->win.running;
    int cold = cold_start(a, current_target, agg);
    if (cold >= 0) {
        int t = clamp(cold, c->min_replicas, c->max_replicas);
        snprintf(why, cap, "cold start %d -> %d: %g requests waiting, no replica running",
                 current_target, t, waiting_requests(a, agg));
        *outcome = "cold start";
        return t;
    }
    if (keep) {
        snprintf(why, cap, "keep %d", current_target);
        *outcome = "target kept";
        return current_target;
    }
    int desired = apply_factors(c, running, raw);
    int bounded = clamp(desired, c->min_replicas, c->max_replicas);
    *outcome = bounded != desired ? clamped(desired, c) : "policy";
    /* No replica running and no request: a positive answer is taken at once (the built-in one
     * is the target itself, so starting replicas stay); an answer of 0 goes through the delays
     * like any downscale. */
    if (running == 0 && desired > 0) {
        if (bounded == current_target)
            snprintf(why, cap, "hold at %d: no replica running", current_target);
        else
            snprintf(why, cap, "%s %d -> %d at once: no replica running",
                     bounded > current_target ? "upscale" : "downscale", current_target, bounded);
        return bounded;
    }
    int t = apply_delays(a, now, current_target, bounded, why, cap);
    if (t == current_target && bounded != current_target) /* a run waits for its delay */
        *outcome = bounded > t ? "upscale delay pending" : "downscale delay pending";
    /* Ray's controller bounds every answer, a target kept by a waiting run included: one left
     * outside the bounds (a redeploy changed them) comes back within them at once. */
    int within = clamp(t, c->min_replicas, c->max_replicas);
    if (within != t) {
        size_t len = strlen(why);
        snprintf(why + len, cap - len, "; %d is outside [%d, %d]: %d", t, c->min_replicas,
                 c->max_replicas, within);
        *outcome = clamped(t, c);
    }
    return within;
}

static void remember(ms_autoscaler_t *a, const ms_autoscale_decision_t *d)
{
    /* A steady state repeats every tick: it refreshes its entry instead of pushing every real
     * change out of the short history. */
    if (a->hist_len > 0) {
        ms_autoscale_decision_t *last = &a->hist[(a->hist_next + AS_HISTORY - 1) % AS_HISTORY];
        if (last->target == d->target && last->previous_target == d->previous_target &&
            last->applied == d->applied && strcmp(last->reason, d->reason) == 0) {
            *last = *d;
            return;
        }
    }
    a->hist[a->hist_next] = *d;
    a->hist_next = (a->hist_next + 1) % AS_HISTORY;
    if (a->hist_len < AS_HISTORY)
        a->hist_len++;
}

int as_finalize(ms_autoscaler_t *a, double now, int current_target, double raw, int keep,
                int dry_run, const as_agg_t *agg, const char *note, const ms_policy_t *scope,
                const ms_policy_t *failed, ms_autoscale_decision_t *out)
{
    char why[160];
    const char *outcome = "policy";
    int t = decide_target(a, now, current_target, raw, keep, agg, why, sizeof why, &outcome);
    /* A cold start's answer stands for the policy's, which it leaves out. */
    int cold = cold_start(a, current_target, agg);
    double answer = cold >= 0 ? cold : keep ? current_target : raw;
    ms_autoscale_decision_t d = {
        .now = now,
        .current_replicas = a->win.running,
        .previous_target = current_target,
        .total_requests = agg->total,
        .queued_requests = agg->queued,
        .raw_target = answer,
        .target = t,
        .applied = !dry_run,
        .outcome = outcome,
        .policy_failed = failed != NULL,
        .policy_version = scope ? ms_policy_version(scope) : 0,
        .min_replicas = a->cfg.min_replicas,
        .max_replicas = a->cfg.max_replicas,
        .upscaling_factor = up_factor(&a->cfg),
        .downscaling_factor = down_factor(&a->cfg),
    };
    if (failed)
        ms_copy_str(d.failure, sizeof d.failure, ms_policy_last_error(failed));
    snprintf(d.reason, sizeof d.reason, "%s%s%s%s", dry_run ? "dry_run: " : "", why,
             note ? "; " : "", note ? note : "");
    if (!dry_run && t > current_target)
        a->last_scale_up = now;
    if (!dry_run && t < current_target)
        a->last_scale_down = now;
    remember(a, &d);
    if (out)
        *out = d;
    return dry_run ? current_target : t;
}

int ms_autoscaler_decide(ms_autoscaler_t *a, double now, int current_target,
                         ms_autoscale_decision_t *out)
{
    as_agg_t agg;
    as_window_aggregate(&a->win, now, a->cfg.look_back_period_s, a->cfg.aggregation_function, &agg);
    double raw = 0;
    const char *note = NULL;
    int keep = 0;
    const ms_policy_t *failed = NULL;
    /* Ray's wrapper answers a cold start without calling the policy. */
    if (cold_start(a, current_target, &agg) < 0 &&
        as_run_deployment(a->script, a, now, current_target, &agg, &raw) != 0) {
        failed = a->script;
        note = "policy failed, built-in used";
        if (a->builtin || as_builtin_raw(a, now, current_target, &agg, &raw) != 0) {
            keep = 1; /* nothing to go on */
            note = "policy failed, target kept";
        }
    }
    return as_finalize(a, now, current_target, raw, keep, a->cfg.dry_run, &agg, note, a->script,
                       failed, out);
}

/* ---- status --------------------------------------------------------------------------------- */

static json_t *decision_json(const ms_autoscale_decision_t *d)
{
    return json_pack("{s:f, s:i, s:i, s:f, s:f, s:f, s:i, s:b, s:s}", "now", d->now,
                     "current_replicas", d->current_replicas, "previous_target", d->previous_target,
                     "total_requests", d->total_requests, "queued_requests", d->queued_requests,
                     "raw_target", d->raw_target, "target", d->target, "applied", d->applied,
                     "reason", d->reason);
}

const ms_autoscale_decision_t *ms_autoscaler_last_decision(const ms_autoscaler_t *a)
{
    return a->hist_len ? &a->hist[(a->hist_next + AS_HISTORY - 1) % AS_HISTORY] : NULL;
}

json_t *ms_autoscaler_status(const ms_autoscaler_t *a)
{
    json_t *recent = json_array();
    for (size_t i = 0; i < a->hist_len; i++) {
        size_t at = (a->hist_next + AS_HISTORY - a->hist_len + i) % AS_HISTORY;
        json_array_append_new(recent, decision_json(&a->hist[at]));
    }
    json_t *st = json_object();
    json_object_set_new(st, "policy", ms_policy_info(a->script));
    json_object_set_new(st, "dry_run", json_boolean(a->cfg.dry_run));
    json_object_set_new(st, "recent_decisions", recent);
    return st;
}

ms_policy_t *ms_autoscaler_policy(ms_autoscaler_t *a)
{
    return a->script;
}
