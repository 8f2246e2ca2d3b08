/*
 * policy: loading, calls, failures, status and two-phase reload of every policy script (see
 * policy.h). Loading touches nothing but the new version, so a reload can prepare on a worker
 * thread while the loop keeps serving with the version in force.
 */
#include "policy/policy.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "core/core.h"

/* Running the chunk, initialize_state and self_test may build lookup tables: a longer budget than
 * one call. It runs off the loop on reload, so it stalls nothing but the reload itself. */
#define INIT_BUDGET_US 2000000u
/* How far method lookups follow __index tables (class inheritance). */
#define CLASS_MAX_DEPTH 8

struct ms_policy {
    const ms_policy_kind_t *kind;
    void *owner;
    char *file, *attr;
    char *fns[MS_POLICY_MAX_FNS];
    int nfns;
    unsigned required;
    json_t *kwargs;
    uint64_t budget_us;
    size_t mem_limit;
    int builtin;
    char *application, *deployment, *role;

    ms_policy_version_t *cur;
    uint64_t version;
    uint64_t failures, reload_failures;
    uint64_t budget_overruns; /* failed calls that ran out of their time budget */
    char last_error[512];
    char last_reload_error[512];
    char where[512]; /* ms_policy_where's answer */

    char *module_dir; /* `require` root; NULL: none */

    int refs;    /* reloads in flight holding this policy */
    int retired; /* freed by its owner while a reload held it */
};

/* ---- text ------------------------------------------------------------------------------------ */

void ms_policy_clean_text(char *out, size_t cap, const char *s, size_t n)
{
    size_t len = ms_utf8_copy(out, cap, s, n);
    for (size_t i = 0; i < len; i++) /* one log line: no line breaks, no control characters */
        if ((unsigned char)out[i] < 0x20 || out[i] == 0x7f)
            out[i] = ' ';
}

static void vformat_clean(char *out, size_t cap, const char *fmt, va_list ap)
{
    char tmp[1024];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    size_t len = n < 0 ? 0 : (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1;
    ms_policy_clean_text(out, cap, tmp, len);
}

void ms_policy_format_text(char *out, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vformat_clean(out, cap, fmt, ap);
    va_end(ap);
}

/* ---- state copies ---------------------------------------------------------------------------- */

typedef struct copy_ctx {
    lua_State *from, *to;
    int seen; /* index in `to`: {light userdata of a source table = its copy} */
    size_t count;
} copy_ctx_t;

static int plain_type(int t)
{
    return t == LUA_TSTRING || t == LUA_TNUMBER || t == LUA_TBOOLEAN || t == LUA_TTABLE;
}

static int copy_rec(copy_ctx_t *c, int idx, int depth);

/* Copies the pairs of the source table at src into the table on top of `to`. */
static int copy_pairs(copy_ctx_t *c, int src, int depth)
{
    lua_State *from = c->from, *to = c->to;
    lua_pushnil(from);
    while (lua_next(from, src)) {
        if (plain_type(lua_type(from, -2)) && plain_type(lua_type(from, -1))) {
            if (copy_rec(c, lua_gettop(from) - 1, depth + 1) != 0) {
                lua_pop(from, 2);
                return -1;
            }
            if (copy_rec(c, lua_gettop(from), depth + 1) != 0) {
                lua_pop(from, 2);
                lua_pop(to, 1);
                return -1;
            }
            lua_rawset(to, -3);
        }
        lua_pop(from, 1);
    }
    return 0;
}

static int copy_rec(copy_ctx_t *c, int idx, int depth)
{
    lua_State *from = c->from, *to = c->to;
    if (++c->count > MS_POLICY_COPY_MAX_VALUES || !lua_checkstack(to, 6) ||
        !lua_checkstack(from, 4))
        return -1;
    switch (lua_type(from, idx)) {
    case LUA_TBOOLEAN:
        lua_pushboolean(to, lua_toboolean(from, idx));
        return 0;
    case LUA_TNUMBER:
        lua_pushnumber(to, lua_tonumber(from, idx));
        return 0;
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(from, idx, &n);
        lua_pushlstring(to, s, n);
        return 0;
    }
    case LUA_TTABLE:
        break;
    default:
        lua_pushnil(to);
        return 0;
    }
    if (depth >= MS_POLICY_COPY_MAX_DEPTH)
        return -1;
    const void *key = lua_topointer(from, idx);
    lua_pushlightuserdata(to, (void *)key);
    lua_rawget(to, c->seen);
    if (!lua_isnil(to, -1))
        return 0; /* shared or cyclic: the copy made before */
    lua_pop(to, 1);
    lua_newtable(to);
    lua_pushlightuserdata(to, (void *)key);
    lua_pushvalue(to, -2);
    lua_rawset(to, c->seen);
    if (copy_pairs(c, idx, depth) != 0) {
        lua_pop(to, 1);
        return -1;
    }
    return 0;
}

