/*
 * config: owns loading a Ray Serve config file (ServeConfigV2 subset) into ms_config_t — the
 * YAML parse, the schema walk with Ray Serve's defaults and validation rules, and the error
 * list. Every problem found is recorded as `file:line:col: message`; loading never stops at
 * the first one, so a user fixes a config in one round. See config.h.
 *
 * Each mapping level (top, http_options, application, deployment) is a table of fields walked
 * by config_fields.c. A field is either implemented here, known to Ray Serve but not
 * implemented yet ("later": type-checked loosely, then a warning), or a legacy field that is
 * an error. Keys not in the table are errors with a did-you-mean. autoscaling_config,
 * request_router_config, autoscaling_policy and external_scaler are validated by
 * config_scaling.c, which also serves autoscaling options given in code as JSON.
 */
#include "config/config_internal.h"
#include "gpu/gpu.h"
#include "core/core.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- logging_config ---------------------------------------------------------------------- */

static void top_logging(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    ms_cfg_walk_logging(c, key, val, &cfg->logging);
}

/* ---- http_options ------------------------------------------------------------------------ */

static void http_host(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_http_options_t *h = obj;
    const char *s = ms_cfg_get_str(c, key, val);
    if (s)
        ms_cfg_replace_str(&h->host, s);
}

static void http_port(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_http_options_t *h = obj;
    long long v;
    if (ms_cfg_get_int(c, key, val, 1, 65535, "an integer in 1..65535", &v))
        h->port = (int)v;
}

static void http_request_timeout(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_http_options_t *h = obj;
    double v;
    if (ms_cfg_is_null(val))
        h->request_timeout_s = 0; /* Ray's None: no timeout */
    else if (ms_cfg_get_num(c, key, val, 0, false, "a number > 0 or null", &v))
        h->request_timeout_s = v;
}

static void http_keep_alive(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_http_options_t *h = obj;
    ms_cfg_get_num(c, key, val, 0, false, "a number > 0", &h->keep_alive_timeout_s);
}

static void http_header_timeout(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_http_options_t *h = obj;
    ms_cfg_get_num(c, key, val, 0, false, "a number > 0", &h->header_timeout_s);
}

static void http_max_header(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_http_options_t *h = obj;
    long long v;
    if (ms_cfg_get_int(c, key, val, 1024, LLONG_MAX, "an integer >= 1024", &v))
        h->max_header_bytes = (size_t)v;
}

static void http_max_body(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_http_options_t *h = obj;
    long long v;
    if (ms_cfg_get_int(c, key, val, 0, LLONG_MAX, "an integer >= 0", &v))
        h->max_body_bytes = (size_t)v;
}

static const ms_cfg_field_t http_fields[] = {
    {"host", http_host, MS_FIELD_OK},
    {"port", http_port, MS_FIELD_OK},
    {"request_timeout_s", http_request_timeout, MS_FIELD_OK},
    {"keep_alive_timeout_s", http_keep_alive, MS_FIELD_OK},
    {"max_header_bytes", http_max_header, MS_FIELD_OK},
    {"max_body_bytes", http_max_body, MS_FIELD_OK},
    {"header_timeout_s", http_header_timeout, MS_FIELD_OK},
    /* Ray Serve's own keys that have no effect here yet: accepted so its configs load. */
    {"root_path", ms_cfg_later_string, MS_FIELD_LATER},
    {"ssl_keyfile", ms_cfg_later_string, MS_FIELD_LATER},
    {"ssl_certfile", ms_cfg_later_string, MS_FIELD_LATER},
    {"ssl_keyfile_password", ms_cfg_later_string, MS_FIELD_LATER},
    {"ssl_ca_certs", ms_cfg_later_string, MS_FIELD_LATER},
};

static void top_http(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    if (ms_cfg_is_null(val) || !ms_cfg_want_mapping(c, key, val, true))
        return;
    ms_cfg_walk_fields(c, val, "in http_options", http_fields, MS_N_FIELDS(http_fields),
                       &cfg->http);
}

/* ---- deployments ------------------------------------------------------------------------- */

typedef struct dep_build {
    ms_deployment_config_t *dep;
    yaml_node_t *name_node;
    yaml_node_t *as_key, *as_val; /* autoscaling_config, parsed once num_replicas is known */
} dep_build_t;

static void dep_name(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    const char *s = ms_cfg_get_str(c, key, val);
    const char *why = s ? ms_cfg_name_problem(s) : NULL;
    if (why) {
        ms_cfg_error(c, val, "deployment name '%.64s' %s (" MS_CFG_NAME_RULE ")", s, why);
        return;
    }
    if (s) {
        ms_cfg_replace_str(&db->dep->name, s);
        db->name_node = val;
    }
}

/* Ray's type is Optional[Union[PositiveInt, str]] and pydantic picks the exact type first: a
 * quoted "3" stays a string, which then fails Ray's "int or 'auto'" check. */
static void dep_num_replicas(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    static const char desc[] = "an integer > 0 or \"auto\"";
    dep_build_t *db = obj;
    long long v;
    const char *s = ms_cfg_value_text(val);
    if (ms_cfg_is_null(val))
        return; /* as if left out: the code's value or the default */
    if (s && !strcmp(s, "auto")) {
        db->dep->num_replicas_auto = 1;
        db->dep->set |= MS_SET_NUM_REPLICAS;
        return;
    }
    if (s && !ms_cfg_is_plain(val) && ms_cfg_parse_lax_int(s, &v)) {
        ms_cfg_quoted_number(c, key, val, desc);
        return;
    }
    if (ms_cfg_get_int(c, key, val, 1, INT_MAX, desc, &v)) {
        db->dep->num_replicas = (int)v;
        db->dep->set |= MS_SET_NUM_REPLICAS;
    }
}

