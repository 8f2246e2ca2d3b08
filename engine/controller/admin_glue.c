/*
 * controller/admin_glue: what the admin API asks of the controller — the status document (Ray
 * Serve's ServeInstanceDetails, plus script versions and recent autoscaling decisions), external
 * scaling, hot reload of every policy and router script, shutdown, Prometheus metrics, and the
 * histories of decisions, reloads and replica lifecycle (engine/history) with their reload
 * entries.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "controller/internal.h"
#include "history/history.h"
#include "metrics/metrics.h"
#include "policy/policy.h"
#include "router/router.h"

static const char *replica_state_name(ms_replica_state_t s)
{
    switch (s) {
    case MS_REPLICA_STARTING:
        return "STARTING";
    case MS_REPLICA_RUNNING:
        return "RUNNING";
    case MS_REPLICA_STOPPING:
        return "STOPPING";
    default:
        return "STOPPED";
    }
}

/* Ray's DeploymentStatus from the replica counts against the target; a rolling update (replicas
 * of the previous version still live) is UPDATING until the last old one is gone. */
static const char *deployment_status(const dep_entry_t *e, size_t running, size_t live)
{
    int target = ms_deployment_target(e->dep);
    if (ms_deployment_updating(e->dep))
        return "UPDATING";
    if ((size_t)target == running && live == running)
        return "HEALTHY";
    if ((size_t)target > running)
        return running == 0 && target > 0 && live == 0 ? "UNHEALTHY" : "UPSCALING";
    return "DOWNSCALING";
}

/* Every replica of a deployment, in a fresh array (free it). */
static ms_replica_t **replica_list(const dep_entry_t *e, size_t *n)
{
    *n = ms_deployment_replicas(e->dep, NULL, 0);
    ms_replica_t **rs = ms_malloc((*n ? *n : 1) * sizeof *rs);
    ms_deployment_replicas(e->dep, rs, *n);
    return rs;
}

static json_t *replicas_json(const dep_entry_t *e, size_t *running, size_t *live)
{
    size_t n;
    ms_replica_t **rs = replica_list(e, &n);
    json_t *arr = json_array();
    *running = *live = 0;
    for (size_t i = 0; i < n; i++) {
        ms_replica_t *r = rs[i];
        *running += r->state == MS_REPLICA_RUNNING;
        *live += r->state == MS_REPLICA_RUNNING || r->state == MS_REPLICA_STARTING;
        json_array_append_new(
            arr, json_pack("{s:s, s:s, s:s, s:i, s:f, s:i, s:o}", "replica_id", r->replica_id,
                           "replica_tag", r->id, "state", replica_state_name(r->state), "pid",
                           r->pid, "start_time_s", r->start_time, "ongoing_requests", r->ongoing,
                           "gpu_ids", ms_gpu_placement_json(&r->gpu)));
    }
    free(rs);
    return arr;
}

/* The deployment's placement counters (docs/admin-api.md, "routing"); the router's failures and
 * budget overruns are its script's, as `router` shows them (they restart at a redeploy). */
static json_t *routing_json(const dep_entry_t *e, json_t *router)
{
    const ms_deployment_stats_t *st = ms_deployment_stats(e->dep);
    return json_pack("{s:{s:I, s:I, s:I}, s:I, s:I, s:I, s:I}", "rank_served", "1",
                     (json_int_t)st->rank_served[0], "2", (json_int_t)st->rank_served[1], "3+",
                     (json_int_t)st->rank_served[2], "fallbacks", (json_int_t)st->fallbacks,
                     "backoffs", (json_int_t)st->backoffs, "budget_overruns",
                     json_integer_value(json_object_get(router, "budget_overruns")),
                     "router_errors", json_integer_value(json_object_get(router, "failures")));
}

static json_t *deployment_json(const dep_entry_t *e)
{
    size_t running, live;
    json_t *replicas = replicas_json(e, &running, &live);
    const char *status = deployment_status(e, running, live);
    const char *trigger = strcmp(status, "UPDATING") == 0 ? "CONFIG_UPDATE_STARTED"
                          : e->autoscaler                 ? "AUTOSCALING"
                                                          : "CONFIG_UPDATE_COMPLETED";
    char message[600] = "";
    const char *failure = ms_deployment_failure(e->dep);
    if (failure) {
        status = "DEPLOY_FAILED";
        trigger = "REPLICA_STARTUP_FAILED";
        if (running > 0) /* a failed rolling update: the previous version still serves */
            snprintf(message, sizeof message,
                     "the new version fails to start; %zu replicas of the previous version keep "
                     "serving: %s",
                     running, failure);
        else
            snprintf(message, sizeof message, "replicas fail to start: %s", failure);
        /* The cut above may fall inside a character; json_pack takes only valid UTF-8. */
        ms_utf8_copy(message, sizeof message, message, strlen(message));
    } else if (strcmp(status, "HEALTHY") != 0) {
        const char *spawn = ms_deployment_spawn_error(e->dep);
        snprintf(message, sizeof message, "%zu of %d replicas running%s%s", running,
                 ms_deployment_target(e->dep), spawn ? "; cannot start more: " : "",
                 spawn ? spawn : "");
    }
    json_t *d = json_pack("{s:s, s:s, s:s, s:s, s:i, s:I, s:o}", "name", e->name, "status", status,
                          "status_trigger", trigger, "message", message, "target_num_replicas",
                          ms_deployment_target(e->dep), "queued_requests",
                          (json_int_t)ms_deployment_queued(e->dep), "replicas", replicas);
    json_t *router = ms_router_script_info(ms_deployment_router_script(e->dep));
    json_object_set_new(d, "routing", routing_json(e, router));
    json_object_set_new(d, "router", router);
    if (e->autoscaler)
        json_object_set_new(d, "autoscaling", ms_autoscaler_status(e->autoscaler));
    if (e->tasks)
        json_object_set_new(d, "task_queue", ms_task_queue_info(e->tasks));
    return d;
}

static const char *app_status(json_t *deps)
{
    const char *key;
    json_t *d;
    int all_healthy = 1;
    json_object_foreach(deps, key, d)
    {
        const char *s = json_string_value(json_object_get(d, "status"));
        if (strcmp(s, "DEPLOY_FAILED") == 0)
            return "DEPLOY_FAILED";
        if (strcmp(s, "UNHEALTHY") == 0)
            return "UNHEALTHY";
        all_healthy &= strcmp(s, "HEALTHY") == 0;
    }
    return all_healthy ? "RUNNING" : "DEPLOYING";
}

