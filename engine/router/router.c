/*
 * router: request-router scripts. Owns, per router, one or two *instances* (the live one and,
 * during a two-phase reload, the prepared one). An instance is a sandboxed Lua state
 * (sandbox.c), the script's `self`, and the persistent tables the router reads: one table per
 * replica, updated in place by C, the candidates array (compacted on removal), and the request
 * table whose fields are overwritten on each call. Nothing is built per request except what the
 * script asks for: `id`, `headers` and `body` are materialized by an __index metamethod only
 * when read, so routing costs a few table stores plus the script's own work.
 *
 * Contract of a router file: the chunk must `return` a class table (or a table holding it under
 * the configured attribute) with a `choose_replicas` function; `initialize_state`,
 * `on_request_routed`, `on_request_completed`, `self_test` and `persist` are optional. See
 * docs/routing.md.
 */
#include "router/router.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>

#include "core/core.h"
#include "sandbox/sandbox.h"

/* Loading the chunk, initialize_state and self_test may build lookup tables: they get a longer
 * budget than one routing call. */
#define MS_SCRIPT_INIT_BUDGET_US    1000000u
#define MS_SCRIPT_DEFAULT_BUDGET_US 1000u
/* on_replicas_changed may rebuild a structure over every replica (a hash ring): more than a
 * routing call, but it runs on the request path (before the next choose), so not a full second. */
#define MS_SCRIPT_UPDATE_BUDGET_US 100000u
/* Caller slot numbers are small dense integers; anything beyond this is a caller bug. */
#define MS_SCRIPT_MAX_INDEX (1 << 20)
/* Limits of a state-to-state copy (persist, replica state on reload): plain data is shallow;
 * deeper or bigger means a cycle or something that should not be copied on the control path. */
#define COPY_MAX_DEPTH  16
#define COPY_MAX_VALUES 200000
/* How far the method lookup follows __index tables (class inheritance). */
#define CLASS_MAX_DEPTH 8

/* Values pinned at the bottom of the Lua stack, right above the sandbox's message handler:
 * lua_pushvalue from a fixed slot is the cheapest way to reach them on every request. They are
 * pinned once the script has loaded and stay until lua_close. */
enum {
    SLOT_CHOOSE = MS_SANDBOX_HANDLER_SLOT + 1,
    SLOT_SELF,
    SLOT_CANDIDATES,
    SLOT_REQUEST,
    SLOT_ON_ROUTED,    /* nil if the script has no on_request_routed */
    SLOT_ON_COMPLETED, /* nil if the script has no on_request_completed */
    SLOT_TOP = SLOT_ON_COMPLETED,
};

/* The last value stored in one request field, so unchanged fields (method, path and model id
 * repeat from request to request) aren't re-interned and re-stored on every call. */
typedef struct field_cache {
    char val[128];
    size_t len;
    int valid;
} field_cache_t;

/* Request fields materialized on first read (bits of lazy_req.set): they are rawset into the
 * request table so that a second read in the same call is a plain lookup, and cleared before the
 * next request is stored. */
enum { LAZY_ID = 1, LAZY_HEADERS = 2, LAZY_BODY = 4 };

typedef struct lazy_req {
    const ms_route_request_t *req; /* the request of the call in progress; NULL outside calls */
    unsigned set;
} lazy_req_t;

typedef struct replica_slot {
    int ref; /* registry ref of the replica's table, LUA_NOREF if the slot is free */
    int pos; /* 1-based position in the candidates array */
    /* What C set, kept C-side so a reload can re-add the replica without trusting the (script
     * writable) Lua table. */
    char *id;
    int max_ongoing;
    int ongoing;
} replica_slot_t;

/* Candidate table address -> caller index, to turn the tables a script returns back into
 * indices with one API call each (LuaJIT's GC never moves objects, so addresses are stable while
 * the registry holds the tables). Identity, not the `index` field, decides: a script can neither
 * forge a candidate nor confuse C by writing to `index`. Rebuilt when the replica set changes,
 * which happens on the control loop, never per request. */
typedef struct cand_entry {
    const void *table; /* NULL: empty */
    int index;
} cand_entry_t;

/* One loaded copy of the script: everything that lives and dies with its Lua state. */
typedef struct instance {
    ms_sandbox_t *sb;
    lua_State *L;
    const char *name; /* the router's file name (borrowed), for messages */

    int ref_self;
    int ref_class;
    int ref_choose;
    int ref_on_routed;    /* LUA_NOREF if the script has none */
    int ref_on_completed; /* LUA_NOREF if the script has none */
    int ref_on_changed;   /* on_replicas_changed; LUA_NOREF if the script has none */
    int replicas_changed; /* the replica set changed since on_replicas_changed last ran */
    int ref_candidates;
    int ref_request;

    replica_slot_t *slots; /* by caller index */
    int nslots;
    int ncand;
    cand_entry_t *by_table; /* open addressing, power-of-two size, at most half full */
    size_t by_table_mask;

    field_cache_t req_method, req_path, req_model;
    lazy_req_t lazy; /* read by the request table's __index (a light userdata upvalue) */

    char sha256[65]; /* of the file content this instance was compiled from */
} instance_t;

struct ms_router_script {
    instance_t *cur;
    instance_t *pending; /* prepared by reload_prepare, NULL otherwise */
    char *name;          /* file name */
    char *attr;          /* NULL: the chunk's value is the class */
    char *kwargs_json;   /* NULL: none */
    uint64_t budget_us;
    size_t mem_limit; /* 0: the sandbox default */