static void dep_max_ongoing(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    long long v;
    if (ms_cfg_get_int(c, key, val, 1, INT_MAX, "an integer > 0", &v)) {
        db->dep->max_ongoing_requests = (int)v;
        db->dep->set |= MS_SET_MAX_ONGOING_REQUESTS;
    }
}

static void dep_max_queued(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    long long v;
    /* A StrictInt in Ray's schema, unlike its other integers. */
    if (ms_cfg_get_strict_int(c, key, val, -1, INT_MAX, "-1 or an integer >= 1", &v)) {
        if (v == 0) {
            ms_cfg_bad_value(c, key, val, "-1 or an integer >= 1");
            return;
        }
        db->dep->max_queued_requests = (int)v;
        db->dep->set |= MS_SET_MAX_QUEUED_REQUESTS;
    }
}

/* ray_actor_options: `memory` caps a Lua replica's memory, `num_gpus` places it on GPUs
 * (docs/gpu.md). The whole mapping is kept, since a change of any key is a code change that
 * rolls the replicas as in Ray Serve; the keys without effect (num_cpus, resources, ...) are
 * named in one warning. */
/* A share of one GPU (a fraction), or a whole number of GPUs; placement rules in engine/gpu. */
static void check_num_gpus(ms_cfg_ctx_t *c, yaml_node_t *k, yaml_node_t *v)
{
    double n;
    if (ms_cfg_is_null(v) || !ms_cfg_get_num(c, k, v, 0, true, "a number of GPUs >= 0", &n))
        return;
    ms_gpu_request_t rq = {.num_gpus = n};
    char err[MS_GPU_REASON_MAX];
    if (ms_gpu_request_check(&rq, err, sizeof err) != 0)
        ms_cfg_error(c, v, "ray_actor_options: %s", err);
}

static void dep_actor_options(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    if (!ms_cfg_want_mapping(c, key, val, true) || ms_cfg_is_null(val))
        return;
    ms_buf_t idle = {0};
    int n_idle = 0;
    for (yaml_node_pair_t *p = val->data.mapping.pairs.start; p < val->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = ms_cfg_node(c, p->key), *v = ms_cfg_node(c, p->value);
        const char *name = ms_cfg_key_name(k);
        double bytes;
        if (name && strcmp(name, "memory") == 0) {
            if (!ms_cfg_is_null(v))
                ms_cfg_get_num(c, k, v, 0, true, "a number of bytes >= 0 or null", &bytes);
            continue;
        }
        if (name && strcmp(name, "num_gpus") == 0) {
            check_num_gpus(c, k, v);
            continue;
        }
        ms_buf_appendf(&idle, "%s'%s'", n_idle++ ? ", " : "", name ? name : "?");
    }
    if (n_idle) {
        ms_config_mark_t m = ms_cfg_mark(key);
        ms_warn("%s:%d:%d: warning: ray_actor_options: %s %s no effect yet (only 'memory' and "
                "'num_gpus' do: the replica's Lua memory cap and its GPU share)",
                c->file, m.line, m.col, idle.data, n_idle == 1 ? "has" : "have");
    }
    ms_buf_free(&idle);
    json_decref(db->dep->ray_actor_options);
    db->dep->ray_actor_options = ms_cfg_to_json(c, val);
}

static void dep_user_config(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    /* null is kept as JSON null with the bit set: the file explicitly clears the code's value. */
    if (!ms_cfg_want_mapping(c, key, val, true))
        return;
    json_t *j = ms_cfg_to_json(c, val);
    if (j) {
        db->dep->user_config = j;
        db->dep->set |= MS_SET_USER_CONFIG;
    }
}

/* The four duration fields share one shape: a number with a bound, a default and a set bit. */
static void dep_seconds(ms_cfg_ctx_t *c, dep_build_t *db, yaml_node_t *key, yaml_node_t *val,
                        bool zero_ok, double *dst, unsigned bit)
{
    if (ms_cfg_get_num(c, key, val, 0, zero_ok, zero_ok ? "a number >= 0" : "a number > 0", dst))
        db->dep->set |= bit;
}

static void dep_wait_loop(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    dep_seconds(c, db, key, val, true, &db->dep->graceful_shutdown_wait_loop_s,
                MS_SET_GRACEFUL_SHUTDOWN_WAIT_LOOP_S);
}

static void dep_shutdown_timeout(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    dep_seconds(c, db, key, val, true, &db->dep->graceful_shutdown_timeout_s,
                MS_SET_GRACEFUL_SHUTDOWN_TIMEOUT_S);
}

static void dep_health_period(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    dep_seconds(c, db, key, val, false, &db->dep->health_check_period_s,
                MS_SET_HEALTH_CHECK_PERIOD_S);
}

static void dep_health_timeout(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    dep_seconds(c, db, key, val, false, &db->dep->health_check_timeout_s,
                MS_SET_HEALTH_CHECK_TIMEOUT_S);
}

