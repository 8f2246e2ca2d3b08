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

struct ms_app_policy {
    char *app;
    int dry_run;
    ms_policy_t *script;
};

ms_app_policy_t *ms_app_policy_new(const char *app, const ms_config_lua_ref_t *fn, json_t *kwargs,
                                   int dry_run, double budget_us, size_t mem_limit, char **err)
{
    ms_policy_t *s = as_policy_load(&as_app_kind, fn->file, fn->attr, kwargs, mem_limit, budget_us,
                                    0, app, NULL, err);
    if (!s)
        return NULL;
    ms_app_policy_t *p = ms_calloc(1, sizeof *p);
    p->app = ms_strdup(app);
    p->dry_run = dry_run;
    p->script = s;
    return p;
}

void ms_app_policy_free(ms_app_policy_t *p)
{
    if (!p)
        return;
    ms_policy_free(p->script);
    free(p->app);
    free(p);
}

ms_policy_t *ms_app_policy_policy(ms_app_policy_t *p)
{
    return p->script;
}

/* The policy's states live in one table {deployment = state} (the core's state value, so a
 * reload hands all of them over at once). Pushes it, creating it on first use. */
static void push_states(ms_policy_t *s)
{
    lua_State *L = ms_policy_current(s)->L;
    ms_policy_push_state(s);
    if (lua_istable(L, -1))
        return;
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    ms_policy_set_state(s);
}

/* Pushes ctxs = {name = ctx} over the deployments (a fresh, protected table each call). */
static void push_ctxs(ms_app_policy_t *p, double now, ms_autoscaler_t *const *deps,
                      const int *current_targets, size_t n, const as_agg_t *aggs)
{
    ms_policy_version_t *v = ms_policy_current(p->script);
    lua_State *L = v->L;
    push_states(p->script);
    int states = lua_gettop(L);
    ms_policy_new_table(v, 0, (int)n);
    for (size_t i = 0; i < n; i++) {
        ms_policy_get(L, states, deps[i]->deployment);
        as_ctx_push(p->script, deps[i], now, current_targets[i], &aggs[i], lua_gettop(L));
        ms_policy_set_value(L, -3, deps[i]->deployment);
        lua_pop(L, 1); /* the state */
    }
    lua_remove(L, states);
}

/* Reads the answer (targets at -2, states at -1) into raw[]/keep[] and stores the states, with
 * raw reads only. Validates everything before storing anything, so a bad answer changes no
 * state. */
static int read_answer(ms_app_policy_t *p, ms_autoscaler_t *const *deps, size_t n, double *raw,
                       int *keep)
{
    ms_policy_t *s = p->script;
    lua_State *L = ms_policy_current(s)->L;
    const char *f = ms_policy_where(s, 0), *fn = ms_policy_fn_name(s, 0);
    int ti = lua_gettop(L) - 1, si = lua_gettop(L);
    if (!lua_istable(L, ti)) {
        ms_policy_fail(s, "%s: %s returned %s as the targets (want a table)", f, fn,
                       luaL_typename(L, ti));
        return -1;
    }
    if (!lua_isnil(L, si) && !lua_istable(L, si)) {
        ms_policy_fail(s, "%s: %s returned %s as the states (want a table or nil)", f, fn,
                       luaL_typename(L, si));
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const char *name = deps[i]->deployment;
        ms_policy_get(L, ti, name);
        keep[i] = lua_isnil(L, -1);
        int bad = !keep[i] && as_check_target(L, -1, &raw[i]) != 0;
        lua_pop(L, 1);
        if (bad) {
            ms_policy_fail(s, "%s: %s returned a bad target for '%s' (want a number >= 0)", f, fn,
                           name);
            return -1;
        }
        if (lua_istable(L, si)) {
            ms_policy_get(L, si, name);
            bad = !lua_isnil(L, -1) && !lua_istable(L, -1);
            lua_pop(L, 1);
            if (bad) {
                ms_policy_fail(s, "%s: %s returned a bad state for '%s' (want a table)", f, fn,
                               name);
                return -1;
            }
        }
    }
    if (!lua_istable(L, si))
        return 0;
    push_states(s);
    for (size_t i = 0; i < n; i++) {
        ms_policy_get(L, si, deps[i]->deployment);
        if (lua_istable(L, -1))
            ms_policy_set_value(L, -2, deps[i]->deployment);
        else
            lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return 0;
}

static int run_app_policy(ms_app_policy_t *p, double now, ms_autoscaler_t *const *deps,
                          const int *current_targets, size_t n, const as_agg_t *aggs, double *raw,
                          int *keep)
{
    ms_policy_t *s = p->script;
    lua_State *L = ms_policy_current(s)->L;
    int base = lua_gettop(L);
    luaL_checkstack(L, 8, "app policy");
    ms_policy_push_fn(s, 0);
    push_ctxs(p, now, deps, current_targets, n, aggs);
    ms_policy_push_kwargs(s);
    if (as_policy_call(s, 2, 2) != 0)
        return -1;
    int rc = read_answer(p, deps, n, raw, keep);
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
    int failed = run_app_policy(p, now, deps, current_targets, n, aggs, raw, keep) != 0;
    for (size_t i = 0; i < n; i++) {
        const char *note = keep[i] ? "left out by the application policy" : NULL;
        if (failed) {
            note = "application policy failed, built-in used";
            keep[i] = 0;
            if (as_builtin_raw(deps[i], now, current_targets[i], &aggs[i], &raw[i]) != 0) {
                keep[i] = 1;
                note = "application policy failed, target kept";
            }
        }
        as_finalize(deps[i], now, current_targets[i], raw[i], keep[i], p->dry_run, &aggs[i], note,
                    p->script, failed ? p->script : NULL, &out[i]);
        out[i].app_scope = 1;
    }
    free(aggs);
    free(raw);
    free(keep);
}

json_t *ms_app_policy_status(const ms_app_policy_t *p)
{
    return json_pack("{s:o, s:b}", "policy", ms_policy_info(p->script), "dry_run", p->dry_run);
}
