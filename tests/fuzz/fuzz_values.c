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
 *
 * Coverage: the codec is Lua, which libFuzzer's instrumentation does not see, so in the libFuzzer
 * build (MS_FUZZ_LIBFUZZER) a Lua line hook, set only while the check runs, counts each pair
 * (previous line, line) of a chunk into an array in libFuzzer's extra-counters section
 * (__libfuzzer_extra_counters, read on Linux through its __start_/__stop_ symbols): an
 * edge-like coverage of the Lua lines, with the JIT off so every line goes through the hook.
 * The replay build has neither the hook nor the section.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>

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
    /* The array marker counts on an empty table only: a map whose keys are exactly 1..n is an
     * array to the encoder, so it comes back marked (Lua cannot tell the two apart). */
    "  if next(a) == nil and next(b) == nil and getmetatable(a) ~= getmetatable(b) then\n"
    "    return false\n"
    "  end\n"
    "  local na, nb, used = 0, 0, {}\n"
    "  for _ in pairs(b) do nb = nb + 1 end\n"
    "  for k, v in pairs(a) do\n"
    "    na = na + 1\n"
    /* A table key decodes to a new table: find an equal one, not the same one. */
    "    if type(k) == 'table' then\n"
    "      local found\n"
    "      for kk, vv in pairs(b) do\n"
    "        if not found and not used[kk] and type(kk) == 'table' and same(k, kk)\n"
    "            and same(v, vv) then used[kk], found = true, true end\n"
    "      end\n"
    "      if not found then return false end\n"
    "    elseif not same(v, b[k]) then return false end\n"
    "  end\n"
    "  return na == nb\n"
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

#ifdef MS_FUZZ_LIBFUZZER
#define LUA_EDGES (1u << 16)
/* libFuzzer counts a byte here like one of its own edge counters (a feature per bucket of hits). */
__attribute__((used, section("__libfuzzer_extra_counters"))) static uint8_t lua_edges[LUA_EDGES];
static uintptr_t prev_site;

static void line_hook(lua_State *L, lua_Debug *ar)
{
    if (!lua_getinfo(L, "S", ar))
        return;
    /* The chunk's source string is interned and lives as long as the chunk: its address names
     * the chunk. The site hashes chunk and line; the edge, the previous site with this one. */
    uintptr_t site = ((uintptr_t)ar->source * 2654435761u) ^ ((uintptr_t)ar->currentline * 40503u);
    uint32_t i = (uint32_t)((site ^ (prev_site >> 1)) * 2246822519u >> 7) % LUA_EDGES;
    prev_site = site;
    if (lua_edges[i] != 255)
        lua_edges[i]++;
}
#endif

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
#ifdef MS_FUZZ_LIBFUZZER
    /* Traces do not call line hooks: run everything in the interpreter. */
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
#endif
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
#ifdef MS_FUZZ_LIBFUZZER
    /* FUZZ_VALUES_BLIND=1: no Lua coverage, to compare with the coverage-blind harness. */
    static int blind = -1;
    if (blind < 0)
        blind = getenv("FUZZ_VALUES_BLIND") != NULL;
    prev_site = 0;
    if (!blind)
        lua_sethook(L, line_hook, LUA_MASKLINE, 0);
#endif
    int rc = lua_pcall(L, 1, 0, 0);
#ifdef MS_FUZZ_LIBFUZZER
    lua_sethook(L, NULL, 0, 0);
#endif
    if (rc != 0) {
        fprintf(stderr, "fuzz_values: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}