static void dep_autoscaling(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    if (!ms_cfg_want_mapping(c, key, val, true))
        return;
    /* null counts as set: the file turns off autoscaling that the code configured. */
    db->as_key = key;
    db->as_val = val;
    db->dep->set |= MS_SET_AUTOSCALING_CONFIG;
}

static void dep_router(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    if (!ms_cfg_want_mapping(c, key, val, true))
        return;
    if (!ms_cfg_is_null(val)) {
        db->dep->router = ms_cfg_router_yaml(c, val);
        if (!db->dep->router)
            return;
    }
    db->dep->set |= MS_SET_REQUEST_ROUTER_CONFIG; /* null: back to the built-in router */
}

static void dep_logging(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_cfg_walk_logging(c, key, val, &((dep_build_t *)obj)->dep->logging);
}

static void dep_process(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    if (!ms_cfg_want_mapping(c, key, val, false))
        return;
    ms_config_process_free(db->dep->process);
    db->dep->process = ms_cfg_process_yaml(c, val);
    json_decref(db->dep->process_json);
    db->dep->process_json = db->dep->process ? ms_cfg_to_json(c, val) : NULL;
    if (db->dep->process)
        db->dep->set |= MS_SET_PROCESS;
}

static void dep_max_concurrent(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    (void)obj;
    (void)val;
    ms_cfg_renamed(c, key, "in deployment", "max_ongoing_requests");
}

/* Ray Serve moved route_prefix from deployments to the application. */
static void dep_route_prefix(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    (void)obj;
    (void)val;
    ms_cfg_error(c, key,
                 "'route_prefix' is no longer a deployment option in Ray Serve; set route_prefix "
                 "on the application");
}

static void dep_task_queue(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    dep_build_t *db = obj;
    if (!ms_cfg_want_mapping(c, key, val, true) || ms_cfg_is_null(val))
        return;
    db->dep->task_queue = ms_cfg_task_queue_yaml(c, val);
}

static const ms_cfg_field_t dep_fields[] = {
    {"name", dep_name, MS_FIELD_OK},
    {"num_replicas", dep_num_replicas, MS_FIELD_OK},
    {"max_ongoing_requests", dep_max_ongoing, MS_FIELD_OK},
    {"max_queued_requests", dep_max_queued, MS_FIELD_OK},
    {"user_config", dep_user_config, MS_FIELD_OK},
    {"graceful_shutdown_wait_loop_s", dep_wait_loop, MS_FIELD_OK},
    {"graceful_shutdown_timeout_s", dep_shutdown_timeout, MS_FIELD_OK},
    {"health_check_period_s", dep_health_period, MS_FIELD_OK},
    {"health_check_timeout_s", dep_health_timeout, MS_FIELD_OK},
    {"autoscaling_config", dep_autoscaling, MS_FIELD_OK},
    {"request_router_config", dep_router, MS_FIELD_OK},
    {"ray_actor_options", dep_actor_options, MS_FIELD_OK}, /* warns of its own idle keys */
    {"process", dep_process, MS_FIELD_OK},                 /* ours */
    {"task_queue", dep_task_queue, MS_FIELD_OK},           /* ours */
    {"logging_config", dep_logging, MS_FIELD_OK},
    {"placement_group_bundles", ms_cfg_later_mappings, MS_FIELD_LATER},
    {"placement_group_strategy", ms_cfg_later_pg_strategy, MS_FIELD_LATER},
    {"max_replicas_per_node", ms_cfg_later_per_node, MS_FIELD_LATER},
    /* Newer Ray Serve options. */
    {"gang_scheduling_config", ms_cfg_later_mapping, MS_FIELD_LATER},
    {"deployment_actors", ms_cfg_later_mappings, MS_FIELD_LATER},
    {"backpressure_config", ms_cfg_later_mapping, MS_FIELD_LATER},
    {"rolling_update_percentage", ms_cfg_later_percentage, MS_FIELD_LATER},
    /* Older Ray Serve names. */
    {"max_concurrent_queries", dep_max_concurrent, MS_FIELD_LEGACY},
    {"route_prefix", dep_route_prefix, MS_FIELD_LEGACY},
};

static void dep_defaults(ms_deployment_config_t *d)
{
    d->num_replicas = MS_DEFAULT_NUM_REPLICAS;
    d->max_ongoing_requests = MS_DEFAULT_MAX_ONGOING_REQUESTS;
    d->max_queued_requests = MS_DEFAULT_MAX_QUEUED_REQUESTS;
    d->graceful_shutdown_wait_loop_s = MS_DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S;
    d->graceful_shutdown_timeout_s = MS_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S;
    d->health_check_period_s = MS_DEFAULT_HEALTH_CHECK_PERIOD_S;
    d->health_check_timeout_s = MS_DEFAULT_HEALTH_CHECK_TIMEOUT_S;
}

/* autoscaling_config after the walk, when num_replicas (which may come later) is known. */
static void walk_deployment_scaling(ms_cfg_ctx_t *c, dep_build_t *db)
{
    ms_deployment_config_t *d = db->dep;
    bool fixed = (d->set & MS_SET_NUM_REPLICAS) && !d->num_replicas_auto;
    if (db->as_val && !ms_cfg_is_null(db->as_val)) {
        if (fixed) {
            ms_cfg_error(c, db->as_key,
                         "num_replicas and autoscaling_config cannot both be set; use "
                         "num_replicas: auto or leave it out");
            return;
        }
        d->autoscaling = ms_cfg_autoscaling_yaml(c, db->as_val, d->num_replicas_auto);
        return;
    }
    /* "auto" alone: Ray Serve's AutoscalingConfig.default(). MS_SET_AUTOSCALING_CONFIG stays
     * clear, so a merge can still lay the code's autoscaling_config over these defaults. */
    if (d->num_replicas_auto)
        d->autoscaling = ms_config_autoscaling_default(1);
}