int ms_policy_copy_value(lua_State *from, int idx, lua_State *to)
{
    if (idx < 0)
        idx = lua_gettop(from) + idx + 1;
    lua_newtable(to);
    copy_ctx_t c = {from, to, lua_gettop(to), 0};
    int rc = copy_rec(&c, idx, 0);
    if (rc == 0)
        lua_remove(to, c.seen);
    else
        lua_settop(to, c.seen - 1);
    return rc;
}

/* ---- tables shared with scripts -------------------------------------------------------------- */

void ms_policy_new_metatable(lua_State *L, int nrec)
{
    lua_createtable(L, 0, nrec + 1);
    lua_pushliteral(L, "__metatable");
    lua_pushboolean(L, 0);
    lua_rawset(L, -3);
}

void ms_policy_new_table(ms_policy_version_t *v, int narr, int nrec)
{
    lua_createtable(v->L, narr, nrec);
    lua_rawgeti(v->L, LUA_REGISTRYINDEX, v->protect_ref);
    lua_setmetatable(v->L, -2);
}

void ms_policy_get(lua_State *L, int t, const char *key)
{
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    lua_pushstring(L, key);
    lua_rawget(L, t);
}

void ms_policy_set_value(lua_State *L, int t, const char *key)
{
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    lua_pushstring(L, key);
    lua_insert(L, -2);
    lua_rawset(L, t);
}

void ms_policy_set_number(lua_State *L, int t, const char *key, double v)
{
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    lua_pushnumber(L, v);
    ms_policy_set_value(L, t, key);
}

void ms_policy_set_string(lua_State *L, int t, const char *key, const char *s)
{
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    lua_pushstring(L, s ? s : "");
    ms_policy_set_value(L, t, key);
}

void ms_policy_set_bool(lua_State *L, int t, const char *key, int b)
{
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    lua_pushboolean(L, b);
    ms_policy_set_value(L, t, key);
}

void ms_policy_set_nil(lua_State *L, int t, const char *key)
{
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    lua_pushnil(L);
    ms_policy_set_value(L, t, key);
}

/* True when the value on top is a table carrying the version's protected metatable: one the
 * script cannot have given metamethods. */
static int is_protected_table(ms_policy_version_t *v)
{
    lua_State *L = v->L;
    if (!lua_istable(L, -1) || !lua_getmetatable(L, -1))
        return 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, v->protect_ref);
    int same = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return same;
}

void ms_policy_subtable(ms_policy_version_t *v, int t, const char *key, int narr, int nrec)
{
    lua_State *L = v->L;
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    ms_policy_get(L, t, key);
    if (is_protected_table(v))
        return;
    lua_pop(L, 1);
    ms_policy_new_table(v, narr, nrec);
    lua_pushvalue(L, -1);
    ms_policy_set_value(L, t, key);
}

/* ---- loading --------------------------------------------------------------------------------- */

/* What a load needs, copied out of the policy so a worker thread reads nothing the loop writes. */
typedef struct load_args {
    const ms_policy_kind_t *kind;
    const char *file, *attr;
    const char *const *fns;
    int nfns;
    unsigned required;
    json_t *kwargs; /* only read */
    size_t mem_limit;
    const char *module_dir;
} load_args_t;

static void version_free(const ms_policy_kind_t *kind, ms_policy_version_t *v)
{
    if (!v)
        return;
    if (kind->release)
        kind->release(v);
    ms_sandbox_free(v->sb); /* lua_close releases every ref at once */
    free(v);
}

/* Pushes cls[name], following __index tables of metatables with raw accesses only (class
 * inheritance); nil if absent. */
