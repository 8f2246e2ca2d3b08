/*
 * controller/control: the control loop. Every control_loop.interval_s it samples each
 * autoscaling deployment (running replicas, their in-flight requests, the queue, the replicas'
 * record_autoscaling_stats), runs the policies — the application's policy when it has one, which
 * takes precedence, else each deployment's own — and applies the targets. Replica stats are
 * polled every request_routing_stats_period_s (every STATS_PERIOD_S for autoscaling
 * deployments). A request that arrives at zero replicas triggers a decision at once.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "controller/internal.h"
#include "history/history.h"
#include "policy/policy.h"

/* Policies run on the controller's loop: a few milliseconds at most, and a bounded heap. */
#define POLICY_BUDGET_US 5000.0
#define POLICY_MEM_LIMIT 0 /* the sandbox's default cap */
#define STATS_PERIOD_S   0.5

int ms__control_initial_replicas(const planned_t *p)
{
    if (!p->autoscaling)
        return p->num_replicas;
    const ms_autoscaling_config_t *a = p->autoscaling;
    return a->initial_replicas >= 0 ? a->initial_replicas : a->min_replicas;
}

dep_entry_t *ms__control_find(controller_t *c, const char *app, const char *deployment)
{
    for (size_t i = 0; i < c->n_deps; i++)
        if (strcmp(c->deps[i].app->name, app) == 0 && strcmp(c->deps[i].name, deployment) == 0)
            return &c->deps[i];
    return NULL;
}

static dep_entry_t *entry_of(controller_t *c, const ms_deployment_t *d)
{
    for (size_t i = 0; i < c->n_deps; i++)
        if (c->deps[i].dep == d)
            return &c->deps[i];
    return NULL;
}

static int setup_app_policies(controller_t *c)
{
    c->n_apps = c->cfg->n_apps;
    c->apps = ms_calloc(c->n_apps ? c->n_apps : 1, sizeof *c->apps);
    for (size_t i = 0; i < c->n_apps; i++) {
        const ms_app_config_t *app = &c->cfg->apps[i];
        c->apps[i].cfg = app;
        char *err = NULL;
        c->apps[i].scale_hook = ms_scale_hook_from_config(app, 0, 0, &err);
        if (err) {
            ms_error("application %s: external_scaler: %s", app->name, err);
            free(err);
            return -1;
        }
        if (c->apps[i].scale_hook && app->scale_redis_url) {
            c->apps[i].watch = ms_watch_new(c->loop, app->scale_redis_url, &err);
            if (!c->apps[i].watch) {
                ms_error("application %s: external_scaler.redis_url: %s", app->name,
                         err ? err : "?");
                free(err);
                return -1;
            }
            ms_scale_hook_set_watch(c->apps[i].scale_hook, c->apps[i].watch);
        }
        if (!app->autoscaling_policy)
            continue;
        c->apps[i].policy = ms_app_policy_new(
            app->name, app->autoscaling_policy, app->autoscaling_policy_kwargs,
            app->autoscaling_policy_dry_run, POLICY_BUDGET_US, POLICY_MEM_LIMIT, &err);
        if (!c->apps[i].policy) {
            ms_error("application %s: autoscaling_policy: %s", app->name, err ? err : "?");
            free(err);
            return -1;
        }
    }
    return 0;
}