static void walk_deployment(ms_cfg_ctx_t *c, yaml_node_t *node, dep_build_t *db)
{
    dep_defaults(db->dep);
    db->dep->mark = ms_cfg_mark(node);
    if (node->type != YAML_MAPPING_NODE) {
        char got[64];
        ms_cfg_describe(node, got, sizeof(got));
        ms_cfg_error(c, node, "each deployment must be a mapping, got %s", got);
        return;
    }
    uint64_t seen =
        ms_cfg_walk_fields(c, node, "in deployment", dep_fields, MS_N_FIELDS(dep_fields), db);
    if (!ms_cfg_was_seen(seen, dep_fields, MS_N_FIELDS(dep_fields), "name"))
        ms_cfg_error(c, node, "deployment is missing required key 'name'");
    walk_deployment_scaling(c, db);
}

static void check_unique_deployments(ms_cfg_ctx_t *c, ms_app_config_t *app, dep_build_t *dbs)
{
    for (size_t i = 0; i < app->n_deployments; i++) {
        for (size_t j = 0; j < i && dbs[i].name_node; j++) {
            if (dbs[j].name_node && !strcmp(app->deployments[i].name, app->deployments[j].name)) {
                ms_cfg_error(c, dbs[i].name_node,
                             "duplicate deployment name '%s' in application '%s' (first at "
                             "line %d)",
                             app->deployments[i].name, app->name,
                             ms_cfg_mark(dbs[j].name_node).line);
                break;
            }
        }
    }
}

/* ---- applications ------------------------------------------------------------------------ */

typedef struct app_build {
    ms_app_config_t *app;
    yaml_node_t *ext_node;    /* external_scaler_enabled value, when true */
    yaml_node_t *scaler_key;  /* external_scaler key, when given */
    yaml_node_t *name_node;   /* NULL when the name is the default */
    yaml_node_t *prefix_node; /* NULL when the prefix is the default */
    bool is_mapping;          /* false for a malformed entry, already reported */
} app_build_t;

static void app_name(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    app_build_t *ab = obj;
    const char *s = ms_cfg_get_str(c, key, val);
    const char *why = s ? ms_cfg_name_problem(s) : NULL;
    if (why) {
        ms_cfg_error(c, val, "application name '%.64s' %s (" MS_CFG_NAME_RULE ")", s, why);
        return;
    }
    if (s) {
        ms_cfg_replace_str(&ab->app->name, s);
        ab->name_node = val;
    }
}

static bool valid_route_prefix(const char *s)
{
    size_t n = strlen(s);
    if (s[0] != '/' || strpbrk(s, "{}"))
        return false;
    return n == 1 || s[n - 1] != '/';
}

static void app_route_prefix(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    app_build_t *ab = obj;
    ab->prefix_node = val;
    if (ms_cfg_is_null(val)) {
        free(ab->app->route_prefix);
        ab->app->route_prefix = NULL; /* not exposed over HTTP */
        return;
    }
    const char *s = ms_cfg_scalar(val);
    if (s && valid_route_prefix(s)) {
        ms_cfg_replace_str(&ab->app->route_prefix, s);
        return;
    }
    ms_cfg_bad_value(c, key, val,
                     "null or a path starting with '/', not ending with '/' (unless exactly \"/\") "
                     "and without '{' or '}'");
}

static void app_import_path(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    app_build_t *ab = obj;
    ab->app->import_path_mark = ms_cfg_mark(val);
    const char *s = ms_cfg_get_str(c, key, val);
    if (!s)
        return;
    ab->app->import_path = ms_strdup(s);
    ms_cfg_resolve_import(c, ab->app, val);
}

static void app_args(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    app_build_t *ab = obj;
    if (ms_cfg_is_null(val) || !ms_cfg_want_mapping(c, key, val, true))
        return; /* null keeps the default {} */
    json_t *j = ms_cfg_to_json(c, val);
    if (j) {
        json_decref(ab->app->args);
        ab->app->args = j;
    }
}

static void app_deployments(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_app_config_t *app = ((app_build_t *)obj)->app;
    if (ms_cfg_is_null(val))
        return;
    if (val->type != YAML_SEQUENCE_NODE) {
        ms_cfg_bad_value(c, key, val, "a list");
        return;
    }
    size_t n = (size_t)(val->data.sequence.items.top - val->data.sequence.items.start);
    app->deployments = ms_calloc(n, sizeof(*app->deployments));
    app->n_deployments = n;
    dep_build_t *dbs = ms_calloc(n, sizeof(*dbs));
    for (size_t i = 0; i < n; i++) {
        dbs[i].dep = &app->deployments[i];
        walk_deployment(c, ms_cfg_node(c, val->data.sequence.items.start[i]), &dbs[i]);
    }
    check_unique_deployments(c, app, dbs);
    free(dbs);
}

