/*
 * runtime/luajson: conversion between Lua values and jansson values, and the serve.json
 * functions built on it. Used for request/response bodies, handle results, the control channel
 * (user_config, stats) and the inspect graph.
 */
#include "runtime/internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/core.h"

/* Deeper nesting is treated as a cycle rather than risking the C stack. */
#define RT_JSON_MAX_DEPTH 64

/* Registry key of the metatable marking a table as a JSON array. */
static const char ARRAY_MT[] = "moonserve.json.array";

static void push_array_mt(lua_State *L)
{
    luaL_newmetatable(L, ARRAY_MT); /* creates it on first use, else pushes the existing one */
}

void rt_json_push(lua_State *L, const json_t *v)
{
    luaL_checkstack(L, 4, "JSON nesting too deep");
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *k;
        json_t *x;
        lua_createtable(L, 0, (int)json_object_size(v));
        json_object_foreach((json_t *)v, k, x)
        {
            rt_json_push(L, x);
            lua_setfield(L, -2, k);
        }
        break;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        lua_createtable(L, (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            rt_json_push(L, json_array_get(v, i));
            lua_rawseti(L, -2, (int)i + 1);
        }
        push_array_mt(L);
        lua_setmetatable(L, -2);
        break;
    }
    case JSON_STRING:
        lua_pushlstring(L, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER:
        lua_pushnumber(L, (lua_Number)json_integer_value(v));
        break;
    case JSON_REAL:
        lua_pushnumber(L, json_real_value(v));
        break;
    case JSON_TRUE:
        lua_pushboolean(L, 1);
        break;
    case JSON_FALSE:
        lua_pushboolean(L, 0);
        break;
    default:
        lua_pushlightuserdata(L, NULL);
        break;
    }
}

/* Returns n when the table at idx is a sequence 1..n (or is marked as an array), else -1. */
static long array_length(lua_State *L, int idx)
{
    long count = 0, max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER) {
            lua_pop(L, 1);
            return -1;
        }
        lua_Number k = lua_tonumber(L, -1);
        if (k < 1 || k != floor(k)) {
            lua_pop(L, 1);
            return -1;
        }
        count++;
        if (k > max)
            max = (long)k;
    }
    if (count == 0) {
        /* An empty table is an object unless it carries the array marker. */
        int marked = 0;
        if (lua_getmetatable(L, idx)) {
            push_array_mt(L);
            marked = lua_rawequal(L, -1, -2);
            lua_pop(L, 2);
        }
        return marked ? 0 : -1;
    }
    return count == max ? max : -1;
}

void rt_quote_bytes(char *out, size_t cap, const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        int plain = ch >= 0x20 && ch < 0x7f && ch != '"' && ch != '\\';
        /* Room for this byte, the "..." if more follow, and the NUL. The previous step kept room
         * for the "...", so it always fits. */
        if (n + (plain ? 1 : 4) + (i + 1 < len ? 3 : 0) >= cap) {
            memcpy(out + n, "...", 3);
            n += 3;
            break;
        }
        if (plain)
            out[n++] = (char)ch;
        else
            n += (size_t)snprintf(out + n, cap - n, "\\x%02x", ch);
    }
    out[n] = '\0';
}

static json_t *from_lua(lua_State *L, int idx, int depth, char *err, size_t errlen);

