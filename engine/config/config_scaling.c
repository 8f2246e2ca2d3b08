/*
 * config (scaling): autoscaling_config (with its policy), request_router_config, the
 * application's autoscaling_policy and its external_scaler hooks, each from the file or from
 * code options through the one validator of config_json.c.
 */
#include "config/config_internal.h"
#include "core/core.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

void ms_config_lua_ref_free(ms_config_lua_ref_t *r)
{
    if (!r)
        return;
    free(r->path);
    free(r->file);
    free(r->attr);
    free(r);
}

ms_config_lua_ref_t *ms_config_lua_ref_copy(const ms_config_lua_ref_t *r)
{
    if (!r)
        return NULL;
    ms_config_lua_ref_t *c = ms_calloc(1, sizeof *c);
    c->path = ms_strdup(r->path);
    c->file = ms_strdup(r->file);
    c->attr = ms_strdup(r->attr);
    c->mark = r->mark;
    return c;
}

/* ---- policy: {policy_function, policy_kwargs, dry_run} -------------------------------------- */

typedef struct policy_build {
    ms_config_lua_ref_t **ref;
    json_t **kwargs;
    int *dry_run;
    bool builtin;     /* policy_function named Ray's built-in policy */
    char **redis_url; /* NULL where the key is not accepted (application-level policies) */
} policy_build_t;

/* Ray's names of its one built-in policy (the second is what the first is bound to). Ray has no
 * application-level built-in: these are the only names, at either level. */
static const char *const builtin_policies[] = {
    "ray.serve.autoscaling_policy:default_autoscaling_policy",
    "ray.serve.autoscaling_policy:replica_queue_length_autoscaling_policy",
    NULL,
};

static void pol_function(jkv_t *kv, void *obj)
{
    policy_build_t *pb = obj;
    pb->builtin = jget_ref(kv, builtin_policies, pb->ref);
}

static void pol_kwargs(jkv_t *kv, void *obj)
{
    policy_build_t *pb = obj;
    jget_mapping(kv, pb->kwargs);
}

static void pol_dry_run(jkv_t *kv, void *obj)
{
    policy_build_t *pb = obj;
    jget_bool(kv, pb->dry_run);
}

static void pol_redis(jkv_t *kv, void *obj)
{
    policy_build_t *pb = obj;
    if (!pb->redis_url)
        jv_error(kv->v, kv->key_node,
                 "redis_url is for deployment policies (autoscaling_config.policy) and "
                 "external_scaler hooks");
    else
        jget_redis_url(kv, pb->redis_url);
}

static const jfield_t policy_fields[] = {
    {"policy_function", pol_function},
    {"policy_kwargs", pol_kwargs},
    {"dry_run", pol_dry_run},
    {"redis_url", pol_redis},
};

/* Walks a policy mapping; returns the fields seen, or 0 when the value is not a mapping. */
static uint64_t walk_policy(jkv_t *kv, const char *where, policy_build_t *pb)
{
    if (!json_is_object(kv->val)) {
        jbad(kv, "a mapping");
        return 0;
    }
    return jv_walk(kv->v, kv->val, jv_submap(kv), where, policy_fields, MS_N_FIELDS(policy_fields),
                   pb);
}

/* ---- autoscaling_config -----------------------------------------------------------------------
 */

typedef struct as_build {
    ms_autoscaling_config_t *a;
    /* Positions for the checks across fields (NULL: the mapping's, or the caller's mark). */
    yaml_node_t *min_node, *max_node, *initial_node;
} as_build_t;

static void as_min(jkv_t *kv, void *obj)
{
    as_build_t *b = obj;
    long long x;
    b->min_node = kv->val_node;
    if (jget_int(kv, 0, INT_MAX, "an integer >= 0", &x))
        b->a->min_replicas = (int)x;
}

static void as_initial(jkv_t *kv, void *obj)
{
    as_build_t *b = obj;
    long long x;
    b->initial_node = kv->val_node;
    if (json_is_null(kv->val))
        b->a->initial_replicas = -1;
    else if (jget_int(kv, 0, INT_MAX, "an integer >= 0 or null", &x))
        b->a->initial_replicas = (int)x;
}

static void as_max(jkv_t *kv, void *obj)
{
    as_build_t *b = obj;
    long long x;
    b->max_node = kv->val_node;
    b->a->max_replicas_given = 1;
    if (jget_int(kv, 1, INT_MAX, "an integer > 0", &x))
        b->a->max_replicas = (int)x;
}

static void as_target(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((as_build_t *)obj)->a->target_ongoing_requests);
}

static void as_metrics_interval(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((as_build_t *)obj)->a->metrics_interval_s);
}

