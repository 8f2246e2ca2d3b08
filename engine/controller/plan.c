/*
 * controller/plan: what the config and the applications' code ask for, merged field by field
 * as Ray Serve merges a config over code: file beats code beats default.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "controller/internal.h"
#include "runtime/runtime.h"
#include "policy/policy.h"
#include "router/router.h"

void ms__plan_free(plan_t *p)
{
    for (size_t i = 0; i < p->n; i++) {
        free(p->items[i].name);
        free(p->items[i].user_config_json);
        if (p->items[i].autoscaling_owned)
            ms_config_autoscaling_free(p->items[i].autoscaling);
        ms_config_process_free(p->items[i].process);
        json_decref(p->items[i].process_json);
    }
    free(p->items);
    p->items = NULL;
    p->n = 0;
}

static int code_int(json_t *options, const char *key, int fallback)
{
    json_t *v = json_object_get(options, key);
    return json_is_integer(v) ? (int)json_integer_value(v) : fallback;
}

static double code_real(json_t *options, const char *key, double fallback)
{
    json_t *v = json_object_get(options, key);
    return json_is_number(v) ? json_number_value(v) : fallback;
}

static void merge_basic(planned_t *out, const ms_deployment_config_t *file, json_t *code)
{
    unsigned set = file ? file->set : 0;
    out->num_replicas = (set & MS_SET_NUM_REPLICAS)
                            ? file->num_replicas
                            : code_int(code, "num_replicas", MS_DEFAULT_NUM_REPLICAS);
    out->max_ongoing_requests =
        (set & MS_SET_MAX_ONGOING_REQUESTS)
            ? file->max_ongoing_requests
            : code_int(code, "max_ongoing_requests", MS_DEFAULT_MAX_ONGOING_REQUESTS);
    out->max_queued_requests =
        (set & MS_SET_MAX_QUEUED_REQUESTS)
            ? file->max_queued_requests
            : code_int(code, "max_queued_requests", MS_DEFAULT_MAX_QUEUED_REQUESTS);
    out->wait_loop_s = (set & MS_SET_GRACEFUL_SHUTDOWN_WAIT_LOOP_S)
                           ? file->graceful_shutdown_wait_loop_s
                           : code_real(code, "graceful_shutdown_wait_loop_s",
                                       MS_DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S);
    out->shutdown_timeout_s = (set & MS_SET_GRACEFUL_SHUTDOWN_TIMEOUT_S)
                                  ? file->graceful_shutdown_timeout_s
                                  : code_real(code, "graceful_shutdown_timeout_s",
                                              MS_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S);
    out->health_check_period_s =
        (set & MS_SET_HEALTH_CHECK_PERIOD_S)
            ? file->health_check_period_s
            : code_real(code, "health_check_period_s", MS_DEFAULT_HEALTH_CHECK_PERIOD_S);
    out->health_check_timeout_s =
        (set & MS_SET_HEALTH_CHECK_TIMEOUT_S)
            ? file->health_check_timeout_s
            : code_real(code, "health_check_timeout_s", MS_DEFAULT_HEALTH_CHECK_TIMEOUT_S);
    json_t *uc =
        (set & MS_SET_USER_CONFIG) ? file->user_config : json_object_get(code, "user_config");
    out->user_config_json = uc ? json_dumps(uc, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    if (!out->user_config_json)
        out->user_config_json = ms_strdup("null");
    out->router = file ? file->router : NULL;
    out->task_queue = file ? file->task_queue : NULL;
}

static void own_autoscaling(planned_t *out, ms_autoscaling_config_t *a)
{
    out->autoscaling = a;
    out->autoscaling_owned = a != NULL;
}

/* Autoscaling, merged as Ray Serve merges num_replicas and autoscaling_config:
 *  - the file's autoscaling_config wins (null in the file turns the code's off); under a
 *    num_replicas: "auto" from code its max_replicas defaults to 100;
 *  - the file's num_replicas: "auto" alone takes the code's autoscaling_config if any, with the
 *    "auto" defaults under it;
 *  - an integer num_replicas in the file means a fixed count;
 *  - otherwise the code's autoscaling_config / num_replicas = "auto". */
