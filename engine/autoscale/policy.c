/*
 * policy: the autoscaling kinds of policy script, and the ctx tables they receive.
 *
 * A policy file returns a table of functions; the configured one is called every tick with a
 * ctx (Ray Serve's AutoscalingContext as a table). The ctx tables are created once per
 * deployment and version and refreshed in place with raw stores; their subtables are re-checked
 * before C writes into them, since a script may have replaced them. raw_metrics is built only
 * when a policy reads it (the ctx's protected metatable), since it can hold a few hundred points
 * per series.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "autoscale/internal.h"
#include "core/core.h"

/* A ctx handed to the call in progress, so the lazy ctx.raw_metrics knows whose window to read. */
typedef struct as_bind {
    const void *ctx;
    const ms_autoscaler_t *a;
    double now;
} as_bind_t;

/* What a version keeps beside its Lua state (the core's kind_data). */
typedef struct as_version {
    int meta_ref;  /* metatable of every ctx */
    int store_ref; /* {deployment name = ctx}: C's own, never shown to scripts */
    as_bind_t *bind;
    size_t nbind, cap_bind;
} as_version_t;

static int ctx_index(lua_State *L);

/* Kind setup (may run on a worker thread). */
static int as_setup(ms_policy_version_t *v, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    lua_State *L = v->L;
    as_version_t *k = ms_calloc(1, sizeof *k);
    v->kind_data = k;
    ms_policy_new_metatable(L, 1);
    lua_pushliteral(L, "__index");
    lua_pushlightuserdata(L, k);
    lua_pushcclosure(L, ctx_index, 1);
    lua_rawset(L, -3);
    k->meta_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    k->store_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

static void as_release(ms_policy_version_t *v)
{
    as_version_t *k = v->kind_data;
    if (k)
        free(k->bind);
    free(k);
}

/* Policies run 10 times a second per deployment, so a few milliseconds is already generous. */
const ms_policy_kind_t as_deployment_kind = {
    .name = "autoscaling_policy",
    .call_budget_us = (uint64_t)AS_DEFAULT_BUDGET_US,
    .fallback = "the built-in policy decides",
    .setup = as_setup,
    .release = as_release,
};

const ms_policy_kind_t as_app_kind = {
    .name = "application_policy",
    .call_budget_us = (uint64_t)AS_DEFAULT_BUDGET_US,
    .fallback = "the built-in policy decides",
    .setup = as_setup,
    .release = as_release,
};

char *as_builtin_path(void)
{
    const char *dir = ms_lua_dir();
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/autoscaling.lua", dir);
    return b.data;
}

ms_policy_t *as_policy_load(const ms_policy_kind_t *kind, const char *file, const char *fn,
                            json_t *kwargs, size_t mem_limit, double budget_us, int builtin,
                            const char *app, const char *deployment, char **err)
{
    ms_policy_spec_t spec = {
        .kind = kind,
        .file = file,
        .fns = {fn},
        .required = 1,
        .kwargs = kwargs,
        .budget_us = budget_us > 0 ? (uint64_t)budget_us : 0,
        .mem_limit = mem_limit,
        .builtin = builtin,
        .application = app,
        .deployment = deployment,
    };
    return ms_policy_new(&spec, err);
}

/* ---- ctx ------------------------------------------------------------------------------------- */

static int ctx_index(lua_State *L)
{
    as_version_t *k = lua_touserdata(L, lua_upvalueindex(1));
    if (lua_type(L, 2) != LUA_TSTRING || strcmp(lua_tostring(L, 2), "raw_metrics") != 0)
        return 0;
    const void *ctx = lua_topointer(L, 1);
    for (size_t i = 0; i < k->nbind; i++) {
        if (k->bind[i].ctx != ctx)
            continue;
        const ms_autoscaler_t *a = k->bind[i].a;
        as_window_push_raw(&a->win, L, k->bind[i].now, a->cfg.look_back_period_s);
        lua_pushliteral(L, "raw_metrics");
        lua_pushvalue(L, -2);
        lua_rawset(L, 1); /* read once per tick; as_ctx_push clears it */
        return 1;
    }
    return 0; /* a ctx kept past its call: the window it described is gone */
}

/* Optional numbers (< 0 unset) become nil, as Ray's None. */
static void set_opt(lua_State *L, int t, const char *k, double v)
{
    if (v < 0)
        ms_policy_set_nil(L, t, k);
    else
        ms_policy_set_number(L, t, k, v);
}

static void fill_config(lua_State *L, int t, const ms_autoscaling_config_t *c)
{
    ms_policy_set_number(L, t, "min_replicas", c->min_replicas);
    set_opt(L, t, "initial_replicas", c->initial_replicas);
    ms_policy_set_number(L, t, "max_replicas", c->max_replicas);
    ms_policy_set_number(L, t, "target_ongoing_requests", c->target_ongoing_requests);
    ms_policy_set_number(L, t, "metrics_interval_s", c->metrics_interval_s);
    ms_policy_set_number(L, t, "look_back_period_s", c->look_back_period_s);
    ms_policy_set_number(L, t, "smoothing_factor", c->smoothing_factor);
    set_opt(L, t, "upscale_smoothing_factor", c->upscale_smoothing_factor);
    set_opt(L, t, "downscale_smoothing_factor", c->downscale_smoothing_factor);
    set_opt(L, t, "upscaling_factor", c->upscaling_factor);
    set_opt(L, t, "downscaling_factor", c->downscaling_factor);
    ms_policy_set_number(L, t, "downscale_delay_s", c->downscale_delay_s);
    set_opt(L, t, "downscale_to_zero_delay_s", c->downscale_to_zero_delay_s);
    ms_policy_set_number(L, t, "upscale_delay_s", c->upscale_delay_s);
    ms_policy_set_string(L, t, "aggregation_function",
                         c->aggregation_function ? c->aggregation_function : "mean");
    ms_policy_set_bool(L, t, "dry_run", c->dry_run);
    if (c->policy)
        ms_policy_set_string(L, t, "policy_function", c->policy->path);
}

/* ctx.running_replicas refilled in place; the tail left by a larger set is cleared. */
static void fill_replicas(ms_policy_version_t *v, int ctx, const as_window_t *w)
{
    lua_State *L = v->L;
    ms_policy_subtable(v, ctx, "running_replicas", (int)w->n_ids, 0);
    size_t old = lua_objlen(L, -1);
    for (size_t i = 0; i < w->n_ids; i++) {
        lua_pushstring(L, w->ids[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    for (size_t i = w->n_ids; i < old; i++) {
        lua_pushnil(L);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_pop(L, 1);
}

/* ctx.policy_state = the state at index `state` (a fresh table when 0 or not a table), with the
 * engine's reserved key written raw: whatever a policy wrote there is overwritten. */
static void fill_state(lua_State *L, int ctx, int state, const ms_autoscaler_t *a)
{
    if (state && lua_istable(L, state))
        lua_pushvalue(L, state);
    else
        lua_newtable(L);
    if (a->decision_dir != 0)
        ms_policy_set_number(L, -1, "__decision_timestamp", a->decision_ts);
    else
        ms_policy_set_nil(L, -1, "__decision_timestamp");
    ms_policy_set_value(L, ctx, "policy_state");
}

/* Pushes the deployment's persistent ctx, creating it on first use. */
static void push_ctx_table(ms_policy_version_t *v, const char *name)
{
    lua_State *L = v->L;
    as_version_t *k = v->kind_data;
    lua_rawgeti(L, LUA_REGISTRYINDEX, k->store_ref);
    ms_policy_get(L, -1, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 24);
        lua_rawgeti(L, LUA_REGISTRYINDEX, k->meta_ref);
        lua_setmetatable(L, -2);
        lua_pushvalue(L, -1);
        ms_policy_set_value(L, -3, name);
    }
    lua_remove(L, -2);
}

/* ctx.gpus refilled in place; ctx.replica_gpu_ids = {[replica tag] = {device, ...}}, fresh each
 * call (replicas come and go). */
static void fill_gpus(ms_policy_version_t *v, int ctx, const ms_autoscaler_t *a)
{
    lua_State *L = v->L;
    ms_policy_subtable(v, ctx, "gpus", ms_gpu_count(a->gpus), 0);
    ms_gpu_lua_fill(L, -1, a->gpus);
    lua_pop(L, 1);
    lua_createtable(L, 0, (int)a->n_gpu);
    for (size_t i = 0; i < a->n_gpu; i++) {
        lua_pushstring(L, a->gpu_ids[i]);
        ms_gpu_lua_push_ids(L, &a->gpu_placements[i]);
        lua_rawset(L, -3);
    }
    ms_policy_set_value(L, ctx, "replica_gpu_ids");
}

static void bind_ctx(as_version_t *k, const void *ctx, const ms_autoscaler_t *a, double now)
{
    if (k->nbind == k->cap_bind) {
        k->cap_bind = k->cap_bind ? k->cap_bind * 2 : 4;
        k->bind = ms_realloc(k->bind, k->cap_bind * sizeof *k->bind);
    }
    k->bind[k->nbind++] = (as_bind_t){ctx, a, now};
}

void as_ctx_push(ms_policy_t *p, const ms_autoscaler_t *a, double now, int current_target,
                 const as_agg_t *agg, int state)
{
    ms_policy_version_t *v = ms_policy_current(p);
    lua_State *L = v->L;
    luaL_checkstack(L, 8, "ctx");
    push_ctx_table(v, a->deployment);
    int ctx = lua_gettop(L);
    ms_policy_set_string(L, ctx, "deployment_name", a->deployment);
    ms_policy_set_string(L, ctx, "app_name", a->app);
    ms_policy_set_number(L, ctx, "current_num_replicas", a->win.running);
    ms_policy_set_number(L, ctx, "target_num_replicas", current_target);
    ms_policy_set_number(L, ctx, "total_num_requests", agg->total);
    ms_policy_set_number(L, ctx, "total_queued_requests", agg->queued);
    ms_policy_set_number(L, ctx, "total_running_requests", agg->total - agg->queued - agg->pending);
    ms_policy_set_number(L, ctx, "total_pending_async_requests", agg->pending);
    ms_policy_set_number(L, ctx, "capacity_adjusted_min_replicas", a->cfg.min_replicas);
    ms_policy_set_number(L, ctx, "capacity_adjusted_max_replicas", a->cfg.max_replicas);
    set_opt(L, ctx, "last_scale_up_time", a->last_scale_up);
    set_opt(L, ctx, "last_scale_down_time", a->last_scale_down);
    ms_policy_set_number(L, ctx, "current_time", now);
    fill_replicas(v, ctx, &a->win);
    if (a->watch) {
        ms_watch_push(a->watch, L);
        ms_policy_set_value(L, ctx, "redis");
    }
    as_window_push_aggregated(&a->win, L, now, a->cfg.look_back_period_s);
    ms_policy_set_value(L, ctx, "aggregated_metrics");
    ms_policy_set_nil(L, ctx, "raw_metrics"); /* rebuilt on first read (ctx_index) */
    fill_state(L, ctx, state, a);
    ms_policy_subtable(v, ctx, "config", 0, 18);
    fill_config(L, lua_gettop(L), &a->cfg);
    lua_pop(L, 1);
    if (a->gpus)
        fill_gpus(v, ctx, a);
    bind_ctx(v->kind_data, lua_topointer(L, ctx), a, now);
}

int as_policy_call(ms_policy_t *p, int nargs, int nres)
{
    int rc = ms_policy_call(p, nargs, nres, 0);
    ((as_version_t *)ms_policy_current(p)->kind_data)->nbind = 0;
    return rc;
}

int as_check_target(lua_State *L, int idx, double *out)
{
    if (lua_type(L, idx) != LUA_TNUMBER)
        return -1;
    double v = lua_tonumber(L, idx);
    if (!isfinite(v) || v < 0)
        return -1;
    *out = v;
    return 0;
}

/* ---- deployment-level call ------------------------------------------------------------------- */

int as_run_deployment(ms_policy_t *p, ms_autoscaler_t *a, double now, int current_target,
                      const as_agg_t *agg, double *raw)
{
    lua_State *L = ms_policy_current(p)->L;
    int base = lua_gettop(L);
    ms_policy_push_fn(p, 0);
    ms_policy_push_state(p);
    if (!lua_istable(L, -1)) { /* the first tick: a state the policy may fill in place */
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        ms_policy_set_state(p);
    }
    int state = lua_gettop(L);
    as_ctx_push(p, a, now, current_target, agg, state);
    lua_remove(L, state);
    ms_policy_push_kwargs(p); /* nil without kwargs */
    if (as_policy_call(p, 2, 2) != 0)
        return -1;
    int rc = 0;
    const char *file = ms_policy_where(p, 0), *fn = ms_policy_fn_name(p, 0);
    if (as_check_target(L, -2, raw) != 0) {
        ms_policy_fail(p, "%s: %s returned %s as the target (want a finite number >= 0)", file, fn,
                       luaL_typename(L, -2));
        rc = -1;
    } else if (lua_istable(L, -1)) {
        lua_pushvalue(L, -1);
        ms_policy_set_state(p);
    } else if (!lua_isnil(L, -1)) {
        ms_policy_fail(p, "%s: %s returned %s as the state (want a table or nil)", file, fn,
                       luaL_typename(L, -1));
        rc = -1;
    }
    lua_settop(L, base);
    return rc;
}