static void as_look_back(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((as_build_t *)obj)->a->look_back_period_s);
}

static void as_smoothing(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((as_build_t *)obj)->a->smoothing_factor);
}

static void as_up_smoothing(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((as_build_t *)obj)->a->upscale_smoothing_factor);
}

static void as_down_smoothing(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((as_build_t *)obj)->a->downscale_smoothing_factor);
}

static void as_up_factor(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((as_build_t *)obj)->a->upscaling_factor);
}

static void as_down_factor(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((as_build_t *)obj)->a->downscaling_factor);
}

static void as_down_delay(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, true, &((as_build_t *)obj)->a->downscale_delay_s);
}

static void as_zero_delay(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, true, &((as_build_t *)obj)->a->downscale_to_zero_delay_s);
}

static void as_up_delay(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, true, &((as_build_t *)obj)->a->upscale_delay_s);
}

static void as_aggregation(jkv_t *kv, void *obj)
{
    static const char *const choices[] = {"mean", "max", "min"};
    as_build_t *b = obj;
    const char *s = json_is_string(kv->val) ? json_string_value(kv->val) : NULL;
    for (size_t i = 0; s && i < MS_N_FIELDS(choices); i++) {
        if (!strcasecmp(s, choices[i])) {
            ms_cfg_replace_str(&b->a->aggregation_function, choices[i]);
            return;
        }
    }
    jbad(kv, "one of mean, max, min");
}

static void as_policy(jkv_t *kv, void *obj)
{
    ms_autoscaling_config_t *a = ((as_build_t *)obj)->a;
    if (json_is_null(kv->val))
        return; /* the built-in policy */
    policy_build_t pb = {&a->policy, &a->policy_kwargs, &a->dry_run, false, &a->redis_url};
    walk_policy(kv, "in autoscaling_config.policy", &pb);
}

static const jfield_t as_fields[] = {
    {"min_replicas", as_min},
    {"initial_replicas", as_initial},
    {"max_replicas", as_max},
    {"target_ongoing_requests", as_target},
    {"metrics_interval_s", as_metrics_interval},
    {"look_back_period_s", as_look_back},
    {"smoothing_factor", as_smoothing},
    {"upscale_smoothing_factor", as_up_smoothing},
    {"downscale_smoothing_factor", as_down_smoothing},
    {"upscaling_factor", as_up_factor},
    {"downscaling_factor", as_down_factor},
    {"downscale_delay_s", as_down_delay},
    {"downscale_to_zero_delay_s", as_zero_delay},
    {"upscale_delay_s", as_up_delay},
    {"aggregation_function", as_aggregation},
    {"policy", as_policy},
};

/* Ray Serve's old names of keys of a table, found by jv_walk among the unknown keys. */
typedef struct jrename {
    const jfield_t *table;
    const char *old, *now;
} jrename_t;
static const jrename_t renames[] = {
    {as_fields, "target_num_ongoing_requests_per_replica", "target_ongoing_requests"},
    {policy_fields, "name", "policy_function"},
};

uint64_t jv_renamed(jv_t *v, const yaml_node_t *key_node, const char *key, const char *where,
                    const jfield_t *fields, size_t n)
{
    for (size_t i = 0; i < MS_N_FIELDS(renames); i++) {
        if (renames[i].table == fields && !strcmp(renames[i].old, key)) {
            jv_error(v, key_node,
                     "unknown key '%s' %s; did you mean '%s'? (its old name in Ray Serve)", key,
                     where, renames[i].now);
            size_t now = jv_find(fields, n, renames[i].now);
            return now < n ? UINT64_C(1) << now : 0;
        }
    }
    return 0;
}

ms_autoscaling_config_t *ms_config_autoscaling_default(int num_replicas_auto)
{
    ms_autoscaling_config_t *a = ms_calloc(1, sizeof(*a));
    a->min_replicas = MS_DEFAULT_AS_MIN_REPLICAS;
    a->initial_replicas = -1;
    a->max_replicas =
        num_replicas_auto ? MS_DEFAULT_AS_MAX_REPLICAS_AUTO : MS_DEFAULT_AS_MAX_REPLICAS;
    a->target_ongoing_requests = MS_DEFAULT_AS_TARGET_ONGOING_REQUESTS;
    a->metrics_interval_s = MS_DEFAULT_AS_METRICS_INTERVAL_S;
    a->look_back_period_s = MS_DEFAULT_AS_LOOK_BACK_PERIOD_S;
    a->smoothing_factor = MS_DEFAULT_AS_SMOOTHING_FACTOR;
    a->upscale_smoothing_factor = -1;
    a->downscale_smoothing_factor = -1;
    a->upscaling_factor = -1;
    a->downscaling_factor = -1;
    a->downscale_delay_s = MS_DEFAULT_AS_DOWNSCALE_DELAY_S;
    a->downscale_to_zero_delay_s = -1;
    a->upscale_delay_s = MS_DEFAULT_AS_UPSCALE_DELAY_S;
    a->aggregation_function = ms_strdup("mean");
    a->mark = (ms_config_mark_t){1, 1};
    return a;
}