static void app_autoscaling_policy(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    app_build_t *ab = obj;
    if (ms_cfg_is_null(val) || !ms_cfg_want_mapping(c, key, val, true))
        return;
    ms_cfg_app_policy_yaml(c, val, ab->app);
}

static void app_logging(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_cfg_walk_logging(c, key, val, &((app_build_t *)obj)->app->logging);
}

static void app_external_scaler(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    app_build_t *ab = obj;
    bool b;
    if (!ms_cfg_get_bool(c, key, val, &b))
        return;
    ab->app->external_scaler_enabled = b;
    ab->ext_node = b ? val : NULL;
}

static void app_scaler_hooks(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    app_build_t *ab = obj;
    ab->scaler_key = key;
    if (!ms_cfg_want_mapping(c, key, val, false))
        return;
    ms_cfg_external_scaler_yaml(c, val, ab->app);
}

/* Ray Serve's schema rule: an external scaler and autoscaling do not mix in one application.
 * Ours: hooks of the external scaling API mean nothing while that API is off for the app. */
static void check_external_scaler(ms_cfg_ctx_t *c, app_build_t *ab)
{
    ms_app_config_t *app = ab->app;
    if (ab->scaler_key && !app->external_scaler_enabled)
        ms_cfg_error(c, ab->scaler_key, "external_scaler needs external_scaler_enabled: true");
    if (!app->external_scaler_enabled)
        return;
    for (size_t i = 0; i < app->n_deployments; i++) {
        ms_deployment_config_t *d = &app->deployments[i];
        if (d->num_replicas_auto || d->autoscaling)
            ms_cfg_error(c, ab->ext_node,
                         "external_scaler_enabled cannot be combined with autoscaling "
                         "(deployment '%s')",
                         d->name ? d->name : "?");
    }
}

static void app_legacy(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    (void)obj;
    (void)val;
    ms_cfg_error(c, key,
                 "'%s' is a legacy single-application field and is not allowed in a "
                 "multi-application config; use http_options.%s",
                 ms_cfg_key_name(key), ms_cfg_key_name(key));
}

static void app_old_name(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    (void)obj;
    (void)val;
    ms_cfg_renamed(c, key, "in application", "name");
}

static const ms_cfg_field_t app_fields[] = {
    {"name", app_name, MS_FIELD_OK},
    {"route_prefix", app_route_prefix, MS_FIELD_OK},
    {"import_path", app_import_path, MS_FIELD_OK},
    {"args", app_args, MS_FIELD_OK},
    {"deployments", app_deployments, MS_FIELD_OK},
    {"runtime_env", ms_cfg_later_mapping, MS_FIELD_LATER},
    {"autoscaling_policy", app_autoscaling_policy, MS_FIELD_OK},
    {"external_scaler_enabled", app_external_scaler, MS_FIELD_OK},
    {"external_scaler", app_scaler_hooks, MS_FIELD_OK},
    {"logging_config", app_logging, MS_FIELD_OK},
    {"host", app_legacy, MS_FIELD_LEGACY},
    {"port", app_legacy, MS_FIELD_LEGACY},
    {"app_name", app_old_name, MS_FIELD_LEGACY},
};

/* Without import_path an application is made in the file alone: one process deployment, which
 * is its ingress (ours; Ray Serve always needs code). */
static void check_config_only_app(ms_cfg_ctx_t *c, yaml_node_t *node, ms_app_config_t *app)
{
    if (app->n_deployments == 1 && app->deployments[0].process)
        return;
    if (app->n_deployments == 1 && !app->deployments[0].process)
        ms_cfg_error(c, node,
                     "application '%s' is missing required key 'import_path' (an application "
                     "without code must consist of one deployment with a 'process' block)",
                     app->name);
    else
        ms_cfg_error(c, node, "application '%s' is missing required key 'import_path'", app->name);
}

static void walk_app(ms_cfg_ctx_t *c, yaml_node_t *node, app_build_t *ab)
{
    ms_app_config_t *app = ab->app;
    app->name = ms_strdup("default");
    app->route_prefix = ms_strdup("/");
    app->args = json_object();
    app->scale_tick_interval_s = MS_DEFAULT_SCALE_TICK_INTERVAL_S;
    app->mark = ms_cfg_mark(node);
    if (node->type != YAML_MAPPING_NODE) {
        char got[64];
        ms_cfg_describe(node, got, sizeof(got));
        ms_cfg_error(c, node, "each application must be a mapping, got %s", got);
        return;
    }
    ab->is_mapping = true;
    uint64_t seen =
        ms_cfg_walk_fields(c, node, "in application", app_fields, MS_N_FIELDS(app_fields), ab);
    if (!ms_cfg_was_seen(seen, app_fields, MS_N_FIELDS(app_fields), "import_path"))
        check_config_only_app(c, node, app);
    check_external_scaler(c, ab);
}

/* Position to blame for a duplicate: the value when the file gave one, else the entry. */
static ms_config_mark_t blame(const yaml_node_t *node, ms_config_mark_t entry)
{
    return node ? ms_cfg_mark(node) : entry;
}

