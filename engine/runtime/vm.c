/*
 * runtime/vm: the LuaJIT VM that hosts deployment code — package.path, the "moonserve.core" C
 * module, loading an application module and resolving its import attribute — and
 * ms_runtime_inspect, which does only that (no constructor runs) to learn the bind graph.
 *
 * Deployment code is the user's model code, so it runs with the full standard library (no
 * sandbox, unlike policy scripts).
 */
#include "runtime/internal.h"
#include "runtime/runtime.h"

#include <lualib.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "nn/nn.h"

static const char MODULE_KEY[] = "moonserve.runtime.module";

static int l_log(lua_State *L)
{
    static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
    int level = luaL_checkoption(L, 1, NULL, levels);
    const char *msg = luaL_checkstring(L, 2);
    ms_log((ms_log_level_t)(MS_LOG_DEBUG + level), "%s", msg);
    return 0;
}

/* package.preload["moonserve.core"]; upvalue 1 is the extra luaL_Reg (or NULL). */
static int open_core(lua_State *L)
{
    const luaL_Reg *extra = lua_touserdata(L, lua_upvalueindex(1));
    lua_newtable(L);
    rt_json_register(L);
    lua_pushcfunction(L, l_log);
    lua_setfield(L, -2, "log");
    for (; extra && extra->name; extra++) {
        lua_pushcfunction(L, extra->func);
        lua_setfield(L, -2, extra->name);
    }
    return 1;
}

/* Pushes the folder of the application file ("." when it names none). */
static void push_app_dir(lua_State *L, const char *app_file)
{
    const char *slash = strrchr(app_file, '/');
    int dir_len = slash ? (int)(slash - app_file) : 1;
    const char *dir = slash ? app_file : ".";
    if (slash && dir_len == 0) /* the file is directly under / */
        dir_len = 1;
    lua_pushlstring(L, dir, (size_t)dir_len);
}

static void set_package_path(lua_State *L, const char *app_file)
{
    const char *lua_dir = ms_lua_dir();
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;", lua_dir);
    push_app_dir(L, app_file);
    lua_pushstring(L, "/?.lua;");
    push_app_dir(L, app_file);
    lua_pushstring(L, "/?/init.lua;");
    lua_pushvalue(L, -6); /* the default path last */
    lua_concat(L, 6);
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}

static char *take_error(lua_State *L)
{
    char *s = ms_strdup(rt_vm_error_text(L, -1));
    lua_pop(L, 1);
    return s;
}

/* tostring through the value's __tostring, run protected: it is deployment code. */
static int error_tostring(lua_State *L)
{
    if (!luaL_callmeta(L, 1, "__tostring") || !lua_isstring(L, -1))
        lua_pushnil(L);
    return 1;
}

void rt_vm_stringify_error(lua_State *L, lua_State *co)
{
    if (lua_type(co, -1) == LUA_TSTRING || lua_type(co, -1) == LUA_TNUMBER)
        return;
    /* co is dead: the metamethod runs on L. */
    lua_pushcfunction(L, error_tostring);
    lua_xmove(co, L, 1);
    if (lua_pcall(L, 1, 1, 0) != 0 || !lua_isstring(L, -1)) {
        lua_pop(L, 1);
        lua_pushliteral(L, "(error object without a message)");
    }
    lua_xmove(L, co, 1);
}

const char *rt_vm_error_text(lua_State *L, int idx)
{
    if (idx < 0)
        idx = lua_gettop(L) + idx + 1;
    const char *s = lua_tostring(L, idx);
    if (s)
        return s;
    lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
    lua_replace(L, idx);
    return lua_tostring(L, idx);
}

/* Plain realloc, not ms_realloc: running out must become a Lua error, not an abort. */
static void *counting_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    rt_mem_t *m = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        m->used -= old;
        return NULL;
    }
    if (m->enforced && m->limit && nsize > old && m->used - old + nsize > m->limit) {
        m->refused = 1;
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (p)
        m->used = m->used - old + nsize;
    return p;
}

static int vm_panic(lua_State *L)
{
    ms_error("Lua panic: %s", rt_vm_error_text(L, -1));
    return 0;
}

lua_State *rt_vm_new(const char *app_file, const luaL_Reg *extra, rt_mem_t *mem, char **err)
{
    /* LuaJIT here is GC64, which accepts a custom allocator (as the policy sandbox's). */
    lua_State *L = mem ? lua_newstate(counting_alloc, mem) : luaL_newstate();
    if (L && mem)
        lua_atpanic(L, vm_panic);
    if (!L) {
        *err = ms_strdup("cannot create a Lua state (out of memory)");
        return NULL;
    }
    luaL_openlibs(L);
    set_package_path(L, app_file);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushlightuserdata(L, (void *)extra);
    lua_pushcclosure(L, open_core, 1);
    lua_setfield(L, -2, "moonserve.core");
    /* The dense-model runtime, loaded on first require; model paths are relative to the app. */
    push_app_dir(L, app_file);
    lua_pushcclosure(L, ms_nn_lua_open, 1);
    lua_setfield(L, -2, "moonserve.nn");
    lua_pop(L, 2);
    lua_getglobal(L, "require");
    lua_pushstring(L, "moonserve");
    if (lua_pcall(L, 1, 1, 0) != 0) {
        *err = take_error(L);
        lua_close(L);
        return NULL;
    }
    lua_setfield(L, LUA_REGISTRYINDEX, MODULE_KEY);
    return L;
}

void rt_vm_push_module(lua_State *L)
{
    lua_getfield(L, LUA_REGISTRYINDEX, MODULE_KEY);
}

int rt_vm_load_app(lua_State *L, const char *file, const char *attr, json_t *args, char **err)
{
    int top = lua_gettop(L);
    if (luaL_loadfile(L, file) != 0) {
        *err = take_error(L);
        return -1;
    }
    if (lua_pcall(L, 0, 1, 0) != 0) {
        *err = take_error(L);
        return -1;
    }
    rt_vm_push_module(L);
    lua_getfield(L, -1, "_resolve");
    lua_replace(L, -2);
    lua_insert(L, -2); /* _resolve, chunk result */
    lua_pushstring(L, attr);
    if (args && !json_is_null(args))
        rt_json_push(L, args);
    else
        lua_newtable(L);
    lua_pushstring(L, file);
    if (lua_pcall(L, 4, 1, 0) != 0) {
        *err = take_error(L);
        lua_settop(L, top);
        return -1;
    }
    return 0;
}

int ms_runtime_inspect(const char *file, const char *attr, json_t *args, json_t **graph, char **err)
{
    *graph = NULL;
    *err = NULL;
    lua_State *L = rt_vm_new(file, NULL, NULL, err);
    if (!L)
        return -1;
    int rc = -1;
    if (rt_vm_load_app(L, file, attr, args, err) == 0) {
        rt_vm_push_module(L);
        lua_getfield(L, -1, "_graph");
        lua_pushvalue(L, -3);
        if (lua_pcall(L, 1, 1, 0) != 0) {
            *err = take_error(L);
        } else {
            char msg[160];
            *graph = rt_json_from_lua(L, -1, msg, sizeof msg);
            if (*graph)
                rc = 0;
            else
                *err = ms_strndup(msg, strlen(msg));
        }
    }
    lua_close(L);
    return rc;
}