void ms_config_autoscaling_free(ms_autoscaling_config_t *a)
{
    if (!a)
        return;
    free(a->aggregation_function);
    ms_config_lua_ref_free(a->policy);
    json_decref(a->policy_kwargs);
    free(a->redis_url);
    free(a);
}

/* The walk and the checks across fields, for either source. `ymap` is NULL for JSON. */
static ms_autoscaling_config_t *autoscaling_parse(jv_t *v, json_t *obj, yaml_node_t *ymap,
                                                  int num_replicas_auto, ms_config_mark_t mark)
{
    size_t before = v->c->n_errors;
    ms_autoscaling_config_t *a = ms_config_autoscaling_default(num_replicas_auto);
    a->mark = mark;
    as_build_t b = {a, NULL, NULL, NULL};
    jv_walk(v, obj, ymap, "in autoscaling_config", as_fields, MS_N_FIELDS(as_fields), &b);
    /* Bounds only when every field was valid: a rejected value would compare as its default. */
    if (v->c->n_errors == before) {
        if (a->max_replicas < a->min_replicas)
            jv_error(v,
                     b.max_node   ? b.max_node
                     : b.min_node ? b.min_node
                                  : ymap,
                     "max_replicas (%d) must be >= min_replicas (%d)%s", a->max_replicas,
                     a->min_replicas,
                     a->max_replicas_given ? ""
                     : num_replicas_auto   ? " (max_replicas defaults to 100 under "
                                             "num_replicas: auto)"
                                           : " (max_replicas defaults to 1)");
        else if (a->initial_replicas >= 0 &&
                 (a->initial_replicas < a->min_replicas || a->initial_replicas > a->max_replicas))
            jv_error(v, b.initial_node ? b.initial_node : ymap,
                     "initial_replicas (%d) must lie between min_replicas (%d) and max_replicas "
                     "(%d)",
                     a->initial_replicas, a->min_replicas, a->max_replicas);
    }
    if (v->c->n_errors != before) {
        ms_config_autoscaling_free(a);
        return NULL;
    }
    return a;
}

ms_autoscaling_config_t *ms_cfg_autoscaling_yaml(ms_cfg_ctx_t *c, yaml_node_t *map,
                                                 int num_replicas_auto)
{
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    return autoscaling_parse(&v, NULL, map, num_replicas_auto, ms_cfg_mark(map));
}

ms_autoscaling_config_t *ms_config_autoscaling_from_json(json_t *obj, int num_replicas_auto,
                                                         const char *file, ms_config_mark_t mark,
                                                         const char *what, ms_config_errors_t *errs)
{
    char *dir = jv_ref_dir(file);
    ms_cfg_ctx_t c = {.file = file ? file : "<code>",
                      .dir = dir,
                      .errs = errs,
                      .json_budget = MS_CFG_JSON_MAX_NODES};
    jv_t v = {&c, what && *what ? what : NULL, mark};
    ms_autoscaling_config_t *a = NULL;
    if (!json_is_object(obj)) {
        char got[64];
        ms_cfg_describe_json(obj, got, sizeof(got));
        jv_error(&v, NULL, "autoscaling_config must be a mapping, got %s", got);
    } else {
        a = autoscaling_parse(&v, obj, NULL, num_replicas_auto, mark);
    }
    free(dir);
    return a;
}

/* ---- request_router_config --------------------------------------------------------------------
 */

/* Ray's default request_router_class and the module that defines it. */
static const char *const builtin_routers[] = {
    "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter",
    NULL,
};

static void rt_class(jkv_t *kv, void *obj)
{
    jget_ref(kv, builtin_routers, &((ms_router_config_t *)obj)->router_class);
}

static void rt_kwargs(jkv_t *kv, void *obj)
{
    jget_mapping(kv, &((ms_router_config_t *)obj)->kwargs);
}

static void rt_period(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((ms_router_config_t *)obj)->stats_period_s);
}

static void rt_timeout(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((ms_router_config_t *)obj)->stats_timeout_s);
}