    uint64_t version; /* successful loads, from 1 */
    uint64_t failures;
    uint64_t reload_failures;
    char last_error[512];
    char last_reload_error[512];
};

/* ---- errors --------------------------------------------------------------------------------- */

/* Counts a failure and keeps its message. The log line is written only when the message changes,
 * so a router failing on every request doesn't flood the log. */
static void fail(ms_router_script_t *s, const char *msg)
{
    s->failures++;
    if (strcmp(s->last_error, msg) != 0) {
        snprintf(s->last_error, sizeof s->last_error, "%s", msg);
        ms_warn("router %s failed, falling back to the built-in choice: %s", s->name, msg);
    }
}

/* ---- state-to-state copies ------------------------------------------------------------------ */

/* Pushes onto `to` a copy of the plain-data value at `idx` of `from`: nil, booleans, numbers,
 * strings, and tables of those (other values, and pairs whose key or value is one, are left
 * out). Raw accesses only, so no script code runs. Returns -1 (nothing pushed) past the depth or
 * size limits, which is what a cycle looks like. Only called outside script calls, where the
 * memory cap is not enforced. */
static int copy_value(lua_State *from, int idx, lua_State *to, int depth, size_t *count)
{
    if (++*count > COPY_MAX_VALUES)
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
        const char *p = lua_tolstring(from, idx, &n);
        lua_pushlstring(to, p, n);
        return 0;
    }
    case LUA_TTABLE:
        break;
    default:
        lua_pushnil(to);
        return 0;
    }
    if (depth >= COPY_MAX_DEPTH || !lua_checkstack(from, 4) || !lua_checkstack(to, 4))
        return -1;
    if (idx < 0)
        idx = lua_gettop(from) + idx + 1;
    lua_newtable(to);
    lua_pushnil(from);
    while (lua_next(from, idx)) {
        int kt = lua_type(from, -2), vt = lua_type(from, -1);
        int plain_k =
            kt == LUA_TSTRING || kt == LUA_TNUMBER || kt == LUA_TBOOLEAN || kt == LUA_TTABLE;
        int plain_v =
            vt == LUA_TSTRING || vt == LUA_TNUMBER || vt == LUA_TBOOLEAN || vt == LUA_TTABLE;
        if (plain_k && plain_v) {
            if (copy_value(from, -2, to, depth + 1, count) != 0) {
                lua_pop(from, 2);
                lua_pop(to, 1);
                return -1;
            }
            if (copy_value(from, -1, to, depth + 1, count) != 0) {
                lua_pop(from, 2);
                lua_pop(to, 2);
                return -1;
            }
            lua_rawset(to, -3);
        }
        lua_pop(from, 1);
    }
    return 0;
}

/* ---- loading -------------------------------------------------------------------------------- */

static char *builtin_router_path(void)
{
    const char *dir = getenv("MOONSERVE_LUA_DIR");
    if (!dir || !*dir)
        dir = MS_LUA_DIR;
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/router.lua", dir);
    return b.data;
}

/* Pushes class[name], following __index *tables* of metatables (inheritance through
 * setmetatable(Class, {__index = Base})) with raw accesses only: looking methods up must not run
 * script code outside a budgeted call. Pushes nil if absent. */
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
        lua_remove(L, -2); /* the table we looked in */
        if (!lua_istable(L, -1))
            break;
    }
    lua_pop(L, 1);
    lua_pushnil(L);
}

/* Stores the function class[name] as a registry ref; LUA_NOREF if absent. -1 if it is present
 * but not a function. */
static int ref_method(instance_t *in, int cls, const char *name, int *ref)
{
    lua_State *L = in->L;
    class_get(L, cls, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        *ref = LUA_NOREF;
        return 0;
    }
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        snprintf(in->sb->err, sizeof in->sb->err, "%s: %s must be a function", in->name, name);
        return -1;
    }
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Calls the method whose ref is given with self and the values above it on the stack (nargs of
 * them), under the loading budget; pops them. A self_test returning false fails too. */
static int call_init_method(instance_t *in, int ref, int nargs, int check_false)
{
    lua_State *L = in->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, in->ref_self);
    for (int i = 0; i < nargs; i++)
        lua_pushvalue(L, -2 - nargs);
    int rc = ms_sandbox_call(in->sb, nargs + 1, 1, MS_SCRIPT_INIT_BUDGET_US);
    if (rc == 0 && check_false && lua_isboolean(L, -1) && !lua_toboolean(L, -1)) {
        snprintf(in->sb->err, sizeof in->sb->err, "%s: self_test returned false", in->name);
        rc = -1;
    }
    lua_pop(L, nargs + (rc == 0));
    return rc;
}

/* Runs the chunk, finds the class (the returned table, or its field `attr`), checks its methods,
 * instantiates self = setmetatable({}, {__index = class}), then calls initialize_state(self,
 * kwargs) and self_test(self) if defined. Leaves the stack as it found it (the chunk popped). */
