/*
 * router: the request-router kind of policy script (engine/policy does loading, checks, versions,
 * failures and reload). What is the router's own: the persistent tables it reads — one table per
 * replica, updated in place by C with raw stores, the candidates array, and the request table
 * whose fields are overwritten on each call — and the parsing of its ranked answer. Nothing is
 * built per request except what the script asks for: `id`, `headers` and `body` are materialized
 * by an __index metamethod only when read.
 *
 * Every table shared with the script carries a protected metatable, so a script can neither
 * attach metamethods to them nor make C run script code outside a budgeted call; C reads them
 * with raw accesses and keeps its own copy of everything it needs (the script may scribble on the
 * tables, it only misleads itself). The replicas' C-side state lives in the router, not in a
 * version, so a reload rebuilds the new version's tables from it at commit.
 */
#include "router/router.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>

#include "core/core.h"
#include "policy/policy.h"
#include "sandbox/sandbox.h"

#define MS_SCRIPT_DEFAULT_BUDGET_US 1000u
/* on_replicas_changed may rebuild a structure over every replica (a hash ring): more than a
 * routing call, but it runs on the request path (before the next choose), so not a full second. */
#define MS_SCRIPT_UPDATE_BUDGET_US 100000u
/* Caller slot numbers are small dense integers; anything beyond this is a caller bug. */
#define MS_SCRIPT_MAX_INDEX (1 << 20)

/* The functions of a router class, in the core's order. */
enum { FN_CHOOSE, FN_ON_ROUTED, FN_ON_COMPLETED, FN_ON_CHANGED };

/* Values pinned at the bottom of each version's stack, right above the sandbox's message handler:
 * lua_pushvalue from a fixed slot is the cheapest way to reach them on every request. */
enum {
    SLOT_CHOOSE = MS_SANDBOX_HANDLER_SLOT + 1,
    SLOT_ON_ROUTED,    /* nil if the class has no on_request_routed */
    SLOT_ON_COMPLETED, /* nil if the class has no on_request_completed */
    SLOT_ON_CHANGED,   /* nil if the class has no on_replicas_changed */
    SLOT_SELF,
    SLOT_CANDIDATES,
    SLOT_REQUEST,
    SLOT_TOP = SLOT_REQUEST,
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

/* Candidate table address -> caller index, to turn the tables a script returns back into
 * indices with one API call each (LuaJIT's GC never moves objects, so addresses are stable while
 * the registry holds the tables). Identity, not a field, decides: a script can neither forge a
 * candidate nor confuse C by writing to one. Rebuilt when the replica set changes, which happens
 * on the control loop, never per request. */
typedef struct cand_entry {
    const void *table; /* NULL: empty */
    int index;
} cand_entry_t;

/* What a version of the router keeps beside its Lua state (the core's kind_data). */
typedef struct rversion {
    int *table_ref; /* by caller index: the replica's table, LUA_NOREF if none */
    int cap;
    cand_entry_t *by_table; /* open addressing, power-of-two size, at most half full */
    size_t by_table_mask;
    int replicas_changed; /* since on_replicas_changed last ran */
    int cand_len;         /* entries C wrote into the candidates array */
    field_cache_t req_method, req_path, req_model;
    lazy_req_t lazy; /* read by the request table's __index (a light userdata upvalue) */
} rversion_t;

/* A replica as C knows it: the truth the Lua tables are rebuilt from. */
typedef struct replica_slot {
    int used;
    int pos; /* 0-based position in order[] */
    char *id;
    int max_ongoing;
    int ongoing;
} replica_slot_t;

struct ms_router_script {
    ms_policy_t *p;
    replica_slot_t *slots; /* by caller index */
    int nslots;
    int *order; /* caller indices in candidate order */
    int ncand;
};

/* ---- per-version tables ---------------------------------------------------------------------- */

static rversion_t *rv(ms_policy_version_t *v)
{
    return v->kind_data;
}

static size_t hash_ptr(const void *p)
{
    return (size_t)(((uintptr_t)p >> 4) * 0x9e3779b97f4a7c15ull >> 20);
}

/* Rebuilds the address map from the version's tables: O(replicas), on replica set changes only. */
static void rebuild_by_table(ms_policy_version_t *v, const ms_router_script_t *s)
{
    rversion_t *r = rv(v);
    size_t size = 16;
    while (size < 2 * (size_t)s->ncand)
        size *= 2;
    free(r->by_table);
    r->by_table = ms_calloc(size, sizeof *r->by_table);
    r->by_table_mask = size - 1;
    for (int i = 0; i < s->ncand; i++) {
        int index = s->order[i];
        lua_rawgeti(v->L, LUA_REGISTRYINDEX, r->table_ref[index]);
        size_t h = hash_ptr(lua_topointer(v->L, -1));
        while (r->by_table[h & r->by_table_mask].table)
            h++;
        r->by_table[h & r->by_table_mask] = (cand_entry_t){lua_topointer(v->L, -1), index};
        lua_pop(v->L, 1);
    }
}

/* Rewrites the candidates array from C's order: whatever the script did to it is undone. */
static void rebuild_candidates(ms_policy_version_t *v, const ms_router_script_t *s)
{
    lua_State *L = v->L;
    rversion_t *r = rv(v);
    for (int i = 0; i < s->ncand; i++) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->table_ref[s->order[i]]);
        lua_rawseti(L, SLOT_CANDIDATES, i + 1);
    }
    int len = (int)lua_objlen(L, SLOT_CANDIDATES);
    int old = len > r->cand_len ? len : r->cand_len;
    for (int i = s->ncand + 1; i <= old; i++) {
        lua_pushnil(L);
        lua_rawseti(L, SLOT_CANDIDATES, i);
    }
    r->cand_len = s->ncand;
    rebuild_by_table(v, s);
    r->replicas_changed = 1;
}

