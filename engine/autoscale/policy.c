/*
 * policy: autoscaling policy scripts in their sandbox, and the ctx tables they receive.
 *
 * A policy file returns a table of functions; the configured one is called every tick with a
 * ctx (Ray Serve's AutoscalingContext as a table). The ctx tables are created once and refreshed
 * in place, as are their running_replicas and config subtables; raw_metrics is built only when a
 * policy reads it (through the ctx metatable), since it can hold a few hundred points per series.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "autoscale/internal.h"
#include "core/core.h"

/* ---- loading -------------------------------------------------------------------------------- */

char *as_builtin_path(void)
{
    const char *dir = getenv("MOONSERVE_LUA_DIR");
    if (!dir || !*dir)
        dir = MS_LUA_DIR;
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/autoscaling.lua", dir);
    return b.data;
}

static int read_file(const char *path, ms_buf_t *b, char **err)
{
    if (ms_read_file(path, b) == 0)
        return 0;
    ms_buf_t e = {0};
    ms_buf_appendf(&e, "%s: %s", path, strerror(errno));
    *err = e.data;
    return -1;
}

static int set_error(as_script_t *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int set_error(as_script_t *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->sb->err, sizeof s->sb->err, fmt, ap);
    va_end(ap);
    return -1;
}

/* Fetches module[name] (module on top) as a function ref: LUA_NOREF when absent, -1 when it is
 * something else than a function. */
static int ref_function(as_script_t *s, const char *name, int *ref)
{
    lua_State *L = s->sb->L;
    lua_getfield(L, -1, name);
    *ref = LUA_NOREF;
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        return set_error(s, "%s: '%s' must be a function", s->file, name);
    }
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Runs the chunk, finds the policy function and runs self_test when there is one. */
static int instantiate(as_script_t *s, const ms_buf_t *text)
{
    lua_State *L = s->sb->L;
    if (ms_sandbox_load(s->sb, text->data ? text->data : "", text->len, s->file) != 0 ||
        ms_sandbox_call(s->sb, 0, 1, (uint64_t)AS_INIT_BUDGET_US) != 0)
        return -1;
    if (!lua_istable(L, -1))
        return set_error(s, "%s: the chunk must return a table of functions, got %s", s->file,
                         luaL_typename(L, -1));
    int self_test;
    if (ref_function(s, s->attr, &s->fn_ref) != 0 || ref_function(s, "self_test", &self_test) != 0)
        return -1;
    if (s->fn_ref == LUA_NOREF)
        return set_error(s, "%s: the returned table has no function '%s'", s->file, s->attr);
    if (self_test == LUA_NOREF)
        return 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, self_test);
    luaL_unref(L, LUA_REGISTRYINDEX, self_test);
    return ms_sandbox_call(s->sb, 0, 0, (uint64_t)AS_INIT_BUDGET_US);
}

static int load_kwargs(as_script_t *s, json_t *kwargs)
{
    if (!kwargs)
        return 0;
    char *text = json_dumps(kwargs, JSON_ENCODE_ANY | JSON_COMPACT);
    int rc = ms_sandbox_push_json(s->sb, text);
    free(text);
    if (rc == 0)
        s->kwargs_ref = luaL_ref(s->sb->L, LUA_REGISTRYINDEX);
    return rc;
}

static int ctx_index(lua_State *L);

