/*
 * app_policy: application-level autoscaling policies. One call sees every autoscaling deployment
 * of the application (ctxs keyed by deployment name) and answers a target per deployment; the
 * engine applies each deployment's own factors, bounds and delays on top. The per-deployment
 * ctx tables and policy_state live in this policy's sandbox and are reused across ticks.
 */
#include "autoscale/autoscale.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "autoscale/internal.h"
#include "core/core.h"

/* One deployment as this policy knows it. */
typedef struct app_entry {
    char *name;
    int ctx_ref;
    int state_ref;
    uint64_t serial; /* autoscaler whose config ctx.config holds; 0 = none yet */
} app_entry_t;

struct ms_app_policy {
    char *app;
    char *file, *attr;
    json_t *kwargs;
    int dry_run;
    double budget_us;
    size_t mem_limit;
    as_script_t *script;
    as_script_t *pending;
    char *reload_error;
    app_entry_t *e;
    size_t n;
    uint64_t failures;
    char last_error[512];
};

ms_app_policy_t *ms_app_policy_new(const char *app, const ms_config_lua_ref_t *fn, json_t *kwargs,
                                   int dry_run, double budget_us, size_t mem_limit, char **err)
{
    as_script_t *s = as_script_load(fn->file, fn->attr, kwargs, mem_limit, NULL, err);
    if (!s)
        return NULL;
    ms_app_policy_t *p = ms_calloc(1, sizeof *p);
    p->app = ms_strdup(app);
    p->file = ms_strdup(fn->file);
    p->attr = ms_strdup(fn->attr);
    p->kwargs = kwargs ? json_deep_copy(kwargs) : NULL;
    p->dry_run = dry_run;
    p->budget_us = budget_us;
    p->mem_limit = mem_limit;
    p->script = s;
    return p;
}

void ms_app_policy_free(ms_app_policy_t *p)
{
    if (!p)
        return;
    as_script_free(p->script);
    as_script_free(p->pending);
    for (size_t i = 0; i < p->n; i++)
        free(p->e[i].name);
    free(p->e);
    json_decref(p->kwargs);
    free(p->reload_error);
    free(p->app);
    free(p->file);
    free(p->attr);
    free(p);
}

static app_entry_t *entry(ms_app_policy_t *p, const char *name)
{
    for (size_t i = 0; i < p->n; i++)
        if (strcmp(p->e[i].name, name) == 0)
            return &p->e[i];
    p->e = ms_realloc(p->e, (p->n + 1) * sizeof *p->e);
    app_entry_t *e = &p->e[p->n++];
    *e = (app_entry_t){ms_strdup(name), LUA_NOREF, LUA_NOREF, 0};
    return e;
}

/* Pushes ctxs = {name = ctx} over the deployments, binding each ctx for raw_metrics. */
static void push_ctxs(ms_app_policy_t *p, double now, ms_autoscaler_t *const *deps,
                      const int *current_targets, size_t n, const as_agg_t *aggs)
{
    as_script_t *s = p->script;
    lua_State *L = s->sb->L;
    lua_createtable(L, 0, (int)n);
    for (size_t i = 0; i < n; i++) {
        app_entry_t *e = entry(p, deps[i]->deployment);
        if (e->ctx_ref == LUA_NOREF)
            e->ctx_ref = as_ctx_new(s);
        int rebind = e->serial != deps[i]->serial;
        e->serial = deps[i]->serial;
        as_ctx_push(s, e->ctx_ref, &e->state_ref, deps[i], now, current_targets[i], &aggs[i],
                    rebind);
        as_bind_add(s, lua_topointer(L, -1), deps[i], now);
        lua_setfield(L, -2, deps[i]->deployment);
    }
}

/* Reads the answer (targets at -2, states at -1) into raw[]/keep[] and stores the states.
 * Validates everything before storing anything, so a bad answer changes no state. */
static int read_answer(ms_app_policy_t *p, ms_autoscaler_t *const *deps, size_t n, double *raw,
                       int *keep, char *err, size_t errlen)
{
    lua_State *L = p->script->sb->L;
    const char *f = p->file, *fn = p->attr;
    if (!lua_istable(L, -2)) {
        snprintf(err, errlen, "%s: %s returned %s as the targets (want a table)", f, fn,
                 luaL_typename(L, -2));
        return -1;
    }
    if (!lua_isnil(L, -1) && !lua_istable(L, -1)) {
        snprintf(err, errlen, "%s: %s returned %s as the states (want a table or nil)", f, fn,
                 luaL_typename(L, -1));
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const char *name = deps[i]->deployment;
        lua_getfield(L, -2, name);
        keep[i] = lua_isnil(L, -1);
        int bad = !keep[i] && as_check_target(L, -1, &raw[i]) != 0;
        lua_pop(L, 1);
        if (bad) {
            snprintf(err, errlen, "%s: %s returned a bad target for '%s' (want a number >= 0)", f,
                     fn, name);
            return -1;
        }
        if (lua_istable(L, -1)) {
            lua_getfield(L, -1, name);
            bad = !lua_isnil(L, -1) && !lua_istable(L, -1);
            lua_pop(L, 1);
            if (bad) {
                snprintf(err, errlen, "%s: %s returned a bad state for '%s' (want a table)", f, fn,
                         name);
                return -1;
            }
        }
    }
    for (size_t i = 0; lua_istable(L, -1) && i < n; i++) {
        lua_getfield(L, -1, deps[i]->deployment);
        if (lua_istable(L, -1)) {
            app_entry_t *e = entry(p, deps[i]->deployment);
            luaL_unref(L, LUA_REGISTRYINDEX, e->state_ref);
            e->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        } else {
            lua_pop(L, 1);
        }
    }
    return 0;
}

