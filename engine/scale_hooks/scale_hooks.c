/*
 * scale_hooks: the external-scaling kind of policy script (engine/policy does loading, checks,
 * versions, failures and reload). A file returns a table of functions; the configured ones are
 * looked up once per load. A hook and a tick named in the same file are one policy script (one
 * sandbox), so the module's upvalues are common to both; in two files they are two.
 */
#include "scale_hooks/scale_hooks.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "core/core.h"
#include "policy/policy.h"

/* A judge runs once per scale request and a tick once a second: 10 ms is already generous for
 * a decision and short enough that a runaway script cannot stall the controller's loop. */
#define HK_DEFAULT_BUDGET_US 10000u

static const ms_policy_kind_t hook_kind = {
    .name = "scale_hook",
    .call_budget_us = HK_DEFAULT_BUDGET_US,
    .fallback = "the request is accepted (a tick changes nothing)",
};

struct ms_scale_hook {
    char *app;
    ms_config_lua_ref_t *hook, *tick; /* own copies; NULL when not configured */
    double interval_s;
    ms_policy_t *hp, *tp; /* scripts of the hook and the tick; the same one for one file */
    int hfn, tfn;         /* the function's index in its script */
    double last_tick;     /* < 0: never */
    uint64_t accepted, clamped, refused, ticks;
    ms_watch_t *watch; /* ctx.redis / req.redis when external_scaler.redis_url is set */
};

void ms_scale_hook_set_watch(ms_scale_hook_t *h, ms_watch_t *w)
{
    h->watch = w;
}

/* t.redis (raw, like every field C writes), when the application has a redis_url. */
static void set_redis(ms_scale_hook_t *h, lua_State *L, int t)
{
    if (!h->watch)
        return;
    ms_watch_push(h->watch, L);
    ms_policy_set_value(L, t, "redis");
}

static int same_file(const ms_config_lua_ref_t *a, const ms_config_lua_ref_t *b)
{
    return a && b && strcmp(a->file, b->file) == 0;
}

static ms_policy_t *load_script(ms_scale_hook_t *h, const ms_config_lua_ref_t *r, const char *fn2,
                                const char *role, json_t *kwargs, double budget_us,
                                size_t mem_limit, char **err)
{
    ms_policy_spec_t spec = {
        .kind = &hook_kind,
        .file = r->file,
        .fns = {r->attr, fn2},
        .required = fn2 ? 3u : 1u,
        .kwargs = kwargs,
        .budget_us = budget_us > 0 ? (uint64_t)budget_us : 0,
        .mem_limit = mem_limit,
        .application = h->app,
        .role = role,
    };
    return ms_policy_new(&spec, err);
}

ms_scale_hook_t *ms_scale_hook_new(const char *app, const ms_config_lua_ref_t *hook,
                                   const ms_config_lua_ref_t *tick, json_t *kwargs,
                                   double tick_interval_s, double budget_us, size_t mem_limit,
                                   char **err)
{
    if (!hook && !tick) {
        *err = ms_strdup("external_scaler needs at least one of 'hook' or 'tick'");
        return NULL;
    }
    ms_scale_hook_t *h = ms_calloc(1, sizeof *h);
    h->app = ms_strdup(app ? app : "");
    h->hook = ms_config_lua_ref_copy(hook);
    h->tick = ms_config_lua_ref_copy(tick);
    h->interval_s = tick_interval_s > 0 ? tick_interval_s : 1.0;
    h->last_tick = -1;
    int ok = 1;
    if (same_file(hook, tick)) {
        h->hp = h->tp =
            load_script(h, hook, tick->attr, "hook+tick", kwargs, budget_us, mem_limit, err);
        h->tfn = 1;
        ok = h->hp != NULL;
    } else {
        if (hook)
            ok = (h->hp = load_script(h, hook, NULL, "hook", kwargs, budget_us, mem_limit, err)) !=
                 NULL;
        if (ok && tick)
            ok = (h->tp = load_script(h, tick, NULL, "tick", kwargs, budget_us, mem_limit, err)) !=
                 NULL;
    }
    if (!ok) {
        ms_scale_hook_free(h);
        return NULL;
    }
    return h;
}

