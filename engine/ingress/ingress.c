/*
 * ingress: routes ingress requests to applications and handle calls to deployments. See ingress.h.
 */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "ingress/ingress.h"
#include "metrics/metrics.h"

/* One route's request metrics. They outlive a redeploy that keeps the route (a new target with
 * the same application, deployment and prefix takes them over), and a request in flight keeps
 * its route's entry alive after a redeploy that drops it. */
typedef struct route_stats route_stats_t;
struct route_stats {
    char *labels; /* application="..",deployment="..",route=".." */
    char *app, *deployment, *route;
    int access_log; /* logging_config.enable_access_log of the route's deployment */
    ms_request_stats_t s;
    size_t inflight;
    int retired; /* no target uses it: not exported, freed once nothing is in flight */
    route_stats_t *next;
};

typedef struct target {
    char *app_name;
    char *deployment_name;
    char *route_prefix; /* NULL unless this deployment is an exposed ingress */
    size_t prefix_len;
    ms_deployment_t *dep;
    route_stats_t *stats; /* NULL unless route_prefix is set */
} target_t;

struct ms_ingress {
    target_t *targets;
    size_t n_targets;
    route_stats_t *stats;        /* every route's, retired ones included */
    ms_request_stats_t unrouted; /* 404s, /-/ paths and requests refused while parsing */
    int access_log;              /* for those: the top-level enable_access_log */
    int draining;
    ms_buf_t routes_json; /* /-/routes body, rebuilt when targets change */
    ms_ingress_task_lookup_t task_lookup;
    void *task_data;
};

void ms_ingress_set_task_lookup(ms_ingress_t *p, ms_ingress_task_lookup_t fn, void *data)
{
    p->task_lookup = fn;
    p->task_data = data;
}

#define TASKS_PREFIX     "/-/tasks/"
#define TASKS_PREFIX_LEN 9

/* /-/tasks/QUEUE[/...]: answered by the queue; 1 when the path was one of those. */
static int tasks_request(ms_ingress_t *p, ms_http_request_t *req)
{
    if (req->path_len < TASKS_PREFIX_LEN || memcmp(req->path, TASKS_PREFIX, TASKS_PREFIX_LEN) != 0)
        return 0;
    const char *name = req->path + TASKS_PREFIX_LEN;
    size_t left = req->path_len - TASKS_PREFIX_LEN;
    const char *slash = memchr(name, '/', left);
    size_t len = slash ? (size_t)(slash - name) : left;
    ms_task_queue_t *q = p->task_lookup ? p->task_lookup(p->task_data, name, len) : NULL;
    if (!q) {
        char msg[300];
        snprintf(msg, sizeof msg, "no task queue '%.*s' (docs/tasks.md)",
                 (int)(len < 200 ? len : 200), name);
        ms_http_respond_error(req, 404, msg);
        return 1;
    }
    const char *rest = slash ? slash + 1 : name + len;
    ms_task_queue_http(q, req, rest, (size_t)(req->path + req->path_len - rest));
    return 1;
}

static void rebuild_routes_json(ms_ingress_t *p);

ms_ingress_t *ms_ingress_new(void)
{
    return ms_calloc(1, sizeof(ms_ingress_t));
}

static void free_retired_stats(ms_ingress_t *p)
{
    for (route_stats_t **at = &p->stats; *at;) {
        route_stats_t *rs = *at;
        if (!rs->retired || rs->inflight) {
            at = &rs->next;
            continue;
        }
        *at = rs->next;
        free(rs->labels);
        free(rs->app);
        free(rs->deployment);
        free(rs->route);
        free(rs);
    }
}

/* The route's entry: a retired one with the same labels is taken over, else a new one. */
static route_stats_t *stats_for(ms_ingress_t *p, const char *app, const char *dep,
                                const char *route)
{
    ms_buf_t labels = {0};
    ms_buf_append_str(&labels, "application=\"");
    ms_buf_append_label(&labels, app);
    ms_buf_append_str(&labels, "\",deployment=\"");
    ms_buf_append_label(&labels, dep);
    ms_buf_append_str(&labels, "\",route=\"");
    ms_buf_append_label(&labels, route);
    ms_buf_append_str(&labels, "\"");
    for (route_stats_t *rs = p->stats; rs; rs = rs->next)
        if (rs->retired && strcmp(rs->labels, labels.data) == 0) {
            rs->retired = 0;
            ms_buf_free(&labels);
            return rs;
        }
    route_stats_t *rs = ms_calloc(1, sizeof *rs);
    rs->labels = labels.data;
    rs->app = ms_strdup(app);
    rs->deployment = ms_strdup(dep);
    rs->route = ms_strdup(route);
    rs->next = p->stats;
    p->stats = rs;
    return rs;
}