int ms__control_setup(controller_t *c, const plan_t *plan)
{
    if (setup_app_policies(c) != 0)
        return -1;
    for (size_t i = 0; i < plan->n; i++) {
        const planned_t *p = &plan->items[i];
        dep_entry_t *e = ms__control_find(c, p->app->name, p->name);
        if (!e)
            continue; /* failed to start; logged there */
        e->stats_period_s =
            p->router ? p->router->stats_period_s : MS_DEFAULT_ROUTING_STATS_PERIOD_S;
        e->stats_timeout_s =
            p->router ? p->router->stats_timeout_s : MS_DEFAULT_ROUTING_STATS_TIMEOUT_S;
        if (p->autoscaling && e->stats_period_s > STATS_PERIOD_S)
            e->stats_period_s = STATS_PERIOD_S;
        char *err = NULL;
        /* A redeploy keeps a queue whose block did not change, with the tasks it runs. */
        if (e->tasks && (!p->task_queue || !ms_task_queue_same(e->tasks, p->task_queue))) {
            ms_task_queue_free(e->tasks);
            e->tasks = NULL;
        }
        if (e->tasks) {
            ms_task_queue_set_max_ongoing(e->tasks, p->max_ongoing_requests);
        } else if (p->task_queue) {
            ms_task_queue_spec_t spec = {.cfg = p->task_queue,
                                         .application = p->app->name,
                                         .deployment = p->name,
                                         .handle_socket = c->handle_socket,
                                         .dep = e->dep,
                                         .max_ongoing_requests = p->max_ongoing_requests};
            e->tasks = ms_task_queue_new(c->loop, &spec, &err);
            if (!e->tasks) {
                ms_error("deployment %s: task_queue: %s", p->name, err ? err : "?");
                free(err);
                return -1;
            }
        }
        if (!p->autoscaling)
            continue;
        e->autoscaler = ms_autoscaler_new(p->app->name, p->name, p->autoscaling, POLICY_BUDGET_US,
                                          POLICY_MEM_LIMIT, &err);
        if (!e->autoscaler) {
            ms_error("deployment %s: autoscaling policy: %s", p->name, err ? err : "?");
            free(err);
            return -1;
        }
        ms_autoscaler_set_gpus(e->autoscaler, c->gpus);
        if (p->autoscaling->redis_url) {
            e->watch = ms_watch_new(c->loop, p->autoscaling->redis_url, &err);
            if (!e->watch) {
                ms_error("deployment %s: autoscaling_config.policy.redis_url: %s", p->name,
                         err ? err : "?");
                free(err);
                return -1;
            }
            ms_autoscaler_set_watch(e->autoscaler, e->watch);
        }
        if (c->apps[e->app_index].policy && p->autoscaling->policy)
            ms_warn("application %s: its autoscaling_policy takes precedence over deployment "
                    "%s's own policy",
                    p->app->name, p->name);
    }
    return 0;
}

/* One observation of a deployment for its autoscaler. */
static void record_sample(dep_entry_t *e, double now)
{
    size_t n = ms_deployment_replicas(e->dep, NULL, 0);
    /* Sized to the replica set each time: one tick's allocation, and no replica left out. */
    ms_replica_t **replicas = ms_malloc((n ? n : 1) * sizeof *replicas);
    const char **ids = ms_malloc((n ? n : 1) * sizeof *ids);
    double *running = ms_malloc((n ? n : 1) * sizeof *running);
    ms_deployment_replicas(e->dep, replicas, n);
    const ms_gpu_placement_t **gpus = ms_malloc((n ? n : 1) * sizeof *gpus);
    size_t k = 0;
    double newest = e->stats_seen;
    for (size_t i = 0; i < n; i++) {
        ms_replica_t *r = replicas[i];
        if (r->state != MS_REPLICA_RUNNING)
            continue;
        ids[k] = r->id;
        gpus[k] = &r->gpu;
        running[k] = r->ongoing;
        if (r->stats_time > newest)
            newest = r->stats_time;
        k++;
    }
    /* Custom metrics go in only when a replica reported since the last sample: each value holds
     * until the next report, and re-adding old ones would only cost the policy time. */
    json_t *custom = NULL;
    if (newest > e->stats_seen) {
        e->stats_seen = newest;
        custom = json_object();
        /* A replica without record_autoscaling_stats reports {}: leaving those out keeps the
         * policy's look-back from walking a thousand empty entries per sample. */
        for (size_t i = 0; i < n; i++)
            if (replicas[i]->state == MS_REPLICA_RUNNING &&
                json_object_size(replicas[i]->autoscaling_stats) > 0)
                json_object_set(custom, replicas[i]->id, replicas[i]->autoscaling_stats);
    }
    ms_autoscale_sample_t s = {
        .now = now,
        .running_replicas = (int)k,
        .n_replicas = k,
        .replica_ids = ids,
        .running_requests = running,
        .queued_requests = (double)ms_deployment_queued(e->dep),
        .pending_tasks = e->tasks && ms_task_queue_backlog(e->tasks) > 0
                             ? (double)ms_task_queue_backlog(e->tasks)
                             : 0,
        .custom_metrics = custom,
    };
    ms_autoscaler_record(e->autoscaler, &s);
    ms_autoscaler_set_replica_gpus(e->autoscaler, k, ids, gpus);
    json_decref(custom);
    free(replicas);
    free(ids);
    free(gpus);
    free(running);
}