ms_scale_hook_t *ms_scale_hook_from_config(const ms_app_config_t *app, double budget_us,
                                           size_t mem_limit, char **err)
{
    *err = NULL;
    if (!app->scale_hook && !app->scale_tick)
        return NULL;
    return ms_scale_hook_new(app->name, app->scale_hook, app->scale_tick, app->scale_hook_kwargs,
                             app->scale_tick_interval_s, budget_us, mem_limit, err);
}

void ms_scale_hook_free(ms_scale_hook_t *h)
{
    if (!h)
        return;
    if (h->tp != h->hp)
        ms_policy_free(h->tp);
    ms_policy_free(h->hp);
    ms_config_lua_ref_free(h->hook);
    ms_config_lua_ref_free(h->tick);
    free(h->app);
    free(h);
}

int ms_scale_hook_has_tick(const ms_scale_hook_t *h)
{
    return h && h->tp != NULL;
}

size_t ms_scale_hook_policies(ms_scale_hook_t *h, struct ms_policy **out)
{
    size_t n = 0;
    if (h->hp)
        out[n++] = h->hp;
    if (h->tp && h->tp != h->hp)
        out[n++] = h->tp;
    return n;
}

/* ---- answers ----------------------------------------------------------------------------------
 */

/* An integer count in [0, INT_MAX] at idx (a Lua number without a fraction). */
static int check_count(lua_State *L, int idx, long long *out)
{
    if (lua_type(L, idx) != LUA_TNUMBER)
        return -1;
    double v = lua_tonumber(L, idx);
    if (!isfinite(v) || v < 0 || v > INT_MAX || v != floor(v))
        return -1;
    *out = (long long)v;
    return 0;
}

/* ---- judge ----------------------------------------------------------------------------------- */

/* Reads the answer at base+1..base+3 (verdict, count or reason, reason). 0 with the verdict, or
 * -1 with the failure counted. Raw reads only: no script code runs. */
static int read_verdict(ms_scale_hook_t *h, lua_State *L, int base, int current_target,
                        ms_hook_verdict_t *v, long long *target, char *reason, size_t cap)
{
    ms_policy_t *p = h->hp;
    const char *f = ms_policy_where(p, h->hfn), *fn = h->hook->attr;
    const char *verdict = lua_type(L, base + 1) == LUA_TSTRING ? lua_tostring(L, base + 1) : NULL;
    if (verdict && strcmp(verdict, "accept") == 0) {
        *v = MS_HOOK_ACCEPT;
        return 0;
    }
    if (verdict && strcmp(verdict, "clamp") == 0) {
        int ridx = base + 3;
        if (check_count(L, base + 2, target) != 0) {
            ms_policy_fail(p,
                           "%s: %s answered \"clamp\" with %s as the count (want an integer >= 0)",
                           f, fn, luaL_typename(L, base + 2));
            return -1;
        }
        if (!lua_isnil(L, ridx) && lua_type(L, ridx) != LUA_TSTRING) {
            ms_policy_fail(p, "%s: %s answered \"clamp\" with %s as the reason (want a string)", f,
                           fn, luaL_typename(L, ridx));
            return -1;
        }
        *v = MS_HOOK_CLAMP;
        if (lua_isnil(L, ridx)) {
            ms_policy_format_text(reason, cap, "clamped to %lld by the external scaling hook",
                                  *target);
        } else {
            size_t n;
            const char *s = lua_tolstring(L, ridx, &n);
            ms_policy_clean_text(reason, cap, s, n);
        }
        return 0;
    }
    if (verdict && strcmp(verdict, "refuse") == 0) {
        int ridx = base + 2;
        if (lua_type(L, ridx) != LUA_TSTRING || lua_objlen(L, ridx) == 0) {
            /* The reason is what the caller of the API gets back: a refusal must explain. */
            ms_policy_fail(
                p, "%s: %s answered \"refuse\" with %s as the reason (want a non-empty string)", f,
                fn, luaL_typename(L, ridx));
            return -1;
        }
        size_t n;
        const char *s = lua_tolstring(L, ridx, &n);
        ms_policy_clean_text(reason, cap, s, n);
        *v = MS_HOOK_REFUSE;
        *target = current_target;
        return 0;
    }
    char got[64];
    if (verdict)
        snprintf(got, sizeof got, "\"%.40s\"", verdict);
    else
        ms_copy_str(got, sizeof got, luaL_typename(L, base + 1));
    ms_policy_fail(p, "%s: %s answered %s (want \"accept\", \"clamp\" or \"refuse\")", f, fn, got);
    return -1;
}