static void grow_refs(rversion_t *r, int index)
{
    int n = r->cap ? r->cap : 8;
    while (n <= index)
        n *= 2;
    r->table_ref = ms_realloc(r->table_ref, (size_t)n * sizeof *r->table_ref);
    for (int i = r->cap; i < n; i++)
        r->table_ref[i] = LUA_NOREF;
    r->cap = n;
}

/* Writes C's view of the replica into its table (creating it when needed). */
static void write_replica(ms_policy_version_t *v, int index, const replica_slot_t *slot)
{
    lua_State *L = v->L;
    rversion_t *r = rv(v);
    if (index >= r->cap)
        grow_refs(r, index);
    if (r->table_ref[index] == LUA_NOREF) {
        ms_policy_new_table(v, 0, 8);
        ms_policy_new_table(v, 0, 0);
        ms_policy_set_value(L, -2, "routing_stats");
        ms_policy_new_table(v, 0, 0);
        ms_policy_set_value(L, -2, "multiplexed_model_ids");
        r->table_ref[index] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->table_ref[index]);
    ms_policy_set_string(L, -1, "id", slot->id);
    ms_policy_set_number(L, -1, "index", index);
    ms_policy_set_number(L, -1, "ongoing", slot->ongoing);
    ms_policy_set_number(L, -1, "max_ongoing_requests", slot->max_ongoing);
    lua_pop(L, 1);
}

static void drop_replica(ms_policy_version_t *v, int index)
{
    rversion_t *r = rv(v);
    if (index < r->cap && r->table_ref[index] != LUA_NOREF) {
        luaL_unref(v->L, LUA_REGISTRYINDEX, r->table_ref[index]);
        r->table_ref[index] = LUA_NOREF;
    }
}

/* Pushes the replica's table, or nothing and returns -1 when the version has none. */
static int push_replica(ms_policy_version_t *v, int index)
{
    rversion_t *r = rv(v);
    if (index < 0 || index >= r->cap || r->table_ref[index] == LUA_NOREF)
        return -1;
    lua_rawgeti(v->L, LUA_REGISTRYINDEX, r->table_ref[index]);
    return 0;
}

/* Replaces the contents of the replica's `field` table in place (its identity is kept, so a
 * script holding on to it sees the new values). The new contents are on top of the stack. */