static void merge_autoscaling(const ms_config_t *cfg, planned_t *out,
                              const ms_deployment_config_t *file, json_t *code,
                              ms_config_errors_t *errs)
{
    json_t *code_as = json_object_get(code, "autoscaling_config");
    json_t *code_n = json_object_get(code, "num_replicas");
    int code_auto = json_is_string(code_n) && strcmp(json_string_value(code_n), "auto") == 0;
    unsigned set = file ? file->set : 0;
    char what[200];
    snprintf(what, sizeof what, "deployment '%s' (autoscaling_config in code)", out->name);
    if (set & MS_SET_AUTOSCALING_CONFIG) {
        out->autoscaling = file->autoscaling; /* NULL: turned off by the file */
        if (out->autoscaling && code_auto && !out->autoscaling->max_replicas_given)
            out->autoscaling->max_replicas = MS_DEFAULT_AS_MAX_REPLICAS_AUTO;
        return;
    }
    if (file && file->num_replicas_auto) {
        if (json_is_object(code_as))
            own_autoscaling(out, ms_config_autoscaling_from_json(code_as, 1, cfg->path,
                                                                 out->app->import_path_mark, what,
                                                                 errs));
        else
            out->autoscaling = file->autoscaling;
        return;
    }
    if (set & MS_SET_NUM_REPLICAS)
        return; /* a fixed count in the file overrides autoscaling in code */
    if (json_is_object(code_as))
        own_autoscaling(out,
                        ms_config_autoscaling_from_json(code_as, code_auto, cfg->path,
                                                        out->app->import_path_mark, what, errs));
    else if (code_auto)
        own_autoscaling(out, ms_config_autoscaling_default(1));
}

/* Code options are validated like file values, since a bad one would only surface later. */
static void check_merged(const ms_config_t *cfg, const planned_t *p, ms_config_errors_t *errs)
{
    ms_config_mark_t at = p->app->import_path_mark;
    if (p->num_replicas < 1 && !p->autoscaling)
        ms_config_errors_add(errs, cfg->path, at, "deployment '%s': num_replicas must be > 0",
                             p->name);
    if (p->max_ongoing_requests < 1)
        ms_config_errors_add(errs, cfg->path, at,
                             "deployment '%s': max_ongoing_requests must be > 0", p->name);
    if (p->health_check_period_s <= 0 || p->health_check_timeout_s <= 0)
        ms_config_errors_add(errs, cfg->path, at,
                             "deployment '%s': health_check_period_s and "
                             "health_check_timeout_s must be > 0",
                             p->name);
    if (p->max_queued_requests == 0 || p->max_queued_requests < -1)
        ms_config_errors_add(errs, cfg->path, at,
                             "deployment '%s': max_queued_requests must be -1 or >= 1", p->name);
    if (p->autoscaling && p->app->external_scaler_enabled)
        ms_config_errors_add(errs, cfg->path, at,
                             "external_scaler_enabled cannot be combined with autoscaling "
                             "(deployment '%s')",
                             p->name);
}

/* As Ray Serve warns: a batched method whose batches need more requests at once than the
 * replica admits can never fill one (it runs partial batches after every wait). */
static void warn_unfillable_batches(const ms_config_t *cfg, const planned_t *p, json_t *batched)
{
    size_t i;
    json_t *m;
    json_array_foreach(batched, i, m)
    {
        json_int_t size = json_integer_value(json_object_get(m, "max_batch_size"));
        json_int_t conc = json_integer_value(json_object_get(m, "max_concurrent_batches"));
        if ((json_int_t)p->max_ongoing_requests < size * conc)
            ms_warn("%s:%d:%d: warning: deployment '%s': max_ongoing_requests (%d) is less than "
                    "max_batch_size * max_concurrent_batches (%lld) of batched method '%s': its "
                    "batches can never fill",
                    cfg->path, p->app->import_path_mark.line, p->app->import_path_mark.col, p->name,
                    p->max_ongoing_requests, (long long)(size * conc),
                    json_string_value(json_object_get(m, "name")));
    }
}

/* The same for process.batch: a batch takes at most the replica's free slots. */
static void warn_unfillable_process_batch(const ms_config_t *cfg, const planned_t *p)
{
    if (!p->process || p->max_ongoing_requests >= p->process->batch_max_size)
        return;
    ms_warn("%s:%d:%d: warning: deployment '%s': max_ongoing_requests (%d) is less than "
            "process.batch.max_batch_size (%d): its batches can never fill",
            cfg->path, p->process->mark.line, p->process->mark.col, p->name,
            p->max_ongoing_requests, p->process->batch_max_size);
}

static void check_overrides_exist(const ms_config_t *cfg, const ms_app_config_t *app, json_t *deps,
                                  ms_config_errors_t *errs)
{
    for (size_t i = 0; i < app->n_deployments; i++) {
        const ms_deployment_config_t *dc = &app->deployments[i];
        int found = 0;
        size_t k;
        json_t *d;
        json_array_foreach(deps, k, d)
        {
            const char *name = json_string_value(json_object_get(d, "name"));
            found |= name && strcmp(name, dc->name) == 0;
        }
        if (found)
            continue;
        ms_buf_t names = {0};
        json_array_foreach(deps, k, d)
        {
            ms_buf_appendf(&names, "%s%s", k ? ", " : "",
                           json_string_value(json_object_get(d, "name")));
        }
        ms_config_errors_add(errs, cfg->path, dc->mark,
                             "deployment '%s' is not part of application '%s' (it has: %s)",
                             dc->name, app->name, names.data ? names.data : "");
        ms_buf_free(&names);
    }
}