static void check_unique_apps(ms_cfg_ctx_t *c, ms_config_t *cfg, app_build_t *abs)
{
    /* A malformed entry has only defaults; comparing them would add noise, not information. */
    for (size_t i = 0; i < cfg->n_apps; i++) {
        ms_app_config_t *a = &cfg->apps[i];
        for (size_t j = 0; j < i && abs[i].is_mapping; j++) {
            if (abs[j].is_mapping && !strcmp(a->name, cfg->apps[j].name)) {
                ms_cfg_error_at(c, blame(abs[i].name_node, a->mark),
                                "duplicate application name '%s' (first at line %d)", a->name,
                                blame(abs[j].name_node, cfg->apps[j].mark).line);
                break;
            }
        }
        for (size_t j = 0; j < i && abs[i].is_mapping && a->route_prefix; j++) {
            const char *other = cfg->apps[j].route_prefix;
            if (abs[j].is_mapping && other && !strcmp(a->route_prefix, other)) {
                ms_cfg_error_at(c, blame(abs[i].prefix_node, a->mark),
                                "duplicate route_prefix '%s' (also used by application '%s')",
                                a->route_prefix, cfg->apps[j].name);
                break;
            }
        }
    }
}

static void top_applications(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    if (val->type != YAML_SEQUENCE_NODE) {
        ms_cfg_bad_value(c, key, val, "a list");
        return;
    }
    size_t n = (size_t)(val->data.sequence.items.top - val->data.sequence.items.start);
    cfg->apps = ms_calloc(n, sizeof(*cfg->apps));
    cfg->n_apps = n;
    app_build_t *abs = ms_calloc(n, sizeof(*abs));
    for (size_t i = 0; i < n; i++) {
        abs[i].app = &cfg->apps[i];
        walk_app(c, ms_cfg_node(c, val->data.sequence.items.start[i]), &abs[i]);
    }
    check_unique_apps(c, cfg, abs);
    free(abs);
}

/* ---- admin and control_loop (ours) ----------------------------------------------------------- */

static void admin_host(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    const char *s = ms_cfg_get_str(c, key, val);
    if (s)
        ms_cfg_replace_str(&cfg->admin.host, s);
}

static void admin_port(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    long long v;
    if (ms_cfg_get_int(c, key, val, 1, 65535, "an integer in 1..65535", &v))
        cfg->admin.port = (int)v;
}

static void admin_token(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    if (ms_cfg_is_null(val)) {
        free(cfg->admin.token);
        cfg->admin.token = NULL;
        return;
    }
    const char *s = ms_cfg_get_str(c, key, val);
    if (s)
        ms_cfg_replace_str(&cfg->admin.token, s);
}

/* A list of non-empty strings without spaces or control characters: Host header values. */
static void admin_allowed_hosts(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    if (val->type != YAML_SEQUENCE_NODE) {
        ms_cfg_bad_value(c, key, val, "a list of host names");
        return;
    }
    size_t n = (size_t)(val->data.sequence.items.top - val->data.sequence.items.start);
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *item = ms_cfg_node(c, val->data.sequence.items.start[i]);
        const char *s = ms_cfg_value_text(item);
        int ok = s && *s;
        for (const char *p = s; ok && *p; p++)
            ok = (unsigned char)*p > ' ' && *p != 0x7f && *p != '/';
        if (!ok) {
            ms_cfg_bad_value(c, key, item,
                             "a list of host names (HOST or HOST:PORT, or \"*\" for any)");
            continue;
        }
        cfg->admin.allowed_hosts =
            ms_realloc(cfg->admin.allowed_hosts, (cfg->admin.n_allowed_hosts + 1) * sizeof(char *));
        cfg->admin.allowed_hosts[cfg->admin.n_allowed_hosts++] = ms_strdup(s);
    }
}

static const ms_cfg_field_t admin_fields[] = {
    {"host", admin_host, MS_FIELD_OK},
    {"port", admin_port, MS_FIELD_OK},
    {"token", admin_token, MS_FIELD_OK},
    {"allowed_hosts", admin_allowed_hosts, MS_FIELD_OK},
};

static void top_admin(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    if (ms_cfg_is_null(val) || !ms_cfg_want_mapping(c, key, val, true))
        return;
    ms_cfg_walk_fields(c, val, "in admin", admin_fields, MS_N_FIELDS(admin_fields), obj);
}

static void control_interval(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    ms_cfg_get_num(c, key, val, 0, false, "a number > 0", &cfg->control_loop_interval_s);
}

static const ms_cfg_field_t control_fields[] = {
    {"interval_s", control_interval, MS_FIELD_OK},
};

static void top_control_loop(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    if (ms_cfg_is_null(val) || !ms_cfg_want_mapping(c, key, val, true))
        return;
    ms_cfg_walk_fields(c, val, "in control_loop", control_fields, MS_N_FIELDS(control_fields), obj);
}

static void top_max_replicas_total(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    long long v;
    if (ms_cfg_get_strict_int(c, key, val, 1, MS_MAX_REPLICAS_TOTAL_LIMIT,
                              "an integer in 1..100000", &v)) {
        cfg->max_replicas_total = (int)v;
        cfg->max_replicas_total_mark = ms_cfg_mark(val);
    }
}

static void top_replica_memory(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_config_t *cfg = obj;
    if (ms_cfg_is_null(val))
        cfg->default_replica_memory = 0;
    else
        ms_cfg_get_int(c, key, val, 0, LLONG_MAX, "an integer >= 0 (bytes)",
                       &cfg->default_replica_memory);
}

/* ---- top level --------------------------------------------------------------------------- */