static void class_get(lua_State *L, int cls, const char *name)
{
    lua_pushvalue(L, cls);
    for (int depth = 0; depth < CLASS_MAX_DEPTH; depth++) {
        lua_pushstring(L, name);
        lua_rawget(L, -2);
        if (!lua_isnil(L, -1) || !lua_getmetatable(L, -2)) {
            lua_remove(L, -2);
            return;
        }
        lua_remove(L, -2); /* nil */
        lua_pushliteral(L, "__index");
        lua_rawget(L, -2);
        lua_remove(L, -2); /* the metatable */
        lua_remove(L, -2); /* the table looked in */
        if (!lua_istable(L, -1))
            break;
    }
    lua_pop(L, 1);
    lua_pushnil(L);
}

/* *ref = cls[name] as a registry ref (LUA_NOREF when absent). -1 when present but no function. */
static int ref_fn(ms_policy_version_t *v, const load_args_t *a, int cls, const char *name, int *ref,
                  char *err, size_t cap)
{
    lua_State *L = v->L;
    class_get(L, cls, name);
    *ref = LUA_NOREF;
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    if (!lua_isfunction(L, -1)) {
        ms_policy_format_text(err, cap, "%s: '%s' must be a function, got %s", a->file, name,
                              luaL_typename(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* The line fns' function at ref is defined on (0 for a C function). */
static int defined_at(lua_State *L, int ref)
{
    lua_Debug ar;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    return lua_getinfo(L, ">S", &ar) && ar.linedefined > 0 ? ar.linedefined : 0;
}

static int sandbox_err(ms_policy_version_t *v, char *err, size_t cap, const char *suffix)
{
    ms_policy_format_text(err, cap, "%s%s", v->sb->err, suffix);
    return -1;
}

/* Runs the chunk and leaves the class (class kinds) or the module on top. */
static int run_chunk(ms_policy_version_t *v, const load_args_t *a, char *err, size_t cap)
{
    lua_State *L = v->L;
    if (ms_sandbox_call(v->sb, 0, 1, INIT_BUDGET_US) != 0)
        return sandbox_err(v, err, cap, "");
    if (!lua_istable(L, -1)) {
        ms_policy_format_text(err, cap, "%s: the chunk must return a table, got %s", a->file,
                              luaL_typename(L, -1));
        return -1;
    }
    if (a->kind->is_class && a->attr && *a->attr) {
        lua_pushstring(L, a->attr);
        lua_rawget(L, -2);
        if (!lua_istable(L, -1)) {
            ms_policy_format_text(err, cap, "%s: the returned table has no class '%s' (got %s)",
                                  a->file, a->attr, luaL_typename(L, -1));
            return -1;
        }
        lua_remove(L, -2);
    }
    return 0;
}

/* Finds every named function in the class or module on top; checks the required ones. */
static int find_fns(ms_policy_version_t *v, const load_args_t *a, char *err, size_t cap)
{
    int cls = lua_gettop(v->L);
    for (int i = 0; i < a->nfns; i++) {
        if (ref_fn(v, a, cls, a->fns[i], &v->fn_ref[i], err, cap) != 0)
            return -1;
        if (v->fn_ref[i] != LUA_NOREF)
            v->fn_line[i] = defined_at(v->L, v->fn_ref[i]);
        if (v->fn_ref[i] == LUA_NOREF && (a->required & (1u << i))) {
            ms_policy_format_text(err, cap, "%s: the returned %s has no function '%s'", a->file,
                                  a->kind->is_class ? "class" : "table", a->fns[i]);
            return -1;
        }
    }
    return 0;
}

/* Calls the function in ref with self (class kinds) and `extra` extra args already on the stack
 * below it; pops them. A self_test answering false fails. */
static int call_init(ms_policy_version_t *v, const load_args_t *a, int ref, int extra,
                     const char *what, char *err, size_t cap)
{
    lua_State *L = v->L;
    int base = lua_gettop(L) - extra;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    int nargs = 0;
    if (a->kind->is_class) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, v->self_ref);
        nargs++;
    }
    for (int i = 0; i < extra; i++, nargs++)
        lua_pushvalue(L, base + 1 + i);
    int rc = ms_sandbox_call(v->sb, nargs, 1, INIT_BUDGET_US);
    if (rc != 0) {
        char suffix[40];
        snprintf(suffix, sizeof suffix, " (%s)", what);
        sandbox_err(v, err, cap, suffix);
    } else if (lua_isboolean(L, -1) && !lua_toboolean(L, -1) && strcmp(what, "self_test") == 0) {
        ms_policy_format_text(err, cap, "%s: self_test returned false", a->file);
        rc = -1;
    }
    lua_settop(L, base);
    return rc;
}

static int push_kwargs_json(ms_policy_version_t *v, json_t *kwargs, char *err, size_t cap)
{
    char *text = kwargs ? json_dumps(kwargs, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
    int rc = ms_sandbox_push_json(v->sb, text);
    free(text);
    if (rc != 0)
        sandbox_err(v, err, cap, "");
    return rc;
}

/* Class kinds: self, initialize_state(self, kwargs). Function kinds: kwargs kept for calls. */
static int instantiate(ms_policy_version_t *v, const load_args_t *a, char *err, size_t cap)
{
    lua_State *L = v->L;
    int cls = lua_gettop(L);
    int init = LUA_NOREF, test = LUA_NOREF;
    if (ref_fn(v, a, cls, "initialize_state", &init, err, cap) != 0 ||
        ref_fn(v, a, cls, "self_test", &test, err, cap) != 0)
        return -1;
    if (a->kind->is_class) {
        lua_newtable(L);
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "__index");
        lua_pushvalue(L, cls);
        lua_rawset(L, -3);
        lua_setmetatable(L, -2);
        v->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_pushvalue(L, cls);
    v->class_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    /* kwargs are decoded even when unused, so a malformed value never passes silently. */
    if (push_kwargs_json(v, a->kwargs, err, cap) != 0)
        return -1;
    if (a->kwargs) {
        lua_pushvalue(L, -1);
        v->kwargs_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (a->kind->is_class && init != LUA_NOREF &&
        call_init(v, a, init, 1, "initialize_state", err, cap) != 0)
        return -1;
    lua_settop(L, cls);
    if (test != LUA_NOREF && call_init(v, a, test, 0, "self_test", err, cap) != 0)
        return -1;
    return 0;
}

/* Reads, compiles and checks one version. NULL with err on failure; sha gets the content's hash
 * whenever the file could be read. Touches nothing outside the new version. */
static ms_policy_version_t *version_load(const load_args_t *a, char sha[65], char *err, size_t cap)
{
    sha[0] = '\0';
    ms_buf_t text = {0};
    if (ms_read_file(a->file, &text) != 0) {
        ms_policy_format_text(err, cap, "%s: %s", a->file, strerror(errno));
        ms_buf_free(&text);
        return NULL;
    }
    ms_sha256_hex(text.data ? text.data : "", text.len, sha);
    ms_policy_version_t *v = ms_calloc(1, sizeof *v);
    for (int i = 0; i < MS_POLICY_MAX_FNS; i++)
        v->fn_ref[i] = LUA_NOREF;
    v->self_ref = v->class_ref = v->kwargs_ref = v->state_ref = LUA_NOREF;
    memcpy(v->sha256, sha, sizeof v->sha256);
    char *e = NULL;
    v->sb = ms_sandbox_new(a->mem_limit, &e);
    if (!v->sb) {
        ms_policy_format_text(err, cap, "%s: %s", a->file, e ? e : "cannot create the sandbox");
        free(e);
        free(v);
        ms_buf_free(&text);
        return NULL;
    }
    v->L = v->sb->L;
    ms_sandbox_set_module_dir(v->sb, a->module_dir);
    ms_policy_new_metatable(v->L, 0);
    v->protect_ref = luaL_ref(v->L, LUA_REGISTRYINDEX);
    int rc = ms_sandbox_load(v->sb, text.data ? text.data : "", text.len, a->file);
    ms_buf_free(&text);
    if (rc != 0)
        sandbox_err(v, err, cap, "");
    else if (run_chunk(v, a, err, cap) != 0 || find_fns(v, a, err, cap) != 0 ||
             instantiate(v, a, err, cap) != 0)
        rc = -1;
    /* The kind may pin values right above the message handler (hot-path slots). */
    lua_settop(v->L, MS_SANDBOX_HANDLER_SLOT);
    if (rc == 0 && a->kind->setup && a->kind->setup(v, err, cap) != 0)
        rc = -1;
    if (rc != 0) {
        version_free(a->kind, v);
        return NULL;
    }
    return v;
}

static load_args_t load_args(const ms_policy_t *p)
{
    return (load_args_t){.kind = p->kind,
                         .file = p->file,
                         .attr = p->attr,
                         .fns = (const char *const *)p->fns,
                         .nfns = p->nfns,
                         .required = p->required,
                         .kwargs = p->kwargs,
                         .mem_limit = p->mem_limit,
                         .module_dir = p->module_dir};
}

/* ---- lifecycle ------------------------------------------------------------------------------- */

static char *dup_or_null(const char *s)
{
    return s && *s ? ms_strdup(s) : NULL;
}

/* Set on the loop, copied into each new policy: workers never read it. */
static char *default_module_dir;

void ms_policy_set_module_dir(const char *dir)
{
    free(default_module_dir);
    default_module_dir = dup_or_null(dir);
}

static void policy_destroy(ms_policy_t *p)
{
    version_free(p->kind, p->cur);
    for (int i = 0; i < p->nfns; i++)
        free(p->fns[i]);
    json_decref(p->kwargs);
    free(p->file);
    free(p->attr);
    free(p->application);
    free(p->deployment);
    free(p->role);
    free(p->module_dir);
    free(p);
}

ms_policy_t *ms_policy_new(const ms_policy_spec_t *spec, char **err)
{
    ms_policy_t *p = ms_calloc(1, sizeof *p);
    p->kind = spec->kind;
    p->file = ms_strdup(spec->file);
    p->attr = dup_or_null(spec->attr);
    for (int i = 0; i < MS_POLICY_MAX_FNS && spec->fns[i]; i++)
        p->fns[p->nfns++] = ms_strdup(spec->fns[i]);
    p->required = spec->required;
    p->kwargs = spec->kwargs ? json_deep_copy(spec->kwargs) : NULL;
    p->budget_us = spec->budget_us ? spec->budget_us : spec->kind->call_budget_us;
    p->mem_limit = spec->mem_limit;
    p->builtin = spec->builtin;
    p->application = dup_or_null(spec->application);
    p->deployment = dup_or_null(spec->deployment);
    p->role = dup_or_null(spec->role);
    p->module_dir = dup_or_null(default_module_dir);
    char msg[512], sha[65];
    load_args_t a = load_args(p);
    p->cur = version_load(&a, sha, msg, sizeof msg);
    if (!p->cur) {
        const char *m = msg[0] ? msg : "load failed"; /* a pointer: -Waddress on arrays */
        *err = ms_strdup(m);
        policy_destroy(p);
        return NULL;
    }
    p->version = 1;
    return p;
}

void ms_policy_free(ms_policy_t *p)
{
    if (!p)
        return;
    if (p->refs > 0) {
        p->retired = 1; /* the reload holding it frees it when it ends */
        return;
    }
    policy_destroy(p);
}

void ms_policy_set_labels(ms_policy_t *p, const char *application, const char *deployment,
                          const char *role)
{
    free(p->application);
    free(p->deployment);
    free(p->role);
    p->application = dup_or_null(application);
    p->deployment = dup_or_null(deployment);
    p->role = dup_or_null(role);
}

void ms_policy_set_owner(ms_policy_t *p, void *owner)
{
    p->owner = owner;
}

void *ms_policy_owner(const ms_policy_t *p)
{
    return p->owner;
}

ms_policy_version_t *ms_policy_current(const ms_policy_t *p)
{
    return p->cur;
}

const char *ms_policy_file(const ms_policy_t *p)
{
    return p->file;
}

const char *ms_policy_fn_name(const ms_policy_t *p, int i)
{
    return i >= 0 && i < p->nfns ? p->fns[i] : "";
}

uint64_t ms_policy_budget_us(const ms_policy_t *p)
{
    return p->budget_us;
}

int ms_policy_has_fn(const ms_policy_t *p, int i)
{
    return i >= 0 && i < MS_POLICY_MAX_FNS && p->cur->fn_ref[i] != LUA_NOREF;
}

void ms_policy_set_memory_limit(ms_policy_t *p, size_t bytes)
{
    p->mem_limit = bytes;
    p->cur->sb->mem_limit = bytes ? bytes : MS_SANDBOX_DEFAULT_MEM_LIMIT;
}

/* ---- calls ----------------------------------------------------------------------------------- */

void ms_policy_push_fn(ms_policy_t *p, int i)
{
    lua_rawgeti(p->cur->L, LUA_REGISTRYINDEX, p->cur->fn_ref[i]);
}

void ms_policy_push_self(ms_policy_t *p)
{
    lua_rawgeti(p->cur->L, LUA_REGISTRYINDEX, p->cur->self_ref);
}

void ms_policy_push_kwargs(ms_policy_t *p)
{
    lua_rawgeti(p->cur->L, LUA_REGISTRYINDEX, p->cur->kwargs_ref);
}

void ms_policy_push_state(ms_policy_t *p)
{
    lua_rawgeti(p->cur->L, LUA_REGISTRYINDEX, p->cur->state_ref);
}

void ms_policy_set_state(ms_policy_t *p)
{
    lua_State *L = p->cur->L;
    luaL_unref(L, LUA_REGISTRYINDEX, p->cur->state_ref);
    p->cur->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

static void note_failure(ms_policy_t *p, const char *clean)
{
    p->failures++;
    if (strcmp(p->last_error, clean) == 0)
        return; /* a script failing on every call must not flood the log */
    ms_copy_str(p->last_error, sizeof p->last_error, clean);
    ms_warn("%s %s v%llu failed, %s: %s", p->kind->name, p->file, (unsigned long long)p->version,
            p->kind->fallback ? p->kind->fallback : "the built-in takes over", clean);
}

int ms_policy_call(ms_policy_t *p, int nargs, int nres, uint64_t budget_us)
{
    ms_sandbox_t *sb = p->cur->sb;
    if (ms_sandbox_call(sb, nargs, nres, budget_us ? budget_us : p->budget_us) == 0)
        return 0;
    p->budget_overruns += sb->budget_exceeded != 0;
    char clean[sizeof p->last_error];
    ms_policy_clean_text(clean, sizeof clean, sb->err, strlen(sb->err));
    note_failure(p, clean);
    return -1;
}

void ms_policy_fail(ms_policy_t *p, const char *fmt, ...)
{
    char clean[sizeof p->last_error];
    va_list ap;
    va_start(ap, fmt);
    vformat_clean(clean, sizeof clean, fmt, ap);
    va_end(ap);
    note_failure(p, clean);
}

const char *ms_policy_where(ms_policy_t *p, int i)
{
    int line = i >= 0 && i < MS_POLICY_MAX_FNS ? p->cur->fn_line[i] : 0;
    if (line > 0)
        snprintf(p->where, sizeof p->where, "%s:%d", p->file, line);
    else
        ms_copy_str(p->where, sizeof p->where, p->file);
    return p->where;
}

uint64_t ms_policy_version(const ms_policy_t *p)
{
    return p->version;
}

uint64_t ms_policy_failures(const ms_policy_t *p)
{
    return p->failures;
}

const char *ms_policy_last_error(const ms_policy_t *p)
{
    return p->last_error;
}

/* ---- status ---------------------------------------------------------------------------------- */

static json_t *str_or_null(const char *s)
{
    return s && *s ? json_string(s) : json_null();
}

/* The fields that say which script this is, shared by status and reload results. */
static json_t *labels(const ms_policy_t *p)
{
    json_t *j = json_object();
    json_object_set_new(j, "kind", json_string(p->kind->name));
    json_object_set_new(j, "application", str_or_null(p->application));
    json_object_set_new(j, "deployment", str_or_null(p->deployment));
    json_object_set_new(j, "role", str_or_null(p->role));
    json_object_set_new(j, "path", json_string(p->file));
    json_object_set_new(j, "function",
                        p->kind->is_class ? str_or_null(p->attr) : str_or_null(p->fns[0]));
    json_object_set_new(j, "builtin", json_boolean(p->builtin));
    return j;
}

json_t *ms_policy_info(const ms_policy_t *p)
{
    json_t *j = labels(p);
    json_object_set_new(j, "version", json_integer((json_int_t)p->version));
    json_object_set_new(j, "sha256", json_string(p->cur->sha256));
    json_object_set_new(j, "failures", json_integer((json_int_t)p->failures));
    json_object_set_new(j, "last_error", str_or_null(p->last_error));
    json_object_set_new(j, "reload_failures", json_integer((json_int_t)p->reload_failures));
    json_object_set_new(j, "reloads", json_integer((json_int_t)(p->version - 1)));
    json_object_set_new(j, "budget_overruns", json_integer((json_int_t)p->budget_overruns));
    json_object_set_new(j, "memory_bytes", json_integer((json_int_t)p->cur->sb->mem_used));
    json_object_set_new(j, "last_reload_error", str_or_null(p->last_reload_error));
    return j;
}

/* ---- reload ---------------------------------------------------------------------------------- */

typedef struct reload_entry {
    ms_policy_t *p;
    load_args_t args;
    ms_policy_version_t *next; /* prepared; NULL when it failed */
    char sha[65];
    char err[512];
} reload_entry_t;

typedef struct reload_job {
    uv_work_t work;
    reload_entry_t *e;
    size_t n;
    ms_policy_reload_cb cb;
    void *data;
} reload_job_t;

/* Old versions closed off the loop: lua_close of a large state takes milliseconds. */
typedef struct retire_job {
    uv_work_t work;
    const ms_policy_kind_t **kinds;
    ms_policy_version_t **v;
    size_t n;
} retire_job_t;

static void prepare_all(reload_entry_t *e, size_t n)
{
    for (size_t i = 0; i < n; i++)
        e[i].next = version_load(&e[i].args, e[i].sha, e[i].err, sizeof e[i].err);
}

/* Moves the state value and, for class kinds, the fields self.persist names. */
static void hand_over(ms_policy_t *p, ms_policy_version_t *from, ms_policy_version_t *to)
{
    if (from->state_ref != LUA_NOREF) {
        lua_rawgeti(from->L, LUA_REGISTRYINDEX, from->state_ref);
        if (ms_policy_copy_value(from->L, -1, to->L) == 0)
            to->state_ref = luaL_ref(to->L, LUA_REGISTRYINDEX);
        else
            ms_warn("%s %s: reload: the state is too deep or too large to hand over (limits %d "
                    "levels, %d values): the new version starts without it",
                    p->kind->name, p->file, MS_POLICY_COPY_MAX_DEPTH, MS_POLICY_COPY_MAX_VALUES);
        lua_pop(from->L, 1);
    }
    if (!p->kind->is_class)
        return;
    lua_State *L = to->L;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, to->class_ref);
    class_get(L, lua_gettop(L), "persist");
    lua_rawgeti(L, LUA_REGISTRYINDEX, to->self_ref);
    lua_rawgeti(from->L, LUA_REGISTRYINDEX, from->self_ref);
    int list = lua_gettop(L) - 1, self = lua_gettop(L);
    int len = lua_istable(L, list) ? (int)lua_objlen(L, list) : 0;
    for (int i = 1; i <= len; i++) {
        lua_rawgeti(L, list, i);
        if (lua_type(L, -1) == LUA_TSTRING) {
            size_t n;
            const char *key = lua_tolstring(L, -1, &n);
            lua_pushlstring(from->L, key, n);
            lua_rawget(from->L, -2);
            if (lua_isnil(from->L, -1))
                lua_pop(L, 1); /* nothing to carry: keep what initialize_state set */
            else if (ms_policy_copy_value(from->L, -1, L) == 0)
                lua_rawset(L, self);
            else {
                ms_warn("%s %s: reload: persist field '%s' is too deep or too large, not kept",
                        p->kind->name, p->file, key);
                lua_pop(L, 1);
            }
            lua_pop(from->L, 1);
        } else {
            lua_pop(L, 1);
        }
    }
    lua_pop(from->L, 1);
    lua_settop(L, top);
}

static json_t *entry_info(const reload_entry_t *e)
{
    const ms_policy_t *p = e->p;
    json_t *j = labels(p);
    json_object_set_new(j, "version", json_integer((json_int_t)(p->version + (e->next != NULL))));
    json_object_set_new(j, "sha256", json_string(e->sha));
    json_object_set_new(j, "ok", json_boolean(e->next != NULL));
    json_object_set_new(j, "error", e->next ? json_null() : json_string(e->err));
    return j;
}

/* Swaps the prepared version in; returns the old one for the caller to close. */
static ms_policy_version_t *commit_one(reload_entry_t *e)
{
    ms_policy_t *p = e->p;
    ms_policy_version_t *old = p->cur;
    hand_over(p, old, e->next);
    if (p->kind->carry)
        p->kind->carry(p, old, e->next);
    e->next->sb->mem_limit = old->sb->mem_limit;
    p->cur = e->next;
    e->next = NULL;
    p->version++;
    p->last_reload_error[0] = '\0';
    ms_info("%s %s: reloaded, version %llu (sha256 %.12s)", p->kind->name, p->file,
            (unsigned long long)p->version, p->cur->sha256);
    return old;
}

static void retire_work(uv_work_t *w)
{
    retire_job_t *r = w->data;
    for (size_t i = 0; i < r->n; i++)
        version_free(r->kinds[i], r->v[i]);
}

static void retire_done(uv_work_t *w, int status)
{
    (void)status;
    retire_job_t *r = w->data;
    free(r->kinds);
    free(r->v);
    free(r);
}

/* Closes versions on a worker thread when a loop is given, else here. */
static void retire(uv_loop_t *loop, const ms_policy_kind_t **kinds, ms_policy_version_t **v,
                   size_t n)
{
    retire_job_t *r = ms_calloc(1, sizeof *r);
    r->kinds = kinds;
    r->v = v;
    r->n = n;
    r->work.data = r;
    if (n == 0 || !loop || uv_queue_work(loop, &r->work, retire_work, retire_done) != 0) {
        retire_work(&r->work);
        retire_done(&r->work, 0);
    }
}

/* Phase two: all or nothing. Runs on the loop, so every script changes at one request boundary.
 * Fills *scripts and releases the entries' holds; returns ok. */
static int finish(uv_loop_t *loop, reload_entry_t *e, size_t n, json_t **scripts)
{
    int ok = 1;
    for (size_t i = 0; i < n; i++)
        ok &= e[i].p->retired || e[i].next != NULL;
    json_t *arr = json_array();
    const ms_policy_kind_t **kinds = ms_calloc(n ? n : 1, sizeof *kinds);
    ms_policy_version_t **old = ms_calloc(n ? n : 1, sizeof *old);
    size_t nold = 0;
    for (size_t i = 0; i < n; i++) {
        ms_policy_t *p = e[i].p;
        if (!p->retired) {
            json_array_append_new(arr, entry_info(&e[i]));
            if (!e[i].next) {
                p->reload_failures++;
                ms_copy_str(p->last_reload_error, sizeof p->last_reload_error, e[i].err);
                ms_warn("%s %s: reload failed, keeping version %llu: %s", p->kind->name, p->file,
                        (unsigned long long)p->version, e[i].err);
            }
        }
        ms_policy_version_t *drop = e[i].next;
        if (ok && !p->retired && drop)
            drop = commit_one(&e[i]);
        if (drop) {
            kinds[nold] = p->kind;
            old[nold++] = drop;
        }
        if (--p->refs == 0 && p->retired)
            policy_destroy(p);
    }
    retire(loop, kinds, old, nold);
    if (scripts)
        *scripts = arr;
    else
        json_decref(arr);
    return ok;
}

static reload_entry_t *hold_all(ms_policy_t *const *ps, size_t n)
{
    reload_entry_t *e = ms_calloc(n ? n : 1, sizeof *e);
    for (size_t i = 0; i < n; i++) {
        e[i].p = ps[i];
        e[i].args = load_args(ps[i]);
        ps[i]->refs++;
    }
    return e;
}

static void reload_work(uv_work_t *w)
{
    reload_job_t *j = w->data;
    prepare_all(j->e, j->n);
}

static void reload_done(uv_work_t *w, int status)
{
    (void)status;
    reload_job_t *j = w->data;
    json_t *scripts = NULL;
    int ok = finish(w->loop, j->e, j->n, &scripts);
    j->cb(j->data, scripts, ok);
    json_decref(scripts);
    free(j->e);
    free(j);
}

int ms_policy_reload_start(uv_loop_t *loop, ms_policy_t *const *ps, size_t n,
                           ms_policy_reload_cb cb, void *data)
{
    reload_job_t *j = ms_calloc(1, sizeof *j);
    j->e = hold_all(ps, n);
    j->n = n;
    j->cb = cb;
    j->data = data;
    j->work.data = j;
    if (uv_queue_work(loop, &j->work, reload_work, reload_done) == 0)
        return 0;
    finish(NULL, j->e, j->n, NULL);
    free(j->e);
    free(j);
    return -1;
}

int ms_policy_reload_now(ms_policy_t *const *ps, size_t n, json_t **scripts)
{
    reload_entry_t *e = hold_all(ps, n);
    prepare_all(e, n);
    int ok = finish(NULL, e, n, scripts);
    free(e);
    return ok;
}