static json_t *app_json(controller_t *c, size_t a)
{
    const app_entry_t *app = &c->apps[a];
    json_t *deps = json_object();
    for (size_t i = 0; i < c->n_deps; i++)
        if (c->deps[i].app_index == a)
            json_object_set_new(deps, c->deps[i].name, deployment_json(&c->deps[i]));
    json_t *j = json_pack("{s:s, s:s?, s:s, s:s, s:b, s:s}", "name", app->cfg->name, "route_prefix",
                          app->cfg->route_prefix, "status", app_status(deps), "message", "",
                          "external_scaler_enabled", app->cfg->external_scaler_enabled, "source",
                          "declarative");
    json_object_set_new(j, "deployments", deps);
    if (app->policy)
        json_object_set_new(j, "autoscaling_policy", ms_app_policy_status(app->policy));
    if (app->scale_hook)
        json_object_set_new(j, "external_scaler", ms_scale_hook_status(app->scale_hook));
    return j;
}

static int on_status(void *data, json_t **body)
{
    controller_t *c = data;
    json_t *apps = json_object();
    for (size_t a = 0; a < c->n_apps; a++)
        json_object_set_new(apps, c->apps[a].cfg->name, app_json(c, a));
    *body = json_pack("{s:{s:i, s:s}, s:s, s:{s:s, s:i}, s:o, s:n}", "controller_info", "pid",
                      (int)getpid(), "actor_name", "moonserve-controller", "deploy_mode",
                      "MULTI_APP", "http_options", "host", c->cfg->http.host, "port",
                      c->cfg->http.port, "applications", apps, "target_capacity");
    json_object_set_new(*body, "control_loop", ms__control_status(c));
    json_object_set_new(*body, "gpus",
                        json_pack("{s:s, s:s, s:o}", "source", ms_gpu_source_name(c->gpus),
                                  "message", ms_gpu_message(c->gpus), "devices",
                                  ms_gpu_devices_json(c->gpus, c->gpu_pool)));
    return 200;
}

static int on_scale(void *data, const char *app, const char *deployment, long long target,
                    json_t **body)
{
    controller_t *c = data;
    dep_entry_t *e = ms__control_find(c, app, deployment);
    if (!e) {
        *body = json_pack("{s:s}", "error", "Application or Deployment not found");
        return 400;
    }
    if (c->shutting_down) {
        *body = json_pack("{s:s}", "error", "Deployment is deleted");
        return 412;
    }
    if (!e->app->external_scaler_enabled) {
        char msg[300];
        snprintf(msg, sizeof msg,
                 "External scaling is disabled for application '%s': set "
                 "external_scaler_enabled: true in its config",
                 app);
        *body = json_pack("{s:s}", "error", msg);
        return 412;
    }
    long long room = ms__control_replica_room(c, e);
    if (target > room) {
        char msg[400];
        snprintf(msg, sizeof msg,
                 "Invalid request body: target_num_replicas %lld is over the engine's replica "
                 "limit: max_replicas_total is %d and the other deployments keep %lld, so "
                 "%s/%s may have at most %lld",
                 target, c->cfg->max_replicas_total, c->cfg->max_replicas_total - room, app,
                 deployment, room);
        *body = json_pack("{s:s}", "error", msg);
        return 400;
    }
    long long t = target;
    char reason[MS_SCALE_HOOK_REASON_MAX];
    ms_scale_hook_t *hook = c->apps[e->app_index].scale_hook;
    ms_hook_verdict_t v = ms_scale_hook_judge(
        hook, deployment, target, ms_deployment_target(e->dep),
        (int)ms_deployment_running_replicas(e->dep), ms_wall_time(), &t, reason, sizeof reason);
    int previous = ms_deployment_target(e->dep);
    if (v == MS_HOOK_REFUSE) {
        ms_info("external scaling %s/%s: %lld refused by the hook: %s", app, deployment, target,
                reason);
        char why[MS_SCALE_HOOK_REASON_MAX + 32];
        snprintf(why, sizeof why, "refused by the hook: %s", reason);
        ms__control_history_external(c, e, "api", target, previous, previous, why);
        *body = json_pack("{s:s}", "error", reason);
        return 422;
    }
    if (t > room)
        t = room; /* a hook may raise the count, but not past the engine's limit */
    if (v == MS_HOOK_CLAMP)
        ms_info("external scaling %s/%s: %lld clamped to %lld by the hook: %s", app, deployment,
                target, t, reason);
    ms_info("external scaling %s/%s: target %lld", app, deployment, t);
    char why[MS_SCALE_HOOK_REASON_MAX + 32] = "";
    if (v == MS_HOOK_CLAMP)
        snprintf(why, sizeof why, "clamped by the hook to %lld: %s", t, reason);
    else if (t != target)
        snprintf(why, sizeof why, "cut at max_replicas_total");
    ms__control_history_external(c, e, "api", target, t, previous, why[0] ? why : NULL);
    ms_deployment_set_target(e->dep, (int)t);
    *body = json_pack("{s:s}", "message",
                      "Scaling request received. Deployment will get scaled asynchronously.");
    return 200;
}

/* ---- hot reload -------------------------------------------------------------------------------
 * Every policy script of the controller goes to one engine/policy reload: prepared on a worker
 * thread, committed all-or-none on the loop. One reload runs at a time; requests that arrive
 * meanwhile wait for the next one, which starts as soon as the current one ends (so a reload
 * asked for after a file changed always reads the file as it is then). */

/* Every policy script of the controller, each once. Returns the count; *out is malloc'd. */
static size_t collect_policies(controller_t *c, ms_policy_t ***out)
{
    size_t cap = 2 * c->n_deps + 3 * c->n_apps + 1, n = 0;
    ms_policy_t **ps = ms_calloc(cap, sizeof *ps);
    for (size_t i = 0; i < c->n_deps; i++) {
        dep_entry_t *e = &c->deps[i];
        ps[n++] = ms_router_script_policy(ms_deployment_router_script(e->dep));
        if (e->autoscaler)
            ps[n++] = ms_autoscaler_policy(e->autoscaler);
    }
    for (size_t a = 0; a < c->n_apps; a++) {
        if (c->apps[a].policy)
            ps[n++] = ms_app_policy_policy(c->apps[a].policy);
        if (c->apps[a].scale_hook)
            n += ms_scale_hook_policies(c->apps[a].scale_hook, ps + n);
    }
    *out = ps;
    return n;
}

typedef struct reload_waiter {
    ms_admin_reply_t *reply; /* NULL: SIGHUP, nobody to answer */
    struct reload_waiter *next;
} reload_waiter_t;