static const ms_cfg_field_t top_fields[] = {
    {"http_options", top_http, MS_FIELD_OK},
    {"logging_config", top_logging, MS_FIELD_OK},
    {"applications", top_applications, MS_FIELD_OK},
    {"proxy_location", ms_cfg_later_proxy_location, MS_FIELD_LATER},
    {"grpc_options", ms_cfg_later_mapping, MS_FIELD_LATER},
    {"target_capacity", ms_cfg_later_target_capacity, MS_FIELD_LATER},
    {"tracing_config", ms_cfg_later_mapping, MS_FIELD_LATER},
    {"admin", top_admin, MS_FIELD_OK},
    {"control_loop", top_control_loop, MS_FIELD_OK},
    {"max_replicas_total", top_max_replicas_total, MS_FIELD_OK},
    {"default_replica_memory", top_replica_memory, MS_FIELD_OK},
};

static void config_defaults(ms_config_t *cfg)
{
    cfg->http.host = ms_strdup("0.0.0.0");
    cfg->http.port = 8000;
    cfg->http.request_timeout_s = 0;
    cfg->http.keep_alive_timeout_s = MS_DEFAULT_KEEP_ALIVE_TIMEOUT_S;
    cfg->http.max_header_bytes = MS_DEFAULT_MAX_HEADER_BYTES;
    cfg->http.max_body_bytes = MS_DEFAULT_MAX_BODY_BYTES;
    cfg->http.header_timeout_s = MS_DEFAULT_HEADER_TIMEOUT_S;
    cfg->logging = (ms_logging_config_t){.set = MS_LOG_SET_ALL,
                                         .level = "INFO",
                                         .json = 0,
                                         .access_log = 1,
                                         .rotation_max_bytes = MS_DEFAULT_ROTATION_MAX_BYTES,
                                         .rotation_backup_count = MS_DEFAULT_ROTATION_BACKUP_COUNT};
    cfg->control_loop_interval_s = MS_DEFAULT_CONTROL_LOOP_INTERVAL_S;
    cfg->admin.host = ms_strdup(MS_DEFAULT_ADMIN_HOST);
    cfg->admin.port = MS_DEFAULT_ADMIN_PORT;
    cfg->max_replicas_total = MS_DEFAULT_MAX_REPLICAS_TOTAL;
}

static void walk_root(ms_cfg_ctx_t *c, yaml_node_t *root, ms_config_t *cfg)
{
    if (!root) {
        ms_cfg_error_at(c, (ms_config_mark_t){1, 1},
                        "config is empty; expected a mapping with 'applications'");
        return;
    }
    if (root->type != YAML_MAPPING_NODE) {
        char got[64];
        ms_cfg_describe(root, got, sizeof(got));
        ms_cfg_error(c, root, "config must be a mapping with 'applications', got %s", got);
        return;
    }
    uint64_t seen =
        ms_cfg_walk_fields(c, root, "at the top level", top_fields, MS_N_FIELDS(top_fields), cfg);
    if (!ms_cfg_was_seen(seen, top_fields, MS_N_FIELDS(top_fields), "applications"))
        ms_cfg_error(c, root, "config is missing required key 'applications'");
}

/* ---- parsing ----------------------------------------------------------------------------- */

static void syntax_error(ms_cfg_ctx_t *c, const yaml_parser_t *p)
{
    ms_config_mark_t m = {1, 1};
    /* Reader errors (bad encoding) carry a byte offset but no line; the rest carry a mark. */
    if (p->error != YAML_READER_ERROR && p->error != YAML_MEMORY_ERROR) {
        m.line = (int)p->problem_mark.line + 1;
        m.col = (int)p->problem_mark.column + 1;
    }
    const char *problem = p->problem ? p->problem : "cannot parse";
    if (p->context)
        ms_cfg_error_at(c, m, "YAML syntax error: %s %s", p->context, problem);
    else if (p->error == YAML_READER_ERROR)
        ms_cfg_error_at(c, m, "YAML syntax error: %s at byte %zu", problem, p->problem_offset);
    else
        ms_cfg_error_at(c, m, "YAML syntax error: %s", problem);
}

/* Walks the parse events only, counting nesting, and stops at the first collection nested deeper
 * than MS_CFG_MAX_NESTING: loading such input into a document would cost time that grows
 * faster than its length (libyaml keeps per-level state it rescans for every token). Syntax
 * errors are left to the load, which reports them with its context. Returns 0 when the depth
 * is within the bound. */
static int check_nesting(ms_cfg_ctx_t *c, const char *text, size_t len)
{
    yaml_parser_t p;
    yaml_parser_initialize(&p);
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    int depth = 0, rc = 0;
    for (;;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&p, &ev))
            break;
        yaml_event_type_t type = ev.type;
        if (type == YAML_SEQUENCE_START_EVENT || type == YAML_MAPPING_START_EVENT) {
            if (++depth > MS_CFG_MAX_NESTING) {
                ms_cfg_error_at(
                    c,
                    (ms_config_mark_t){(int)ev.start_mark.line + 1, (int)ev.start_mark.column + 1},
                    "config nests deeper than %d levels of mappings and lists; "
                    "refused without loading it",
                    MS_CFG_MAX_NESTING);
                rc = -1;
            }
        } else if (type == YAML_SEQUENCE_END_EVENT || type == YAML_MAPPING_END_EVENT) {
            depth--;
        }
        yaml_event_delete(&ev);
        if (rc != 0 || type == YAML_STREAM_END_EVENT)
            break;
    }
    yaml_parser_delete(&p);
    return rc;
}