long long ms__control_replica_room(const controller_t *c, const dep_entry_t *e)
{
    long long others = 0;
    for (size_t i = 0; i < c->n_deps; i++)
        if (&c->deps[i] != e)
            others += ms_deployment_target(c->deps[i].dep);
    long long room = c->cfg->max_replicas_total - others;
    return room > 0 ? room : 0;
}

/* A scaling decision cut to what max_replicas_total leaves; a cut never lowers the target in
 * force. Each run of cuts is logged once, not every tick. */
static int within_limit(controller_t *c, dep_entry_t *e, int target, const char *who)
{
    int current = ms_deployment_target(e->dep);
    long long room = ms__control_replica_room(c, e);
    if (target <= current || target <= room) {
        e->limit_logged = 0;
        return target;
    }
    int cut = room > current ? (int)room : current;
    if (!e->limit_logged)
        ms_warn("%s %s/%s: asked for %d replicas, cut to %d: max_replicas_total is %d and the "
                "other deployments keep %lld",
                who, e->app->name, e->name, target, cut, c->cfg->max_replicas_total,
                c->cfg->max_replicas_total - room);
    e->limit_logged = 1;
    return cut;
}

/* ---- decision history ------------------------------------------------------------------------
 * One entry per decision that changes something (docs/admin-api.md, "GET /api/v1/history"): the
 * first of each autoscaler, then any whose raw target or reason differs from the last recorded
 * one, or that moves the target. A steady state, or the same failure every tick, is one entry. */

static json_t *decision_entry(const dep_entry_t *e, const ms_autoscale_decision_t *d, int applied,
                              const char *reason)
{
    json_t *j = json_pack(
        "{s:f, s:s, s:s, s:s, s:I, s:{s:f, s:f, s:f, s:f, s:i, s:i}, s:f, s:i, s:i, s:{s:i, s:i}, "
        "s:{s:f, s:f}, s:s, s:s, s:b}",
        "time", d->now, "application", e->app->name, "deployment", e->name, "scope",
        d->app_scope ? "application" : "deployment", "policy_version",
        (json_int_t)d->policy_version, "inputs", "total_ongoing_requests", d->total_requests,
        "total_num_requests", d->total_requests, "total_running_requests",
        d->total_requests - d->queued_requests, "total_queued_requests", d->queued_requests,
        "running_replicas", d->current_replicas, "current_target", d->previous_target, "raw_target",
        d->raw_target, "applied_target", applied, "previous_target", d->previous_target, "bounds",
        "min_replicas", d->min_replicas, "max_replicas", d->max_replicas, "factors",
        "upscaling_factor", d->upscaling_factor, "downscaling_factor", d->downscaling_factor,
        "reason", reason, "detail", d->reason, "dry_run", !d->applied);
    return j;
}

static void record_decision(dep_entry_t *e, const ms_autoscale_decision_t *d, int applied, int cut)
{
    char reason[sizeof e->history_reason];
    if (d->policy_failed)
        ms_policy_format_text(reason, sizeof reason, "policy failed: %s", d->failure);
    else if (cut)
        snprintf(reason, sizeof reason, "clamped to max_replicas_total");
    else
        ms_copy_str(reason, sizeof reason, d->outcome ? d->outcome : "policy");
    if (e->history_have && d->raw_target == e->history_raw && applied == d->previous_target &&
        strcmp(reason, e->history_reason) == 0)
        return;
    e->history_have = 1;
    e->history_raw = d->raw_target;
    memcpy(e->history_reason, reason, sizeof reason);
    ms_history_record(MS_HISTORY_AUTOSCALING, decision_entry(e, d, applied, reason));
}