static void log_reload(json_t *scripts, int ok)
{
    size_t i;
    json_t *s;
    json_array_foreach(scripts, i, s)
    {
        const char *err = json_string_value(json_object_get(s, "error"));
        const char *path = json_string_value(json_object_get(s, "path"));
        json_int_t version = json_integer_value(json_object_get(s, "version"));
        const char *sha = json_string_value(json_object_get(s, "sha256"));
        if (err)
            ms_error("reload: %s: %s", path ? path : "?", err);
        else
            ms_info("reload: %s v%lld sha256 %.12s", path ? path : "?", (long long)version,
                    sha ? sha : "?");
    }
    ms_log(ok ? MS_LOG_INFO : MS_LOG_ERROR, "reload %s: %zu scripts",
           ok ? "applied" : "rejected, nothing changed", json_array_size(scripts));
}

/* ---- reload history ------------------------------------------------------------------------
 * One entry per script and reload (docs/admin-api.md): who asked, what changed against the
 * script as it was when the reload began, and the result (a script that prepared fine is still
 * "failed" when another one rejected the reload, since nothing was committed). */

static const char *str_or(json_t *o, const char *key, const char *dflt)
{
    const char *v = json_string_value(json_object_get(o, key));
    return v ? v : dflt;
}

/* Who a script is: kind, application, deployment and role (one policy each). */
static char *script_key(json_t *info)
{
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s\x1f%s\x1f%s\x1f%s", str_or(info, "kind", ""),
                   str_or(info, "application", ""), str_or(info, "deployment", ""),
                   str_or(info, "role", ""));
    return b.data;
}

static json_t *scripts_now(controller_t *c)
{
    ms_policy_t **ps;
    size_t n = collect_policies(c, &ps);
    json_t *all = json_object();
    for (size_t i = 0; i < n; i++) {
        json_t *info = ms_policy_info(ps[i]);
        char *key = script_key(info);
        json_object_set_new(all, key, info);
        free(key);
    }
    free(ps);
    return all;
}

static const char *requested_by(const reload_waiter_t *w)
{
    int admin = 0, sighup = 0;
    for (; w; w = w->next) {
        admin |= w->reply != NULL;
        sighup |= w->reply == NULL;
    }
    return admin && sighup ? "admin+sighup" : admin ? "admin" : "sighup";
}

static json_t *script_changes(json_t *before, json_t *s, int ok)
{
    json_t *changed = json_array();
    if (!before) {
        json_array_append_new(changed, json_string("new script"));
        return changed;
    }
    const char *path0 = str_or(before, "path", ""), *path1 = str_or(s, "path", "");
    if (strcmp(path0, path1) != 0) {
        ms_buf_t b = {0};
        ms_buf_appendf(&b, "path %s -> %s", path0, path1);
        json_t *text = json_string(b.data);
        json_array_append_new(changed, text ? text : json_string("path"));
        ms_buf_free(&b);
    }
    const char *sha0 = str_or(before, "sha256", ""), *sha1 = str_or(s, "sha256", "");
    if (strcmp(sha0, sha1) != 0) {
        char text[80];
        snprintf(text, sizeof text, "sha256 %.12s -> %.12s", sha0, sha1);
        json_array_append_new(changed, json_string(text));
    }
    json_int_t v0 = json_integer_value(json_object_get(before, "version"));
    json_int_t v1 = json_integer_value(json_object_get(s, "version"));
    if (ok && v0 != v1) {
        char text[80];
        snprintf(text, sizeof text, "version %lld -> %lld", (long long)v0, (long long)v1);
        json_array_append_new(changed, json_string(text));
    }
    return changed;
}

static void record_reload(controller_t *c, json_t *scripts, int ok)
{
    const char *who = requested_by(c->reload_running);
    double now = ms_wall_time();
    size_t i;
    json_t *s;
    json_array_foreach(scripts, i, s)
    {
        char *key = script_key(s);
        json_t *before = c->reload_before ? json_object_get(c->reload_before, key) : NULL;
        free(key);
        const char *err = json_string_value(json_object_get(s, "error"));
        int script_ok = json_is_true(json_object_get(s, "ok"));
        json_t *error = err  ? json_string(err)
                        : ok ? json_null()
                             : json_string("not applied: another script failed to prepare");
        if (!error)
            error = json_string("(message not valid UTF-8)");
        json_t *e = json_pack(
            "{s:f, s:s, s:O, s:O, s:O, s:s, s:o, s:s, s:o, s:O, s:I, s:s?, s:O}", "time", now,
            "kind", str_or(s, "kind", "?"), "application",
            json_object_get(s, "application") ? json_object_get(s, "application") : json_null(),
            "deployment",
            json_object_get(s, "deployment") ? json_object_get(s, "deployment") : json_null(),
            "role", json_object_get(s, "role") ? json_object_get(s, "role") : json_null(),
            "requested_by", who, "changed", script_changes(before, s, ok && script_ok), "result",
            ok ? "ok" : "failed", "error", error, "version",
            json_object_get(s, "version") ? json_object_get(s, "version") : json_null(), "reload",
            (json_int_t)c->reloads, "path", str_or(s, "path", NULL), "sha256",
            json_object_get(s, "sha256") ? json_object_get(s, "sha256") : json_null());
        ms_history_record(MS_HISTORY_RELOADS, e);
    }
    json_decref(c->reload_before);
    c->reload_before = NULL;
}

static void start_reload(controller_t *c);

static void on_reloaded(void *data, json_t *scripts, int ok)
{
    controller_t *c = data;
    log_reload(scripts, ok);
    record_reload(c, scripts, ok);
    reload_waiter_t *w = c->reload_running;
    c->reload_running = NULL;
    while (w) {
        reload_waiter_t *next = w->next;
        if (w->reply)
            ms_admin_reply_send(w->reply, ok ? 200 : 422,
                                json_pack("{s:b, s:O}", "ok", ok, "scripts", scripts));
        free(w);
        w = next;
    }
    c->reload_in_flight = 0;
    if (c->reload_waiting)
        start_reload(c);
}

static void start_reload(controller_t *c)
{
    ms_policy_t **ps;
    size_t n = collect_policies(c, &ps);
    c->reload_running = c->reload_waiting;
    c->reload_waiting = NULL;
    c->reload_in_flight = 1;
    c->reloads++;
    json_decref(c->reload_before);
    c->reload_before = scripts_now(c);
    if (ms_policy_reload_start(c->loop, ps, n, on_reloaded, c) != 0) {
        /* No worker could take it: prepare here rather than not at all. */
        json_t *scripts = NULL;
        int ok = ms_policy_reload_now(ps, n, &scripts);
        on_reloaded(c, scripts, ok);
        json_decref(scripts);
    }
    free(ps);
}

void ms__reload_request(controller_t *c, ms_admin_reply_t *reply)
{
    reload_waiter_t *w = ms_calloc(1, sizeof *w);
    w->reply = reply;
    w->next = c->reload_waiting;
    c->reload_waiting = w;
    if (!c->reload_in_flight)
        start_reload(c);
}