static void refill_field(ms_policy_version_t *v, int replica, const char *field)
{
    lua_State *L = v->L;
    int src = lua_gettop(L);
    ms_policy_subtable(v, replica, field, 0, 0);
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

/* Kind setup (may run on a worker thread): the candidates array and the request table, pinned
 * with the class's functions and self. */
static int router_setup(ms_policy_version_t *v, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    lua_State *L = v->L;
    rversion_t *r = ms_calloc(1, sizeof *r);
    v->kind_data = r;
    for (int i = FN_CHOOSE; i <= FN_ON_CHANGED; i++)
        lua_rawgeti(L, LUA_REGISTRYINDEX, v->fn_ref[i]); /* LUA_NOREF pushes nil */
    lua_rawgeti(L, LUA_REGISTRYINDEX, v->self_ref);
    ms_policy_new_table(v, 8, 0);
    lua_createtable(L, 0, 8);
    ms_policy_new_metatable(L, 1);
    lua_pushliteral(L, "__index");
    lua_pushlightuserdata(L, &r->lazy);
    lua_pushcclosure(L, request_index, 1);
    lua_rawset(L, -3);
    lua_setmetatable(L, -2);
    return 0;
}

static void router_release(ms_policy_version_t *v)
{
    rversion_t *r = v->kind_data;
    if (!r)
        return;
    free(r->table_ref);
    free(r->by_table);
    free(r);
}

/* Copies the replica's `field` table from the old version's table (at from_idx) into the new
 * one's (on top of `to`'s stack) in place, under the core's copy rule. */
static void copy_replica_field(ms_policy_version_t *from, int from_idx, ms_policy_version_t *to,
                               const char *field)
{
    ms_policy_get(from->L, from_idx, field);
    if (lua_istable(from->L, -1) && ms_policy_copy_value(from->L, -1, to->L) == 0)
        refill_field(to, lua_gettop(to->L) - 1, field);
    lua_pop(from->L, 1);
}

/* Kind carry, at commit: the new version gets every replica, with its stats and model ids as the
 * old version's script saw them. */
static void router_carry(ms_policy_t *p, ms_policy_version_t *from, ms_policy_version_t *to)
{
    ms_router_script_t *s = ms_policy_owner(p);
    for (int i = 0; i < s->ncand; i++) {
        int index = s->order[i];
        write_replica(to, index, &s->slots[index]);
        if (push_replica(from, index) != 0)
            continue;
        push_replica(to, index);
        copy_replica_field(from, lua_gettop(from->L), to, "routing_stats");
        copy_replica_field(from, lua_gettop(from->L), to, "multiplexed_model_ids");
        lua_pop(to->L, 1);
        lua_pop(from->L, 1);
    }
    rebuild_candidates(to, s);
}

static const ms_policy_kind_t router_kind = {
    .name = "router",
    .is_class = 1,
    .call_budget_us = MS_SCRIPT_DEFAULT_BUDGET_US,
    .fallback = "the engine's least-loaded choice routes instead",
    .setup = router_setup,
    .release = router_release,
    .carry = router_carry,
};

/* ---- lifecycle ------------------------------------------------------------------------------- */

static char *builtin_router_path(void)
{
    const char *dir = ms_lua_dir();
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/router.lua", dir);
    return b.data;
}

/* kwargs arrive as JSON text from the config; a malformed text fails the load. */
static int parse_kwargs(const char *file, const char *kwargs_json, json_t **out, char **err)
{
    *out = NULL;
    if (!kwargs_json || !*kwargs_json)
        return 0;
    json_error_t jerr;
    *out = json_loads(kwargs_json, JSON_DECODE_ANY, &jerr);
    if (*out)
        return 0;
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s: kwargs:%d:%d: %s", file, jerr.line, jerr.column, jerr.text);
    *err = b.data;
    return -1;
}

ms_router_script_t *ms_router_script_new_class(const char *file, const char *attr,
                                               const char *kwargs_json, uint64_t budget_us,
                                               char **err)
{
    char *path = file ? ms_strdup(file) : builtin_router_path();
    json_t *kwargs;
    if (parse_kwargs(path, kwargs_json, &kwargs, err) != 0) {
        free(path);
        return NULL;
    }
    ms_policy_spec_t spec = {
        .kind = &router_kind,
        .file = path,
        .attr = attr,
        .fns = {"choose_replicas", "on_request_routed", "on_request_completed",
                "on_replicas_changed"},
        .required = 1u << FN_CHOOSE,
        .kwargs = kwargs,
        .budget_us = budget_us,
        .builtin = file == NULL,
    };
    ms_policy_t *p = ms_policy_new(&spec, err);
    json_decref(kwargs);
    free(path);
    if (!p)
        return NULL;
    ms_router_script_t *s = ms_calloc(1, sizeof *s);
    s->p = p;
    ms_policy_set_owner(p, s);
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
    ms_policy_free(s->p);
    for (int i = 0; i < s->nslots; i++)
        free(s->slots[i].id);
    free(s->slots);
    free(s->order);
    free(s);
}

ms_policy_t *ms_router_script_policy(ms_router_script_t *s)
{
    return s->p;
}

void ms_router_script_set_memory_limit(ms_router_script_t *s, size_t bytes)
{
    ms_policy_set_memory_limit(s->p, bytes);
}

/* ---- replica set ----------------------------------------------------------------------------- */

static replica_slot_t *slot_of(ms_router_script_t *s, int index)
{
    if (index < 0 || index >= s->nslots || !s->slots[index].used)
        return NULL;
    return &s->slots[index];
}

static void grow_slots(ms_router_script_t *s, int index)
{
    int n = s->nslots ? s->nslots : 8;
    while (n <= index)
        n *= 2;
    s->slots = ms_realloc(s->slots, (size_t)n * sizeof *s->slots);
    s->order = ms_realloc(s->order, (size_t)n * sizeof *s->order);
    for (int i = s->nslots; i < n; i++)
        s->slots[i] = (replica_slot_t){0};
    s->nslots = n;
}

void ms_router_script_add_replica(ms_router_script_t *s, int index, const char *id,
                                  int max_ongoing_requests)
{
    if (index < 0 || index >= MS_SCRIPT_MAX_INDEX) {
        ms_warn("router %s: replica index %d out of range, ignored", ms_policy_file(s->p), index);
        return;
    }
    if (index >= s->nslots)
        grow_slots(s, index);
    replica_slot_t *slot = &s->slots[index];
    int known = slot->used;
    free(slot->id);
    slot->id = ms_strdup(id ? id : "");
    slot->max_ongoing = max_ongoing_requests;
    if (!known) {
        slot->used = 1;
        slot->ongoing = 0;
        slot->pos = s->ncand;
        s->order[s->ncand++] = index;
    }
    ms_policy_version_t *v = ms_policy_current(s->p);
    write_replica(v, index, slot); /* an update keeps the table's identity */
    if (known)
        rv(v)->replicas_changed = 1;
    else
        rebuild_candidates(v, s);
}

/* Compacts the order by moving the last entry into the hole; the order is not meaningful. */
void ms_router_script_remove_replica(ms_router_script_t *s, int index)
{
    replica_slot_t *slot = slot_of(s, index);
    if (!slot)
        return;
    int last = s->order[--s->ncand];
    s->order[slot->pos] = last;
    s->slots[last].pos = slot->pos;
    free(slot->id);
    *slot = (replica_slot_t){0};
    ms_policy_version_t *v = ms_policy_current(s->p);
    drop_replica(v, index);
    rebuild_candidates(v, s);
}

void ms_router_script_set_ongoing(ms_router_script_t *s, int index, int ongoing)
{
    replica_slot_t *slot = slot_of(s, index);
    if (!slot)
        return;
    slot->ongoing = ongoing;
    ms_policy_version_t *v = ms_policy_current(s->p);
    if (push_replica(v, index) == 0) {
        ms_policy_set_number(v->L, -1, "ongoing", ongoing);
        lua_pop(v->L, 1);
    }
}

void ms_router_script_set_model_ids(ms_router_script_t *s, int index, const char *const *ids,
                                    size_t n)
{
    ms_policy_version_t *v = ms_policy_current(s->p);
    if (!slot_of(s, index) || push_replica(v, index) != 0)
        return;
    lua_State *L = v->L;
    lua_createtable(L, 0, (int)n);
    for (size_t i = 0; i < n; i++) {
        lua_pushboolean(L, 1);
        ms_policy_set_value(L, -2, ids[i]);
    }
    refill_field(v, lua_gettop(L) - 1, "multiplexed_model_ids");
    lua_pop(L, 1);
}

int ms_router_script_set_routing_stats(ms_router_script_t *s, int index, const char *json)
{
    ms_policy_version_t *v = ms_policy_current(s->p);
    if (!slot_of(s, index) || push_replica(v, index) != 0)
        return -1;
    lua_State *L = v->L;
    int base = lua_gettop(L) - 1;
    if (ms_sandbox_push_json(v->sb, json) != 0 || !lua_istable(L, -1)) {
        lua_settop(L, base);
        return -1;
    }
    refill_field(v, lua_gettop(L) - 1, "routing_stats");
    lua_settop(L, base);
    return 0;
}

/* ---- calls ----------------------------------------------------------------------------------- */

/* Stores `val` into field `key` of the request table (on top), unless it equals the value the
 * cache says is already there. */
static void set_request_field(lua_State *L, const char *key, const char *val, size_t n,
                              field_cache_t *c)
{
    if (c->valid && c->len == n && memcmp(c->val, val, n) == 0)
        return;
    lua_pushlstring(L, val, n);
    ms_policy_set_value(L, -2, key);
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
        if (ms_http_header_is(h, name)) {
            *len = h->value_len;
            return h->value;
        }
    }
    *len = 0;
    return "";
}