ms_hook_verdict_t ms_scale_hook_judge(ms_scale_hook_t *h, const char *deployment,
                                      long long requested, int current_target, int running_replicas,
                                      double now, long long *target_out, char *reason,
                                      size_t reason_cap)
{
    *target_out = requested;
    if (reason_cap)
        reason[0] = '\0';
    if (!h || !h->hp)
        return MS_HOOK_ACCEPT;
    ms_policy_version_t *pv = ms_policy_current(h->hp);
    lua_State *L = pv->L;
    int base = lua_gettop(L);
    luaL_checkstack(L, 8, "scale hook");
    ms_policy_push_fn(h->hp, h->hfn);
    ms_policy_new_table(pv, 0, 6); /* a fresh req each call: a hook may keep it, nothing aliases */
    int req = lua_gettop(L);
    ms_policy_set_string(L, req, "application", h->app);
    ms_policy_set_string(L, req, "deployment", deployment);
    ms_policy_set_number(L, req, "target_num_replicas", (double)requested);
    ms_policy_set_number(L, req, "current_target", current_target);
    ms_policy_set_number(L, req, "running_replicas", running_replicas);
    ms_policy_set_number(L, req, "time", now);
    set_redis(h, L, req);
    ms_policy_push_kwargs(h->hp); /* nil without kwargs */
    ms_hook_verdict_t v = MS_HOOK_ACCEPT;
    long long target = requested;
    int rc = ms_policy_call(h->hp, 2, 3, 0);
    if (rc == 0)
        rc = read_verdict(h, L, base, current_target, &v, &target, reason, reason_cap);
    lua_settop(L, base);
    if (rc != 0) {
        h->accepted++;
        ms_policy_format_text(reason, reason_cap, "accepted: the external scaling hook failed (%s)",
                              ms_policy_last_error(h->hp));
        return MS_HOOK_ACCEPT;
    }
    *target_out = target;
    if (v == MS_HOOK_ACCEPT)
        h->accepted++;
    else if (v == MS_HOOK_CLAMP)
        h->clamped++;
    else
        h->refused++;
    return v;
}

/* ---- tick ------------------------------------------------------------------------------------ */

/* ctx.deployments from the caller's state, skipping malformed entries. */
static void push_deployments(ms_policy_version_t *pv, json_t *state)
{
    lua_State *L = pv->L;
    ms_policy_new_table(pv, 0, (int)json_object_size(state));
    const char *name;
    json_t *d;
    json_object_foreach(state, name, d)
    {
        if (!json_is_object(d))
            continue;
        ms_policy_new_table(pv, 0, 2);
        ms_policy_set_number(L, -1, "current_target",
                             json_number_value(json_object_get(d, "current_target")));
        ms_policy_set_number(L, -1, "running_replicas",
                             json_number_value(json_object_get(d, "running_replicas")));
        ms_policy_set_value(L, -2, name);
    }
}

/* Validates the answer (targets at -2, new state at -1) completely before using any of it, then
 * builds the changes. NULL with the failure counted on a bad answer; an empty object when nothing
 * changes. lua_next is a raw traversal: no script code runs. */