static void on_reload(void *data, ms_admin_reply_t *reply)
{
    ms__reload_request(data, reply);
}

static int on_deploy(void *data, const char *text, size_t len, int is_yaml, json_t **body)
{
    (void)is_yaml; /* JSON is YAML: one loader reads both */
    return ms__deploy(data, text, len, body);
}

static int on_shutdown(void *data, json_t **body)
{
    ms__begin_shutdown(data, "shutdown requested through the admin API");
    *body = NULL;
    return 200;
}

/* ---- metrics -----------------------------------------------------------------------------------
 */

/* A label value in the Prometheus text format: backslash, double quote and newline escaped
 * (names are any text the config allows). The caller frees it. */
static char *label_value(const char *s)
{
    ms_buf_t b = {0};
    ms_buf_append_label(&b, s);
    return b.data;
}

/* One script's sample of a family: moonserve_script_info (version and hash as labels) when
 * field is NULL, else the integer `field` of its info, with `extra` labels (may be ""). */
static void script_metric(ms_buf_t *b, const ms_policy_t *p, const char *name, const char *field,
                          const char *extra)
{
    json_t *info = ms_policy_info(p);
    const char *app_name = json_string_value(json_object_get(info, "application"));
    const char *dep_name = json_string_value(json_object_get(info, "deployment"));
    const char *sha = json_string_value(json_object_get(info, "sha256"));
    char *app = label_value(app_name ? app_name : ""), *dep = label_value(dep_name ? dep_name : "");
    ms_buf_appendf(b, "%s{kind=\"%s\",application=\"%s\",deployment=\"%s\"", name,
                   json_string_value(json_object_get(info, "kind")), app, dep);
    if (field)
        ms_buf_appendf(b, "%s} %lld\n", extra,
                       (long long)json_integer_value(json_object_get(info, field)));
    else
        ms_buf_appendf(b, ",version=\"%lld\",sha256=\"%s\"} 1\n",
                       (long long)json_integer_value(json_object_get(info, "version")),
                       sha ? sha : "");
    free(app);
    free(dep);
    json_decref(info);
}

static const struct {
    const char *name, *type, *help, *field, *extra;
} SCRIPT_FAMILIES[] = {
    {"moonserve_script_info", "gauge",
     "The policy and router scripts loaded: version and sha256 as labels.", NULL, ""},
    {"moonserve_script_failures_total", "counter",
     "Calls into a policy or router script that failed (errors, budget overruns).", "failures", ""},
    {"moonserve_script_budget_overruns_total", "counter",
     "Calls into a script stopped because they ran past their time budget.", "budget_overruns", ""},
    {"moonserve_script_reloads_total", "counter",
     "Reloads of a script, by result (a failed one leaves the old version in force).", "reloads",
     ",result=\"ok\""},
    {"moonserve_script_reloads_total", NULL, NULL, "reload_failures", ",result=\"failed\""},
    {"moonserve_script_memory_bytes", "gauge", "Memory the script's Lua state holds.",
     "memory_bytes", ""},
};

static void script_metrics(controller_t *c, ms_buf_t *b)
{
    ms_policy_t **ps;
    size_t n = collect_policies(c, &ps);
    for (size_t f = 0; f < sizeof SCRIPT_FAMILIES / sizeof *SCRIPT_FAMILIES; f++) {
        if (SCRIPT_FAMILIES[f].type)
            ms_metrics_family(b, SCRIPT_FAMILIES[f].name, SCRIPT_FAMILIES[f].type,
                              SCRIPT_FAMILIES[f].help);
        for (size_t i = 0; i < n; i++)
            script_metric(b, ps[i], SCRIPT_FAMILIES[f].name, SCRIPT_FAMILIES[f].field,
                          SCRIPT_FAMILIES[f].extra);
    }
    free(ps);
}

typedef enum { DEP_TARGET, DEP_RUNNING, DEP_QUEUED, DEP_ONGOING, DEP_FAMILIES } dep_family_t;

static const char *const DEP_FAMILY[DEP_FAMILIES][2] = {
    {"moonserve_deployment_target_replicas", "Replicas the deployment is scaling to."},
    {"moonserve_deployment_running_replicas", "Replicas running and serving."},
    {"moonserve_deployment_queued_requests", "Requests waiting for a replica (Ray's "
                                             "serve_deployment_queued_queries)."},
    {"moonserve_deployment_ongoing_requests", "Requests sent to replicas and not finished (Ray's "
                                              "serve_num_ongoing_requests_at_replicas)."},
};

static size_t dep_value(const dep_entry_t *e, dep_family_t f)
{
    if (f == DEP_TARGET)
        return (size_t)ms_deployment_target(e->dep);
    if (f == DEP_QUEUED)
        return ms_deployment_queued(e->dep);
    size_t n, v = 0;
    ms_replica_t **rs = replica_list(e, &n);
    for (size_t i = 0; i < n; i++)
        v += f == DEP_RUNNING ? rs[i]->state == MS_REPLICA_RUNNING : (size_t)rs[i]->ongoing;
    free(rs);
    return v;
}

static char *dep_labels(const dep_entry_t *e)
{
    ms_buf_t b = {0};
    ms_buf_append_str(&b, "application=\"");
    ms_buf_append_label(&b, e->app->name);
    ms_buf_append_str(&b, "\",deployment=\"");
    ms_buf_append_label(&b, e->name);
    ms_buf_append_str(&b, "\"");
    return b.data;
}

/* The request counters of every deployment; errors_only: the error classes alone. */
static void dep_requests(controller_t *c, char **labels, ms_buf_t *b, int errors_only)
{
    const char *name = errors_only ? "moonserve_deployment_error_requests_total"
                                   : "moonserve_deployment_requests_total";
    ms_metrics_family(b, name, "counter",
                      errors_only ? "Requests a deployment's replicas failed, answered with an "
                                    "error, or dropped (client gone, timed out)."
                                  : "Requests that left a deployment's replicas, by status class "
                                    "(HTTP and handle calls).");
    for (size_t i = 0; i < c->n_deps; i++) {
        const ms_deployment_stats_t *st = ms_deployment_stats(c->deps[i].dep);
        for (int k = 0; k < MS_STATUS_CLASSES; k++)
            if (st->requests[k] && (!errors_only || ms_metrics_class_is_error(k)))
                ms_buf_appendf(b, "%s{%s,status_class=\"%s\"} %llu\n", name, labels[i],
                               ms_metrics_status_class_name(k),
                               (unsigned long long)st->requests[k]);
    }
}