void ms__control_history_external(controller_t *c, const dep_entry_t *e, const char *source,
                                  long long requested, long long applied, int previous,
                                  const char *why)
{
    json_t *version = json_null();
    ms_scale_hook_t *hook = c->apps[e->app_index].scale_hook;
    struct ms_policy *ps[4];
    if (hook && ms_scale_hook_policies(hook, ps) > 0)
        version = json_integer((json_int_t)ms_policy_version(ps[0]));
    char reason[400];
    if (why)
        ms_policy_format_text(reason, sizeof reason, "external scale: %s", why);
    else
        snprintf(reason, sizeof reason, "external scale");
    json_t *j = json_pack(
        "{s:f, s:s, s:s, s:s, s:o, s:{s:I, s:I, s:i}, s:I, s:I, s:i, s:{s:n, s:n}, s:{s:n, s:n}, "
        "s:s, s:s, s:b}",
        "time", ms_wall_time(), "application", e->app->name, "deployment", e->name, "scope",
        "deployment", "policy_version", version, "inputs", "requested_target",
        (json_int_t)requested, "running_replicas",
        (json_int_t)ms_deployment_running_replicas(e->dep), "current_target", previous,
        "raw_target", (json_int_t)requested, "applied_target", (json_int_t)applied,
        "previous_target", previous, "bounds", "min_replicas", "max_replicas", "factors",
        "upscaling_factor", "downscaling_factor", "reason", reason, "source", source, "dry_run", 0);
    ms_history_record(MS_HISTORY_AUTOSCALING, j);
}

static void apply(controller_t *c, dep_entry_t *e, const ms_autoscale_decision_t *d)
{
    if (!d->applied) {
        record_decision(e, d, d->previous_target, 0);
        return;
    }
    int target = within_limit(c, e, d->target, "autoscaling");
    record_decision(e, d, target, target != d->target);
    if (target != ms_deployment_target(e->dep)) {
        ms_info("autoscaling %s/%s: %d -> %d (%s)", e->app->name, e->name, d->previous_target,
                target, d->reason);
        ms_deployment_set_target(e->dep, target);
    }
}

static void decide_app(controller_t *c, size_t app_index, double now)
{
    size_t n = 0;
    for (size_t i = 0; i < c->n_deps; i++)
        n += c->deps[i].app_index == app_index && c->deps[i].autoscaler;
    if (n == 0)
        return;
    /* Every autoscaling deployment of the application, however many. */
    ms_autoscaler_t **scalers = ms_malloc(n * sizeof *scalers);
    int *targets = ms_malloc(n * sizeof *targets);
    dep_entry_t **entries = ms_malloc(n * sizeof *entries);
    ms_autoscale_decision_t *decisions = ms_malloc(n * sizeof *decisions);
    size_t k = 0;
    for (size_t i = 0; i < c->n_deps; i++) {
        dep_entry_t *e = &c->deps[i];
        if (e->app_index != app_index || !e->autoscaler)
            continue;
        scalers[k] = e->autoscaler;
        targets[k] = ms_deployment_target(e->dep);
        entries[k++] = e;
    }
    ms_app_policy_decide(c->apps[app_index].policy, now, scalers, targets, n, decisions);
    for (size_t i = 0; i < n; i++)
        apply(c, entries[i], &decisions[i]);
    free(scalers);
    free(targets);
    free(entries);
    free(decisions);
}

static void decide_one(controller_t *c, dep_entry_t *e, double now)
{
    ms_autoscale_decision_t d;
    ms_autoscaler_decide(e->autoscaler, now, ms_deployment_target(e->dep), &d);
    apply(c, e, &d);
}

