/*
 * Fuzz harness of the handle value encoding (docs/replica-protocol.md, "Value encoding"; the
 * codec is Lua, lua/moonserve.lua's _values): any bytes given to the decoder either decode or are
 * refused with "malformed handle value payload: ..."; what decodes encodes again, and that payload
 * decodes to equal values (NaN equals NaN, -0.0 keeps its sign, arrays keep the array marker)
 * whose encoding has the same length (not always the same bytes: an object's keys go in the
 * table's iteration order). The VM is
 * the replica's (rt_vm_new, the engine's lua/ folder: MOONSERVE_LUA_DIR, which ctest sets), made
 * once. Built as a libFuzzer binary with -DMS_FUZZ=ON, else replayed over
 * tests/fuzz/corpus/values by replay.c.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

#include "runtime/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char CHECK[] =
    "local values = ...\n"
    "local function same(a, b)\n"
    "  if type(a) ~= type(b) then return false end\n"
    "  if type(a) == 'number' then\n"
    "    if a ~= a then return b ~= b end\n"
    "    return a == b and (a ~= 0 or 1 / a == 1 / b)\n"
    "  end\n"
    "  if type(a) ~= 'table' then return a == b end\n"
    "  if getmetatable(a) ~= getmetatable(b) then return false end\n"
    "  for k, v in pairs(a) do if not same(v, b[k]) then return false end end\n"
    "  for k in pairs(b) do if a[k] == nil then return false end end\n"
    "  return true\n"
    "end\n"
    "return function(s)\n"
    "  local ok, n, vals = pcall(values.decode, s)\n"
    "  if not ok then\n"
    "    assert(type(n) == 'string' and n:find('^malformed handle value payload: '), "
    "'refused without the message: ' .. tostring(n))\n"
    "    return\n"
    "  end\n"
    "  local e1, err = values.encode(vals, n, 'value')\n"
    "  assert(e1, 'a decoded value does not encode: ' .. tostring(err))\n"
    "  local ok2, n2, vals2 = pcall(values.decode, e1)\n"
    "  assert(ok2, 'a re-encoded payload does not decode: ' .. tostring(n2))\n"
    "  assert(n2 == n, 'the count changed')\n"
    "  for i = 1, n do assert(same(vals[i], vals2[i]), 'value ' .. i .. ' changed') end\n"
    "  assert(#values.encode(vals2, n2, 'value') == #e1, 'the encoding changed length')\n"
    "end\n";

static lua_State *vm(void)
{
    static lua_State *L;
    if (L)
        return L;
    char app[] = "/tmp/moonserve-fuzz-values-XXXXXX.lua";
    int fd = mkstemps(app, 4);
    if (fd < 0)
        abort();
    FILE *f = fdopen(fd, "w");
    fputs("return {}\n", f);
    fclose(f);
    char *err = NULL;
    L = rt_vm_new(app, NULL, NULL, &err);
    remove(app);
    if (!L) {
        fprintf(stderr, "fuzz_values: no VM (set MOONSERVE_LUA_DIR): %s\n", err ? err : "?");
        abort();
    }
    rt_vm_push_module(L);
    if (luaL_loadstring(L, CHECK) != 0) {
        fprintf(stderr, "fuzz_values: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_getfield(L, -2, "_values"); /* the chunk's argument */
    if (lua_pcall(L, 1, 1, 0) != 0) {
        fprintf(stderr, "fuzz_values: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_setfield(L, LUA_REGISTRYINDEX, "fuzz_values_check");
    lua_settop(L, 0);
    return L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lua_State *L = vm();
    lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_values_check");
    lua_pushlstring(L, (const char *)data, size);
    if (lua_pcall(L, 1, 0, 0) != 0) {
        fprintf(stderr, "fuzz_values: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}