static void dep_counter(controller_t *c, char **labels, ms_buf_t *b, const char *name,
                        const char *help, int failures)
{
    ms_metrics_family(b, name, "counter", help);
    for (size_t i = 0; i < c->n_deps; i++) {
        const ms_deployment_stats_t *st = ms_deployment_stats(c->deps[i].dep);
        ms_buf_appendf(b, "%s{%s} %llu\n", name, labels[i],
                       (unsigned long long)(failures ? st->replica_failures : st->replica_starts));
    }
}

static void dep_histogram(controller_t *c, char **labels, ms_buf_t *b, const char *name,
                          const char *help, int queue_wait)
{
    ms_metrics_family(b, name, "histogram", help);
    for (size_t i = 0; i < c->n_deps; i++) {
        const ms_deployment_stats_t *st = ms_deployment_stats(c->deps[i].dep);
        ms_histogram_text(b, name, labels[i], queue_wait ? &st->queue_wait : &st->processing);
    }
}

/* The latest decision's inputs and raw answer, for deployments that autoscale. */
static void autoscaling_metrics(controller_t *c, char **labels, ms_buf_t *b)
{
    static const char *const FAMILY[3][2] = {
        {"moonserve_autoscaling_desired_replicas",
         "The autoscaling policy's latest raw answer, before factors, bounds and delays."},
        {"moonserve_autoscaling_total_requests",
         "Requests (queued and running, over the look-back window) the latest decision saw."},
        {"moonserve_autoscaling_queued_requests", "Requests queued that the latest decision saw."},
    };
    for (int f = 0; f < 3; f++) {
        ms_metrics_family(b, FAMILY[f][0], "gauge", FAMILY[f][1]);
        for (size_t i = 0; i < c->n_deps; i++) {
            const ms_autoscale_decision_t *d =
                c->deps[i].autoscaler ? ms_autoscaler_last_decision(c->deps[i].autoscaler) : NULL;
            if (d)
                ms_buf_appendf(b, "%s{%s} %.6g\n", FAMILY[f][0], labels[i],
                               f == 0   ? d->raw_target
                               : f == 1 ? d->total_requests
                                        : d->queued_requests);
        }
    }
}

/* ---- custom metrics (serve.metrics) ------------------------------------------------------------
 * Replicas report their Counter, Gauge and Histogram values with each stats poll; here they are
 * summed per deployment and tag set. A replica's snapshot is checked again (names, tag keys,
 * shapes), since the text must stay well-formed whatever a script put in it. */

#define CUSTOM_MAX_SERIES 10000 /* over every deployment and metric */

static void add_number(json_t *acc, const char *name, json_t *v);

static int metric_name_ok(const char *s)
{
    if (!s || !*s || (*s >= '0' && *s <= '9') || strncmp(s, "__", 2) == 0 ||
        strncmp(s, "moonserve_", 10) == 0 || strlen(s) > 200)
        return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '_'))
            return 0;
    return 1;
}

/* The engine's own metrics that replicas keep (lua/moonserve/multiplex.lua) and that travel
 * with the custom ones: the only moonserve_ names a replica may report. */
static const char *const REPLICA_ENGINE_METRICS[] = {
    "moonserve_multiplexed_get_model_requests_total",
    "moonserve_multiplexed_models_load_total",
    "moonserve_multiplexed_models_unload_total",
    "moonserve_multiplexed_models",
    "moonserve_multiplexed_model_load_latency_seconds",
    "moonserve_multiplexed_model_unload_latency_seconds",
};

static int replica_metric_name_ok(const char *s)
{
    for (size_t i = 0; i < sizeof REPLICA_ENGINE_METRICS / sizeof *REPLICA_ENGINE_METRICS; i++)
        if (s && strcmp(s, REPLICA_ENGINE_METRICS[i]) == 0)
            return 1;
    return metric_name_ok(s);
}

static int tags_ok(json_t *tags)
{
    const char *k;
    json_t *v;
    if (json_is_array(tags) && json_array_size(tags) == 0)
        return 1; /* an empty Lua table */
    if (!json_is_object(tags))
        return 0;
    json_object_foreach(tags, k, v)
    {
        if (!metric_name_ok(k) || !json_is_string(v) || strcmp(k, "application") == 0 ||
            strcmp(k, "deployment") == 0 || strcmp(k, "le") == 0)
            return 0;
    }
    return 1;
}

static void add_series(json_t *agg, json_t *s, int histogram, size_t n_buckets)
{
    if (!histogram) {
        add_number(agg, "value", json_object_get(s, "value"));
        return;
    }
    json_t *from = json_object_get(s, "buckets"), *to = json_object_get(agg, "buckets");
    for (size_t i = 0; i < n_buckets && i < json_array_size(from); i++)
        json_array_set_new(to, i,
                           json_real(json_number_value(json_array_get(to, i)) +
                                     json_number_value(json_array_get(from, i))));
    add_number(agg, "count", json_object_get(s, "count"));
    add_number(agg, "sum", json_object_get(s, "sum"));
}

/* Folds one replica's (or script's) metric into all[name]: {type, description, boundaries,
 * series: {key: {labels, tags, value | buckets, count, sum}}}; labels is the Prometheus label
 * text of the deployment (or script) it belongs to, and series with the same labels and tags add
 * up. A name another deployment uses with another type
 * or other boundaries is left out. */
static void fold_metric(json_t *all, const char *labels, const char *name, json_t *m,
                        size_t *n_series)
{
    const char *type = json_string_value(json_object_get(m, "type"));
    json_t *bounds = json_object_get(m, "boundaries");
    int histogram = type && strcmp(type, "histogram") == 0;
    if (!replica_metric_name_ok(name) || !type ||
        (!histogram && strcmp(type, "counter") != 0 && strcmp(type, "gauge") != 0) ||
        (histogram && (!json_is_array(bounds) || json_array_size(bounds) == 0)))
        return;
    json_t *e = json_object_get(all, name);
    if (!e) {
        const char *help = json_string_value(json_object_get(m, "description"));
        e = json_pack("{s:s, s:s, s:O, s:{}}", "type", type, "description", help ? help : "",
                      "boundaries", histogram ? bounds : json_null(), "series");
        json_object_set_new(all, name, e);
    }
    if (strcmp(json_string_value(json_object_get(e, "type")), type) != 0 ||
        (histogram && !json_equal(json_object_get(e, "boundaries"), bounds)))
        return;
    size_t nb = histogram ? json_array_size(bounds) + 1 : 0;
    json_t *series = json_object_get(m, "series"), *s, *out = json_object_get(e, "series");
    size_t i;
    json_array_foreach(series, i, s)
    {
        json_t *tags = json_object_get(s, "tags");
        if (!tags_ok(tags))
            continue;
        char *tk = json_dumps(tags, JSON_COMPACT | JSON_SORT_KEYS);
        ms_buf_t key = {0};
        ms_buf_appendf(&key, "%s %s", labels, tk ? tk : "");
        free(tk);
        json_t *agg = json_object_get(out, key.data);
        if (!agg && *n_series < CUSTOM_MAX_SERIES) {
            (*n_series)++;
            agg = json_pack("{s:s, s:O}", "labels", labels, "tags", tags);
            if (histogram) {
                json_t *b = json_array();
                for (size_t k = 0; k < nb; k++)
                    json_array_append_new(b, json_real(0));
                json_object_set_new(agg, "buckets", b);
            }
            json_object_set_new(out, key.data, agg);
        }
        ms_buf_free(&key);
        if (agg)
            add_series(agg, s, histogram, nb);
    }
}