/* An application's external_scaler tick, when due: it may set any of its deployments' targets
 * from an outside signal (a schedule). */
static void run_scale_tick(controller_t *c, size_t a, double now)
{
    json_t *state = json_object();
    for (size_t i = 0; i < c->n_deps; i++) {
        dep_entry_t *e = &c->deps[i];
        if (e->app_index != a)
            continue;
        json_object_set_new(state, e->name,
                            json_pack("{s:i, s:I}", "current_target", ms_deployment_target(e->dep),
                                      "running_replicas",
                                      (json_int_t)ms_deployment_running_replicas(e->dep)));
    }
    json_t *targets = ms_scale_hook_tick(c->apps[a].scale_hook, now, state);
    const char *name;
    json_t *v;
    json_object_foreach(targets, name, v)
    {
        dep_entry_t *e = ms__control_find(c, c->apps[a].cfg->name, name);
        if (!e || !json_is_integer(v))
            continue;
        json_int_t t = json_integer_value(v);
        if (t < 0 || t > MS_MAX_TARGET_REPLICAS) {
            ms_error("application %s: external_scaler tick asked %lld replicas for %s; "
                     "ignored (allowed: 0 to %d)",
                     c->apps[a].cfg->name, (long long)t, name, MS_MAX_TARGET_REPLICAS);
            continue;
        }
        int previous = ms_deployment_target(e->dep);
        int applied = within_limit(c, e, (int)t, "external_scaler tick");
        /* A tick answers every interval: only one that moves the target is a decision. */
        if (applied != previous)
            ms__control_history_external(c, e, "tick", t, applied, previous,
                                         applied != t ? "cut at max_replicas_total" : NULL);
        ms_deployment_set_target(e->dep, applied);
    }
    json_decref(targets);
    json_decref(state);
}

static void tick(controller_t *c)
{
    double now = ms_wall_time();
    ms_log_flush();         /* access lines wait at most one tick */
    ms_gpu_sample(c->gpus); /* for /metrics and the policies' ctx.gpus */
    for (size_t i = 0; i < c->n_deps; i++)
        ms_deployment_check_health(c->deps[i].dep);
    for (size_t i = 0; i < c->n_deps; i++)
        ms_deployment_poll_stats(c->deps[i].dep, c->deps[i].stats_period_s,
                                 c->deps[i].stats_timeout_s);
    for (size_t i = 0; i < c->n_deps; i++)
        if (c->deps[i].tasks)
            ms_task_queue_tick(c->deps[i].tasks);
    for (size_t a = 0; a < c->n_apps; a++)
        if (c->apps[a].watch)
            ms_watch_refresh(c->apps[a].watch);
    for (size_t i = 0; i < c->n_deps; i++)
        if (c->deps[i].watch)
            ms_watch_refresh(c->deps[i].watch);
    for (size_t i = 0; i < c->n_deps; i++)
        if (c->deps[i].autoscaler)
            record_sample(&c->deps[i], now);
    for (size_t a = 0; a < c->n_apps; a++) {
        if (c->apps[a].policy)
            decide_app(c, a, now);
        if (c->apps[a].scale_hook && ms_scale_hook_has_tick(c->apps[a].scale_hook))
            run_scale_tick(c, a, now);
    }
    for (size_t i = 0; i < c->n_deps; i++) {
        dep_entry_t *e = &c->deps[i];
        if (e->autoscaler && !c->apps[e->app_index].policy)
            decide_one(c, e, now);
    }
}

/* Times every tick: its cost grows with the replicas (health checks, stats polls, samples), and
 * status shows it so an operator sees when the loop gets close to its interval. */
static double thread_cpu_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void add_time(ms__tick_time_t *t, uint64_t tick_no, double ms)
{
    t->recent_ms[tick_no % MS__TICK_RECENT] = ms;
    t->last_ms = ms;
    t->total_ms += ms;
    if (ms > t->max_ms)
        t->max_ms = ms;
}

