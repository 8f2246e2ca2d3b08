/*
 * scale_hooks: external-scaling hook scripts in their sandboxes (see scale_hooks.h). A file returns
 * a table of functions; the configured ones are fetched once per load. A hook and a tick named in
 * the same file share one sandbox ("unit"), so the module's upvalues are common to both; in two
 * files they get one each. Every call into Lua goes through ms_sandbox_call with the budget.
 */
#include "scale_hooks/scale_hooks.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "core/core.h"
#include "sandbox/sandbox.h"

/* A judge runs once per scale request and a tick once a second: 10 ms is already generous for
 * a decision and short enough that a runaway script cannot stall the controller's loop. */
#define HK_DEFAULT_BUDGET_US 10000.0
/* Loading a chunk and its self_test may build tables: a longer budget than one call's. */
#define HK_INIT_BUDGET_US 1000000.0

/* One loaded file: its sandbox and the functions the config names in it. */
typedef struct hk_unit {
    ms_sandbox_t *sb;
    char *file;
    int version;
    char sha256[65];
    int judge_ref;  /* LUA_NOREF: this unit does not judge */
    int tick_ref;   /* LUA_NOREF: this unit does not tick */
    int kwargs_ref; /* LUA_NOREF: no kwargs (pushes nil) */
    int state_ref;  /* ctx.state of the tick, kept across ticks; LUA_NOREF until first tick */
} hk_unit_t;

struct ms_scale_hook {
    char *app;
    ms_config_lua_ref_t *hook, *tick; /* own copies; NULL when not configured */
    json_t *kwargs;
    double interval_s;
    double budget_us;
    size_t mem_limit;
    hk_unit_t *hu, *tu;   /* units of the hook and the tick; the same pointer for one file */
    hk_unit_t *phu, *ptu; /* prepared by reload, not yet committed */
    char *reload_error;
    double last_tick; /* < 0: never */
    uint64_t failures, accepted, clamped, refused, ticks;
    char last_error[512];
};

/* Text from scripts made safe for JSON and logs (defined with the failure helpers below). */
static void copy_reason(char *out, size_t cap, const char *s, size_t n);

/* ---- loading -------------------------------------------------------------------------------- */

static char *fmt_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *fmt_err(const char *fmt, ...)
{
    ms_buf_t b = {0};
    va_list ap;
    va_start(ap, fmt);
    char tmp[1024];
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    ms_buf_append_str(&b, tmp);
    return b.data;
}

static int read_file(const char *path, ms_buf_t *b, char **err)
{
    if (ms_read_file(path, b) == 0)
        return 0;
    *err = fmt_err("%s: %s", path, strerror(errno));
    return -1;
}

static void unit_free(hk_unit_t *u)
{
    if (!u)
        return;
    ms_sandbox_free(u->sb);
    free(u->file);
    free(u);
}

/* Fetches module[name] (module on top) as a function ref. A missing or non-function value is an
 * error: the config named it, so the file must provide it. */