static int instantiate(instance_t *in, const char *attr, const char *kwargs_json)
{
    lua_State *L = in->L;
    int base = lua_gettop(L) - 1; /* below the chunk */
    if (ms_sandbox_call(in->sb, 0, 1, MS_SCRIPT_INIT_BUDGET_US) != 0)
        return -1;
    if (!lua_istable(L, -1)) {
        snprintf(in->sb->err, sizeof in->sb->err,
                 "%s: the chunk must return a router class (a table), got %s", in->name,
                 luaL_typename(L, -1));
        goto fail;
    }
    if (attr && *attr) {
        lua_pushstring(L, attr);
        lua_rawget(L, -2);
        if (!lua_istable(L, -1)) {
            snprintf(in->sb->err, sizeof in->sb->err,
                     "%s: the returned table has no router class '%s' (got %s)", in->name, attr,
                     luaL_typename(L, -1));
            goto fail;
        }
        lua_remove(L, -2);
    }
    int cls = lua_gettop(L);
    int ref_init = LUA_NOREF, ref_test = LUA_NOREF;
    if (ref_method(in, cls, "choose_replicas", &in->ref_choose) != 0 ||
        ref_method(in, cls, "on_request_routed", &in->ref_on_routed) != 0 ||
        ref_method(in, cls, "on_request_completed", &in->ref_on_completed) != 0 ||
        ref_method(in, cls, "on_replicas_changed", &in->ref_on_changed) != 0 ||
        ref_method(in, cls, "initialize_state", &ref_init) != 0 ||
        ref_method(in, cls, "self_test", &ref_test) != 0)
        goto fail;
    if (in->ref_choose == LUA_NOREF) {
        snprintf(in->sb->err, sizeof in->sb->err, "%s: the router class has no choose_replicas",
                 in->name);
        goto fail;
    }
    lua_newtable(L); /* self */
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, cls);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    in->ref_self = luaL_ref(L, LUA_REGISTRYINDEX);
    in->ref_class = luaL_ref(L, LUA_REGISTRYINDEX); /* pops the class */

    /* kwargs are decoded even when unused, so a malformed config never passes silently. */
    if (ms_sandbox_push_json(in->sb, kwargs_json) != 0)
        goto fail;
    if (ref_init != LUA_NOREF && call_init_method(in, ref_init, 1, 0) != 0)
        goto fail;
    lua_settop(L, base);
    if (ref_test != LUA_NOREF && call_init_method(in, ref_test, 0, 1) != 0)
        goto fail;
    lua_settop(L, base);
    return 0;
fail:
    lua_settop(L, base);
    return -1;
}

/* __index of the request table: materializes `id`, `headers` and `body` of the request in
 * progress on first read, and caches them in the table for the rest of the call. Outside a call
 * (a script that kept the table) every lazy field reads as nil. */
static int request_index(lua_State *L)
{
    lazy_req_t *lz = lua_touserdata(L, lua_upvalueindex(1));
    const ms_route_request_t *r = lz->req;
    if (!r || lua_type(L, 2) != LUA_TSTRING)
        return 0;
    size_t kl;
    const char *k = lua_tolstring(L, 2, &kl);
    unsigned bit;
    if (kl == 2 && memcmp(k, "id", 2) == 0) {
        bit = LAZY_ID;
        lua_pushstring(L, r->id ? r->id : "");
    } else if (kl == 4 && memcmp(k, "body", 4) == 0) {
        bit = LAZY_BODY;
        lua_pushlstring(L, r->body ? r->body : "", r->body ? r->body_len : 0);
    } else if (kl == 7 && memcmp(k, "headers", 7) == 0) {
        bit = LAZY_HEADERS;
        lua_createtable(L, 0, (int)r->n_headers);
        for (size_t i = 0; i < r->n_headers; i++) {
            const ms_http_header_t *h = &r->headers[i];
            luaL_Buffer b;
            luaL_buffinit(L, &b);
            for (size_t j = 0; j < h->name_len; j++)
                luaL_addchar(&b, (char)tolower((unsigned char)h->name[j]));
            luaL_pushresult(&b);
            lua_pushvalue(L, -1);
            lua_rawget(L, -3);
            if (lua_isstring(L, -1)) { /* repeated header: join, as HTTP allows */
                lua_pushliteral(L, ", ");
                lua_pushlstring(L, h->value, h->value_len);
                lua_concat(L, 3);
            } else {
                lua_pop(L, 1);
                lua_pushlstring(L, h->value, h->value_len);
            }
            lua_rawset(L, -3);
        }
    } else {
        return 0;
    }
    lua_pushvalue(L, 2);
    lua_pushvalue(L, -2);
    lua_rawset(L, 1);
    lz->set |= bit;
    return 1;
}

/* The request table: one per instance, with a protected metatable whose __index is the lazy
 * materializer above. */
