/*
 * modules: `require` for policy scripts, when the sandbox has a module directory (see
 * ms_sandbox_set_module_dir). `require "a.b"` loads DIR/a/b.lua as text, compiles it like any
 * policy chunk (text only, budgeted), runs it in the sandbox environment under the budget of the
 * call in progress, and caches its value per state. Names are dot-separated words of letters,
 * digits, '_' and '-', so a name can never climb out of DIR or name an absolute path; there are
 * no C modules, no search path and no package table for scripts to change.
 *
 * The closure's upvalues, which only it can reach: 1 the environment, 2 the cache (name ->
 * value, or the "loading" marker while the module runs), 3 the chain of modules loading now (an
 * array, for the message when a cycle closes).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <lauxlib.h>

#include "core/core.h"
#include "sandbox/sandbox.h"
#include "sandbox/sandbox_lib.h"

#define MOD_NAME_MAX 200

/* The one engine module scripts may require (Counter, Gauge, Histogram: docs/metrics.md); it
 * comes from the engine's Lua folder, never from the config's. */
static const char ENGINE_METRICS[] = "moonserve.metrics";

#define UP_ENV   lua_upvalueindex(1)
#define UP_CACHE lua_upvalueindex(2)
#define UP_CHAIN lua_upvalueindex(3)

static int loading_marker; /* its address marks a module that is running */

static int valid_name(const char *name, size_t len)
{
    if (len == 0 || len > MOD_NAME_MAX || name[0] == '.' || name[len - 1] == '.')
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c == '.' ? name[i + 1] == '.'
                     : !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                         (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* Raises "require cycle: a -> b -> a" from the chain of modules loading now. */
static int cycle_error(lua_State *L, const char *name)
{
    int n = (int)lua_objlen(L, UP_CHAIN), from = n;
    while (from > 1) {
        lua_rawgeti(L, UP_CHAIN, from);
        int same = strcmp(lua_tostring(L, -1), name) == 0;
        lua_pop(L, 1);
        if (same)
            break;
        from--;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = from; i <= n; i++) {
        lua_rawgeti(L, UP_CHAIN, i);
        luaL_addvalue(&b);
        luaL_addstring(&b, " -> ");
    }
    luaL_addstring(&b, name);
    luaL_pushresult(&b);
    return luaL_error(L, "require cycle: %s", lua_tostring(L, -1));
}

/* Pushes the text of DIR/<rel> as a string-sized userdata; returns its length. The file is read
 * with no Lua call between open and close, so an error can never leak it. */
static size_t read_module(lua_State *L, const char *dir, const char *name, const char *rel,
                          const char **text)
{
    char path[4096];
    struct stat st;
    if (snprintf(path, sizeof path, "%s/%s", dir, rel) >= (int)sizeof path)
        luaL_error(L, "module '%s': path too long", name);
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
        luaL_error(L, "module '%s' not found in %s (no file %s)", name, dir, rel);
    if ((size_t)st.st_size > ms_sandbox_mem_left(L))
        luaL_error(L, "module '%s': %s is larger than the memory left", name, rel);
    char *buf = lua_newuserdata(L, (size_t)st.st_size + 1);
    FILE *f = fopen(path, "rb");
    size_t n = 0;
    int err = 0;
    if (f) {
        n = fread(buf, 1, (size_t)st.st_size, f);
        err = ferror(f) ? errno : 0;
        fclose(f);
    } else {
        err = errno;
    }
    if (!f || err)
        luaL_error(L, "module '%s': cannot read %s: %s", name, rel, strerror(err));
    *text = buf;
    return n;
}

/* Compiles and runs the module (name at index 1), leaving its value on top. A failure forgets
 * the module (so a later require tries again) and re-raises the error as it came, budget and
 * memory aborts included. */
static void run_module(lua_State *L, const char *name, const char *rel, const char *text,
                       size_t len)
{
    char chunkname[MOD_NAME_MAX + 16];
    snprintf(chunkname, sizeof chunkname, "@%s", rel);
    if (len > 0 && text[0] == LUA_SIGNATURE[0])
        luaL_error(L, "module '%s': %s is precompiled bytecode, which is not accepted", name, rel);
    int chain = (int)lua_objlen(L, UP_CHAIN) + 1;
    lua_pushlightuserdata(L, &loading_marker);
    lua_setfield(L, UP_CACHE, name);
    lua_pushvalue(L, 1);
    lua_rawseti(L, UP_CHAIN, chain);
    int rc = ms_sandbox_load_text(L, text, len, chunkname);
    if (rc == 0) {
        lua_pushvalue(L, UP_ENV);
        lua_setfenv(L, -2);
        lua_pushvalue(L, 1);
        rc = lua_pcall(L, 1, 1, 0);
    }
    lua_pushnil(L);
    lua_rawseti(L, UP_CHAIN, chain);
    if (rc != 0) {
        lua_pushnil(L);
        lua_setfield(L, UP_CACHE, name);
        lua_error(L);
    }
}

static int sb_require(lua_State *L)
{
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    lua_settop(L, 1);
    if (!valid_name(name, len))
        return luaL_error(L,
                          "require: invalid module name '%s' (dot-separated words of "
                          "letters, digits, '_' and '-')",
                          name);
    lua_getfield(L, UP_CACHE, name);
    if (lua_touserdata(L, -1) == &loading_marker)
        return cycle_error(L, name);
    if (!lua_isnil(L, -1))
        return 1;
    lua_pop(L, 1);
    char rel[MOD_NAME_MAX + 8];
    snprintf(rel, sizeof rel, "%s.lua", name);
    for (char *c = rel; c < rel + len; c++)
        if (*c == '.')
            *c = '/';
    const ms_sandbox_t *sb = lua_touserdata(L, lua_upvalueindex(4));
    const char *dir = strcmp(name, ENGINE_METRICS) == 0 ? ms_lua_dir() : sb->module_dir;
    const char *text;
    size_t n = read_module(L, dir, name, rel, &text);
    run_module(L, name, rel, text, n);
    if (lua_isnil(L, -1)) { /* as Lua's require: a module that returns nothing is `true` */
        lua_pop(L, 1);
        lua_pushboolean(L, 1);
    }
    lua_pushvalue(L, -1);
    lua_setfield(L, UP_CACHE, name);
    return 1;
}

int ms_sandbox_push_loaded(ms_sandbox_t *sb, const char *name)
{
    lua_State *L = sb->L;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->env_ref);
    lua_pushliteral(L, "require");
    lua_rawget(L, -2);
    if (lua_tocfunction(L, -1) == sb_require && lua_getupvalue(L, -1, 2)) {
        lua_pushstring(L, name);
        lua_rawget(L, -2);
        if (lua_istable(L, -1)) {
            lua_replace(L, top + 1);
            lua_settop(L, top + 1);
            return 0;
        }
    }
    lua_settop(L, top);
    return -1;
}

void ms_sandbox_push_require(ms_sandbox_t *sb)
{
    lua_State *L = sb->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->env_ref);
    lua_newtable(L);
    lua_newtable(L);
    lua_pushlightuserdata(L, sb);
    lua_pushcclosure(L, sb_require, 4);
}