/* The process block: the file's whole, else the code's (validated like the file's). */
static void merge_process(const ms_config_t *cfg, planned_t *out,
                          const ms_deployment_config_t *file, json_t *code,
                          ms_config_errors_t *errs)
{
    if (file && (file->set & MS_SET_PROCESS)) {
        out->process = ms_config_process_copy(file->process);
        out->process_json = json_incref(file->process_json);
        return;
    }
    json_t *proc = json_object_get(code, "process");
    if (!proc)
        return;
    char what[300];
    snprintf(what, sizeof what, "deployment '%s' (process in code)", out->name);
    out->process = ms_config_process_from_json(proc, cfg->path, cfg->dir,
                                               out->app->import_path_mark, what, errs);
    out->process_json = out->process ? json_incref(proc) : NULL;
}

/* The bind graph of an application: from its code, or for a config-only application (no
 * import_path) its one process deployment as the ingress. */
static json_t *app_graph(const ms_app_config_t *app, char **err)
{
    if (!app->import_file)
        return json_pack("{s:s, s:[{s:s, s:{}}]}", "ingress", app->deployments[0].name,
                         "deployments", "name", app->deployments[0].name, "options");
    json_t *graph = NULL;
    return ms_runtime_inspect(app->import_file, app->import_attr, app->args, &graph, err) == 0
               ? graph
               : NULL;
}

static int plan_app(const ms_config_t *cfg, const ms_app_config_t *app, plan_t *plan,
                    ms_config_errors_t *errs)
{
    char *err = NULL;
    json_t *graph = app_graph(app, &err);
    if (!graph) {
        ms_config_errors_add(errs, cfg->path, app->import_path_mark,
                             "application '%s' failed to load: %s", app->name,
                             err ? err : "unknown error");
        free(err);
        return -1;
    }
    size_t errors_before = errs->n;
    const char *ingress = json_string_value(json_object_get(graph, "ingress"));
    json_t *deps = json_object_get(graph, "deployments");
    check_overrides_exist(cfg, app, deps, errs);
    size_t k;
    json_t *d;
    json_array_foreach(deps, k, d)
    {
        const char *name = json_string_value(json_object_get(d, "name"));
        /* A name from code only (no entry in the file) gets the file's rule here: it becomes a
         * path component and a URL segment just the same. */
        const char *why = name ? ms_cfg_name_problem(name) : NULL;
        if (why) {
            ms_config_errors_add(
                errs, cfg->path, app->import_path_mark,
                "application '%s': deployment name '%.64s' (from its code) %s (%s)", app->name,
                name, why, MS_CFG_NAME_RULE);
            continue;
        }
        json_t *code = json_object_get(d, "options");
        plan->items = ms_realloc(plan->items, (plan->n + 1) * sizeof *plan->items);
        planned_t *p = &plan->items[plan->n++];
        memset(p, 0, sizeof *p);
        p->app = app;
        p->name = ms_strdup(name ? name : "?");
        p->is_ingress = ingress && name && strcmp(ingress, name) == 0;
        const ms_deployment_config_t *file = ms_config_find_deployment(app, p->name);
        merge_basic(p, file, code);
        p->logging = ms_config_logging_merge(ms_config_logging_merge(cfg->logging, app->logging),
                                             file ? file->logging : (ms_logging_config_t){0});
        merge_autoscaling(cfg, p, file, code, errs);
        merge_process(cfg, p, file, code, errs);
        check_merged(cfg, p, errs);
        warn_unfillable_batches(cfg, p, json_object_get(d, "batched"));
        warn_unfillable_process_batch(cfg, p);
    }
    json_decref(graph);
    return errs->n == errors_before ? 0 : -1;
}

/* Where a deployment's count was written: its entry in the file, else its application's
 * import_path (the count came from code). */
static ms_config_mark_t count_mark(const planned_t *p)
{
    const ms_deployment_config_t *file = ms_config_find_deployment(p->app, p->name);
    return file ? file->mark : p->app->import_path_mark;
}

/* max_replicas_total bounds what the config asks for: no deployment's count or autoscaling
 * bound may pass it, nor may the counts every deployment starts with, together. Autoscaling
 * decisions above what is left are cut when they are made (control.c). */