/* A HELP text on one line, with backslashes escaped, as the format wants. */
static void append_help(ms_buf_t *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            ms_buf_append_str(b, "\\\\");
        else if (*s == '\n')
            ms_buf_append_str(b, "\\n");
        else
            ms_buf_append(b, s, 1);
    }
}

static void custom_labels(ms_buf_t *out, json_t *agg)
{
    ms_buf_append_str(out, json_string_value(json_object_get(agg, "labels")));
    const char *k;
    json_t *v;
    json_t *tags = json_object_get(agg, "tags");
    json_object_foreach(tags, k, v)
    {
        ms_buf_appendf(out, ",%s=\"", k);
        ms_buf_append_label(out, json_string_value(v));
        ms_buf_append_str(out, "\"");
    }
}

static void custom_family(ms_buf_t *b, const char *name, json_t *e)
{
    const char *type = json_string_value(json_object_get(e, "type"));
    size_t len = strlen(name);
    int counter = strcmp(type, "counter") == 0;
    /* Prometheus names counters NAME_total (Ray's exporter adds the suffix too). */
    const char *suffix =
        counter && !(len > 6 && strcmp(name + len - 6, "_total") == 0) ? "_total" : "";
    ms_buf_appendf(b, "# HELP %s%s ", name, suffix);
    append_help(b, json_string_value(json_object_get(e, "description")));
    ms_buf_appendf(b, "\n# TYPE %s%s %s\n", name, suffix, type);
    ms_buf_t labels = {0};
    const char *key;
    json_t *agg;
    json_t *bounds = json_object_get(e, "boundaries");
    json_object_foreach(json_object_get(e, "series"), key, agg)
    {
        ms_buf_reset(&labels);
        custom_labels(&labels, agg);
        if (strcmp(type, "histogram") != 0) {
            ms_buf_appendf(b, "%s%s{%s} %.17g\n", name, suffix, labels.data,
                           json_number_value(json_object_get(agg, "value")));
            continue;
        }
        json_t *buckets = json_object_get(agg, "buckets");
        double cumulative = 0;
        for (size_t i = 0; i < json_array_size(buckets); i++) {
            cumulative += json_number_value(json_array_get(buckets, i));
            char le[32];
            if (i < json_array_size(bounds))
                ms_buf_appendf(
                    b, "%s_bucket{%s,le=\"%s\"} %.17g\n", name, labels.data,
                    ms_metrics_number(le, sizeof le, json_number_value(json_array_get(bounds, i))),
                    cumulative);
            else
                ms_buf_appendf(b, "%s_bucket{%s,le=\"+Inf\"} %.17g\n", name, labels.data,
                               cumulative);
        }
        ms_buf_appendf(b, "%s_sum{%s} %.17g\n%s_count{%s} %.17g\n", name, labels.data,
                       json_number_value(json_object_get(agg, "sum")), name, labels.data,
                       json_number_value(json_object_get(agg, "count")));
    }
    ms_buf_free(&labels);
}

/* The application and deployment labels of a script's metrics ("" for what it lacks: an
 * application policy has no deployment), as replicas' metrics have. */
static char *script_labels(const ms_policy_t *p)
{
    json_t *info = ms_policy_info(p);
    const char *app = json_string_value(json_object_get(info, "application"));
    const char *dep = json_string_value(json_object_get(info, "deployment"));
    ms_buf_t b = {0};
    ms_buf_append_str(&b, "application=\"");
    ms_buf_append_label(&b, app ? app : "");
    ms_buf_append_str(&b, "\",deployment=\"");
    ms_buf_append_label(&b, dep ? dep : "");
    ms_buf_append_str(&b, "\"");
    json_decref(info);
    return b.data;
}

/* Metrics that policy and router scripts defined (require "moonserve.metrics"). */
static void fold_script_metrics(controller_t *c, json_t *all, size_t *n_series)
{
    ms_policy_t **ps;
    size_t n = collect_policies(c, &ps);
    for (size_t i = 0; i < n; i++) {
        json_t *snap = ms_policy_metrics(ps[i]);
        if (!snap)
            continue;
        char *labels = script_labels(ps[i]);
        const char *name;
        json_t *m;
        json_object_foreach(snap, name, m)
        {
            fold_metric(all, labels, name, m, n_series);
        }
        free(labels);
        json_decref(snap);
    }
    free(ps);
}

static void custom_metrics(controller_t *c, char **dep_labels, ms_buf_t *b)
{
    json_t *all = json_object();
    size_t n_series = 0;
    fold_script_metrics(c, all, &n_series);
    for (size_t i = 0; i < c->n_deps; i++) {
        size_t n;
        ms_replica_t **rs = replica_list(&c->deps[i], &n);
        for (size_t k = 0; k < n; k++) {
            const char *name;
            json_t *m;
            json_object_foreach(rs[k]->custom_metrics, name, m)
            {
                fold_metric(all, dep_labels[i], name, m, &n_series);
            }
        }
        free(rs);
    }
    const char *name;
    json_t *e;
    json_object_foreach(all, name, e)
    {
        custom_family(b, name, e);
    }
    json_decref(all);
}

/* Task queues (docs/tasks.md): their state from ms_task_queue_info, labelled by queue too (a
 * name from the config: bounded). */