/* Forgets the lazy fields materialized for the previous request. */
static void clear_lazy(lua_State *L, rversion_t *r)
{
    static const char *const names[] = {"id", "headers", "body"};
    for (int i = 0; i < 3; i++)
        if (r->lazy.set & (1u << i))
            ms_policy_set_nil(L, SLOT_REQUEST, names[i]);
    r->lazy.set = 0;
}

/* Overwrites the persistent request table's eager fields and pushes it; no request pushes nil
 * (as Ray Serve passes None when a routing pass has no pending request). */
static void push_request(ms_policy_version_t *v, const ms_route_request_t *req)
{
    lua_State *L = v->L;
    rversion_t *r = rv(v);
    if (r->lazy.set)
        clear_lazy(L, r);
    r->lazy.req = req;
    if (!req) {
        lua_pushnil(L);
        return;
    }
    lua_pushvalue(L, SLOT_REQUEST);
    const char *m = req->method ? req->method : "";
    const char *path = req->path ? req->path : "";
    set_request_field(L, "method", m, strlen(m), &r->req_method);
    set_request_field(L, "path", path, strlen(path), &r->req_path);
    size_t mlen;
    const char *model = req->multiplexed_model_id;
    if (model && *model)
        mlen = strlen(model);
    else
        model = header_model_id(req, &mlen);
    set_request_field(L, "multiplexed_model_id", model, mlen, &r->req_model);
}