void ms_ingress_clear(ms_ingress_t *p)
{
    /* Routes the last redeploy dropped go now; the others wait for the new set to take them. */
    free_retired_stats(p);
    for (route_stats_t *rs = p->stats; rs; rs = rs->next)
        rs->retired = 1;
    for (size_t i = 0; i < p->n_targets; i++) {
        free(p->targets[i].app_name);
        free(p->targets[i].deployment_name);
        free(p->targets[i].route_prefix);
    }
    free(p->targets);
    p->targets = NULL;
    p->n_targets = 0;
    rebuild_routes_json(p);
}

void ms_ingress_free(ms_ingress_t *p)
{
    ms_ingress_clear(p);
    for (route_stats_t *rs = p->stats; rs; rs = rs->next)
        rs->inflight = 0; /* the servers are closed before the ingress is freed */
    free_retired_stats(p);
    ms_buf_free(&p->routes_json);
    free(p);
}

static void rebuild_routes_json(ms_ingress_t *p)
{
    /* Prefixes and names are any text the config allows (quotes, backslashes, newlines):
     * jansson escapes them. It keeps insertion order, so the body lists routes as configured. */
    json_t *routes = json_object();
    for (size_t i = 0; i < p->n_targets; i++) {
        const target_t *t = &p->targets[i];
        if (t->route_prefix)
            json_object_set_new(routes, t->route_prefix, json_string(t->app_name));
    }
    char *text = json_dumps(routes, 0);
    json_decref(routes);
    ms_buf_reset(&p->routes_json);
    ms_buf_append_str(&p->routes_json, text ? text : "{}");
    free(text);
}

void ms_ingress_add_deployment(ms_ingress_t *p, const char *app_name, const char *deployment_name,
                               const char *route_prefix, ms_deployment_t *d, int access_log)
{
    p->targets = ms_realloc(p->targets, (p->n_targets + 1) * sizeof *p->targets);
    target_t *t = &p->targets[p->n_targets++];
    t->app_name = ms_strdup(app_name);
    t->deployment_name = ms_strdup(deployment_name);
    t->route_prefix = route_prefix ? ms_strdup(route_prefix) : NULL;
    t->prefix_len = route_prefix ? strlen(route_prefix) : 0;
    t->dep = d;
    t->stats = route_prefix ? stats_for(p, app_name, deployment_name, route_prefix) : NULL;
    if (t->stats)
        t->stats->access_log = access_log;
    rebuild_routes_json(p);
}

void ms_ingress_set_access_log(ms_ingress_t *p, int on)
{
    p->access_log = on;
}

void ms_ingress_set_draining(ms_ingress_t *p, int draining)
{
    p->draining = draining;
}

/* A prefix matches the path itself or the path up to a '/' boundary; "/" matches everything. */
static int prefix_matches(const target_t *t, const char *path, size_t path_len)
{
    if (t->prefix_len == 1)
        return 1;
    if (path_len < t->prefix_len || memcmp(path, t->route_prefix, t->prefix_len) != 0)
        return 0;
    return path_len == t->prefix_len || path[t->prefix_len] == '/';
}

static const target_t *match_route(const ms_ingress_t *p, const char *path, size_t path_len)
{
    const target_t *best = NULL;
    for (size_t i = 0; i < p->n_targets; i++) {
        const target_t *t = &p->targets[i];
        if (t->route_prefix && prefix_matches(t, path, path_len) &&
            (!best || t->prefix_len > best->prefix_len))
            best = t;
    }
    return best;
}

static int path_is(const ms_http_request_t *req, const char *s)
{
    return req->path_len == strlen(s) && memcmp(req->path, s, req->path_len) == 0;
}