static void task_metrics(controller_t *c, char **labels, ms_buf_t *b)
{
    static const char *const GAUGES[][3] = {
        {"moonserve_task_queue_backlog", "backlog", "Tasks waiting in the queue, not taken yet."},
        {"moonserve_task_queue_running", "running", "Tasks this engine runs now."},
        {"moonserve_task_queue_connected", "connected", "1 while the queue's Redis is up."},
    };
    static const char *const OUTCOMES[] = {"submitted", "started",     "succeeded",     "failed",
                                           "retried",   "redelivered", "unprocessable", "revoked"};
    json_t **info = ms_calloc(c->n_deps + 1, sizeof *info);
    for (size_t i = 0; i < c->n_deps; i++)
        info[i] = c->deps[i].tasks ? ms_task_queue_info(c->deps[i].tasks) : NULL;
    for (size_t g = 0; g < sizeof GAUGES / sizeof *GAUGES; g++) {
        ms_metrics_family(b, GAUGES[g][0], "gauge", GAUGES[g][2]);
        for (size_t i = 0; i < c->n_deps; i++) {
            json_t *v = info[i] ? json_object_get(info[i], GAUGES[g][1]) : NULL;
            if (v)
                ms_buf_appendf(b, "%s{%s,queue=\"%s\"} %lld\n", GAUGES[g][0], labels[i],
                               json_string_value(json_object_get(info[i], "queue")),
                               json_is_boolean(v) ? (long long)json_is_true(v)
                                                  : (long long)json_integer_value(v));
        }
    }
    ms_metrics_family(b, "moonserve_task_queue_tasks_total", "counter",
                      "Tasks by what happened to them (submitted here, started, succeeded, "
                      "failed, retried, redelivered, unprocessable, revoked).");
    for (size_t i = 0; i < c->n_deps; i++)
        for (size_t k = 0; info[i] && k < sizeof OUTCOMES / sizeof *OUTCOMES; k++)
            ms_buf_appendf(b,
                           "moonserve_task_queue_tasks_total{%s,queue=\"%s\",outcome=\"%s\"} "
                           "%lld\n",
                           labels[i], json_string_value(json_object_get(info[i], "queue")),
                           OUTCOMES[k],
                           (long long)json_integer_value(json_object_get(info[i], OUTCOMES[k])));
    for (size_t i = 0; i < c->n_deps; i++)
        json_decref(info[i]);
    free(info);
}

static void deployment_metrics(controller_t *c, ms_buf_t *b)
{
    char **labels = ms_calloc(c->n_deps + 1, sizeof *labels);
    for (size_t i = 0; i < c->n_deps; i++)
        labels[i] = dep_labels(&c->deps[i]);
    for (int f = 0; f < DEP_FAMILIES; f++) {
        ms_metrics_family(b, DEP_FAMILY[f][0], "gauge", DEP_FAMILY[f][1]);
        for (size_t i = 0; i < c->n_deps; i++)
            ms_buf_appendf(b, "%s{%s} %zu\n", DEP_FAMILY[f][0], labels[i],
                           dep_value(&c->deps[i], (dep_family_t)f));
    }
    autoscaling_metrics(c, labels, b);
    dep_requests(c, labels, b, 0);
    dep_requests(c, labels, b, 1);
    dep_histogram(c, labels, b, "moonserve_deployment_processing_duration_seconds",
                  "Time from a request's sending to a replica to its end there.", 0);
    dep_histogram(c, labels, b, "moonserve_deployment_queue_wait_seconds",
                  "Time a request waited in the deployment's queue for a replica.", 1);
    dep_counter(c, labels, b, "moonserve_deployment_replica_starts_total", "Replicas started.", 0);
    dep_counter(c, labels, b, "moonserve_deployment_replica_failures_total",
                "Replicas lost unasked: crashes, constructor failures, unhealthy replacements.", 1);
    custom_metrics(c, labels, b);
    task_metrics(c, labels, b);
    for (size_t i = 0; i < c->n_deps; i++)
        free(labels[i]);
    free(labels);
}

/* Adds replica histogram `h` ({count, sum, buckets = {{le, cumulative}, ...}}) into acc;
 * takes h. */
static void add_histogram(json_t *acc, const char *name, json_t *h)
{
    json_t *a = json_object_get(acc, name);
    json_t *buckets = json_object_get(h, "buckets");
    if (!json_is_array(buckets) || !a) {
        if (json_is_array(buckets))
            json_object_set_new(acc, name, h);
        else
            json_decref(h);
        return;
    }
    json_t *ab = json_object_get(a, "buckets");
    for (size_t i = 0; i < json_array_size(ab) && i < json_array_size(buckets); i++) {
        json_t *x = json_array_get(json_array_get(ab, i), 1);
        json_t *y = json_array_get(json_array_get(buckets, i), 1);
        json_array_set_new(json_array_get(ab, i), 1,
                           json_real(json_number_value(x) + json_number_value(y)));
    }
    json_object_set_new(a, "count",
                        json_real(json_number_value(json_object_get(a, "count")) +
                                  json_number_value(json_object_get(h, "count"))));
    json_object_set_new(a, "sum",
                        json_real(json_number_value(json_object_get(a, "sum")) +
                                  json_number_value(json_object_get(h, "sum"))));
    json_decref(h);
}

static void add_number(json_t *acc, const char *name, json_t *v)
{
    json_object_set_new(
        acc, name, json_real(json_number_value(json_object_get(acc, name)) + json_number_value(v)));
}

/* The replica's histograms (times in ms), and the metric each becomes: times in seconds, as
 * Prometheus names them; Ray's names are serve_batch_wait_time_ms and so on. */
static const struct {
    const char *stat, *metric, *help;
    double scale;
} BATCH_HISTOGRAMS[] = {
    {"wait_time_ms", "moonserve_batch_wait_time_seconds",
     "Time a batch's first request waited for the batch to run.", 1e-3},
    {"execution_time_ms", "moonserve_batch_execution_time_seconds", "Time a batch ran.", 1e-3},
    {"utilization_percent", "moonserve_batch_utilization_percent",
     "Batch size over max_batch_size, in percent.", 1},
    {"batch_size", "moonserve_batch_actual_size", "Requests in a batch.", 1},
};
#define N_BATCH_HISTOGRAMS (sizeof BATCH_HISTOGRAMS / sizeof *BATCH_HISTOGRAMS)

/* Every replica's serve.batch stats, summed per method (docs/batching.md, "Metrics"). */
static json_t *batch_totals(const dep_entry_t *e)
{
    size_t n;
    ms_replica_t **rs = replica_list(e, &n);
    json_t *totals = json_object();
    for (size_t i = 0; i < n; i++) {
        const char *fn;
        json_t *st;
        json_object_foreach(rs[i]->batching_stats, fn, st)
        {
            json_t *acc = json_object_get(totals, fn);
            if (!acc) {
                acc = json_object();
                json_object_set_new(totals, fn, acc);
            }
            add_number(acc, "batches_processed", json_object_get(st, "batches_processed"));
            add_number(acc, "queue_length", json_object_get(st, "queue_length"));
            for (size_t k = 0; k < N_BATCH_HISTOGRAMS; k++)
                add_histogram(acc, BATCH_HISTOGRAMS[k].stat,
                              json_deep_copy(json_object_get(st, BATCH_HISTOGRAMS[k].stat)));
        }
    }
    free(rs);
    return totals;
}

