/*
 * watch: the values, their refresh and the Lua side (watch.h). Each key keeps what it is asked
 * for (len, get or both); a refresh sends TYPE then the type's length command (XLEN, LLEN, SCARD,
 * ZCARD, HLEN) for len keys and GET for get keys, pipelined on one connection.
 */
#include "watch/watch.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "broker/broker.h"
#include "core/core.h"

#define KEY_MAX   512
#define VALUE_MAX 65536

typedef struct wkey {
    char name[KEY_MAX];
    int want_len, want_get;
    int has_len;
    double len;
    char *value;  /* GET's answer, NULL: none (yet, or the key holds no string) */
    double asked; /* wall time a script last asked */
    int inflight; /* answers still to come for it */
} wkey_t;

struct ms_watch {
    ms_broker_t *b;
    wkey_t *keys[MS_WATCH_MAX_KEYS];
    int n;
};

ms_watch_t *ms_watch_new(uv_loop_t *loop, const char *url, char **err)
{
    ms_watch_t *w = ms_calloc(1, sizeof *w);
    w->b = ms_broker_new(loop, url, NULL, err);
    if (!w->b) {
        free(w);
        return NULL;
    }
    return w;
}

static void free_key(wkey_t *k)
{
    free(k->value);
    free(k);
}

void ms_watch_free(ms_watch_t *w)
{
    if (!w)
        return;
    for (int i = 0; i < w->n; i++)
        w->keys[i]->inflight = -1000; /* dying: answers CLOSED below must not touch it */
    ms_broker_free(w->b);
    for (int i = 0; i < w->n; i++)
        free_key(w->keys[i]);
    free(w);
}

/* ---- refresh ----------------------------------------------------------------------------------
 */

typedef struct {
    ms_watch_t *w;
    wkey_t *k;
} wreq_t;

static int took(wkey_t *k)
{
    return --k->inflight >= 0;
}

static void on_len(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    wkey_t *k = data;
    (void)err;
    if (!took(k))
        return;
    if (st == MS_BROKER_OK && r && r->type == REDIS_REPLY_INTEGER) {
        k->len = (double)r->integer;
        k->has_len = 1;
    }
}

static const char *len_command(const char *type)
{
    static const char *const map[][2] = {{"stream", "XLEN"},
                                         {"list", "LLEN"},
                                         {"set", "SCARD"},
                                         {"zset", "ZCARD"},
                                         {"hash", "HLEN"}};
    for (size_t i = 0; i < sizeof map / sizeof *map; i++)
        if (strcmp(type, map[i][0]) == 0)
            return map[i][1];
    return NULL;
}

static void on_type(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    wreq_t *q = data;
    wkey_t *k = q->k;
    ms_watch_t *w = q->w;
    free(q);
    (void)err;
    if (!took(k) || st != MS_BROKER_OK || !r || r->type != REDIS_REPLY_STATUS)
        return;
    const char *cmd = len_command(r->str);
    if (!cmd) { /* "none" (no such key) reads as 0; a string has no length */
        k->has_len = strcmp(r->str, "none") == 0;
        k->len = 0;
        return;
    }
    const char *argv[] = {cmd, k->name};
    size_t lens[] = {strlen(cmd), strlen(k->name)};
    k->inflight++;
    ms_broker_command(w->b, on_len, k, 2, argv, lens);
}

static void on_get(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    wkey_t *k = data;
    (void)err;
    if (!took(k) || st != MS_BROKER_OK || !r)
        return;
    free(k->value);
    k->value =
        r->type == REDIS_REPLY_STRING && r->len <= VALUE_MAX ? ms_strndup(r->str, r->len) : NULL;
}

static void drop_idle(ms_watch_t *w, double now)
{
    for (int i = 0; i < w->n;) {
        wkey_t *k = w->keys[i];
        if (now - k->asked > MS_WATCH_IDLE_S && k->inflight == 0) {
            free_key(k);
            w->keys[i] = w->keys[--w->n];
        } else {
            i++;
        }
    }
}

void ms_watch_refresh(ms_watch_t *w)
{
    drop_idle(w, ms_wall_time());
    if (!ms_broker_connected(w->b))
        return;
    for (int i = 0; i < w->n; i++) {
        wkey_t *k = w->keys[i];
        if (k->inflight > 0)
            continue; /* the last refresh has not been answered: do not pile up */
        if (k->want_len) {
            wreq_t *q = ms_malloc(sizeof *q);
            q->w = w;
            q->k = k;
            const char *argv[] = {"TYPE", k->name};
            size_t lens[] = {4, strlen(k->name)};
            k->inflight++;
            ms_broker_command(w->b, on_type, q, 2, argv, lens);
        }
        if (k->want_get) {
            const char *argv[] = {"GET", k->name};
            size_t lens[] = {3, strlen(k->name)};
            k->inflight++;
            ms_broker_command(w->b, on_get, k, 2, argv, lens);
        }
    }
}

/* ---- Lua --------------------------------------------------------------------------------------
 */

static wkey_t *ask(lua_State *L, int get)
{
    ms_watch_t *w = lua_touserdata(L, lua_upvalueindex(1));
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    if (len == 0 || len >= KEY_MAX || memchr(name, 0, len))
        luaL_error(L, "ctx.redis: a key is 1 to %d bytes, without NUL", KEY_MAX - 1);
    wkey_t *k = NULL;
    for (int i = 0; i < w->n && !k; i++)
        if (strcmp(w->keys[i]->name, name) == 0)
            k = w->keys[i];
    if (!k) {
        if (w->n == MS_WATCH_MAX_KEYS)
            luaL_error(L, "ctx.redis: more than %d keys are watched", MS_WATCH_MAX_KEYS);
        k = ms_calloc(1, sizeof *k);
        memcpy(k->name, name, len + 1);
        w->keys[w->n++] = k;
    }
    k->asked = ms_wall_time();
    if (get)
        k->want_get = 1;
    else
        k->want_len = 1;
    return k;
}

/* len(key) -> the key's length as last read, or nil before the first read. */
static int l_len(lua_State *L)
{
    wkey_t *k = ask(L, 0);
    if (!k->has_len)
        return 0;
    lua_pushnumber(L, k->len);
    return 1;
}

/* get(key) -> the key's string value as last read, or nil. */
static int l_get(lua_State *L)
{
    wkey_t *k = ask(L, 1);
    if (!k->value)
        return 0;
    lua_pushstring(L, k->value);
    return 1;
}

void ms_watch_push(ms_watch_t *w, lua_State *L)
{
    lua_createtable(L, 0, 3);
    lua_pushliteral(L, "len");
    lua_pushlightuserdata(L, w);
    lua_pushcclosure(L, l_len, 1);
    lua_rawset(L, -3);
    lua_pushliteral(L, "get");
    lua_pushlightuserdata(L, w);
    lua_pushcclosure(L, l_get, 1);
    lua_rawset(L, -3);
    lua_pushliteral(L, "connected");
    lua_pushboolean(L, ms_broker_connected(w->b));
    lua_rawset(L, -3);
}
