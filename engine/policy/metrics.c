/*
 * policy/metrics: the custom metrics a policy or router script defined with
 * `require "moonserve.metrics"` (docs/metrics.md, "Custom metrics"), read for /metrics. The
 * module's registry is read straight from the script's state with raw accesses only: no Lua code
 * runs, so a scrape costs the script no budget and a script cannot run code from it. The result
 * has the shape a replica's stats carry, so both are exported by one path.
 */
#include <lauxlib.h>
#include <string.h>

#include "policy/policy.h"

static const char *raw_string(lua_State *L, int t, const char *key)
{
    lua_pushstring(L, key);
    lua_rawget(L, t);
    const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1); /* s stays alive: the table holds it */
    return s;
}

static double raw_number(lua_State *L, int t, const char *key)
{
    lua_pushstring(L, key);
    lua_rawget(L, t);
    double v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
    lua_pop(L, 1);
    return v;
}

/* The numbers of the list at t[key], or NULL when it is not a table. */
static json_t *raw_numbers(lua_State *L, int t, const char *key)
{
    lua_pushstring(L, key);
    lua_rawget(L, t);
    json_t *out = NULL;
    if (lua_istable(L, -1)) {
        out = json_array();
        for (int i = 1; i <= (int)lua_objlen(L, -1); i++) {
            lua_rawgeti(L, -1, i);
            json_array_append_new(out, json_real(lua_tonumber(L, -1)));
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    return out;
}

/* {k: v} of the string pairs in the table at t[key]. */
static json_t *raw_tags(lua_State *L, int t, const char *key)
{
    json_t *out = json_object();
    lua_pushstring(L, key);
    lua_rawget(L, t);
    if (lua_istable(L, -1)) {
        lua_pushnil(L);
        while (lua_next(L, -2)) { /* lua_next is raw */
            if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING)
                json_object_set_new(out, lua_tostring(L, -2), json_string(lua_tostring(L, -1)));
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    return out;
}

/* One series table (at the top) in the snapshot's shape. */
static json_t *series_json(lua_State *L, int histogram)
{
    int s = lua_gettop(L);
    json_t *e = json_pack("{s:o}", "tags", raw_tags(L, s, "tags"));
    if (histogram) {
        json_t *buckets = raw_numbers(L, s, "buckets");
        json_object_set_new(e, "buckets", buckets ? buckets : json_array());
        json_object_set_new(e, "count", json_real(raw_number(L, s, "count")));
        json_object_set_new(e, "sum", json_real(raw_number(L, s, "sum")));
    } else {
        json_object_set_new(e, "value", json_real(raw_number(L, s, "value")));
    }
    return e;
}

/* One metric table (at the top), or NULL when it is not one the module made. */
static json_t *metric_json(lua_State *L)
{
    int m = lua_gettop(L);
    const char *kind = raw_string(L, m, "kind");
    const char *type = !kind                            ? NULL
                       : strcmp(kind, "Counter") == 0   ? "counter"
                       : strcmp(kind, "Gauge") == 0     ? "gauge"
                       : strcmp(kind, "Histogram") == 0 ? "histogram"
                                                        : NULL;
    if (!type)
        return NULL;
    const char *help = raw_string(L, m, "description");
    json_t *bounds = raw_numbers(L, m, "boundaries");
    json_t *list = json_array();
    lua_pushliteral(L, "series");
    lua_rawget(L, m);
    if (lua_istable(L, -1)) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            if (lua_istable(L, -1))
                json_array_append_new(list, series_json(L, bounds != NULL));
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    return json_pack("{s:s, s:s, s:o, s:o}", "type", type, "description", help ? help : "",
                     "boundaries", bounds ? bounds : json_null(), "series", list);
}

json_t *ms_policy_metrics(const ms_policy_t *p)
{
    ms_policy_version_t *v = ms_policy_current(p);
    if (!v || ms_sandbox_push_loaded(v->sb, "moonserve.metrics") != 0)
        return NULL;
    lua_State *L = v->L;
    int top = lua_gettop(L) - 1;
    json_t *out = NULL;
    lua_pushliteral(L, "_registry");
    lua_rawget(L, -2);
    if (lua_istable(L, -1)) {
        out = json_object();
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_istable(L, -1)) {
                json_t *m = metric_json(L);
                if (m)
                    json_object_set_new(out, lua_tostring(L, -2), m);
            }
            lua_pop(L, 1);
        }
    }
    lua_settop(L, top);
    return out;
}