static void batch_histogram(ms_buf_t *b, size_t k, const char *labels, json_t *h)
{
    const char *metric = BATCH_HISTOGRAMS[k].metric;
    double scale = BATCH_HISTOGRAMS[k].scale;
    json_t *bk = json_object_get(h, "buckets");
    for (size_t i = 0; i < json_array_size(bk); i++) {
        json_t *le = json_array_get(json_array_get(bk, i), 0);
        char lebuf[32];
        if (json_is_string(le))
            snprintf(lebuf, sizeof lebuf, "+Inf");
        else
            snprintf(lebuf, sizeof lebuf, "%g", json_number_value(le) * scale);
        ms_buf_appendf(b, "%s_bucket{%s,le=\"%s\"} %.0f\n", metric, labels, lebuf,
                       json_number_value(json_array_get(json_array_get(bk, i), 1)));
    }
    ms_buf_appendf(b, "%s_sum{%s} %.9g\n", metric, labels,
                   json_number_value(json_object_get(h, "sum")) * scale);
    ms_buf_appendf(b, "%s_count{%s} %.0f\n", metric, labels,
                   json_number_value(json_object_get(h, "count")));
}

/* One family's lines for every deployment's batched methods. family < 0: the counter
 * (-1) or the queue-length gauge (-2); else BATCH_HISTOGRAMS[family]. */
static void batch_family(ms_buf_t *b, json_t **totals, const controller_t *c, int family)
{
    for (size_t i = 0; i < c->n_deps; i++) {
        char *a = label_value(c->deps[i].app->name), *d = label_value(c->deps[i].name);
        const char *fn;
        json_t *acc;
        json_object_foreach(totals[i], fn, acc)
        {
            char *f = label_value(fn);
            ms_buf_t labels = {0};
            ms_buf_appendf(&labels, "application=\"%s\",deployment=\"%s\",function_name=\"%s\"", a,
                           d, f);
            if (family == -1)
                ms_buf_appendf(b, "moonserve_batches_processed_total{%s} %.0f\n", labels.data,
                               json_number_value(json_object_get(acc, "batches_processed")));
            else if (family == -2)
                ms_buf_appendf(b, "moonserve_batch_queue_length{%s} %.0f\n", labels.data,
                               json_number_value(json_object_get(acc, "queue_length")));
            else
                batch_histogram(b, (size_t)family, labels.data,
                                json_object_get(acc, BATCH_HISTOGRAMS[family].stat));
            ms_buf_free(&labels);
            free(f);
        }
        free(a);
        free(d);
    }
}

static void batch_metrics(controller_t *c, ms_buf_t *b)
{
    json_t **totals = ms_calloc(c->n_deps + 1, sizeof *totals);
    for (size_t i = 0; i < c->n_deps; i++)
        totals[i] = batch_totals(&c->deps[i]);
    ms_metrics_family(b, "moonserve_batches_processed_total", "counter",
                      "Batches a batched method ran.");
    batch_family(b, totals, c, -1);
    ms_metrics_family(b, "moonserve_batch_queue_length", "gauge",
                      "Requests waiting in a batched method's queue.");
    batch_family(b, totals, c, -2);
    for (size_t k = 0; k < N_BATCH_HISTOGRAMS; k++) {
        ms_metrics_family(b, BATCH_HISTOGRAMS[k].metric, "histogram", BATCH_HISTOGRAMS[k].help);
        batch_family(b, totals, c, (int)k);
    }
    for (size_t i = 0; i < c->n_deps; i++)
        json_decref(totals[i]);
    free(totals);
}

static int on_metrics(void *data, char **text)
{
    controller_t *c = data;
    ms_buf_t b = {0};
    deployment_metrics(c, &b);
    batch_metrics(c, &b);
    script_metrics(c, &b);
    /* The file's config, and the latest deploy's: a count that grew with each deploy would be
     * a leak. */
    ms_metrics_family(&b, "moonserve_controller_configs_held", "gauge",
                      "Configs the controller holds (the file's and the latest deploy's).");
    ms_buf_appendf(&b, "moonserve_controller_configs_held %d\n", 1 + (c->deployed != NULL));
    ms_metrics_family(&b, "moonserve_controller_control_loops_total", "counter",
                      "Control-loop ticks run (health checks, stats polls, autoscaling).");
    ms_buf_appendf(&b, "moonserve_controller_control_loops_total %llu\n",
                   (unsigned long long)c->tick_stats.ticks);
    ms_metrics_family(&b, "moonserve_event_loop_idle_seconds_total", "counter",
                      "Time the controller's event loop waited for events; 1 - its rate is the "
                      "loop's utilization.");
    ms_buf_appendf(&b, "moonserve_event_loop_idle_seconds_total %.6f\n",
                   (double)uv_metrics_idle_time(c->loop) / 1e9);
    ms_gpu_metrics_text(c->gpus, &b);
    ms_ingress_metrics_text(c->proxy, &b);
    ms_metrics_family(&b, "moonserve_http_ongoing_requests", "gauge",
                      "HTTP requests received and not answered yet.");
    ms_buf_appendf(&b, "moonserve_http_ongoing_requests %zu\n",
                   c->ingress ? ms_http_server_inflight(c->ingress) : (size_t)0);
    *text = b.data;
    return 200;
}

/* ---- history --------------------------------------------------------------------------------- */

static int on_history(void *data, const ms_admin_history_query_t *q, json_t **body)
{
    (void)data;
    static const unsigned bits[MS_HISTORY_KINDS] = {
        [MS_HISTORY_AUTOSCALING] = MS_ADMIN_HISTORY_AUTOSCALING,
        [MS_HISTORY_RELOADS] = MS_ADMIN_HISTORY_RELOADS,
        [MS_HISTORY_LIFECYCLE] = MS_ADMIN_HISTORY_LIFECYCLE,
    };
    ms_history_filter_t f = {
        .application = q->application,
        .deployment = q->deployment,
        .has_since = q->has_since,
        .since = q->since,
        .limit = (size_t)q->limit,
    };
    *body = json_object();
    for (int k = 0; k < MS_HISTORY_KINDS; k++)
        if (q->kinds & bits[k])
            json_object_set_new(*body, ms_history_kind_name((ms_history_kind_t)k),
                                ms_history_query(ms_history_of((ms_history_kind_t)k), &f));
    return 200;
}

ms_admin_callbacks_t ms__admin_callbacks(void)
{
    ms_admin_callbacks_t cb = {
        .status = on_status,
        .deploy = on_deploy,
        .shutdown = on_shutdown,
        .scale = on_scale,
        .reload = on_reload,
        .metrics = on_metrics,
        .history = on_history,
    };
    return cb;
}