static json_t *read_targets(ms_scale_hook_t *h, lua_State *L, json_t *state)
{
    ms_policy_t *p = h->tp;
    const char *f = ms_policy_where(p, h->tfn), *fn = h->tick->attr;
    int ti = lua_gettop(L) - 1, si = lua_gettop(L);
    if (!lua_isnil(L, ti) && !lua_istable(L, ti)) {
        ms_policy_fail(p, "%s: %s returned %s as the targets (want a table or nil)", f, fn,
                       luaL_typename(L, ti));
        return NULL;
    }
    if (!lua_isnil(L, si) && !lua_istable(L, si)) {
        ms_policy_fail(p, "%s: %s returned %s as the state (want a table or nil)", f, fn,
                       luaL_typename(L, si));
        return NULL;
    }
    json_t *out = json_object();
    if (lua_istable(L, ti)) {
        lua_pushnil(L);
        while (lua_next(L, ti)) {
            long long n = -1; /* stays < 0 unless a valid count */
            const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
            json_t *d = name ? json_object_get(state, name) : NULL;
            if (!name)
                ms_policy_fail(p, "%s: %s returned a key that is not a deployment name (%s)", f, fn,
                               luaL_typename(L, -2));
            else if (!d)
                ms_policy_fail(p, "%s: %s returned a target for unknown deployment '%s'", f, fn,
                               name);
            else if (check_count(L, -1, &n) != 0)
                ms_policy_fail(p, "%s: %s returned a bad target for '%s' (want an integer >= 0)", f,
                               fn, name);
            if (!name || !d || n < 0) {
                lua_pop(L, 2);
                json_decref(out);
                return NULL;
            }
            if (n != (long long)json_number_value(json_object_get(d, "current_target")))
                json_object_set_new(out, name, json_integer(n));
            lua_pop(L, 1);
        }
    }
    if (lua_istable(L, si)) {
        lua_pushvalue(L, si);
        ms_policy_set_state(p);
    }
    return out;
}

json_t *ms_scale_hook_tick(ms_scale_hook_t *h, double now, json_t *state)
{
    if (!h || !h->tp)
        return NULL;
    if (h->last_tick >= 0 && now - h->last_tick < h->interval_s && now >= h->last_tick)
        return NULL; /* not due; a clock stepping backwards makes it due at once */
    h->last_tick = now;
    h->ticks++;
    ms_policy_version_t *pv = ms_policy_current(h->tp);
    lua_State *L = pv->L;
    int base = lua_gettop(L);
    luaL_checkstack(L, 10, "scale tick");
    ms_policy_push_state(h->tp);
    if (!lua_istable(L, -1)) { /* the first tick: a state the tick may fill in place */
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        ms_policy_set_state(h->tp);
    }
    int st = lua_gettop(L);
    ms_policy_push_fn(h->tp, h->tfn);
    ms_policy_new_table(pv, 0, 4);
    int ctx = lua_gettop(L);
    ms_policy_set_string(L, ctx, "application", h->app);
    ms_policy_set_number(L, ctx, "time", now);
    push_deployments(pv, state);
    ms_policy_set_value(L, ctx, "deployments");
    lua_pushvalue(L, st);
    ms_policy_set_value(L, ctx, "state");
    set_redis(h, L, ctx);
    lua_remove(L, st);
    ms_policy_push_kwargs(h->tp);
    json_t *out = NULL;
    if (ms_policy_call(h->tp, 2, 2, 0) == 0)
        out = read_targets(h, L, state);
    lua_settop(L, base);
    if (out && json_object_size(out) == 0) {
        json_decref(out);
        out = NULL;
    }
    return out;
}

/* ---- status ---------------------------------------------------------------------------------- */

/* The script object of one role; a file holding both functions names the role's own. */
static json_t *role_info(const ms_policy_t *p, const ms_config_lua_ref_t *r)
{
    if (!p)
        return json_null();
    json_t *j = ms_policy_info(p);
    json_object_set_new(j, "function", json_string(r->attr));
    return j;
}

json_t *ms_scale_hook_status(const ms_scale_hook_t *h)
{
    json_t *st = json_object();
    json_object_set_new(st, "hook", role_info(h->hp, h->hook));
    json_object_set_new(st, "tick", role_info(h->tp, h->tick));
    json_object_set_new(st, "tick_interval_s", json_real(h->interval_s));
    json_object_set_new(st, "last_tick", h->last_tick >= 0 ? json_real(h->last_tick) : json_null());
    json_object_set_new(st, "accepted", json_integer((json_int_t)h->accepted));
    json_object_set_new(st, "clamped", json_integer((json_int_t)h->clamped));
    json_object_set_new(st, "refused", json_integer((json_int_t)h->refused));
    json_object_set_new(st, "ticks", json_integer((json_int_t)h->ticks));
    return st;
}