static void on_ingress_request(ms_http_request_t *req, void *data)
{
    ms_ingress_t *p = data;
    static const ms_http_header_t text = {"Content-Type", 12, "text/plain", 10};
    static const ms_http_header_t json = {"Content-Type", 12, "application/json", 16};
    if (path_is(req, "/-/healthz")) {
        if (p->draining)
            ms_http_respond(req, 503, &text, 1, "This node is being drained.", 27);
        else
            ms_http_respond(req, 200, &text, 1, "success", 7);
        return;
    }
    if (path_is(req, "/-/routes")) {
        ms_http_respond(req, 200, &json, 1, p->routes_json.data, p->routes_json.len);
        return;
    }
    if (tasks_request(p, req))
        return;
    const target_t *t = match_route(p, req->path, req->path_len);
    if (!t) {
        char msg[600];
        snprintf(msg, sizeof msg, "Path '%.500s' not found. Ping http://.../-/routes for routes.",
                 req->path);
        ms_http_respond_error(req, 404, msg);
        return;
    }
    req->route = t->stats;
    /* The route's stats entry lives while the request is in flight, so its copy of the prefix
     * outlives a redeploy that changes the route; the replica learns it from a header. */
    req->route_prefix = t->stats->route;
    t->stats->inflight++;
    /* The header marks a call through a handle, which may name any method of the class and
     * whose body the replica decodes as Lua values: only replicas, on the handle socket, send
     * it. */
    if (ms_http_request_header(req, "x-moonserve-method", NULL)) {
        ms_http_respond_error(req, 400, "X-Moonserve-Method is reserved for handle calls");
        return;
    }
    if (ms_http_request_header(req, "x-moonserve-task", NULL)) {
        ms_http_respond_error(req, 400, "X-Moonserve-Task is reserved for the task consumer");
        return;
    }
    ms_deployment_submit(t->dep, req);
}

static void on_ingress_complete(const ms_http_request_t *req, int status, int disconnected,
                                uint64_t elapsed_ns, void *data)
{
    ms_ingress_t *p = data;
    route_stats_t *rs = req->route;
    double ms = (double)elapsed_ns / 1e6;
    ms_request_stats_record(rs ? &rs->s : &p->unrouted, req->method, status, disconnected, ms);
    if (rs ? rs->access_log : p->access_log) {
        ms_access_record_t a = {.request_id = req->request_id,
                                .application = rs ? rs->app : "",
                                .deployment = rs ? rs->deployment : "",
                                .replica = req->served_by,
                                .method = req->method,
                                .route = rs ? rs->route : "",
                                .status = status,
                                .disconnected = disconnected,
                                .latency_ms = ms};
        ms_log_access(&a);
    }
    if (rs && --rs->inflight == 0 && rs->retired)
        free_retired_stats(p);
}

void ms_ingress_metrics_text(const ms_ingress_t *p, ms_buf_t *b)
{
    for (int f = 0; f < MS_REQUEST_FAMILIES; f++) {
        ms_request_stats_type(b, (ms_request_family_t)f);
        for (const route_stats_t *rs = p->stats; rs; rs = rs->next)
            if (!rs->retired)
                ms_request_stats_text(b, (ms_request_family_t)f, rs->labels, &rs->s);
        ms_request_stats_text(b, (ms_request_family_t)f,
                              "application=\"\",deployment=\"\",route=\"\"", &p->unrouted);
    }
}

/* A body streams when the deployment that will get the request says so (process replicas take
 * large and chunked bodies as they arrive). */
static int ingress_stream_body(const ms_http_request_t *req, void *data)
{
    const target_t *t = match_route(data, req->path, req->path_len);
    return t && ms_deployment_streams_body(t->dep, req->body_length);
}

static void on_handle_request(ms_http_request_t *req, void *data)
{
    ms_ingress_t *p = data;
    if (tasks_request(p, req)) /* deployment code's serve.tasks.* */
        return;
    size_t len = 0;
    const char *v = ms_http_request_header(req, "x-moonserve-target", &len);
    const char *slash = v ? memchr(v, '/', len) : NULL;
    if (!slash) {
        ms_http_respond_error(req, 400, "handle call without X-Moonserve-Target: APP/DEPLOYMENT");
        return;
    }
    size_t app_len = (size_t)(slash - v), dep_len = len - app_len - 1;
    for (size_t i = 0; i < p->n_targets; i++) {
        const target_t *t = &p->targets[i];
        if (strlen(t->app_name) == app_len && memcmp(t->app_name, v, app_len) == 0 &&
            strlen(t->deployment_name) == dep_len &&
            memcmp(t->deployment_name, slash + 1, dep_len) == 0) {
            ms_deployment_submit(t->dep, req);
            return;
        }
    }
    ms_http_respond_error(req, 404, "no such deployment for this handle");
}

static void on_abort(ms_http_request_t *req, void *data)
{
    (void)data;
    ms_task_queue_abort(req);
    ms_deployment_abort(req);
}

ms_http_server_config_t ms_ingress_ingress_config(ms_ingress_t *p)
{
    ms_http_server_config_t cfg = {.on_request = on_ingress_request,
                                   .on_abort = on_abort,
                                   .data = p,
                                   .stream_body = ingress_stream_body,
                                   .on_complete = on_ingress_complete};
    return cfg;
}

ms_http_server_config_t ms_ingress_handle_config(ms_ingress_t *p)
{
    ms_http_server_config_t cfg = {
        .on_request = on_handle_request, .on_abort = on_abort, .data = p};
    return cfg;
}