/* A newer Ray Serve key with no effect here yet: checked loosely, then warned about. */
static void rt_later(jkv_t *kv, void *obj)
{
    (void)obj;
    if (!json_is_boolean(kv->val) && !json_is_object(kv->val) && !json_is_null(kv->val)) {
        jbad(kv, "true, false, a mapping or null");
        return;
    }
    if (kv->key_node)
        ms_cfg_warn_unsupported(kv->v->c, kv->key_node);
}

static const jfield_t router_fields[] = {
    {"request_router_class", rt_class},
    {"request_router_kwargs", rt_kwargs},
    {"request_routing_stats_period_s", rt_period},
    {"request_routing_stats_timeout_s", rt_timeout},
    {"ingress_router_fallback", rt_later},
};

void ms_cfg_router_free(ms_router_config_t *r)
{
    if (!r)
        return;
    ms_config_lua_ref_free(r->router_class);
    json_decref(r->kwargs);
    free(r);
}

ms_router_config_t *ms_cfg_router_yaml(ms_cfg_ctx_t *c, yaml_node_t *map)
{
    size_t before = c->n_errors;
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    ms_router_config_t *r = ms_calloc(1, sizeof(*r));
    r->stats_period_s = MS_DEFAULT_ROUTING_STATS_PERIOD_S;
    r->stats_timeout_s = MS_DEFAULT_ROUTING_STATS_TIMEOUT_S;
    jv_walk(&v, NULL, map, "in request_router_config", router_fields, MS_N_FIELDS(router_fields),
            r);
    if (c->n_errors != before) {
        ms_cfg_router_free(r);
        return NULL;
    }
    return r;
}

/* ---- applications[].autoscaling_policy --------------------------------------------------------
 */

void ms_cfg_app_policy_yaml(ms_cfg_ctx_t *c, yaml_node_t *map, ms_app_config_t *app)
{
    size_t before = c->n_errors;
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    policy_build_t pb = {&app->autoscaling_policy, &app->autoscaling_policy_kwargs,
                         &app->autoscaling_policy_dry_run, false, NULL};
    uint64_t seen = jv_walk(&v, NULL, map, "in autoscaling_policy", policy_fields,
                            MS_N_FIELDS(policy_fields), &pb);
    if (!(seen & 1)) {
        jv_error(&v, map, "autoscaling_policy is missing required key 'policy_function'");
    } else if (pb.builtin) {
        /* Ray has no application-level built-in; its default policy decides per deployment,
         * which is what happens here without an application-level policy. So the application
         * gets none, exactly as if the key were absent. */
        json_decref(app->autoscaling_policy_kwargs);
        app->autoscaling_policy_kwargs = NULL;
        app->autoscaling_policy_dry_run = 0;
    } else if (!app->autoscaling_policy && c->n_errors == before) {
        /* An application-level policy has no built-in to fall back on. */
        jv_error(&v, map,
                 "autoscaling_policy.policy_function must name a Lua function "
                 "('file.lua:attr' or 'module.sub:attr')");
    }
}

/* ---- applications[].external_scaler (ours) ------------------------------------------------- */

static void es_hook(jkv_t *kv, void *obj)
{
    jget_ref(kv, NULL, &((ms_app_config_t *)obj)->scale_hook);
}

static void es_tick(jkv_t *kv, void *obj)
{
    jget_ref(kv, NULL, &((ms_app_config_t *)obj)->scale_tick);
}

static void es_tick_interval(jkv_t *kv, void *obj)
{
    /* Zero would run the tick on every control-loop pass; a period must be positive. */
    jget_num(kv, 0, false, &((ms_app_config_t *)obj)->scale_tick_interval_s);
}

static void es_kwargs(jkv_t *kv, void *obj)
{
    jget_mapping(kv, &((ms_app_config_t *)obj)->scale_hook_kwargs);
}

static void es_redis(jkv_t *kv, void *obj)
{
    jget_redis_url(kv, &((ms_app_config_t *)obj)->scale_redis_url);
}

static const jfield_t scaler_fields[] = {
    {"hook", es_hook},     {"tick", es_tick},       {"tick_interval_s", es_tick_interval},
    {"kwargs", es_kwargs}, {"redis_url", es_redis},
};

void ms_cfg_external_scaler_yaml(ms_cfg_ctx_t *c, yaml_node_t *map, ms_app_config_t *app)
{
    size_t before = c->n_errors;
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    jv_walk(&v, NULL, map, "in external_scaler", scaler_fields, MS_N_FIELDS(scaler_fields), app);
    /* Without either function the key would configure nothing: most likely a typo. */
    if (!app->scale_hook && !app->scale_tick && c->n_errors == before)
        jv_error(&v, map, "external_scaler needs at least one of 'hook' or 'tick'");
}