/* Parses the first document and rejects any second one; returns 0 with *doc loaded. */
static int parse_document(ms_cfg_ctx_t *c, const char *text, size_t len, yaml_document_t *doc)
{
    yaml_parser_t p;
    yaml_parser_initialize(&p);
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    int rc = -1;
    if (!yaml_parser_load(&p, doc)) {
        syntax_error(c, &p);
        goto out;
    }
    yaml_document_t extra;
    if (!yaml_parser_load(&p, &extra)) {
        syntax_error(c, &p);
        yaml_document_delete(doc);
        goto out;
    }
    yaml_node_t *extra_root = yaml_document_get_root_node(&extra);
    if (extra_root)
        ms_cfg_error(c, extra_root, "config must be a single YAML document");
    yaml_document_delete(&extra);
    rc = 0;
out:
    yaml_parser_delete(&p);
    return rc;
}

/* `dir` made absolute, so import files resolve the same whatever the cwd later becomes. */
static char *absolute_dir(const char *dir)
{
    char *real = realpath(dir && *dir ? dir : ".", NULL);
    if (real)
        return real;
    char cwd[PATH_MAX];
    ms_buf_t b = {0};
    if (dir[0] == '/' || !getcwd(cwd, sizeof(cwd)))
        ms_buf_appendf(&b, "%s", dir);
    else
        ms_buf_appendf(&b, "%s/%s", cwd, dir);
    return b.data;
}

int ms_config_load_string(const char *text, size_t len, const char *name, const char *dir,
                          ms_config_t **out, ms_config_errors_t *errs)
{
    ms_cfg_ctx_t c = {.file = name ? name : "<string>", .errs = errs};
    ms_config_t *cfg = ms_calloc(1, sizeof(*cfg));
    cfg->path = ms_strdup(c.file);
    cfg->dir = absolute_dir(dir);
    c.dir = cfg->dir;
    c.json_budget = MS_CFG_JSON_MAX_NODES;
    config_defaults(cfg);
    *out = NULL;

    yaml_document_t doc;
    if (check_nesting(&c, text, len) == 0 && parse_document(&c, text, len, &doc) == 0) {
        c.doc = &doc;
        walk_root(&c, yaml_document_get_root_node(&doc), cfg);
        yaml_document_delete(&doc);
    }
    if (c.n_errors > 0) {
        ms_config_free(cfg);
        return -1;
    }
    *out = cfg;
    return 0;
}

/* Absolute folder of an existing file (its realpath's parent). */
static char *file_dir(const char *path)
{
    char *real = realpath(path, NULL);
    if (!real)
        return NULL;
    char *slash = strrchr(real, '/');
    if (slash == real)
        slash[1] = '\0'; /* file in "/" */
    else
        *slash = '\0';
    return real;
}

int ms_config_load(const char *path, ms_config_t **out, ms_config_errors_t *errs)
{
    ms_buf_t b = {0};
    *out = NULL;
    if (ms_read_file(path, &b) < 0) {
        ms_config_errors_add(errs, path, (ms_config_mark_t){1, 1}, "cannot read config: %s",
                             strerror(errno));
        ms_buf_free(&b);
        return -1;
    }
    char *dir = file_dir(path);
    int rc = ms_config_load_string(b.data ? b.data : "", b.len, path, dir, out, errs);
    free(dir);
    ms_buf_free(&b);
    return rc;
}

/* ---- freeing and lookup ------------------------------------------------------------------ */

static void app_free(ms_app_config_t *app)
{
    free(app->name);
    free(app->route_prefix);
    free(app->import_path);
    free(app->import_file);
    free(app->import_attr);
    json_decref(app->args);
    for (size_t i = 0; i < app->n_deployments; i++) {
        free(app->deployments[i].name);
        json_decref(app->deployments[i].user_config);
        json_decref(app->deployments[i].ray_actor_options);
        ms_config_process_free(app->deployments[i].process);
        json_decref(app->deployments[i].process_json);
        ms_config_autoscaling_free(app->deployments[i].autoscaling);
        ms_cfg_router_free(app->deployments[i].router);
        ms_cfg_task_queue_free(app->deployments[i].task_queue);
    }
    free(app->deployments);
    ms_config_lua_ref_free(app->autoscaling_policy);
    json_decref(app->autoscaling_policy_kwargs);
    ms_config_lua_ref_free(app->scale_hook);
    ms_config_lua_ref_free(app->scale_tick);
    json_decref(app->scale_hook_kwargs);
    free(app->scale_redis_url);
}

void ms_config_free(ms_config_t *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < cfg->n_apps; i++)
        app_free(&cfg->apps[i]);
    free(cfg->apps);
    free(cfg->http.host);
    free(cfg->admin.host);
    free(cfg->admin.token);
    for (size_t i = 0; i < cfg->admin.n_allowed_hosts; i++)
        free(cfg->admin.allowed_hosts[i]);
    free(cfg->admin.allowed_hosts);
    free(cfg->path);
    free(cfg->dir);
    free(cfg);
}

const ms_deployment_config_t *ms_config_find_deployment(const ms_app_config_t *app,
                                                        const char *name)
{
    for (size_t i = 0; app && name && i < app->n_deployments; i++)
        if (app->deployments[i].name && !strcmp(app->deployments[i].name, name))
            return &app->deployments[i];
    return NULL;
}
