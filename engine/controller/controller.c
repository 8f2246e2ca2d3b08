/*
 * controller: plan deployments from the config, run them, shut them down. See controller.h.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "controller/controller.h"
#include "proxy/proxy.h"
#include "router/router.h"
#include "runtime/runtime.h"

/* One deployment's settings after merging file, code and defaults. */
typedef struct planned {
    const ms_app_config_t *app;
    char *name;
    int num_replicas;
    int max_ongoing_requests;
    int max_queued_requests;
    char *user_config_json;
    double wait_loop_s;
    double shutdown_timeout_s;
    int is_ingress;
} planned_t;

typedef struct plan {
    planned_t *items;
    size_t n;
} plan_t;

static void plan_free(plan_t *p)
{
    for (size_t i = 0; i < p->n; i++) {
        free(p->items[i].name);
        free(p->items[i].user_config_json);
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

/* File beats code beats default, field by field, as Ray Serve merges a config over code. */
static void merge(planned_t *out, const ms_deployment_config_t *file, json_t *code)
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
    json_t *uc =
        (set & MS_SET_USER_CONFIG) ? file->user_config : json_object_get(code, "user_config");
    out->user_config_json = uc ? json_dumps(uc, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    if (!out->user_config_json)
        out->user_config_json = ms_strdup("null");
}

/* Code options are validated like file values, since a bad one would only surface later. */
static void check_merged(const ms_config_t *cfg, const planned_t *p, ms_config_errors_t *errs)
{
    ms_config_mark_t at = p->app->import_path_mark;
    if (p->num_replicas < 1)
        ms_config_errors_add(errs, cfg->path, at, "deployment '%s': num_replicas must be > 0",
                             p->name);
    if (p->max_ongoing_requests < 1)
        ms_config_errors_add(errs, cfg->path, at,
                             "deployment '%s': max_ongoing_requests must be > 0", p->name);
    if (p->max_queued_requests == 0 || p->max_queued_requests < -1)
        ms_config_errors_add(errs, cfg->path, at,
                             "deployment '%s': max_queued_requests must be -1 or >= 1", p->name);
}

static int plan_app(const ms_config_t *cfg, const ms_app_config_t *app, plan_t *plan,
                    ms_config_errors_t *errs)
{
    json_t *graph = NULL;
    char *err = NULL;
    if (ms_runtime_inspect(app->import_file, app->import_attr, app->args, &graph, &err) != 0) {
        ms_config_errors_add(errs, cfg->path, app->import_path_mark,
                             "application '%s' failed to load: %s", app->name,
                             err ? err : "unknown error");
        free(err);
        return -1;
    }
    int rc = 0;
    const char *ingress = json_string_value(json_object_get(graph, "ingress"));
    json_t *deps = json_object_get(graph, "deployments");
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
        if (!found) {
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
            rc = -1;
        }
    }
    size_t k;
    json_t *d;
    json_array_foreach(deps, k, d)
    {
        const char *name = json_string_value(json_object_get(d, "name"));
        plan->items = ms_realloc(plan->items, (plan->n + 1) * sizeof *plan->items);
        planned_t *p = &plan->items[plan->n++];
        memset(p, 0, sizeof *p);
        p->app = app;
        p->name = ms_strdup(name ? name : "?");
        p->is_ingress = ingress && name && strcmp(ingress, name) == 0;
        merge(p, ms_config_find_deployment(app, p->name), json_object_get(d, "options"));
        size_t before = errs->n;
        check_merged(cfg, p, errs);
        if (errs->n != before)
            rc = -1;
    }
    json_decref(graph);
    return rc;
}

static int build_plan(const ms_config_t *cfg, plan_t *plan, ms_config_errors_t *errs)
{
    int rc = 0;
    for (size_t i = 0; i < cfg->n_apps; i++)
        if (plan_app(cfg, &cfg->apps[i], plan, errs) != 0)
            rc = -1;
    return rc;
}

int ms_controller_check(const ms_config_t *cfg, ms_config_errors_t *errs)
{
    plan_t plan = {0};
    int rc = build_plan(cfg, &plan, errs);
    plan_free(&plan);
    return rc;
}

/* ---- running ------------------------------------------------------------------------------- */

typedef struct controller {
    uv_loop_t *loop;
    const ms_config_t *cfg;
    ms_proxy_t *proxy;
    ms_http_server_t *ingress;
    ms_http_server_t *handles;
    ms_deployment_t **deps;
    size_t n_deps;
    size_t deps_stopping;
    uv_signal_t sigterm, sigint;
    uv_timer_t drain_timer;
    uint64_t drain_deadline_ms;
    double drain_bound_s; /* longest graceful_shutdown_timeout_s of any deployment */
    char run_dir[64];
    char handle_socket[128];
    int shutting_down;
    int exit_code;
} controller_t;

static double max_shutdown_timeout(const plan_t *plan)
{
    double t = 0;
    for (size_t i = 0; i < plan->n; i++)
        if (plan->items[i].shutdown_timeout_s > t)
            t = plan->items[i].shutdown_timeout_s;
    return t;
}

static void close_handle(uv_handle_t *h)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void on_deployment_stopped(void *data)
{
    controller_t *c = data;
    if (--c->deps_stopping > 0)
        return;
    for (size_t i = 0; i < c->n_deps; i++)
        ms_deployment_free(c->deps[i]);
    c->n_deps = 0;
    if (c->handles)
        ms_http_server_close(c->handles);
    close_handle((uv_handle_t *)&c->drain_timer);
    close_handle((uv_handle_t *)&c->sigterm);
    close_handle((uv_handle_t *)&c->sigint);
    ms_info("all replicas stopped; bye");
}

static void stop_deployments(controller_t *c)
{
    uv_timer_stop(&c->drain_timer);
    if (c->ingress)
        ms_http_server_close(c->ingress);
    c->ingress = NULL;
    c->deps_stopping = c->n_deps;
    if (c->n_deps == 0) {
        c->deps_stopping = 1;
        on_deployment_stopped(c);
        return;
    }
    for (size_t i = 0; i < c->n_deps; i++)
        ms_deployment_shutdown(c->deps[i], on_deployment_stopped, c);
}

/* Polls until in-flight requests are answered or the graceful deadline passes. */
static void on_drain_tick(uv_timer_t *t)
{
    controller_t *c = t->data;
    size_t inflight = ms_http_server_inflight(c->ingress);
    if (inflight == 0 || ms_now_ms() >= c->drain_deadline_ms) {
        if (inflight)
            ms_warn("shutdown: %zu requests still in flight at the deadline", inflight);
        stop_deployments(c);
    }
}

static void on_signal(uv_signal_t *s, int signum)
{
    controller_t *c = s->data;
    if (c->shutting_down) {
        /* A second Ctrl-C means "now"; a repeated SIGTERM (as `timeout` sends to the whole
         * group) changes nothing. */
        if (signum == SIGINT) {
            ms_info("second SIGINT: shutting down now");
            c->drain_deadline_ms = 0;
        }
        return;
    }
    c->shutting_down = 1;
    c->drain_deadline_ms = ms_now_ms() + (uint64_t)(c->drain_bound_s * 1000.0);
    ms_info("received %s: draining", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    ms_proxy_set_draining(c->proxy, 1);
    ms_http_server_stop_accepting(c->ingress);
    uv_timer_start(&c->drain_timer, on_drain_tick, 0, 20);
}

static ms_http_limits_t limits_from(const ms_http_options_t *h)
{
    ms_http_limits_t l = {h->max_header_bytes, h->max_body_bytes, h->header_timeout_s,
                          h->keep_alive_timeout_s};
    return l;
}

static int start_deployments(controller_t *c, const plan_t *plan, const char *exe_path)
{
    c->deps = ms_calloc(plan->n ? plan->n : 1, sizeof *c->deps);
    for (size_t i = 0; i < plan->n; i++) {
        const planned_t *p = &plan->items[i];
        char *args_json = json_dumps(p->app->args, JSON_COMPACT);
        ms_buf_t import = {0};
        ms_buf_appendf(&import, "%s:%s", p->app->import_file, p->app->import_attr);
        ms_deployment_settings_t s = {
            .app_name = p->app->name,
            .name = p->name,
            .num_replicas = p->num_replicas,
            .max_ongoing_requests = p->max_ongoing_requests,
            .max_queued_requests = p->max_queued_requests,
            .request_timeout_s = c->cfg->http.request_timeout_s,
            .graceful_shutdown_timeout_s = p->shutdown_timeout_s,
            .spec = {.exe_path = exe_path,
                     .run_dir = c->run_dir,
                     .controller_socket = c->handle_socket,
                     .import_path = import.data,
                     .args_json = args_json ? args_json : "{}",
                     .user_config_json = p->user_config_json,
                     .graceful_shutdown_wait_loop_s = p->wait_loop_s},
        };
        char *err = NULL;
        ms_deployment_t *d = ms_deployment_new(c->loop, &s, &err);
        free(args_json);
        ms_buf_free(&import);
        if (!d) {
            ms_error("deployment %s: %s", p->name, err ? err : "failed to start");
            free(err);
            return -1;
        }
        c->deps[c->n_deps++] = d;
        ms_proxy_add_deployment(c->proxy, p->app->name, p->name,
                                p->is_ingress ? p->app->route_prefix : NULL, d);
    }
    return 0;
}

static int open_listeners(controller_t *c)
{
    const ms_http_options_t *h = &c->cfg->http;
    ms_http_server_config_t ingress = ms_proxy_ingress_config(c->proxy);
    ingress.limits = limits_from(h);
    int r = ms_http_server_listen_tcp(c->loop, h->host, h->port, &ingress, &c->ingress);
    if (r != 0) {
        ms_error("cannot listen on %s:%d: %s", h->host, h->port, uv_strerror(r));
        return -1;
    }
    ms_http_server_config_t handles = ms_proxy_handle_config(c->proxy);
    handles.limits = limits_from(h);
    /* Replicas are trusted peers that pool their connections: no slowloris guard, and no idle
     * timeout that could close a connection just as a replica reuses it. */
    handles.limits.header_timeout_s = 0;
    handles.limits.keep_alive_timeout_s = 0;
    r = ms_http_server_listen_unix(c->loop, c->handle_socket, &handles, &c->handles);
    if (r != 0) {
        ms_error("cannot listen on %s: %s", c->handle_socket, uv_strerror(r));
        return -1;
    }
    ms_info("serving on http://%s:%d", h->host, ms_http_server_port(c->ingress));
    return 0;
}

int ms_controller_run(const ms_config_t *cfg, const char *exe_path)
{
    ms_config_errors_t errs = {0};
    plan_t plan = {0};
    if (build_plan(cfg, &plan, &errs) != 0) {
        for (size_t i = 0; i < errs.n; i++)
            fprintf(stderr, "%s\n", errs.items[i]);
        ms_config_errors_free(&errs);
        plan_free(&plan);
        return 1;
    }
    controller_t c = {0};
    c.loop = uv_default_loop();
    c.cfg = cfg;
    c.proxy = ms_proxy_new();
    snprintf(c.run_dir, sizeof c.run_dir, "/tmp/moonserve.XXXXXX");
    if (!mkdtemp(c.run_dir)) {
        ms_error("cannot create a run folder under /tmp");
        plan_free(&plan);
        ms_proxy_free(c.proxy);
        return 1;
    }
    snprintf(c.handle_socket, sizeof c.handle_socket, "%s/controller.sock", c.run_dir);

    uv_timer_init(c.loop, &c.drain_timer);
    c.drain_timer.data = &c;
    uv_signal_init(c.loop, &c.sigterm);
    uv_signal_init(c.loop, &c.sigint);
    c.sigterm.data = c.sigint.data = &c;
    /* Signals are handled before anything starts, so a SIGTERM during start-up drains too. */
    uv_signal_start(&c.sigterm, on_signal, SIGTERM);
    uv_signal_start(&c.sigint, on_signal, SIGINT);
    /* The drain deadline is fixed when the signal arrives; remember the bound now. */
    c.drain_bound_s = max_shutdown_timeout(&plan);
    int rc = 0;
    if (open_listeners(&c) != 0 || start_deployments(&c, &plan, exe_path) != 0) {
        rc = 1;
        if (c.ingress)
            ms_http_server_stop_accepting(c.ingress);
        c.shutting_down = 1;
        stop_deployments(&c);
    }
    plan_free(&plan);
    uv_run(c.loop, UV_RUN_DEFAULT);
    ms_proxy_free(c.proxy);
    free(c.deps);
    rmdir(c.run_dir);
    uv_loop_close(c.loop);
    return rc;
}