static int ref_function(hk_unit_t *u, const char *name, int *ref, char **err)
{
    lua_State *L = u->sb->L;
    lua_getfield(L, -1, name);
    if (!lua_isfunction(L, -1)) {
        *err = lua_isnil(L, -1)
                   ? fmt_err("%s: the returned table has no function '%s'", u->file, name)
                   : fmt_err("%s: '%s' must be a function, got %s", u->file, name,
                             luaL_typename(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Runs the chunk, fetches the named functions, runs self_test when exported, pushes kwargs. */
static int instantiate(hk_unit_t *u, const ms_buf_t *text, const char *judge, const char *tick,
                       json_t *kwargs, char **err)
{
    lua_State *L = u->sb->L;
    if (ms_sandbox_load(u->sb, text->data ? text->data : "", text->len, u->file) != 0 ||
        ms_sandbox_call(u->sb, 0, 1, (uint64_t)HK_INIT_BUDGET_US) != 0) {
        *err = ms_strdup(u->sb->err);
        return -1;
    }
    if (!lua_istable(L, -1)) {
        *err = fmt_err("%s: the chunk must return a table of functions, got %s", u->file,
                       luaL_typename(L, -1));
        return -1;
    }
    if ((judge && ref_function(u, judge, &u->judge_ref, err) != 0) ||
        (tick && ref_function(u, tick, &u->tick_ref, err) != 0))
        return -1;
    lua_getfield(L, -1, "self_test");
    if (!lua_isnil(L, -1)) {
        if (!lua_isfunction(L, -1)) {
            *err = fmt_err("%s: 'self_test' must be a function, got %s", u->file,
                           luaL_typename(L, -1));
            return -1;
        }
        if (ms_sandbox_call(u->sb, 0, 0, (uint64_t)HK_INIT_BUDGET_US) != 0) {
            *err = fmt_err("%s (self_test)", u->sb->err);
            return -1;
        }
    } else {
        lua_pop(L, 1);
    }
    if (kwargs) {
        char *json = json_dumps(kwargs, JSON_ENCODE_ANY | JSON_COMPACT);
        int rc = ms_sandbox_push_json(u->sb, json);
        free(json);
        if (rc != 0) {
            *err = ms_strdup(u->sb->err);
            return -1;
        }
        u->kwargs_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return 0;
}

/* Loads `file` with the functions `judge` and/or `tick` (NULL: not from this file). NULL with
 * *err on failure; sha_out gets the content's hash whenever the file could be read. */
static hk_unit_t *unit_load(const char *file, const char *judge, const char *tick, json_t *kwargs,
                            size_t mem_limit, char sha_out[65], char **err)
{
    ms_buf_t text = {0};
    if (read_file(file, &text, err) != 0) {
        ms_buf_free(&text);
        return NULL;
    }
    hk_unit_t *u = ms_calloc(1, sizeof *u);
    u->judge_ref = u->tick_ref = u->kwargs_ref = u->state_ref = LUA_NOREF;
    u->file = ms_strdup(file);
    u->version = 1;
    ms_sha256_hex(text.data ? text.data : "", text.len, u->sha256);
    memcpy(sha_out, u->sha256, 65);
    u->sb = ms_sandbox_new(mem_limit, err);
    int rc = u->sb ? instantiate(u, &text, judge, tick, kwargs, err) : -1;
    ms_buf_free(&text);
    if (rc != 0) {
        unit_free(u);
        return NULL;
    }
    lua_settop(u->sb->L, MS_SANDBOX_HANDLER_SLOT);
    return u;
}

static int same_file(const ms_config_lua_ref_t *a, const ms_config_lua_ref_t *b)
{
    return a && b && strcmp(a->file, b->file) == 0;
}

static json_t *ref_info(const char *role, const ms_config_lua_ref_t *r, const hk_unit_t *u,
                        int version, const char *sha, const char *err)
{
    return json_pack("{s:s, s:s, s:s, s:i, s:s, s:b, s:s?}", "role", role, "path", r->file,
                     "function", r->attr, "version", u ? u->version : version, "sha256",
                     u ? u->sha256 : sha, "ok", err == NULL, "error", err);
}

/* Loads the units of h's refs into *hu and *tu. On failure both are NULL and *err is set. `info`
 * (optional) gets one entry per role; `old_hu`/`old_tu` give the versions to count from. */
static int load_units(ms_scale_hook_t *h, hk_unit_t **hu, hk_unit_t **tu, json_t *info,
                      const hk_unit_t *old_hu, const hk_unit_t *old_tu, char **err)
{
    char sha_h[65] = "", sha_t[65] = "";
    char *err_h = NULL, *err_t = NULL;
    *hu = *tu = NULL;
    if (same_file(h->hook, h->tick)) {
        *hu = *tu = unit_load(h->hook->file, h->hook->attr, h->tick->attr, h->kwargs, h->mem_limit,
                              sha_h, &err_h);
        memcpy(sha_t, sha_h, sizeof sha_t);
        err_t = err_h ? ms_strdup(err_h) : NULL;
    } else {
        if (h->hook)
            *hu = unit_load(h->hook->file, h->hook->attr, NULL, h->kwargs, h->mem_limit, sha_h,
                            &err_h);
        if (h->tick)
            *tu = unit_load(h->tick->file, NULL, h->tick->attr, h->kwargs, h->mem_limit, sha_t,
                            &err_t);
    }
    if (*hu && old_hu)
        (*hu)->version = old_hu->version + 1;
    if (*tu && old_tu && *tu != *hu)
        (*tu)->version = old_tu->version + 1;
    /* Messages quote the script's text, which may not be UTF-8; they end up in JSON. */
    if (err_h)
        copy_reason(err_h, strlen(err_h) + 1, err_h, strlen(err_h));
    if (err_t)
        copy_reason(err_t, strlen(err_t) + 1, err_t, strlen(err_t));
    if (info && h->hook)
        json_array_append_new(
            info, ref_info("hook", h->hook, *hu, old_hu ? old_hu->version : 0, sha_h, err_h));
    if (info && h->tick)
        json_array_append_new(
            info, ref_info("tick", h->tick, *tu, old_tu ? old_tu->version : 0, sha_t, err_t));
    int failed = err_h || err_t;
    if (failed) {
        *err = ms_strdup(err_h ? err_h : err_t);
        if (*tu != *hu)
            unit_free(*tu);
        unit_free(*hu);
        *hu = *tu = NULL;
    }
    free(err_h);
    free(err_t);
    return failed ? -1 : 0;
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
    h->kwargs = kwargs ? json_deep_copy(kwargs) : NULL;
    h->interval_s = tick_interval_s > 0 ? tick_interval_s : 1.0;
    h->budget_us = budget_us > 0 ? budget_us : HK_DEFAULT_BUDGET_US;
    h->mem_limit = mem_limit;
    h->last_tick = -1;
    if (load_units(h, &h->hu, &h->tu, NULL, NULL, NULL, err) != 0) {
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

static void free_units(hk_unit_t *hu, hk_unit_t *tu)
{
    if (tu != hu)
        unit_free(tu);
    unit_free(hu);
}

void ms_scale_hook_free(ms_scale_hook_t *h)
{
    if (!h)
        return;
    free_units(h->hu, h->tu);
    free_units(h->phu, h->ptu);
    ms_config_lua_ref_free(h->hook);
    ms_config_lua_ref_free(h->tick);
    json_decref(h->kwargs);
    free(h->reload_error);
    free(h->app);
    free(h);
}

int ms_scale_hook_has_tick(const ms_scale_hook_t *h)
{
    return h && h->tu != NULL;
}

/* ---- failures and reasons ------------------------------------------------------------------- */

/* Counts a failure, logging only a changed message so a broken script cannot flood the log. */
static void note_failure(ms_scale_hook_t *h, const char *role, const char *msg)
{
    char clean[sizeof h->last_error];
    copy_reason(clean, sizeof clean, msg, strlen(msg)); /* status must stay valid JSON */
    h->failures++;
    if (strcmp(h->last_error, clean) != 0) {
        memcpy(h->last_error, clean, sizeof clean);
        ms_warn("external scaling %s of %s failed%s: %s", role, h->app,
                strcmp(role, "hook") == 0 ? ", request accepted" : ", nothing changed", clean);
    }
}

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 when invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    size_t len = s[0] < 0x80         ? 1
                 : (s[0] >> 5) == 6  ? 2
                 : (s[0] >> 4) == 14 ? 3
                 : (s[0] >> 3) == 30 ? 4
                                     : 0;
    if (len == 0 || len > n || (len == 2 && s[0] < 0xc2) || (len == 4 && s[0] > 0xf4))
        return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    if (len == 3 && ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] >= 0xa0)))
        return 0; /* overlong, or a UTF-16 surrogate */
    if (len == 4 && ((s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] >= 0x90)))
        return 0;
    return len;
}

/* Copies a script's text into out: the caller puts it in a JSON body and a log line, so bytes
 * that are not UTF-8 become '?', control characters become spaces, and a cut never splits a
 * character. The output is never longer than the input, so out may be s (in place). */
static void copy_reason(char *out, size_t cap, const char *s, size_t n)
{
    if (cap == 0)
        return;
    size_t o = 0;
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t len = utf8_len(p + i, n - i);
        if (o + (len ? len : 1) >= cap)
            break;
        if (len == 0) {
            out[o++] = '?';
            i++;
        } else if (len == 1 && (p[i] < 0x20 || p[i] == 0x7f)) {
            out[o++] = ' ';
            i++;
        } else {
            memmove(out + o, p + i, len);
            o += len;
            i += len;
        }
    }
    out[o] = '\0';
}

static void set_reason(char *out, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_reason(char *out, size_t cap, const char *fmt, ...)
{
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    copy_reason(out, cap, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

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

/* ---- judge ---------------------------------------------------------------------------------- */

static void set_num(lua_State *L, const char *k, double v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

/* Reads the answer at base+1..base+3 (verdict, count or reason, reason). 0 with the verdict, or
 * -1 with the problem in err. */
static int read_verdict(ms_scale_hook_t *h, lua_State *L, int base, int current_target,
                        ms_hook_verdict_t *v, long long *target, char *reason, size_t cap,
                        char *err, size_t errlen)
{
    const char *f = h->hook->file, *fn = h->hook->attr;
    const char *verdict = lua_type(L, base + 1) == LUA_TSTRING ? lua_tostring(L, base + 1) : NULL;
    if (verdict && strcmp(verdict, "accept") == 0) {
        *v = MS_HOOK_ACCEPT;
        return 0;
    }
    if (verdict && strcmp(verdict, "clamp") == 0) {
        int ridx = base + 3;
        if (check_count(L, base + 2, target) != 0) {
            snprintf(err, errlen,
                     "%s: %s answered \"clamp\" with %s as the count (want an integer >= 0)", f, fn,
                     luaL_typename(L, base + 2));
            return -1;
        }
        if (!lua_isnil(L, ridx) && lua_type(L, ridx) != LUA_TSTRING) {
            snprintf(err, errlen, "%s: %s answered \"clamp\" with %s as the reason (want a string)",
                     f, fn, luaL_typename(L, ridx));
            return -1;
        }
        *v = MS_HOOK_CLAMP;
        if (lua_isnil(L, ridx)) {
            set_reason(reason, cap, "clamped to %lld by the external scaling hook", *target);
        } else {
            size_t n;
            const char *s = lua_tolstring(L, ridx, &n);
            copy_reason(reason, cap, s, n);
        }
        return 0;
    }
    if (verdict && strcmp(verdict, "refuse") == 0) {
        int ridx = base + 2;
        if (lua_type(L, ridx) != LUA_TSTRING || lua_objlen(L, ridx) == 0) {
            /* The reason is what the caller of the API gets back: a refusal must explain. */
            snprintf(err, errlen,
                     "%s: %s answered \"refuse\" with %s as the reason (want a non-empty string)",
                     f, fn, luaL_typename(L, ridx));
            return -1;
        }
        size_t n;
        const char *s = lua_tolstring(L, ridx, &n);
        copy_reason(reason, cap, s, n);
        *v = MS_HOOK_REFUSE;
        *target = current_target;
        return 0;
    }
    char got[64];
    if (verdict)
        snprintf(got, sizeof got, "\"%.40s\"", verdict);
    else
        snprintf(got, sizeof got, "%s", luaL_typename(L, base + 1));
    snprintf(err, errlen, "%s: %s answered %s (want \"accept\", \"clamp\" or \"refuse\")", f, fn,
             got);
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
    if (!h || !h->hu)
        return MS_HOOK_ACCEPT;
    hk_unit_t *u = h->hu;
    lua_State *L = u->sb->L;
    int base = lua_gettop(L);
    luaL_checkstack(L, 8, "scale hook");
    lua_rawgeti(L, LUA_REGISTRYINDEX, u->judge_ref);
    lua_createtable(L, 0, 6); /* a fresh req each call: a hook may keep it, nothing aliases */
    set_str(L, "application", h->app);
    set_str(L, "deployment", deployment);
    set_num(L, "target_num_replicas", (double)requested);
    set_num(L, "current_target", current_target);
    set_num(L, "running_replicas", running_replicas);
    set_num(L, "time", now);
    lua_rawgeti(L, LUA_REGISTRYINDEX, u->kwargs_ref); /* nil without kwargs */
    char err[512];
    ms_hook_verdict_t v = MS_HOOK_ACCEPT;
    long long target = requested;
    int rc = -1;
    if (ms_sandbox_call(u->sb, 2, 3, (uint64_t)h->budget_us) != 0)
        snprintf(err, sizeof err, "%s", u->sb->err);
    else
        rc = read_verdict(h, L, base, current_target, &v, &target, reason, reason_cap, err,
                          sizeof err);
    lua_settop(L, base);
    if (rc != 0) {
        note_failure(h, "hook", err);
        h->accepted++;
        set_reason(reason, reason_cap, "accepted: the external scaling hook failed (%s)", err);
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

/* ---- tick ----------------------------------------------------------------------------------- */

/* ctx.deployments from the caller's state, skipping malformed entries. */
static void push_deployments(lua_State *L, json_t *state)
{
    lua_createtable(L, 0, (int)json_object_size(state));
    const char *name;
    json_t *d;
    json_object_foreach(state, name, d)
    {
        if (!json_is_object(d))
            continue;
        lua_createtable(L, 0, 2);
        set_num(L, "current_target", json_number_value(json_object_get(d, "current_target")));
        set_num(L, "running_replicas", json_number_value(json_object_get(d, "running_replicas")));
        lua_setfield(L, -2, name);
    }
}

/* Validates the answer (targets at -2, new state at -1) completely before using any of it, then
 * builds the changes. NULL with err set on a bad answer; an empty object when nothing changes. */
static json_t *read_targets(ms_scale_hook_t *h, lua_State *L, json_t *state, char *err,
                            size_t errlen)
{
    const char *f = h->tick->file, *fn = h->tick->attr;
    int ti = lua_gettop(L) - 1, si = lua_gettop(L);
    if (!lua_isnil(L, ti) && !lua_istable(L, ti)) {
        snprintf(err, errlen, "%s: %s returned %s as the targets (want a table or nil)", f, fn,
                 luaL_typename(L, ti));
        return NULL;
    }
    if (!lua_isnil(L, si) && !lua_istable(L, si)) {
        snprintf(err, errlen, "%s: %s returned %s as the state (want a table or nil)", f, fn,
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
                snprintf(err, errlen, "%s: %s returned a key that is not a deployment name (%s)", f,
                         fn, luaL_typename(L, -2));
            else if (!d)
                snprintf(err, errlen, "%s: %s returned a target for unknown deployment '%s'", f, fn,
                         name);
            else if (check_count(L, -1, &n) != 0)
                snprintf(err, errlen,
                         "%s: %s returned a bad target for '%s' (want an integer >= 0)", f, fn,
                         name);
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
        luaL_unref(L, LUA_REGISTRYINDEX, h->tu->state_ref);
        lua_pushvalue(L, si);
        h->tu->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return out;
}

json_t *ms_scale_hook_tick(ms_scale_hook_t *h, double now, json_t *state)
{
    if (!h || !h->tu)
        return NULL;
    if (h->last_tick >= 0 && now - h->last_tick < h->interval_s && now >= h->last_tick)
        return NULL; /* not due; a clock stepping backwards makes it due at once */
    h->last_tick = now;
    h->ticks++;
    hk_unit_t *u = h->tu;
    lua_State *L = u->sb->L;
    int base = lua_gettop(L);
    luaL_checkstack(L, 10, "scale tick");
    if (u->state_ref == LUA_NOREF) {
        lua_newtable(L);
        u->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, u->tick_ref);
    lua_createtable(L, 0, 4);
    set_str(L, "application", h->app);
    set_num(L, "time", now);
    push_deployments(L, state);
    lua_setfield(L, -2, "deployments");
    lua_rawgeti(L, LUA_REGISTRYINDEX, u->state_ref);
    lua_setfield(L, -2, "state");
    lua_rawgeti(L, LUA_REGISTRYINDEX, u->kwargs_ref);
    char err[512];
    json_t *out = NULL;
    if (ms_sandbox_call(u->sb, 2, 2, (uint64_t)h->budget_us) != 0)
        snprintf(err, sizeof err, "%s", u->sb->err);
    else
        out = read_targets(h, L, state, err, sizeof err);
    lua_settop(L, base);
    if (!out) {
        note_failure(h, "tick", err);
        return NULL;
    }
    if (json_object_size(out) == 0) {
        json_decref(out);
        return NULL;
    }
    return out;
}

/* ---- hot reload ----------------------------------------------------------------------------- */

int ms_scale_hook_reload_prepare(ms_scale_hook_t *h, json_t **info)
{
    free_units(h->phu, h->ptu);
    h->phu = h->ptu = NULL;
    json_t *arr = json_array();
    char *err = NULL;
    int rc = load_units(h, &h->phu, &h->ptu, arr, h->hu, h->tu, &err);
    free(h->reload_error);
    h->reload_error = err;
    if (info)
        *info = arr;
    else
        json_decref(arr);
    return rc;
}

void ms_scale_hook_reload_commit(ms_scale_hook_t *h)
{
    if (!h->phu && !h->ptu)
        return;
    /* The tick's state survives a reload, so a schedule does not restart from scratch. */
    if (h->tu && h->ptu && h->tu->state_ref != LUA_NOREF) {
        lua_State *from = h->tu->sb->L, *to = h->ptu->sb->L;
        lua_rawgeti(from, LUA_REGISTRYINDEX, h->tu->state_ref);
        ms_sandbox_copy_value(from, -1, to);
        lua_pop(from, 1);
        if (lua_istable(to, -1))
            h->ptu->state_ref = luaL_ref(to, LUA_REGISTRYINDEX);
        else
            lua_pop(to, 1);
    }
    free_units(h->hu, h->tu);
    h->hu = h->phu;
    h->tu = h->ptu;
    h->phu = h->ptu = NULL;
}

void ms_scale_hook_reload_abort(ms_scale_hook_t *h)
{
    free_units(h->phu, h->ptu);
    h->phu = h->ptu = NULL;
}

/* ---- status --------------------------------------------------------------------------------- */

static json_t *script_info(const ms_config_lua_ref_t *r, const hk_unit_t *u)
{
    if (!r || !u)
        return json_null();
    return json_pack("{s:s, s:s, s:i, s:s}", "path", r->file, "function", r->attr, "version",
                     u->version, "sha256", u->sha256);
}

json_t *ms_scale_hook_status(const ms_scale_hook_t *h)
{
    json_t *st = json_object();
    json_object_set_new(st, "hook", script_info(h->hook, h->hu));
    json_object_set_new(st, "tick", script_info(h->tick, h->tu));
    json_object_set_new(st, "tick_interval_s", json_real(h->interval_s));
    json_object_set_new(st, "last_tick", h->last_tick >= 0 ? json_real(h->last_tick) : json_null());
    json_object_set_new(st, "failures", json_integer((json_int_t)h->failures));
    json_object_set_new(st, "last_error",
                        h->last_error[0] ? json_string(h->last_error) : json_null());
    json_object_set_new(st, "reload_error",
                        h->reload_error ? json_string(h->reload_error) : json_null());
    json_object_set_new(st, "accepted", json_integer((json_int_t)h->accepted));
    json_object_set_new(st, "clamped", json_integer((json_int_t)h->clamped));
    json_object_set_new(st, "refused", json_integer((json_int_t)h->refused));
    json_object_set_new(st, "ticks", json_integer((json_int_t)h->ticks));
    return st;
}
