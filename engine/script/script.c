/*
 * script: request-router scripts. Owns, per router instance, the sandboxed Lua state (sandbox.c),
 * the script's `self`, and the persistent tables the router reads: one table per replica,
 * updated in place by C, the candidates array (compacted on removal), and the request table
 * whose fields are overwritten on each call. Nothing is built per request except the strings
 * of the request itself, so routing costs a few table stores plus the script's own work.
 *
 * Contract of a router file: the chunk must `return` a class table with a `choose_replicas`
 * function; `initialize_state` and `on_request_routed` are optional. See docs/routing.md.
 */
#include "script/script.h"

#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "core/core.h"
#include "sandbox/sandbox.h"

/* Loading the chunk and initialize_state may build lookup tables: they get a longer budget than
 * one routing call. */
#define MS_SCRIPT_INIT_BUDGET_US    1000000u
#define MS_SCRIPT_DEFAULT_BUDGET_US 1000u
/* Caller slot numbers are small dense integers; anything beyond this is a caller bug. */
#define MS_SCRIPT_MAX_INDEX (1 << 20)

/* Values pinned at the bottom of the Lua stack, right above the sandbox's message handler:
 * lua_pushvalue from a fixed slot is the cheapest way to reach them on every request. They are
 * pinned once the script has loaded and stay until lua_close. */
enum {
    SLOT_CHOOSE = MS_SANDBOX_HANDLER_SLOT + 1,
    SLOT_SELF,
    SLOT_CANDIDATES,
    SLOT_REQUEST,
    SLOT_ON_ROUTED, /* nil if the script has no on_request_routed */
};

/* The last value stored in one request field, so unchanged fields (method, path and model id
 * repeat from request to request) aren't re-interned and re-stored on every call. */
typedef struct field_cache {
    char val[128];
    int valid;
} field_cache_t;