static int new_request_ref(instance_t *in)
{
    lua_State *L = in->L;
    lua_createtable(L, 0, 8);
    lua_createtable(L, 0, 2);
    lua_pushlightuserdata(L, &in->lazy);
    lua_pushcclosure(L, request_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable"); /* getmetatable(request) is false: not replaceable */
    lua_setmetatable(L, -2);
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

static int new_table_ref(lua_State *L)
{
    lua_newtable(L);
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

static void pin_hot_values(instance_t *in)
{
    lua_State *L = in->L;
    int refs[] = {in->ref_choose,  in->ref_self,      in->ref_candidates,
                  in->ref_request, in->ref_on_routed, in->ref_on_completed};
    lua_settop(L, MS_SANDBOX_HANDLER_SLOT);
    for (size_t i = 0; i < sizeof refs / sizeof refs[0]; i++)
        lua_rawgeti(L, LUA_REGISTRYINDEX, refs[i]); /* LUA_NOREF pushes nil */
}

static void instance_free(instance_t *in)
{
    if (!in)
        return;
    ms_sandbox_free(in->sb); /* lua_close releases every ref at once */
    for (int i = 0; i < in->nslots; i++)
        free(in->slots[i].id);
    free(in->slots);
    free(in->by_table);
    free(in);
}

/* Reads the file, compiles it into a fresh sandbox and instantiates the class. Returns NULL with
 * the message in err on failure; the digest of what was read is in sha (if it could be read). */
static instance_t *instance_load(ms_router_script_t *s, char *err, size_t errlen, char sha[65])
{
    sha[0] = 0;
    ms_buf_t text = {0};
    if (ms_read_file(s->name, &text) != 0) {
        snprintf(err, errlen, "%s: %s", s->name, strerror(errno));
        ms_buf_free(&text);
        return NULL;
    }
    ms_sha256_hex(text.data ? text.data : "", text.len, sha);

    instance_t *in = ms_calloc(1, sizeof *in);
    in->name = s->name;
    in->ref_self = in->ref_class = in->ref_choose = LUA_NOREF;
    in->ref_on_routed = in->ref_on_completed = in->ref_on_changed = LUA_NOREF;
    memcpy(in->sha256, sha, sizeof in->sha256);
    char *e = NULL;
    in->sb = ms_sandbox_new(s->mem_limit, &e);
    if (!in->sb) {
        snprintf(err, errlen, "%s", e ? e : "cannot create the sandbox");
        free(e);
        free(in);
        ms_buf_free(&text);
        return NULL;
    }
    in->L = in->sb->L;
    in->ref_candidates = new_table_ref(in->L);
    in->ref_request = new_request_ref(in);
    int rc = ms_sandbox_load(in->sb, text.data ? text.data : "", text.len, s->name);
    ms_buf_free(&text);
    if (rc != 0 || instantiate(in, s->attr, s->kwargs_json) != 0) {
        snprintf(err, errlen, "%s", in->sb->err);
        instance_free(in);
        return NULL;
    }
    pin_hot_values(in);
    return in;
}

ms_router_script_t *ms_router_script_new_class(const char *file, const char *attr,
                                               const char *kwargs_json, uint64_t budget_us,
                                               char **err)
{
    ms_router_script_t *s = ms_calloc(1, sizeof *s);
    s->budget_us = budget_us ? budget_us : MS_SCRIPT_DEFAULT_BUDGET_US;
    s->name = file ? ms_strdup(file) : builtin_router_path();
    s->attr = attr && *attr ? ms_strdup(attr) : NULL;
    s->kwargs_json = kwargs_json ? ms_strdup(kwargs_json) : NULL;
    char msg[512], sha[65];
    s->cur = instance_load(s, msg, sizeof msg, sha);
    if (!s->cur) {
        const char *m = msg; /* a pointer: ms_strdup's NULL test on an array trips -Waddress */
        *err = ms_strdup(m);
        ms_router_script_free(s);
        return NULL;
    }
    s->version = 1;
    return s;
}

ms_router_script_t *ms_router_script_new(const char *path, const char *kwargs_json,
                                         uint64_t budget_us, char **err)
{
    return ms_router_script_new_class(path, NULL, kwargs_json, budget_us, err);
}

void ms_router_script_free(ms_router_script_t *s)
{
    if (!s)
        return;
    instance_free(s->cur);
    instance_free(s->pending);
    free(s->name);
    free(s->attr);
    free(s->kwargs_json);
    free(s);
}

void ms_router_script_set_memory_limit(ms_router_script_t *s, size_t bytes)
{
    s->mem_limit = bytes;
    size_t limit = bytes ? bytes : MS_SANDBOX_DEFAULT_MEM_LIMIT;
    s->cur->sb->mem_limit = limit;
    if (s->pending)
        s->pending->sb->mem_limit = limit;
}

/* ---- replica set ---------------------------------------------------------------------------- *
 * Each public update goes to the live instance and, during a reload, to the prepared one too, so
 * that the commit swaps in a router that has seen everything. */

static size_t hash_ptr(const void *p)
{
    return (size_t)(((uintptr_t)p >> 4) * 0x9e3779b97f4a7c15ull >> 20);
}

static void by_table_insert(instance_t *in, const void *t, int index)
{
    size_t h = hash_ptr(t);
    while (in->by_table[h & in->by_table_mask].table)
        h++;
    in->by_table[h & in->by_table_mask] = (cand_entry_t){t, index};
}

/* Rebuilds the address map from the slots: O(slots), on replica set changes only. */
static void rebuild_by_table(instance_t *in)
{
    size_t size = 16;
    while (size < 2 * (size_t)in->ncand)
        size *= 2;
    free(in->by_table);
    in->by_table = ms_calloc(size, sizeof *in->by_table);
    in->by_table_mask = size - 1;
    for (int i = 0; i < in->nslots; i++) {
        if (in->slots[i].ref == LUA_NOREF)
            continue;
        lua_rawgeti(in->L, LUA_REGISTRYINDEX, in->slots[i].ref);
        by_table_insert(in, lua_topointer(in->L, -1), i);
        lua_pop(in->L, 1);
    }
}

static replica_slot_t *slot_of(instance_t *in, int index)
{
    if (index < 0 || index >= in->nslots || in->slots[index].ref == LUA_NOREF)
        return NULL;
    return &in->slots[index];
}

static void grow_slots(instance_t *in, int index)
{
    int n = in->nslots ? in->nslots : 8;
    while (n <= index)
        n *= 2;
    in->slots = ms_realloc(in->slots, (size_t)n * sizeof *in->slots);
    for (int i = in->nslots; i < n; i++)
        in->slots[i] = (replica_slot_t){.ref = LUA_NOREF};
    in->nslots = n;
}

/* Pushes a fresh replica table: the fields C keeps up to date, and the two tables the script may
 * read (filled by ms_router_script_set_routing_stats / _set_model_ids). */
static void push_replica_table(lua_State *L, int index, const char *id, int max_ongoing)
{
    lua_createtable(L, 0, 8);
    lua_pushstring(L, id ? id : "");
    lua_setfield(L, -2, "id");
    lua_pushinteger(L, index);
    lua_setfield(L, -2, "index");
    lua_pushinteger(L, 0);
    lua_setfield(L, -2, "ongoing");
    lua_pushinteger(L, max_ongoing);
    lua_setfield(L, -2, "max_ongoing_requests");
    lua_newtable(L);
    lua_setfield(L, -2, "routing_stats");
    lua_newtable(L);
    lua_setfield(L, -2, "multiplexed_model_ids");
}

static void inst_add_replica(instance_t *in, int index, const char *id, int max_ongoing)
{
    lua_State *L = in->L;
    replica_slot_t *slot = slot_of(in, index);
    if (slot) { /* already known: update in place, keep its table identity */
        free(slot->id);
        slot->id = ms_strdup(id ? id : "");
        slot->max_ongoing = max_ongoing;
        lua_rawgeti(L, LUA_REGISTRYINDEX, slot->ref);
        lua_pushstring(L, slot->id);
        lua_setfield(L, -2, "id");
        lua_pushinteger(L, max_ongoing);
        lua_setfield(L, -2, "max_ongoing_requests");
        lua_pop(L, 1);
        in->replicas_changed = 1;
        return;
    }
    if (index >= in->nslots)
        grow_slots(in, index);
    slot = &in->slots[index];
    slot->id = ms_strdup(id ? id : "");
    slot->max_ongoing = max_ongoing;
    slot->ongoing = 0;
    push_replica_table(L, index, slot->id, max_ongoing);
    lua_pushvalue(L, SLOT_CANDIDATES);
    lua_pushvalue(L, -2);
    slot->pos = ++in->ncand;
    lua_rawseti(L, -2, slot->pos);
    lua_pop(L, 1);
    slot->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    rebuild_by_table(in);
    in->replicas_changed = 1;
}

void ms_router_script_add_replica(ms_router_script_t *s, int index, const char *id,
                                  int max_ongoing_requests)
{
    if (index < 0 || index >= MS_SCRIPT_MAX_INDEX) {
        ms_warn("router %s: replica index %d out of range, ignored", s->name, index);
        return;
    }
    inst_add_replica(s->cur, index, id, max_ongoing_requests);
    if (s->pending)
        inst_add_replica(s->pending, index, id, max_ongoing_requests);
}

/* Compacts the candidates array by moving the last entry into the hole, so `#candidates` stays
 * exact and removal is O(1). The order of candidates is not meaningful. */
static void inst_remove_replica(instance_t *in, int index)
{
    lua_State *L = in->L;
    replica_slot_t *slot = slot_of(in, index);
    if (!slot)
        return;
    lua_pushvalue(L, SLOT_CANDIDATES);
    if (slot->pos != in->ncand) {
        for (int i = 0; i < in->nslots; i++) { /* the slot of the last entry; rare, O(slots) */
            if (in->slots[i].ref != LUA_NOREF && in->slots[i].pos == in->ncand) {
                in->slots[i].pos = slot->pos;
                break;
            }
        }
        lua_rawgeti(L, -1, in->ncand);
        lua_rawseti(L, -2, slot->pos);
    }
    lua_pushnil(L);
    lua_rawseti(L, -2, in->ncand);
    lua_pop(L, 1);
    in->ncand--;
    luaL_unref(L, LUA_REGISTRYINDEX, slot->ref);
    free(slot->id);
    *slot = (replica_slot_t){.ref = LUA_NOREF};
    rebuild_by_table(in);
    in->replicas_changed = 1;
}

void ms_router_script_remove_replica(ms_router_script_t *s, int index)
{
    inst_remove_replica(s->cur, index);
    if (s->pending)
        inst_remove_replica(s->pending, index);
}

static void inst_set_ongoing(instance_t *in, int index, int ongoing)
{
    replica_slot_t *slot = slot_of(in, index);
    if (!slot)
        return;
    slot->ongoing = ongoing;
    lua_rawgeti(in->L, LUA_REGISTRYINDEX, slot->ref);
    lua_pushinteger(in->L, ongoing);
    lua_setfield(in->L, -2, "ongoing");
    lua_pop(in->L, 1);
}

void ms_router_script_set_ongoing(ms_router_script_t *s, int index, int ongoing)
{
    inst_set_ongoing(s->cur, index, ongoing);
    if (s->pending)
        inst_set_ongoing(s->pending, index, ongoing);
}

/* Replaces the contents of the replica's `field` table in place (its identity is kept, so a
 * script holding on to it sees the new values). The new contents are on top of the stack. */
static void refill_field(lua_State *L, int replica, const char *field)
{
    int src = lua_gettop(L);
    lua_getfield(L, replica, field);
    if (!lua_istable(L, -1)) { /* the script replaced it: put a table back */
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, replica, field);
    }
    int dst = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, dst)) { /* clear: assigning nil to the current key is allowed */
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_pushnil(L);
        lua_rawset(L, dst);
    }
    lua_pushnil(L);
    while (lua_next(L, src)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, dst);
    }
    lua_settop(L, src - 1);
}