static void make_metatable(as_script_t *s)
{
    lua_State *L = s->sb->L;
    lua_createtable(L, 0, 2);
    lua_pushlightuserdata(L, s);
    lua_pushcclosure(L, ctx_index, 1);
    lua_setfield(L, -2, "__index");
    s->meta_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

as_script_t *as_script_load(const char *file, const char *attr, json_t *kwargs, size_t mem_limit,
                            char sha_out[65], char **err)
{
    ms_buf_t text = {0};
    if (read_file(file, &text, err) != 0) {
        ms_buf_free(&text);
        return NULL;
    }
    as_script_t *s = ms_calloc(1, sizeof *s);
    s->fn_ref = s->kwargs_ref = s->meta_ref = s->ctx_ref = s->state_ref = LUA_NOREF;
    s->file = ms_strdup(file);
    s->attr = ms_strdup(attr);
    s->version = 1;
    ms_sha256_hex(text.data ? text.data : "", text.len, s->sha256);
    if (sha_out)
        memcpy(sha_out, s->sha256, 65);
    s->sb = ms_sandbox_new(mem_limit, err);
    if (!s->sb) {
        ms_buf_free(&text);
        as_script_free(s);
        return NULL;
    }
    int rc = instantiate(s, &text);
    ms_buf_free(&text);
    if (rc == 0)
        rc = load_kwargs(s, kwargs);
    if (rc != 0) {
        *err = ms_strdup(s->sb->err);
        as_script_free(s);
        return NULL;
    }
    make_metatable(s);
    lua_settop(s->sb->L, MS_SANDBOX_HANDLER_SLOT);
    return s;
}

void as_script_free(as_script_t *s)
{
    if (!s)
        return;
    ms_sandbox_free(s->sb);
    free(s->bind);
    free(s->file);
    free(s->attr);
    free(s);
}

json_t *as_script_info(const as_script_t *s)
{
    return json_pack("{s:s, s:s, s:b, s:i, s:s, s:b, s:n}", "path", s->file, "function", s->attr,
                     "builtin", s->builtin, "version", s->version, "sha256", s->sha256, "ok", 1,
                     "error");
}

void as_script_hand_over(as_script_t *from, as_script_t *to)
{
    if (from->state_ref == LUA_NOREF)
        return;
    lua_rawgeti(from->sb->L, LUA_REGISTRYINDEX, from->state_ref);
    ms_sandbox_copy_value(from->sb->L, -1, to->sb->L);
    lua_pop(from->sb->L, 1);
    to->state_ref = luaL_ref(to->sb->L, LUA_REGISTRYINDEX);
}

/* ---- ctx ------------------------------------------------------------------------------------ */

static int ctx_index(lua_State *L)
{
    as_script_t *s = lua_touserdata(L, lua_upvalueindex(1));
    if (lua_type(L, 2) != LUA_TSTRING || strcmp(lua_tostring(L, 2), "raw_metrics") != 0)
        return 0;
    const void *ctx = lua_topointer(L, 1);
    for (size_t i = 0; i < s->nbind; i++) {
        if (s->bind[i].ctx != ctx)
            continue;
        const ms_autoscaler_t *a = s->bind[i].a;
        as_window_push_raw(&a->win, L, s->bind[i].now, a->cfg.look_back_period_s);
        lua_pushliteral(L, "raw_metrics");
        lua_pushvalue(L, -2);
        lua_rawset(L, 1); /* read once per tick; as_ctx_push clears it */
        return 1;
    }
    return 0; /* a ctx kept past its call: the window it described is gone */
}

int as_ctx_new(as_script_t *s)
{
    lua_State *L = s->sb->L;
    lua_createtable(L, 0, 24);
    lua_newtable(L);
    lua_setfield(L, -2, "running_replicas");
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->meta_ref);
    lua_setmetatable(L, -2);
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

static void set_num(lua_State *L, const char *k, double v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

/* Optional numbers (< 0 unset) become nil, as Ray's None. */
static void set_opt(lua_State *L, const char *k, double v)
{
    if (v < 0)
        lua_pushnil(L);
    else
        lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void push_config(lua_State *L, const ms_autoscaling_config_t *c)
{
    lua_createtable(L, 0, 18);
    set_num(L, "min_replicas", c->min_replicas);
    set_opt(L, "initial_replicas", c->initial_replicas);
    set_num(L, "max_replicas", c->max_replicas);
    set_num(L, "target_ongoing_requests", c->target_ongoing_requests);
    set_num(L, "metrics_interval_s", c->metrics_interval_s);
    set_num(L, "look_back_period_s", c->look_back_period_s);
    set_num(L, "smoothing_factor", c->smoothing_factor);
    set_opt(L, "upscale_smoothing_factor", c->upscale_smoothing_factor);
    set_opt(L, "downscale_smoothing_factor", c->downscale_smoothing_factor);
    set_opt(L, "upscaling_factor", c->upscaling_factor);
    set_opt(L, "downscaling_factor", c->downscaling_factor);
    set_num(L, "downscale_delay_s", c->downscale_delay_s);
    set_opt(L, "downscale_to_zero_delay_s", c->downscale_to_zero_delay_s);
    set_num(L, "upscale_delay_s", c->upscale_delay_s);
    set_str(L, "aggregation_function", c->aggregation_function ? c->aggregation_function : "mean");
    lua_pushboolean(L, c->dry_run);
    lua_setfield(L, -2, "dry_run");
    if (c->policy) {
        set_str(L, "policy_function", c->policy->path);
    }
}

/* ctx.running_replicas refilled in place; the tail left by a larger set is cleared. */
static void fill_replicas(lua_State *L, const as_window_t *w)
{
    lua_getfield(L, -1, "running_replicas");
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

static void fill_state(lua_State *L, int *state_ref, const ms_autoscaler_t *a)
{
    if (*state_ref == LUA_NOREF) {
        lua_newtable(L);
        *state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, *state_ref);
    /* The reserved key is ours: whatever a policy wrote there is overwritten. */
    if (a->decision_dir != 0)
        lua_pushnumber(L, a->decision_ts);
    else
        lua_pushnil(L);
    lua_setfield(L, -2, "__decision_timestamp");
    lua_setfield(L, -2, "policy_state");
}

void as_ctx_push(as_script_t *s, int ctx_ref, int *state_ref, const ms_autoscaler_t *a, double now,
                 int current_target, const as_agg_t *agg, int with_config)
{
    lua_State *L = s->sb->L;
    luaL_checkstack(L, 8, "ctx");
    lua_rawgeti(L, LUA_REGISTRYINDEX, ctx_ref);
    set_str(L, "deployment_name", a->deployment);
    set_str(L, "app_name", a->app);
    set_num(L, "current_num_replicas", a->win.running);
    set_num(L, "target_num_replicas", current_target);
    set_num(L, "total_num_requests", agg->total);
    set_num(L, "total_queued_requests", agg->queued);
    set_num(L, "total_running_requests", agg->total - agg->queued);
    set_num(L, "capacity_adjusted_min_replicas", a->cfg.min_replicas);
    set_num(L, "capacity_adjusted_max_replicas", a->cfg.max_replicas);
    set_opt(L, "last_scale_up_time", a->last_scale_up);
    set_opt(L, "last_scale_down_time", a->last_scale_down);
    set_num(L, "current_time", now);
    fill_replicas(L, &a->win);
    as_window_push_aggregated(&a->win, L, now, a->cfg.look_back_period_s);
    lua_setfield(L, -2, "aggregated_metrics");
    lua_pushnil(L);
    lua_setfield(L, -2, "raw_metrics"); /* rebuilt on first read (ctx_index) */
    fill_state(L, state_ref, a);
    if (with_config) {
        push_config(L, &a->cfg);
        lua_setfield(L, -2, "config");
    }
}

void as_bind_add(as_script_t *s, const void *ctx, const ms_autoscaler_t *a, double now)
{
    if (s->nbind == s->cap_bind) {
        s->cap_bind = s->cap_bind ? s->cap_bind * 2 : 4;
        s->bind = ms_realloc(s->bind, s->cap_bind * sizeof *s->bind);
    }
    s->bind[s->nbind++] = (as_bind_t){ctx, a, now};
}

int as_script_call(as_script_t *s, int nargs, int nres, double budget_us)
{
    int rc = ms_sandbox_call(s->sb, nargs, nres,
                             (uint64_t)(budget_us > 0 ? budget_us : AS_DEFAULT_BUDGET_US));
    s->nbind = 0;
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

/* ---- deployment-level call ------------------------------------------------------------------ */

int as_run_deployment(as_script_t *s, ms_autoscaler_t *a, double now, int current_target,
                      const as_agg_t *agg, double *raw, char *err, size_t errlen)
{
    lua_State *L = s->sb->L;
    int base = lua_gettop(L);
    int first = s->ctx_ref == LUA_NOREF;
    if (first)
        s->ctx_ref = as_ctx_new(s);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->fn_ref);
    as_ctx_push(s, s->ctx_ref, &s->state_ref, a, now, current_target, agg, first);
    as_bind_add(s, lua_topointer(L, -1), a, now);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->kwargs_ref); /* nil without kwargs */
    if (as_script_call(s, 2, 2, a->budget_us) != 0) {
        snprintf(err, errlen, "%s", s->sb->err);
        return -1;
    }
    int rc = 0;
    if (as_check_target(L, -2, raw) != 0) {
        snprintf(err, errlen, "%s: %s returned %s as the target (want a finite number >= 0)",
                 s->file, s->attr, luaL_typename(L, -2));
        rc = -1;
    } else if (lua_istable(L, -1)) {
        luaL_unref(L, LUA_REGISTRYINDEX, s->state_ref);
        lua_pushvalue(L, -1);
        s->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    } else if (!lua_isnil(L, -1)) {
        snprintf(err, errlen, "%s: %s returned %s as the state (want a table or nil)", s->file,
                 s->attr, luaL_typename(L, -1));
        rc = -1;
    }
    lua_settop(L, base);
    return rc;
}