static json_t *table_to_json(lua_State *L, int idx, int depth, char *err, size_t errlen)
{
    long n = array_length(L, idx);
    if (n >= 0) {
        json_t *arr = json_array();
        for (long i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, (int)i);
            json_t *x = from_lua(L, lua_gettop(L), depth + 1, err, errlen);
            lua_pop(L, 1);
            if (!x) {
                json_decref(arr);
                return NULL;
            }
            json_array_append_new(arr, x);
        }
        return arr;
    }
    json_t *obj = json_object();
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int kt = lua_type(L, -2);
        if (kt != LUA_TSTRING && kt != LUA_TNUMBER) {
            snprintf(err, errlen, "cannot encode a %s key as JSON", lua_typename(L, kt));
            lua_pop(L, 2);
            json_decref(obj);
            return NULL;
        }
        /* Copy the key: lua_tostring on a number key would confuse lua_next. */
        lua_pushvalue(L, -2);
        size_t key_len;
        const char *key = lua_tolstring(L, -1, &key_len);
        json_t *x = from_lua(L, lua_gettop(L) - 1, depth + 1, err, errlen);
        if (!x) {
            lua_pop(L, 3);
            json_decref(obj);
            return NULL;
        }
        /* jansson refuses a key that is not UTF-8 (and frees x): say so instead of dropping it. */
        if (json_object_setn_new(obj, key, key_len, x) != 0) {
            char quoted[64];
            rt_quote_bytes(quoted, sizeof quoted, key, key_len);
            snprintf(err, errlen, "cannot encode the table key \"%s\" as JSON: not valid UTF-8",
                     quoted);
            lua_pop(L, 3);
            json_decref(obj);
            return NULL;
        }
        lua_pop(L, 2);
    }
    return obj;
}

static json_t *from_lua(lua_State *L, int idx, int depth, char *err, size_t errlen)
{
    if (depth > RT_JSON_MAX_DEPTH) {
        snprintf(err, errlen, "cannot encode JSON: nesting deeper than %d (a cycle?)",
                 RT_JSON_MAX_DEPTH);
        return NULL;
    }
    luaL_checkstack(L, 6, "JSON nesting too deep");
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        return json_null();
    case LUA_TBOOLEAN:
        return json_boolean(lua_toboolean(L, idx));
    case LUA_TNUMBER: {
        lua_Number d = lua_tonumber(L, idx);
        if (isnan(d) || isinf(d)) {
            snprintf(err, errlen, "cannot encode %s as JSON", isnan(d) ? "NaN" : "infinity");
            return NULL;
        }
        /* Integral values below 2^53 are exact in a double: emit them without a fraction. */
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
            return json_integer((json_int_t)d);
        return json_real(d);
    }
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        json_t *j = json_stringn(s, len);
        if (!j)
            snprintf(err, errlen, "cannot encode a string that is not valid UTF-8 as JSON");
        return j;
    }
    case LUA_TTABLE:
        return table_to_json(L, idx, depth, err, errlen);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL)
            return json_null();
        /* fall through */
    default:
        snprintf(err, errlen, "cannot encode a %s value as JSON", luaL_typename(L, idx));
        return NULL;
    }
}

json_t *rt_json_from_lua(lua_State *L, int idx, char *err, size_t errlen)
{
    if (idx < 0)
        idx = lua_gettop(L) + idx + 1;
    return from_lua(L, idx, 0, err, errlen);
}

static int l_json_encode(lua_State *L)
{
    char err[160];
    luaL_checkany(L, 1);
    json_t *j = rt_json_from_lua(L, 1, err, sizeof err);
    if (!j)
        return luaL_error(L, "%s", err);
    char *s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(j);
    lua_pushstring(L, s);
    free(s);
    return 1;
}

static int l_json_decode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    json_error_t jerr;
    json_t *j = json_loadb(s, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!j)
        return luaL_error(L, "invalid JSON at line %d column %d: %s", jerr.line, jerr.column,
                          jerr.text);
    rt_json_push(L, j);
    json_decref(j);
    return 1;
}

/* serve.json.array(t): marks t (default a new table) so it encodes as an array even when empty. */
static int l_json_array(lua_State *L)
{
    if (lua_isnoneornil(L, 1))
        lua_newtable(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    push_array_mt(L);
    lua_setmetatable(L, 1);
    return 1;
}

void rt_json_register(lua_State *L)
{
    lua_pushcfunction(L, l_json_encode);
    lua_setfield(L, -2, "json_encode");
    lua_pushcfunction(L, l_json_decode);
    lua_setfield(L, -2, "json_decode");
    lua_pushcfunction(L, l_json_array);
    lua_setfield(L, -2, "json_array");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "json_null");
}