static void inst_set_model_ids(instance_t *in, int index, const char *const *ids, size_t n)
{
    lua_State *L = in->L;
    replica_slot_t *slot = slot_of(in, index);
    if (!slot)
        return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, slot->ref);
    lua_createtable(L, 0, (int)n);
    for (size_t i = 0; i < n; i++) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, ids[i]);
    }
    refill_field(L, lua_gettop(L) - 1, "multiplexed_model_ids");
    lua_pop(L, 1);
}

void ms_router_script_set_model_ids(ms_router_script_t *s, int index, const char *const *ids,
                                    size_t n)
{
    inst_set_model_ids(s->cur, index, ids, n);
    if (s->pending)
        inst_set_model_ids(s->pending, index, ids, n);
}

static int inst_set_routing_stats(instance_t *in, int index, const char *json)
{
    lua_State *L = in->L;
    replica_slot_t *slot = slot_of(in, index);
    if (!slot)
        return -1;
    int base = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, slot->ref);
    if (ms_sandbox_push_json(in->sb, json) != 0 || !lua_istable(L, -1)) {
        lua_settop(L, base);
        return -1;
    }
    refill_field(L, lua_gettop(L) - 1, "routing_stats");
    lua_pop(L, 1);
    return 0;
}

int ms_router_script_set_routing_stats(ms_router_script_t *s, int index, const char *json)
{
    int rc = inst_set_routing_stats(s->cur, index, json);
    if (s->pending)
        inst_set_routing_stats(s->pending, index, json);
    return rc;
}