/* If the value at `idx` is one of the current candidate tables (the very table, not a lookalike),
 * returns its caller index; otherwise -1. Raw accesses only: no script code runs here. */
static int candidate_index(const rversion_t *r, lua_State *L, int idx)
{
    const void *t = lua_type(L, idx) == LUA_TTABLE ? lua_topointer(L, idx) : NULL;
    if (!t || !r->by_table)
        return -1;
    for (size_t h = hash_ptr(t);; h++) {
        const cand_entry_t *e = &r->by_table[h & r->by_table_mask];
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

/* Appends the known candidates of the list at `list` as one rank; empty ranks are dropped. The
 * length is the raw border (lua_objlen never calls __len) and is capped by the room left. */
static void collect_rank(const rversion_t *r, lua_State *L, int list, choice_out_t *o)
{
    size_t start = o->n;
    int len = (int)lua_objlen(L, list);
    for (int i = 1; i <= len && o->n < o->cap; i++) {
        lua_rawgeti(L, list, i);
        int index = candidate_index(r, L, -1);
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
static int convert_result(ms_router_script_t *s, ms_policy_version_t *v, choice_out_t *o)
{
    lua_State *L = v->L;
    const rversion_t *r = rv(v);
    int res = lua_gettop(L);
    if (!lua_istable(L, res)) {
        ms_policy_fail(s->p, "%s: choose_replicas must return a list of ranks, got %s",
                       ms_policy_where(s->p, FN_CHOOSE), luaL_typename(L, res));
        return -1;
    }
    lua_rawgeti(L, res, 1);
    if (lua_type(L, -1) == LUA_TTABLE) {
        if (candidate_index(r, L, -1) >= 0) {
            collect_rank(r, L, res, o);
            return (int)o->nranks;
        }
        collect_rank(r, L, res + 1, o);
    }
    lua_settop(L, res);
    int len = (int)lua_objlen(L, res);
    for (int i = 2; i <= len && o->nranks < o->rank_cap; i++) {
        lua_rawgeti(L, res, i);
        if (lua_type(L, -1) == LUA_TTABLE)
            collect_rank(r, L, res + 1, o);
        lua_settop(L, res);
    }
    return (int)o->nranks;
}

/* Runs on_replicas_changed(self, candidates) once after a burst of replica set changes, right
 * before the next choose: the set changes one replica at a time on the control loop, and a
 * script rebuilding a ring on each change would do N rebuilds for N new replicas. */
static void notify_replicas_changed(ms_router_script_t *s, ms_policy_version_t *v)
{
    lua_State *L = v->L;
    rv(v)->replicas_changed = 0; /* even if it fails: a broken hook must not run every request */
    if (lua_isnil(L, SLOT_ON_CHANGED))
        return;
    lua_pushvalue(L, SLOT_ON_CHANGED);
    lua_pushvalue(L, SLOT_SELF);
    lua_pushvalue(L, SLOT_CANDIDATES);
    ms_policy_call(s->p, 2, 0, MS_SCRIPT_UPDATE_BUDGET_US);
}

int ms_router_script_choose(ms_router_script_t *s, const ms_route_request_t *req, int *out_index,
                            size_t out_cap, int *out_rank_end, size_t rank_cap)
{
    ms_policy_version_t *v = ms_policy_current(s->p);
    lua_State *L = v->L;
    rversion_t *r = rv(v);
    if (r->replicas_changed)
        notify_replicas_changed(s, v);
    if (s->ncand == 0)
        return 0; /* nothing to choose from: not worth a call */
    lua_pushvalue(L, SLOT_CHOOSE);
    lua_pushvalue(L, SLOT_SELF);
    lua_pushvalue(L, SLOT_CANDIDATES);
    push_request(v, req);
    int rc = ms_policy_call(s->p, 3, 1, 0);
    r->lazy.req = NULL; /* the caller's request is not valid after the call */
    if (rc != 0)
        return -1;
    choice_out_t o = {out_index, out_cap, 0, out_rank_end, rank_cap, 0};
    int n = convert_result(s, v, &o);
    lua_settop(L, SLOT_TOP);
    if (n == 0) {
        /* Nothing usable (an empty list, lookalike tables, tables whose entries hide behind
         * metamethods): a request must never wait on such a router, so it counts as a failure and
         * the engine chooses. */
        ms_policy_fail(s->p, "%s: choose_replicas returned no current candidate",
                       ms_policy_where(s->p, FN_CHOOSE));
        return -1;
    }
    return n;
}

void ms_router_script_on_routed(ms_router_script_t *s, const ms_route_request_t *req, int index)
{
    ms_policy_version_t *v = ms_policy_current(s->p);
    lua_State *L = v->L;
    if (lua_isnil(L, SLOT_ON_ROUTED) || !slot_of(s, index))
        return;
    lua_pushvalue(L, SLOT_ON_ROUTED);
    lua_pushvalue(L, SLOT_SELF);
    push_request(v, req);
    push_replica(v, index);
    ms_policy_call(s->p, 3, 0, 0);
    rv(v)->lazy.req = NULL;
}

void ms_router_script_on_completed(ms_router_script_t *s, int index, double latency_s, int ok)
{
    ms_policy_version_t *v = ms_policy_current(s->p);
    lua_State *L = v->L;
    if (lua_isnil(L, SLOT_ON_COMPLETED) || !slot_of(s, index))
        return;
    lua_pushvalue(L, SLOT_ON_COMPLETED);
    lua_pushvalue(L, SLOT_SELF);
    push_replica(v, index);
    lua_pushnumber(L, latency_s);
    lua_pushboolean(L, ok);
    ms_policy_call(s->p, 4, 0, 0);
}

/* ---- status ---------------------------------------------------------------------------------- */

uint64_t ms_router_script_failures(const ms_router_script_t *s)
{
    return ms_policy_failures(s->p);
}

const char *ms_router_script_last_error(const ms_router_script_t *s)
{
    return ms_policy_last_error(s->p);
}

json_t *ms_router_script_info(const ms_router_script_t *s)
{
    return ms_policy_info(s->p);
}