static int run_app_policy(ms_app_policy_t *p, double now, ms_autoscaler_t *const *deps,
                          const int *current_targets, size_t n, const as_agg_t *aggs, double *raw,
                          int *keep, char *err, size_t errlen)
{
    as_script_t *s = p->script;
    lua_State *L = s->sb->L;
    int base = lua_gettop(L);
    luaL_checkstack(L, 8, "app policy");
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->fn_ref);
    push_ctxs(p, now, deps, current_targets, n, aggs);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->kwargs_ref);
    if (as_script_call(s, 2, 2, p->budget_us) != 0) {
        snprintf(err, errlen, "%s", s->sb->err);
        return -1;
    }
    int rc = read_answer(p, deps, n, raw, keep, err, errlen);
    lua_settop(L, base);
    return rc;
}

void ms_app_policy_decide(ms_app_policy_t *p, double now, ms_autoscaler_t *const *deps,
                          const int *current_targets, size_t n, ms_autoscale_decision_t *out)
{
    as_agg_t *aggs = ms_calloc(n ? n : 1, sizeof *aggs);
    double *raw = ms_calloc(n ? n : 1, sizeof *raw);
    int *keep = ms_calloc(n ? n : 1, sizeof *keep);
    for (size_t i = 0; i < n; i++)
        as_window_aggregate(&deps[i]->win, now, deps[i]->cfg.look_back_period_s,
                            deps[i]->cfg.aggregation_function, &aggs[i]);
    char err[512];
    int failed =
        run_app_policy(p, now, deps, current_targets, n, aggs, raw, keep, err, sizeof err) != 0;
    if (failed)
        as_note_failure(p->app, &p->failures, p->last_error, sizeof p->last_error, err);
    for (size_t i = 0; i < n; i++) {
        const char *note = keep[i] ? "left out by the application policy" : NULL;
        if (failed) {
            note = "application policy failed, built-in used";
            keep[i] = 0;
            if (as_builtin_raw(deps[i], now, current_targets[i], &aggs[i], &raw[i], err,
                               sizeof err) != 0) {
                keep[i] = 1;
                note = "application policy failed, target kept";
            }
        }
        as_finalize(deps[i], now, current_targets[i], raw[i], keep[i], p->dry_run, &aggs[i], note,
                    &out[i]);
    }
    free(aggs);
    free(raw);
    free(keep);
}

json_t *ms_app_policy_status(const ms_app_policy_t *p)
{
    json_t *st = json_object();
    json_object_set_new(st, "policy", as_script_info(p->script));
    json_object_set_new(st, "failures", json_integer((json_int_t)p->failures));
    json_object_set_new(st, "last_error",
                        p->last_error[0] ? json_string(p->last_error) : json_null());
    json_object_set_new(st, "reload_error",
                        p->reload_error ? json_string(p->reload_error) : json_null());
    json_object_set_new(st, "dry_run", json_boolean(p->dry_run));
    return st;
}

/* ---- hot reload ----------------------------------------------------------------------------- */

int ms_app_policy_reload_prepare(ms_app_policy_t *p, json_t **info)
{
    char sha[65] = "";
    char *err = NULL;
    as_script_free(p->pending);
    p->pending = as_script_load(p->file, p->attr, p->kwargs, p->mem_limit, sha, &err);
    free(p->reload_error);
    p->reload_error = err;
    if (!p->pending) {
        if (info)
            *info =
                json_pack("{s:s, s:s, s:i, s:s, s:b, s:s}", "path", p->file, "function", p->attr,
                          "version", p->script->version, "sha256", sha, "ok", 0, "error", err);
        return -1;
    }
    p->pending->version = p->script->version + 1;
    if (info)
        *info = as_script_info(p->pending);
    return 0;
}

/* Per-deployment states move to the new sandbox; the ctx tables are rebuilt there. */
void ms_app_policy_reload_commit(ms_app_policy_t *p)
{
    if (!p->pending)
        return;
    lua_State *from = p->script->sb->L, *to = p->pending->sb->L;
    for (size_t i = 0; i < p->n; i++) {
        app_entry_t *e = &p->e[i];
        if (e->state_ref != LUA_NOREF) {
            lua_rawgeti(from, LUA_REGISTRYINDEX, e->state_ref);
            ms_sandbox_copy_value(from, -1, to);
            lua_pop(from, 1);
            e->state_ref = luaL_ref(to, LUA_REGISTRYINDEX);
        }
        e->ctx_ref = LUA_NOREF;
        e->serial = 0;
    }
    as_script_free(p->script);
    p->script = p->pending;
    p->pending = NULL;
}

void ms_app_policy_reload_abort(ms_app_policy_t *p)
{
    as_script_free(p->pending);
    p->pending = NULL;
}