/* ---- calls ---------------------------------------------------------------------------------- */

/* Stores `val` into field `key` of the table on top of the stack, unless it equals the value the
 * cache says is already there. */
static void set_request_field(lua_State *L, const char *key, const char *val, size_t n,
                              field_cache_t *c)
{
    if (c->valid && c->len == n && memcmp(c->val, val, n) == 0)
        return;
    lua_pushlstring(L, val, n);
    lua_setfield(L, -2, key);
    c->valid = n < sizeof c->val;
    if (c->valid) {
        memcpy(c->val, val, n);
        c->len = n;
    }
}

/* The model id of a request that doesn't give one: Ray Serve's serve_multiplexed_model_id
 * header. The length test first keeps the scan to one compare per header. */
static const char *header_model_id(const ms_route_request_t *req, size_t *len)
{
    static const char name[] = "serve_multiplexed_model_id";
    for (size_t i = 0; i < req->n_headers; i++) {
        const ms_http_header_t *h = &req->headers[i];
        if (h->name_len == sizeof name - 1 && strncasecmp(h->name, name, sizeof name - 1) == 0) {
            *len = h->value_len;
            return h->value;
        }
    }
    *len = 0;
    return "";
}

/* Forgets the lazy fields materialized for the previous request. */
static void clear_lazy(instance_t *in)
{
    lua_State *L = in->L;
    static const char *const names[] = {"id", "headers", "body"};
    lua_pushvalue(L, SLOT_REQUEST);
    for (int i = 0; i < 3; i++) {
        if (in->lazy.set & (1u << i)) {
            lua_pushnil(L);
            lua_setfield(L, -2, names[i]);
        }
    }
    lua_pop(L, 1);
    in->lazy.set = 0;
}

/* Overwrites the persistent request table's eager fields and pushes it; no request pushes nil
 * (as Ray Serve passes None when a routing pass has no pending request). */
static void push_request(instance_t *in, const ms_route_request_t *req)
{
    lua_State *L = in->L;
    if (in->lazy.set)
        clear_lazy(in);
    in->lazy.req = req;
    if (!req) {
        lua_pushnil(L);
        return;
    }
    lua_pushvalue(L, SLOT_REQUEST);
    const char *m = req->method ? req->method : "";
    const char *p = req->path ? req->path : "";
    set_request_field(L, "method", m, strlen(m), &in->req_method);
    set_request_field(L, "path", p, strlen(p), &in->req_path);
    size_t mlen;
    const char *model = req->multiplexed_model_id;
    if (model && *model)
        mlen = strlen(model);
    else
        model = header_model_id(req, &mlen);
    set_request_field(L, "multiplexed_model_id", model, mlen, &in->req_model);
}

/* If the value at `idx` is one of the current candidate tables (the very table, not a lookalike),
 * returns its caller index; otherwise -1. Raw accesses only: no script code runs here. */
static int candidate_index(const instance_t *in, int idx)
{
    const void *t = lua_topointer(in->L, idx); /* NULL for non-tables and non-objects */
    if (!t || !in->by_table)
        return -1;
    for (size_t h = hash_ptr(t);; h++) {
        const cand_entry_t *e = &in->by_table[h & in->by_table_mask];
        if (e->table == t)
            return e->index;
        if (!e->table)
            return -1;
    }
}

typedef struct choice_out {
    int *index;
    size_t cap, n;
    int *rank_end;
    size_t rank_cap, nranks;
} choice_out_t;

