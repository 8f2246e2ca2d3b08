/*
 * The GPU data in the shapes the controller hands on: JSON for status, a Lua table for the
 * autoscaling ctx, Prometheus text for /metrics. One field list, the same names in all three.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/internal.h"
#include "metrics/metrics.h"

json_t *ms_gpu_devices_json(const ms_gpu_t *g, const ms_gpu_pool_t *p)
{
    json_t *list = json_array();
    for (int i = 0; i < g->n; i++) {
        const ms_gpu_device_t *d = &g->dev[i];
        json_t *o =
            json_pack("{s:i, s:s, s:o, s:o, s:I}", "index", i, "name", d->name, "utilization",
                      d->has_sample ? json_real(d->utilization) : json_null(), "memory_used_bytes",
                      d->has_sample ? json_integer((json_int_t)d->memory_used_bytes) : json_null(),
                      "memory_total_bytes", (json_int_t)d->memory_total_bytes);
        if (p) {
            json_object_set_new(o, "allocated",
                                json_real((double)ms_gpu_pool_used_units(p, i) / MS_GPU_UNITS));
            json_object_set_new(o, "memory_reserved_bytes",
                                json_integer((json_int_t)ms_gpu_pool_reserved_bytes(p, i)));
        }
        json_array_append_new(list, o);
    }
    return list;
}

json_t *ms_gpu_placement_json(const ms_gpu_placement_t *pl)
{
    json_t *ids = json_array();
    for (int k = 0; k < pl->n_devices; k++)
        json_array_append_new(ids, json_integer(pl->devices[k]));
    return ids;
}

/* t[key] = number, or nil when unknown. Raw: a script may have given the entry a metatable. */
static void set_number(lua_State *L, const char *key, int known, double v)
{
    lua_pushstring(L, key);
    if (known)
        lua_pushnumber(L, v);
    else
        lua_pushnil(L);
    lua_rawset(L, -3);
}

void ms_gpu_lua_fill(lua_State *L, int idx, const ms_gpu_t *g)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    for (int i = 0; i < g->n; i++) {
        const ms_gpu_device_t *d = &g->dev[i];
        lua_rawgeti(L, idx, i + 1);
        if (!lua_istable(L, -1)) {
            lua_pop(L, 1);
            lua_createtable(L, 0, 5);
            lua_pushvalue(L, -1);
            lua_rawseti(L, idx, i + 1);
        }
        set_number(L, "index", 1, i);
        lua_pushliteral(L, "name");
        lua_pushstring(L, d->name);
        lua_rawset(L, -3);
        set_number(L, "utilization", d->has_sample, d->utilization);
        set_number(L, "memory_used_bytes", d->has_sample, (double)d->memory_used_bytes);
        set_number(L, "memory_total_bytes", 1, (double)d->memory_total_bytes);
        lua_pop(L, 1);
    }
    /* Entries past the device count (a table reused from a larger list) go. */
    for (int i = g->n + 1; (lua_rawgeti(L, idx, i), !lua_isnil(L, -1)); i++) {
        lua_pop(L, 1);
        lua_pushnil(L);
        lua_rawseti(L, idx, i);
    }
    lua_pop(L, 1);
}

void ms_gpu_lua_push_ids(lua_State *L, const ms_gpu_placement_t *pl)
{
    lua_createtable(L, pl->n_devices, 0);
    for (int k = 0; k < pl->n_devices; k++) {
        lua_pushinteger(L, pl->devices[k]);
        lua_rawseti(L, -2, k + 1);
    }
}

/* `metric{gpu="i",name="..."} ` with the value still to come. */
static void metric_start(ms_buf_t *b, const char *metric, int i, const char *name)
{
    ms_buf_appendf(b, "%s{gpu=\"%d\",name=\"", metric, i);
    ms_buf_append_label(b, name);
    ms_buf_append_str(b, "\"} ");
}

void ms_gpu_metrics_text(const ms_gpu_t *g, ms_buf_t *b)
{
    if (g->n == 0)
        return;
    ms_metrics_family(b, "moonserve_gpu_utilization", "gauge",
                      "GPU utilization (0..1) at the latest sample (NVML, or the fake GPUs).");
    for (int i = 0; i < g->n; i++)
        if (g->dev[i].has_sample) {
            metric_start(b, "moonserve_gpu_utilization", i, g->dev[i].name);
            ms_buf_appendf(b, "%.4g\n", g->dev[i].utilization);
        }
    ms_metrics_family(b, "moonserve_gpu_memory_used_bytes", "gauge",
                      "GPU memory in use at the latest sample.");
    for (int i = 0; i < g->n; i++)
        if (g->dev[i].has_sample) {
            metric_start(b, "moonserve_gpu_memory_used_bytes", i, g->dev[i].name);
            ms_buf_append_uint(b, g->dev[i].memory_used_bytes);
            ms_buf_append_str(b, "\n");
        }
    ms_metrics_family(b, "moonserve_gpu_memory_total_bytes", "gauge", "GPU memory in all.");
    for (int i = 0; i < g->n; i++) {
        metric_start(b, "moonserve_gpu_memory_total_bytes", i, g->dev[i].name);
        ms_buf_append_uint(b, g->dev[i].memory_total_bytes);
        ms_buf_append_str(b, "\n");
    }
}