static int check_replica_limit(const ms_config_t *cfg, const plan_t *plan, ms_config_errors_t *errs)
{
    size_t before = errs->n;
    int limit = cfg->max_replicas_total;
    long long total = 0;
    for (size_t i = 0; i < plan->n; i++) {
        const planned_t *p = &plan->items[i];
        const ms_autoscaling_config_t *a = p->autoscaling;
        int n = a ? a->max_replicas : p->num_replicas;
        if (n > limit)
            ms_config_errors_add(errs, cfg->path, count_mark(p),
                                 "deployment '%s' of application '%s': %s %d is over the engine's "
                                 "replica limit, max_replicas_total %d",
                                 p->name, p->app->name,
                                 a ? "autoscaling_config.max_replicas" : "num_replicas", n, limit);
        total += ms__control_initial_replicas(p);
    }
    if (errs->n == before && total > limit && plan->n > 0)
        ms_config_errors_add(errs, cfg->path,
                             cfg->max_replicas_total_mark.line ? cfg->max_replicas_total_mark
                                                               : plan->items[0].app->mark,
                             "the deployments start with %lld replicas together (num_replicas, or "
                             "autoscaling initial_replicas / min_replicas), over the engine's "
                             "replica limit, max_replicas_total %d",
                             total, limit);
    return errs->n == before ? 0 : -1;
}

int ms__plan_build(const ms_config_t *cfg, plan_t *plan, ms_config_errors_t *errs)
{
    int rc = 0;
    for (size_t i = 0; i < cfg->n_apps; i++)
        if (plan_app(cfg, &cfg->apps[i], plan, errs) != 0)
            rc = -1;
    if (rc == 0)
        rc = check_replica_limit(cfg, plan, errs);
    return rc;
}

/* Loads a script the way `run` would, only to report what would fail. */
static void check_loads(const ms_config_t *cfg, ms_config_mark_t at, const char *what, char *err,
                        ms_config_errors_t *errs)
{
    if (err)
        ms_config_errors_add(errs, cfg->path, at, "%s: %s", what, err);
    free(err);
}

int ms__plan_check_scripts(const ms_config_t *cfg, const plan_t *plan, ms_config_errors_t *errs)
{
    size_t before = errs->n;
    ms_policy_set_module_dir(cfg->dir);
    for (size_t i = 0; i < plan->n; i++) {
        const planned_t *p = &plan->items[i];
        char *err = NULL;
        char what[300];
        if (p->router && p->router->router_class) {
            char *kw = p->router->kwargs ? json_dumps(p->router->kwargs, JSON_COMPACT) : NULL;
            ms_router_script_t *s = ms_router_script_new_class(
                p->router->router_class->file, p->router->router_class->attr, kw, 0, &err);
            free(kw);
            if (s)
                ms_router_script_free(s);
            snprintf(what, sizeof what, "deployment '%s': request_router_class", p->name);
            check_loads(cfg, p->router->router_class->mark, what, err, errs);
        }
        if (p->autoscaling && p->autoscaling->policy) {
            err = NULL;
            ms_autoscaler_t *a =
                ms_autoscaler_new(p->app->name, p->name, p->autoscaling, 0, 0, &err);
            if (a)
                ms_autoscaler_free(a);
            snprintf(what, sizeof what, "deployment '%s': policy_function", p->name);
            check_loads(cfg, p->autoscaling->policy->mark, what, err, errs);
        }
    }
    for (size_t i = 0; i < cfg->n_apps; i++) {
        const ms_app_config_t *app = &cfg->apps[i];
        char *err = NULL;
        ms_scale_hook_t *h = ms_scale_hook_from_config(app, 0, 0, &err);
        if (h)
            ms_scale_hook_free(h);
        if (err)
            check_loads(cfg, (app->scale_hook ? app->scale_hook : app->scale_tick)->mark,
                        "external_scaler", err, errs);
        if (!app->autoscaling_policy)
            continue;
        err = NULL;
        ms_app_policy_t *p = ms_app_policy_new(app->name, app->autoscaling_policy,
                                               app->autoscaling_policy_kwargs, 0, 0, 0, &err);
        if (p)
            ms_app_policy_free(p);
        check_loads(cfg, app->autoscaling_policy->mark, "autoscaling_policy", err, errs);
    }
    return errs->n == before ? 0 : -1;
}

int ms_controller_check(const ms_config_t *cfg, ms_config_errors_t *errs)
{
    plan_t plan = {0};
    int rc = ms__plan_build(cfg, &plan, errs);
    if (rc == 0)
        rc = ms__plan_check_scripts(cfg, &plan, errs);
    ms__plan_free(&plan);
    return rc;
}