/* Appends the known candidates of the list at `list` as one rank; empty ranks are dropped. */
static void collect_rank(instance_t *in, int list, choice_out_t *o)
{
    lua_State *L = in->L;
    size_t start = o->n;
    int len = (int)lua_objlen(L, list);
    for (int i = 1; i <= len && o->n < o->cap; i++) {
        lua_rawgeti(L, list, i);
        int index = candidate_index(in, -1);
        lua_pop(L, 1);
        if (index >= 0)
            o->index[o->n++] = index;
    }
    if (o->n > start && o->nranks < o->rank_cap)
        o->rank_end[o->nranks++] = (int)o->n;
    else
        o->n = start; /* no room for the rank: forget its entries too */
}

/* Converts the result on top of the stack: a list of ranks, or a flat list of candidates taken
 * as one rank. Returns the number of ranks, or -1 if the result is not a list. The first entry
 * tells the two shapes apart, and is reused as the first rank when it is one (this runs on every
 * request: each API call here is a measurable part of a routing call). */
static int convert_result(ms_router_script_t *s, instance_t *in, choice_out_t *o)
{
    lua_State *L = in->L;
    int res = lua_gettop(L);
    if (!lua_istable(L, res)) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s: choose_replicas must return a list of ranks, got %s",
                 s->name, luaL_typename(L, res));
        fail(s, msg);
        return -1;
    }
    lua_rawgeti(L, res, 1);
    if (lua_type(L, -1) == LUA_TTABLE) {
        if (candidate_index(in, -1) >= 0) {
            collect_rank(in, res, o);
            return (int)o->nranks;
        }
        collect_rank(in, res + 1, o);
    }
    lua_settop(L, res);
    int len = (int)lua_objlen(L, res);
    for (int r = 2; r <= len && o->nranks < o->rank_cap; r++) {
        lua_rawgeti(L, res, r);
        if (lua_type(L, -1) == LUA_TTABLE)
            collect_rank(in, res + 1, o);
        lua_settop(L, res);
    }
    return (int)o->nranks;
}

/* Runs on_replicas_changed(self, candidates) once after a burst of replica set changes, right
 * before the next choose: the set changes one replica at a time on the control loop, and a
 * script rebuilding a ring on each change would do N rebuilds for N new replicas. */
static void notify_replicas_changed(ms_router_script_t *s, instance_t *in)
{
    lua_State *L = in->L;
    in->replicas_changed = 0; /* even if it fails: a broken hook must not run on every request */
    if (in->ref_on_changed == LUA_NOREF)
        return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, in->ref_on_changed);
    lua_pushvalue(L, SLOT_SELF);
    lua_pushvalue(L, SLOT_CANDIDATES);
    if (ms_sandbox_call(in->sb, 2, 0, MS_SCRIPT_UPDATE_BUDGET_US) != 0)
        fail(s, in->sb->err);
}

int ms_router_script_choose(ms_router_script_t *s, const ms_route_request_t *req, int *out_index,
                            size_t out_cap, int *out_rank_end, size_t rank_cap)
{
    instance_t *in = s->cur;
    lua_State *L = in->L;
    if (in->replicas_changed)
        notify_replicas_changed(s, in);
    if (in->ncand == 0)
        return 0; /* nothing to choose from: not worth a call */
    lua_pushvalue(L, SLOT_CHOOSE);
    lua_pushvalue(L, SLOT_SELF);
    lua_pushvalue(L, SLOT_CANDIDATES);
    push_request(in, req);
    int rc = ms_sandbox_call(in->sb, 3, 1, s->budget_us);
    in->lazy.req = NULL; /* the caller's request is not valid after the call */
    if (rc != 0) {
        fail(s, in->sb->err);
        return -1;
    }
    choice_out_t o = {out_index, out_cap, 0, out_rank_end, rank_cap, 0};
    int n = convert_result(s, in, &o);
    lua_settop(L, SLOT_TOP);
    return n;
}

void ms_router_script_on_routed(ms_router_script_t *s, const ms_route_request_t *req, int index)
{
    instance_t *in = s->cur;
    lua_State *L = in->L;
    replica_slot_t *slot = slot_of(in, index);
    if (in->ref_on_routed == LUA_NOREF || !slot)
        return;
    lua_pushvalue(L, SLOT_ON_ROUTED);
    lua_pushvalue(L, SLOT_SELF);
    push_request(in, req);
    lua_rawgeti(L, LUA_REGISTRYINDEX, slot->ref);
    int rc = ms_sandbox_call(in->sb, 3, 0, s->budget_us);
    in->lazy.req = NULL;
    if (rc != 0)
        fail(s, in->sb->err);
}

void ms_router_script_on_completed(ms_router_script_t *s, int index, double latency_s, int ok)
{
    instance_t *in = s->cur;
    lua_State *L = in->L;
    replica_slot_t *slot = slot_of(in, index);
    if (in->ref_on_completed == LUA_NOREF || !slot)
        return;
    lua_pushvalue(L, SLOT_ON_COMPLETED);
    lua_pushvalue(L, SLOT_SELF);
    lua_rawgeti(L, LUA_REGISTRYINDEX, slot->ref);
    lua_pushnumber(L, latency_s);
    lua_pushboolean(L, ok);
    if (ms_sandbox_call(in->sb, 4, 0, s->budget_us) != 0)
        fail(s, in->sb->err);
}

/* ---- reload --------------------------------------------------------------------------------- */