typedef struct replica_slot {
    int ref; /* registry ref of the replica's table, LUA_NOREF if the slot is free */
    int pos; /* 1-based position in the candidates array */
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

struct ms_router_script {
    ms_sandbox_t *sb;
    lua_State *L;
    uint64_t budget_us;
    char *name; /* file name, for logs */

    int ref_self;
    int ref_choose;
    int ref_on_routed; /* LUA_NOREF if the script has none */
    int ref_candidates;
    int ref_request;

    replica_slot_t *slots; /* by caller index */
    int nslots;
    int ncand;
    cand_entry_t *by_table; /* open addressing, power-of-two size, at most half full */
    size_t by_table_mask;

    field_cache_t req_method, req_path, req_model;

    uint64_t failures;
    char last_error[512];
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

/* Stores the function class[name] as a registry ref; LUA_NOREF if absent. -1 if it is present
 * but not a function. The class table is on top of the stack. */
static int ref_method(ms_router_script_t *s, const char *name, int *ref)
{
    lua_State *L = s->L;
    lua_getfield(L, -1, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        *ref = LUA_NOREF;
        return 0;
    }
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        snprintf(s->sb->err, sizeof s->sb->err, "%s: %s must be a function", s->name, name);
        return -1;
    }
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Runs the chunk, checks it returned a class, and instantiates self = setmetatable({}, {__index =
 * class}). Leaves the stack as it found it. */
static int instantiate(ms_router_script_t *s, const char *kwargs_json)
{
    lua_State *L = s->L;
    if (ms_sandbox_call(s->sb, 0, 1, MS_SCRIPT_INIT_BUDGET_US) != 0)
        return -1;
    if (!lua_istable(L, -1)) {
        snprintf(s->sb->err, sizeof s->sb->err,
                 "%s: the chunk must return a router class (a table), got %s", s->name,
                 luaL_typename(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    int ref_init = LUA_NOREF;
    if (ref_method(s, "choose_replicas", &s->ref_choose) != 0 ||
        ref_method(s, "on_request_routed", &s->ref_on_routed) != 0 ||
        ref_method(s, "initialize_state", &ref_init) != 0) {
        lua_pop(L, 1);
        return -1;
    }
    if (s->ref_choose == LUA_NOREF) {
        snprintf(s->sb->err, sizeof s->sb->err, "%s: the router class has no choose_replicas",
                 s->name);
        lua_pop(L, 1);
        return -1;
    }
    lua_newtable(L); /* self */
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    lua_remove(L, -2); /* the class stays reachable through self's metatable */
    s->ref_self = luaL_ref(L, LUA_REGISTRYINDEX);

    /* kwargs are decoded even when unused, so a malformed config never passes silently. */
    if (ms_sandbox_push_json(s->sb, kwargs_json) != 0)
        return -1;
    if (ref_init == LUA_NOREF) {
        lua_pop(L, 1);
        return 0;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref_init);
    luaL_unref(L, LUA_REGISTRYINDEX, ref_init);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_self);
    lua_pushvalue(L, -3);
    lua_remove(L, -4);
    return ms_sandbox_call(s->sb, 2, 0, MS_SCRIPT_INIT_BUDGET_US);
}

static int new_table_ref(lua_State *L)
{
    lua_newtable(L);
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

static void pin_hot_values(ms_router_script_t *s)
{
    lua_State *L = s->L;
    int refs[] = {s->ref_choose, s->ref_self, s->ref_candidates, s->ref_request, s->ref_on_routed};
    lua_settop(L, MS_SANDBOX_HANDLER_SLOT);
    for (size_t i = 0; i < sizeof refs / sizeof refs[0]; i++)
        lua_rawgeti(L, LUA_REGISTRYINDEX, refs[i]); /* LUA_NOREF pushes nil */
}

ms_router_script_t *ms_router_script_new(const char *path, const char *kwargs_json,
                                         uint64_t budget_us, char **err)
{
    ms_router_script_t *s = ms_calloc(1, sizeof *s);
    s->ref_self = s->ref_choose = s->ref_on_routed = LUA_NOREF;
    s->budget_us = budget_us ? budget_us : MS_SCRIPT_DEFAULT_BUDGET_US;
    s->name = path ? ms_strdup(path) : builtin_router_path();
    s->sb = ms_sandbox_new(0, err);
    if (!s->sb) {
        free(s->name);
        free(s);
        return NULL;
    }
    s->L = s->sb->L;
    s->ref_candidates = new_table_ref(s->L);
    s->ref_request = new_table_ref(s->L);
    if (ms_sandbox_load_file(s->sb, s->name) != 0 || instantiate(s, kwargs_json) != 0) {
        *err = ms_strdup(s->sb->err);
        ms_router_script_free(s);
        return NULL;
    }
    pin_hot_values(s);
    return s;
}

void ms_router_script_free(ms_router_script_t *s)
{
    if (!s)
        return;
    ms_sandbox_free(s->sb); /* lua_close releases every ref at once */
    free(s->slots);
    free(s->by_table);
    free(s->name);
    free(s);
}

void ms_router_script_set_memory_limit(ms_router_script_t *s, size_t bytes)
{
    s->sb->mem_limit = bytes ? bytes : MS_SANDBOX_DEFAULT_MEM_LIMIT;
}

/* ---- replica set ---------------------------------------------------------------------------- */

static size_t hash_ptr(const void *p)
{
    return (size_t)(((uintptr_t)p >> 4) * 0x9e3779b97f4a7c15ull >> 20);
}

static void by_table_insert(ms_router_script_t *s, const void *t, int index)
{
    size_t h = hash_ptr(t);
    while (s->by_table[h & s->by_table_mask].table)
        h++;
    s->by_table[h & s->by_table_mask] = (cand_entry_t){t, index};
}

/* Rebuilds the address map from the slots: O(slots), on replica set changes only. */
static void rebuild_by_table(ms_router_script_t *s)
{
    size_t size = 16;
    while (size < 2 * (size_t)s->ncand)
        size *= 2;
    free(s->by_table);
    s->by_table = ms_calloc(size, sizeof *s->by_table);
    s->by_table_mask = size - 1;
    for (int i = 0; i < s->nslots; i++) {
        if (s->slots[i].ref == LUA_NOREF)
            continue;
        lua_rawgeti(s->L, LUA_REGISTRYINDEX, s->slots[i].ref);
        by_table_insert(s, lua_topointer(s->L, -1), i);
        lua_pop(s->L, 1);
    }
}

static replica_slot_t *slot_of(ms_router_script_t *s, int index)
{
    if (index < 0 || index >= s->nslots || s->slots[index].ref == LUA_NOREF)
        return NULL;
    return &s->slots[index];
}

static void grow_slots(ms_router_script_t *s, int index)
{
    int n = s->nslots ? s->nslots : 8;
    while (n <= index)
        n *= 2;
    s->slots = ms_realloc(s->slots, (size_t)n * sizeof *s->slots);
    for (int i = s->nslots; i < n; i++)
        s->slots[i] = (replica_slot_t){.ref = LUA_NOREF, .pos = 0};
    s->nslots = n;
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

void ms_router_script_add_replica(ms_router_script_t *s, int index, const char *id,
                                  int max_ongoing_requests)
{
    lua_State *L = s->L;
    if (index < 0 || index >= MS_SCRIPT_MAX_INDEX) {
        ms_warn("router %s: replica index %d out of range, ignored", s->name, index);
        return;
    }
    replica_slot_t *slot = slot_of(s, index);
    if (slot) { /* already known: update in place, keep its table identity */
        lua_rawgeti(L, LUA_REGISTRYINDEX, slot->ref);
        lua_pushstring(L, id ? id : "");
        lua_setfield(L, -2, "id");
        lua_pushinteger(L, max_ongoing_requests);
        lua_setfield(L, -2, "max_ongoing_requests");
        lua_pop(L, 1);
        return;
    }
    if (index >= s->nslots)
        grow_slots(s, index);
    slot = &s->slots[index];
    push_replica_table(L, index, id, max_ongoing_requests);
    lua_pushvalue(L, SLOT_CANDIDATES);
    lua_pushvalue(L, -2);
    slot->pos = ++s->ncand;
    lua_rawseti(L, -2, slot->pos);
    lua_pop(L, 1);
    slot->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    rebuild_by_table(s);
}

/* Compacts the candidates array by moving the last entry into the hole, so `#candidates` stays
 * exact and removal is O(1). The order of candidates is not meaningful. */
void ms_router_script_remove_replica(ms_router_script_t *s, int index)
{
    lua_State *L = s->L;
    replica_slot_t *slot = slot_of(s, index);
    if (!slot)
        return;
    lua_pushvalue(L, SLOT_CANDIDATES);
    if (slot->pos != s->ncand) {
        lua_rawgeti(L, -1, s->ncand);
        lua_getfield(L, -1, "index");
        int moved = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        lua_rawseti(L, -2, slot->pos);
        s->slots[moved].pos = slot->pos;
    }
    lua_pushnil(L);
    lua_rawseti(L, -2, s->ncand);
    lua_pop(L, 1);
    s->ncand--;
    luaL_unref(L, LUA_REGISTRYINDEX, slot->ref);
    *slot = (replica_slot_t){.ref = LUA_NOREF, .pos = 0};
    rebuild_by_table(s);
}

void ms_router_script_set_ongoing(ms_router_script_t *s, int index, int ongoing)
{
    replica_slot_t *slot = slot_of(s, index);
    if (!slot)
        return;
    lua_rawgeti(s->L, LUA_REGISTRYINDEX, slot->ref);
    lua_pushinteger(s->L, ongoing);
    lua_setfield(s->L, -2, "ongoing");
    lua_pop(s->L, 1);
}

/* Replaces the contents of the replica's `field` table in place (its identity is kept, so a
 * script holding on to it sees the new values). The new contents are on top of the stack. */
static void refill_field(lua_State *L, int replica, const char *field)
{
    int src = lua_gettop(L);
    lua_getfield(L, replica, field);
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

void ms_router_script_set_model_ids(ms_router_script_t *s, int index, const char *const *ids,
                                    size_t n)
{
    lua_State *L = s->L;
    replica_slot_t *slot = slot_of(s, index);
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

int ms_router_script_set_routing_stats(ms_router_script_t *s, int index, const char *json)
{
    lua_State *L = s->L;
    replica_slot_t *slot = slot_of(s, index);
    if (!slot)
        return -1;
    int base = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, slot->ref);
    if (ms_sandbox_push_json(s->sb, json) != 0 || !lua_istable(L, -1)) {
        lua_settop(L, base);
        return -1;
    }
    refill_field(L, lua_gettop(L) - 1, "routing_stats");
    lua_pop(L, 1);
    return 0;
}

/* ---- calls ---------------------------------------------------------------------------------- */

/* Stores `val` into field `key` of the table on top of the stack, unless it equals the value the
 * cache says is already there. */
static void set_request_field(lua_State *L, const char *key, const char *val, field_cache_t *c)
{
    size_t n = strlen(val);
    if (c && c->valid && n < sizeof c->val && memcmp(c->val, val, n + 1) == 0)
        return;
    lua_pushlstring(L, val, n);
    lua_setfield(L, -2, key);
    if (!c)
        return;
    c->valid = n < sizeof c->val;
    if (c->valid)
        memcpy(c->val, val, n + 1);
}

/* Overwrites the persistent request table's fields and pushes it; no request pushes nil (as Ray
 * Serve passes None when a routing pass has no pending request). */
static void push_request(ms_router_script_t *s, const ms_route_request_t *req)
{
    lua_State *L = s->L;
    if (!req) {
        lua_pushnil(L);
        return;
    }
    lua_pushvalue(L, SLOT_REQUEST);
    set_request_field(L, "id", req->id ? req->id : "", NULL);
    set_request_field(L, "method", req->method ? req->method : "", &s->req_method);
    set_request_field(L, "path", req->path ? req->path : "", &s->req_path);
    set_request_field(L, "multiplexed_model_id",
                      req->multiplexed_model_id ? req->multiplexed_model_id : "", &s->req_model);
}

/* If the value at `idx` is one of the current candidate tables (the very table, not a lookalike),
 * returns its caller index; otherwise -1. Raw accesses only: no script code runs here. */
static int candidate_index(ms_router_script_t *s, int idx)
{
    const void *t = lua_topointer(s->L, idx); /* NULL for non-tables and non-objects */
    if (!t || !s->by_table)
        return -1;
    for (size_t h = hash_ptr(t);; h++) {
        const cand_entry_t *e = &s->by_table[h & s->by_table_mask];
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
static void collect_rank(ms_router_script_t *s, int list, choice_out_t *o)
{
    lua_State *L = s->L;
    size_t start = o->n;
    int len = (int)lua_objlen(L, list);
    for (int i = 1; i <= len && o->n < o->cap; i++) {
        lua_rawgeti(L, list, i);
        int index = candidate_index(s, -1);
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
 * as one rank. Returns the number of ranks, or -1 if the result is not a list. */
static int convert_result(ms_router_script_t *s, choice_out_t *o)
{
    lua_State *L = s->L;
    int res = lua_gettop(L);
    if (!lua_istable(L, res)) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s: choose_replicas must return a list of ranks, got %s",
                 s->name, luaL_typename(L, res));
        fail(s, msg);
        return -1;
    }
    lua_rawgeti(L, res, 1);
    int flat = candidate_index(s, -1) >= 0;
    lua_pop(L, 1);
    if (flat) {
        collect_rank(s, res, o);
        return (int)o->nranks;
    }
    int len = (int)lua_objlen(L, res);
    for (int r = 1; r <= len && o->nranks < o->rank_cap; r++) {
        lua_rawgeti(L, res, r);
        if (lua_istable(L, -1))
            collect_rank(s, lua_gettop(L), o);
        lua_pop(L, 1);
    }
    return (int)o->nranks;
}

int ms_router_script_choose(ms_router_script_t *s, const ms_route_request_t *req, int *out_index,
                            size_t out_cap, int *out_rank_end, size_t rank_cap)
{
    lua_State *L = s->L;
    if (s->ncand == 0)
        return 0; /* nothing to choose from: not worth a call */
    int base = lua_gettop(L);
    lua_pushvalue(L, SLOT_CHOOSE);
    lua_pushvalue(L, SLOT_SELF);
    lua_pushvalue(L, SLOT_CANDIDATES);
    push_request(s, req);
    if (ms_sandbox_call(s->sb, 3, 1, s->budget_us) != 0) {
        fail(s, s->sb->err);
        return -1;
    }
    choice_out_t o = {out_index, out_cap, 0, out_rank_end, rank_cap, 0};
    int n = convert_result(s, &o);
    lua_settop(L, base);
    return n;
}

void ms_router_script_on_routed(ms_router_script_t *s, const ms_route_request_t *req, int index)
{
    lua_State *L = s->L;
    replica_slot_t *slot = slot_of(s, index);
    if (s->ref_on_routed == LUA_NOREF || !slot)
        return;
    lua_pushvalue(L, SLOT_ON_ROUTED);
    lua_pushvalue(L, SLOT_SELF);
    push_request(s, req);
    lua_rawgeti(L, LUA_REGISTRYINDEX, slot->ref);
    if (ms_sandbox_call(s->sb, 3, 0, s->budget_us) != 0)
        fail(s, s->sb->err);
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