static void on_tick(uv_timer_t *t)
{
    controller_t *c = t->data;
    uint64_t start = ms_now_us();
    double cpu_start = thread_cpu_ms();
    tick(c);
    ms__tick_stats_t *ts = &c->tick_stats;
    add_time(&ts->wall, ts->ticks, (double)(ms_now_us() - start) / 1000.0);
    add_time(&ts->cpu, ts->ticks, thread_cpu_ms() - cpu_start);
    ts->ticks++;
}

/* {"last_tick_ms", "recent_max_tick_ms" (the last MS__TICK_RECENT ticks), "mean_tick_ms",
 * "max_tick_ms"} of one clock, into o, with the given suffix after "tick". */
static void put_time(json_t *o, const ms__tick_time_t *t, uint64_t ticks, const char *clock)
{
    size_t n = ticks < MS__TICK_RECENT ? (size_t)ticks : MS__TICK_RECENT;
    double recent_max = 0;
    for (size_t i = 0; i < n; i++)
        if (t->recent_ms[i] > recent_max)
            recent_max = t->recent_ms[i];
    char key[40];
    snprintf(key, sizeof key, "last_tick%s_ms", clock);
    json_object_set_new(o, key, json_real(t->last_ms));
    snprintf(key, sizeof key, "recent_max_tick%s_ms", clock);
    json_object_set_new(o, key, json_real(recent_max));
    snprintf(key, sizeof key, "mean_tick%s_ms", clock);
    json_object_set_new(o, key, json_real(ticks ? t->total_ms / (double)ticks : 0.0));
    snprintf(key, sizeof key, "max_tick%s_ms", clock);
    json_object_set_new(o, key, json_real(t->max_ms));
}

json_t *ms__control_status(const controller_t *c)
{
    const ms__tick_stats_t *ts = &c->tick_stats;
    json_t *o = json_pack("{s:f, s:I}", "interval_s", c->cfg->control_loop_interval_s, "ticks",
                          (json_int_t)ts->ticks);
    put_time(o, &ts->wall, ts->ticks, "");
    put_time(o, &ts->cpu, ts->ticks, "_cpu");
    return o;
}

void ms__control_on_cold_start(ms_deployment_t *d, void *data)
{
    controller_t *c = data;
    dep_entry_t *e = entry_of(c, d);
    if (!e || !e->autoscaler || c->shutting_down)
        return; /* a fixed or externally scaled count stays where it was set */
    double now = ms_wall_time();
    record_sample(e, now);
    decide_one(c, e, now);
}

void ms__control_start(controller_t *c)
{
    uint64_t ms = (uint64_t)(c->cfg->control_loop_interval_s * 1000.0);
    if (ms == 0)
        ms = 1;
    uv_timer_start(&c->control_timer, on_tick, ms, ms);
}

void ms__control_stop(controller_t *c)
{
    uv_timer_stop(&c->control_timer);
}

void ms__control_release_policies(controller_t *c)
{
    for (size_t i = 0; i < c->n_deps; i++) {
        if (c->deps[i].autoscaler)
            ms_autoscaler_free(c->deps[i].autoscaler);
        c->deps[i].autoscaler = NULL;
        ms_watch_free(c->deps[i].watch);
        c->deps[i].watch = NULL;
    }
    for (size_t i = 0; i < c->n_apps; i++) {
        if (c->apps[i].policy)
            ms_app_policy_free(c->apps[i].policy);
        if (c->apps[i].scale_hook)
            ms_scale_hook_free(c->apps[i].scale_hook);
        ms_watch_free(c->apps[i].watch);
    }
    free(c->apps);
    c->apps = NULL;
    c->n_apps = 0;
}

void ms__control_free(controller_t *c)
{
    if (!uv_is_closing((uv_handle_t *)&c->control_timer))
        uv_close((uv_handle_t *)&c->control_timer, NULL);
    ms__control_release_policies(c);
    for (size_t i = 0; i < c->n_deps; i++) {
        ms_task_queue_free(c->deps[i].tasks);
        c->deps[i].tasks = NULL;
    }
}