/* Copies the replica's `field` table from the old instance's table (at from_idx) into the new
 * one's (on top of `to`'s stack) in place. */
static void copy_replica_field(instance_t *from, int from_idx, instance_t *to, const char *field)
{
    lua_getfield(from->L, from_idx, field);
    size_t count = 0;
    if (lua_istable(from->L, -1) && copy_value(from->L, -1, to->L, 0, &count) == 0) {
        refill_field(to->L, lua_gettop(to->L) - 1, field);
    }
    lua_pop(from->L, 1);
}

/* Re-adds the old instance's replicas to the new one, in the same candidate order, with the
 * state C set (id, limit, ongoing) and the stats and model ids as the script sees them. */
static void carry_replicas(instance_t *from, instance_t *to)
{
    lua_State *L = from->L;
    lua_pushvalue(L, SLOT_CANDIDATES);
    for (int pos = 1; pos <= from->ncand; pos++) {
        lua_rawgeti(L, -1, pos);
        int index = candidate_index(from, -1);
        replica_slot_t *slot = slot_of(from, index);
        if (slot) {
            inst_add_replica(to, index, slot->id, slot->max_ongoing);
            inst_set_ongoing(to, index, slot->ongoing);
            lua_rawgeti(to->L, LUA_REGISTRYINDEX, to->slots[index].ref);
            copy_replica_field(from, lua_gettop(L), to, "routing_stats");
            copy_replica_field(from, lua_gettop(L), to, "multiplexed_model_ids");
            lua_pop(to->L, 1);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* Copies old self[name] to new self[name] for each string in the new class's `persist` list. */
static void carry_persisted(ms_router_script_t *s, instance_t *from, instance_t *to)
{
    lua_State *L = to->L;
    int base = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, to->ref_class);
    class_get(L, lua_gettop(L), "persist");
    if (!lua_istable(L, -1)) {
        lua_settop(L, base);
        return;
    }
    int list = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, to->ref_self);
    lua_rawgeti(from->L, LUA_REGISTRYINDEX, from->ref_self);
    int len = (int)lua_objlen(L, list);
    for (int i = 1; i <= len; i++) {
        lua_rawgeti(L, list, i);
        if (lua_type(L, -1) == LUA_TSTRING) {
            size_t n;
            const char *key = lua_tolstring(L, -1, &n);
            lua_pushlstring(from->L, key, n);
            lua_rawget(from->L, -2);
            size_t count = 0;
            if (lua_isnil(from->L, -1))
                lua_pop(L, 1); /* nothing to carry: keep what initialize_state set */
            else if (copy_value(from->L, -1, L, 0, &count) == 0)
                lua_rawset(L, -3); /* self[key] = copy; pops the copy and the key */
            else {
                ms_warn("router %s: reload: persist field '%s' is too deep or cyclic, not kept",
                        s->name, key);
                lua_pop(L, 1);
            }
            lua_pop(from->L, 1);
        } else {
            lua_pop(L, 1);
        }
    }
    lua_pop(from->L, 1);
    lua_settop(L, base);
}

static void reload_failed(ms_router_script_t *s, const char *msg)
{
    s->reload_failures++;
    snprintf(s->last_reload_error, sizeof s->last_reload_error, "%s", msg);
    ms_warn("router %s: reload failed, keeping version %llu: %s", s->name,
            (unsigned long long)s->version, msg);
}

int ms_router_script_reload_prepare(ms_router_script_t *s, json_t **info)
{
    ms_router_script_reload_abort(s);
    char msg[512], sha[65];
    instance_t *in = instance_load(s, msg, sizeof msg, sha);
    if (in) {
        carry_replicas(s->cur, in);
        s->pending = in;
    } else {
        reload_failed(s, msg);
    }
    if (info) {
        *info = json_pack("{s:s, s:I, s:s, s:b}", "path", s->name, "version",
                          (json_int_t)(s->version + (in != NULL)), "sha256", sha, "ok", in != NULL);
        json_object_set_new(*info, "error", in ? json_null() : json_string(msg));
    }
    return in ? 0 : -1;
}

int ms_router_script_reload_commit(ms_router_script_t *s)
{
    if (!s->pending)
        return -1;
    instance_t *old = s->cur;
    carry_persisted(s, old, s->pending);
    s->cur = s->pending;
    s->pending = NULL;
    instance_free(old);
    s->version++;
    ms_info("router %s: reloaded, version %llu (sha256 %.12s)", s->name,
            (unsigned long long)s->version, s->cur->sha256);
    return 0;
}

void ms_router_script_reload_abort(ms_router_script_t *s)
{
    instance_free(s->pending);
    s->pending = NULL;
}

/* ---- status --------------------------------------------------------------------------------- */

uint64_t ms_router_script_failures(const ms_router_script_t *s)
{
    return s->failures;
}

const char *ms_router_script_last_error(const ms_router_script_t *s)
{
    return s->last_error;
}

json_t *ms_router_script_info(const ms_router_script_t *s)
{
    return json_pack("{s:s, s:I, s:s, s:I, s:s, s:I, s:s, s:b}", "path", s->name, "version",
                     (json_int_t)s->version, "sha256", s->cur->sha256, "failures",
                     (json_int_t)s->failures, "last_error", s->last_error, "reload_failures",
                     (json_int_t)s->reload_failures, "last_reload_error", s->last_reload_error,
                     "reload_pending", s->pending != NULL);
}
