/*
 * Fuzz harness of the JSON <-> Lua marshalling: serve.json's decode side (rt_json_push, after
 * json_loadb with the flags l_json_decode uses), its encode side (rt_json_from_lua, used for
 * response bodies, handle results and the control channel) and the policy sandbox's
 * ms_sandbox_push_json (kwargs). Any text must decode or be refused, never crash.
 * Invariants: the Lua value decoded holds exactly what the JSON held (every member and element,
 * numbers as doubles, null as serve.json.null, or absent in the sandbox); encoding it back gives
 * JSON equal to the input up to integer/real spelling, and decoding that again gives an equal
 * Lua value (round-trip); the only refusal of the encoder is the documented nesting limit
 * (RT_JSON_MAX_DEPTH, 64), with its message, and only for input nested that deep. Built as a
 * libFuzzer binary with -DMS_FUZZ=ON (clang), else linked with replay.c so ctest runs the corpus
 * (tests/fuzz/corpus/json_lua).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/internal.h"
#include "sandbox/sandbox.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static size_t json_depth(const json_t *j)
{
    size_t d = 0, i;
    const char *k;
    json_t *x;
    if (json_is_array(j)) {
        json_array_foreach((json_t *)j, i, x)
        {
            size_t dx = json_depth(x);
            d = dx > d ? dx : d;
        }
    } else if (json_is_object(j)) {
        json_object_foreach((json_t *)j, k, x)
        {
            size_t dx = json_depth(x);
            d = dx > d ? dx : d;
        }
    } else {
        return 0;
    }
    return d + 1;
}

static double number(const json_t *j)
{
    return json_is_integer(j) ? (double)json_integer_value(j) : json_real_value(j);
}

/* JSON equality with integers and reals compared as the doubles Lua holds. */
static int json_same(const json_t *a, const json_t *b)
{
    if (json_is_number(a) || json_is_number(b))
        return json_is_number(a) && json_is_number(b) && number(a) == number(b);
    if (json_typeof(a) != json_typeof(b))
        return 0;
    if (json_is_array(a)) {
        if (json_array_size(a) != json_array_size(b))
            return 0;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!json_same(json_array_get(a, i), json_array_get(b, i)))
                return 0;
        return 1;
    }
    if (json_is_object(a)) {
        const char *k;
        size_t kl;
        json_t *x;
        if (json_object_size(a) != json_object_size(b))
            return 0;
        json_object_keylen_foreach((json_t *)a, k, kl, x)
        {
            json_t *y = json_object_getn(b, k, kl);
            if (!y || !json_same(x, y))
                return 0;
        }
        return 1;
    }
    return json_equal(a, b);
}

/* The Lua value at idx holds what j holds; null_is_nil: the sandbox's null (absent) rather than
 * serve.json.null (a NULL lightuserdata). */
static int lua_holds(lua_State *L, int idx, const json_t *j, int null_is_nil)
{
    luaL_checkstack(L, 4, "compare");
    if (idx < 0)
        idx = lua_gettop(L) + idx + 1;
    int t = lua_type(L, idx);
    switch (json_typeof(j)) {
    case JSON_NULL:
        return null_is_nil ? t == LUA_TNIL
                           : t == LUA_TLIGHTUSERDATA && lua_touserdata(L, idx) == NULL;
    case JSON_TRUE:
    case JSON_FALSE:
        return t == LUA_TBOOLEAN && lua_toboolean(L, idx) == json_is_true(j);
    case JSON_INTEGER:
    case JSON_REAL:
        return t == LUA_TNUMBER && lua_tonumber(L, idx) == number(j);
    case JSON_STRING: {
        size_t n;
        const char *s = t == LUA_TSTRING ? lua_tolstring(L, idx, &n) : NULL;
        return s && n == json_string_length(j) && memcmp(s, json_string_value(j), n) == 0;
    }
    default:
        break;
    }
    if (t != LUA_TTABLE)
        return 0;
    size_t expect = 0; /* entries the table must have: members that are not absent nulls */
    if (json_is_array(j)) {
        for (size_t i = 0; i < json_array_size(j); i++) {
            json_t *x = json_array_get(j, i);
            expect += !(null_is_nil && json_is_null(x));
            lua_rawgeti(L, idx, (int)i + 1);
            int ok = lua_holds(L, lua_gettop(L), x, null_is_nil);
            lua_pop(L, 1);
            if (!ok)
                return 0;
        }
    } else {
        const char *k;
        size_t kl;
        json_t *x;
        json_object_keylen_foreach((json_t *)j, k, kl, x)
        {
            expect += !(null_is_nil && json_is_null(x));
            lua_pushlstring(L, k, kl);
            lua_rawget(L, idx);
            int ok = lua_holds(L, lua_gettop(L), x, null_is_nil);
            lua_pop(L, 1);
            if (!ok)
                return 0;
        }
    }
    size_t have = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        have++;
    }
    return have == expect;
}

typedef struct {
    const uint8_t *data;
    size_t size;
} input_t;

static int runtime_side(lua_State *L)
{
    const input_t *in = lua_touserdata(L, 1);
    json_error_t jerr;
    json_t *j1 =
        json_loadb((const char *)in->data, in->size, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!j1)
        return 0;
    rt_json_push(L, j1);
    int v1 = lua_gettop(L);
    if (!lua_holds(L, v1, j1, 0))
        abort(); /* the decoded value lost or changed something */
    char err[160] = "";
    json_t *j2 = rt_json_from_lua(L, v1, err, sizeof err);
    if (!j2) {
        if (json_depth(j1) <= 64 || strstr(err, "nesting deeper than 64") == NULL)
            abort(); /* the depth limit is the only reason to refuse a decoded value */
        json_decref(j1);
        return 0;
    }
    if (!json_same(j1, j2))
        abort();
    char *text = json_dumps(j2, JSON_COMPACT | JSON_ENCODE_ANY);
    json_t *j3 = text ? json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr) : NULL;
    if (!j3)
        abort(); /* the encoder wrote something its decoder refuses */
    rt_json_push(L, j3);
    if (!lua_holds(L, lua_gettop(L), j1, 0))
        abort();
    json_decref(j3);
    free(text);
    json_decref(j2);
    json_decref(j1);
    return 0;
}

static void sandbox_side(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';
    char *err = NULL;
    ms_sandbox_t *sb = ms_sandbox_new(0, &err);
    if (!sb)
        abort();
    json_error_t jerr;
    json_t *j = json_loads(text, JSON_DECODE_ANY, &jerr);
    int rc = ms_sandbox_push_json(sb, text);
    if (!*text) {
        if (rc != 0 || lua_type(sb->L, -1) != LUA_TTABLE)
            abort(); /* "" means no kwargs: an empty table */
    } else if ((rc == 0) != (j != NULL) || (rc == 0 && !lua_holds(sb->L, -1, j, 1))) {
        abort();
    }
    json_decref(j);
    ms_sandbox_free(sb);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static lua_State *L;
    if (!L)
        L = luaL_newstate();
    input_t in = {data, size};
    if (lua_cpcall(L, runtime_side, &in) != 0) {
        /* Only the Lua stack limit may stop the decoder, and jansson's own depth limit (2048)
         * keeps it from doing so. */
        abort();
    }
    lua_settop(L, 0);
    lua_gc(L, LUA_GCCOLLECT, 0);
    sandbox_side(data, size);
    return 0;
}
