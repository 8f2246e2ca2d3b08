/*
 * The ingress-route matcher (lua/moonserve/routes.lua) in a plain LuaJIT state: the checks are
 * in test_routes.lua, which returns the list of the ones that failed.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>

#include "test.h"

static const char *source_dir(void)
{
    const char *d = getenv("MS_SOURCE_DIR");
    return d && *d ? d : MS_SOURCE_DIR;
}

int main(void)
{
    char path[4096], script[4096];
    snprintf(path, sizeof path, "%s/lua/?.lua", source_dir());
    snprintf(script, sizeof script, "%s/tests/unit/test_routes.lua", source_dir());
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_pushstring(L, path);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
    int rc = luaL_dofile(L, script);
    if (rc != 0)
        fprintf(stderr, "%s\n", lua_tostring(L, -1));
    ASSERT_INT_EQ(rc, 0);
    if (rc == 0) {
        ASSERT_TRUE(lua_istable(L, -1));
        size_t n = lua_objlen(L, -1);
        for (size_t i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, (int)i);
            fprintf(stderr, "routes check failed: %s\n", lua_tostring(L, -1));
            lua_pop(L, 1);
        }
        ASSERT_INT_EQ(n, 0);
    }
    lua_close(L);
    return TEST_DONE();
}
