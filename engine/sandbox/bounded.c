/*
 * bounded: the sandbox's versions of the library functions outside pattern matching that can
 * run long inside one C call (see docs/sandbox.md for the whole list and why the others stay).
 *
 *  - string.rep: the result is checked against the memory left before anything is allocated,
 *    then built with a few large copies that charge the budget.
 *  - table.concat: the size is computed first (one pass that charges the budget), checked
 *    against the memory left, then the result is built in one buffer.
 *  - table.sort: Lua 5.1's quicksort, charging the budget for its comparisons, so a huge table
 *    sorted without a comparator (or with a C function as one) cannot outlast the budget.
 *  - table.insert: moving elements up to make room charges the budget too.
 *
 * Semantics follow LuaJIT's: raw element access, numbers formatted as tostring does, the same
 * error messages.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

#include "sandbox/sandbox_lib.h"

/* Charges one tick per MS_SANDBOX_WORK_PER_TICK units of element work. */
typedef struct {
    lua_State *L;
    unsigned units;
} work_meter;

static inline void meter_step(work_meter *w)
{
    if (++w->units >= MS_SANDBOX_WORK_PER_TICK) {
        w->units = 0;
        ms_sandbox_charge(w->L, 1);
    }
}

/* Refuses, before allocating, a result whose build needs `need` bytes more than are left. The
 * cap counts garbage not yet collected (LuaJIT has no emergency collection), so before refusing
 * one full collection is tried. */
static void check_room(lua_State *L, const char *fn, double result, double need)
{
    size_t left = ms_sandbox_mem_left(L);
    if (need <= (double)left)
        return;
    lua_gc(L, LUA_GCCOLLECT, 0);
    left = ms_sandbox_mem_left(L);
    if (need <= (double)left)
        return;
    char msg[160];
    snprintf(msg, sizeof msg,
             "%s: memory limit exceeded: a result of %.0f bytes does not fit (%zu KiB left)", fn,
             result, left >> 10);
    luaL_error(L, "%s", msg);
}

/* A buffer of n bytes: on the C stack when small, else a userdata (counted by the allocator,
 * collected with the rest, so an error half-way leaks nothing). */
static char *scratch(lua_State *L, char *local, size_t local_size, size_t n)
{
    return n <= local_size ? local : lua_newuserdata(L, n);
}

/* ---- string.rep ------------------------------------------------------------------------------ */

#define REP_CHUNK          (1u << 20) /* bytes copied between two looks at the budget */
#define REP_BYTES_PER_TICK 16384      /* memcpy moves about this much in a microsecond */

/* s (sep s)^(n-1): the result is periodic, so after one period is written the filled part is
 * copied after itself (doubling, then REP_CHUNK at a time), where LuaJIT copies byte by byte
 * (16 MB took 40 ms there, about 2 ms here). The result must fit twice in the memory left: the
 * buffer and the string made from it. */
static int sb_rep(lua_State *L)
{
    size_t l, lsep;
    const char *s = luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    const char *sep = luaL_optlstring(L, 3, "", &lsep);
    if (n <= 0 || (l == 0 && lsep == 0)) {
        lua_pushliteral(L, "");
        return 1;
    }
    double want = (double)n * (double)l + (double)(n - 1) * (double)lsep;
    check_room(L, "string.rep", want, 2 * want);
    size_t total = (size_t)n * l + (size_t)(n - 1) * lsep, period = l + lsep;
    char local[1024];
    char *buf = scratch(L, local, sizeof local, total);
    memcpy(buf, s, l);
    if (n > 1)
        memcpy(buf + l, sep, lsep);
    size_t filled = period < total ? period : total;
    while (filled < total) {
        size_t from = filled % period; /* buf[from..] continues the period at buf[filled..] */
        size_t k = filled - from;
        if (k > total - filled)
            k = total - filled;
        if (k > REP_CHUNK)
            k = REP_CHUNK;
        memcpy(buf + filled, buf + from, k);
        filled += k;
        if (k >= REP_BYTES_PER_TICK)
            ms_sandbox_charge(L, k / REP_BYTES_PER_TICK);
    }
    lua_pushlstring(L, buf, total);
    return 1;
}

/* ---- string.upper, string.lower, string.reverse --------------------------------------------- */

#define TRANSFORM_CHUNK          (1u << 16) /* bytes between two charges: about 60 us */
#define TRANSFORM_BYTES_PER_TICK 1024

enum { XF_UPPER, XF_LOWER, XF_REVERSE };

static void transform(char *dst, const char *src, size_t n, size_t len, size_t at, int how)
{
    switch (how) {
    case XF_UPPER:
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)src[at + i];
            dst[at + i] = (char)(c >= 'a' && c <= 'z' ? c - 0x20 : c);
        }
        break;
    case XF_LOWER:
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)src[at + i];
            dst[at + i] = (char)(c >= 'A' && c <= 'Z' ? c + 0x20 : c);
        }
        break;
    default:
        for (size_t i = 0; i < n; i++)
            dst[len - 1 - (at + i)] = src[at + i];
        break;
    }
}

/* ASCII case mapping (as LuaJIT: the locale never matters) and reversal, a chunk at a time. */
static int sb_transform(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    int how = (int)lua_tointeger(L, lua_upvalueindex(1));
    char local[1024];
    char *buf = scratch(L, local, sizeof local, len);
    for (size_t at = 0; at < len; at += TRANSFORM_CHUNK) {
        size_t n = len - at < TRANSFORM_CHUNK ? len - at : TRANSFORM_CHUNK;
        transform(buf, s, n, len, at, how);
        if (n == TRANSFORM_CHUNK)
            ms_sandbox_charge(L, TRANSFORM_CHUNK / TRANSFORM_BYTES_PER_TICK);
    }
    lua_pushlstring(L, buf, len);
    return 1;
}

/* ---- string.format, os.date: charged up front ------------------------------------------------ */

/* Both stay LuaJIT's own, called from here (upvalue 1) after the predicted time of the call is
 * charged, so a call that cannot fit in the budget is aborted before it starts: format is linear
 * in its string arguments (%q escapes about 8 ns a byte, the rest copies about 1), date in its
 * format (about 16 ns a byte). */
static uint64_t format_ticks(lua_State *L)
{
    size_t flen = 0;
    const char *fmt = lua_tolstring(L, 1, &flen);
    uint64_t bytes = flen, ns_per_byte = fmt && strstr(fmt, "%q") ? 8 : 1;
    for (int i = 2; i <= lua_gettop(L); i++)
        if (lua_type(L, i) == LUA_TSTRING)
            bytes += lua_objlen(L, i);
    return bytes * ns_per_byte / 1000;
}

static uint64_t date_ticks(lua_State *L)
{
    return (lua_type(L, 1) == LUA_TSTRING ? lua_objlen(L, 1) : 0) * 16 / 1000;
}

/* The stock function ran below a C frame, so its error lacks the script's line and names the
 * function '?': put both back as LuaJIT would have for a direct call. Aborts and memory errors
 * pass untouched. */
static int raise_as_caller(lua_State *L, int rc)
{
    if (rc == LUA_ERRMEM || ms_sandbox_aborting(L) || lua_type(L, -1) != LUA_TSTRING)
        return lua_error(L);
    const char *msg = lua_tostring(L, -1);
    const char *q = strncmp(msg, "bad argument #", 14) == 0 ? strstr(msg, " to '?'") : NULL;
    lua_Debug ar;
    const char *name = "?";
    if (lua_getstack(L, 0, &ar) && lua_getinfo(L, "n", &ar) && ar.name)
        name = ar.name;
    luaL_where(L, 1);
    if (q) {
        lua_pushlstring(L, msg, (size_t)(q - msg));
        lua_pushfstring(L, " to '%s'%s", name, q + 7);
        lua_concat(L, 3);
    } else {
        lua_pushvalue(L, -2);
        lua_concat(L, 2);
    }
    return lua_error(L);
}

static int call_stock(lua_State *L, uint64_t ticks)
{
    if (ticks)
        ms_sandbox_charge(L, ticks);
    int n = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    int rc = lua_pcall(L, n, LUA_MULTRET, 0);
    if (rc != 0)
        return raise_as_caller(L, rc);
    return lua_gettop(L);
}

static int sb_format(lua_State *L)
{
    return call_stock(L, format_ticks(L));
}

static int sb_date(lua_State *L)
{
    return call_stock(L, date_ticks(L));
}

static void wrap_stock(lua_State *L, int lib, const char *name, lua_CFunction f)
{
    lua_getfield(L, lib, name);
    lua_pushcclosure(L, f, 1);
    lua_setfield(L, lib, name);
}

/* ---- table.concat ---------------------------------------------------------------------------- */

/* Writes an integral number below 1e14 as tostring does ("%.14g" prints those as integers);
 * returns its length. */
static size_t format_integer(char *out, long long v)
{
    char tmp[24];
    size_t n = 0, len = 0;
    unsigned long long u = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        out[len++] = '-';
    while (n)
        out[len++] = tmp[--n];
    return len;
}

/* Pushes t[i] and returns its text: strings as they are, numbers as tostring writes them (small
 * integers into `num`, without making a string), anything else the error LuaJIT raises. */
static const char *concat_piece(lua_State *L, lua_Integer i, size_t *len, char *num)
{
    lua_rawgeti(L, 1, (int)i);
    int t = lua_type(L, -1);
    if (t == LUA_TNUMBER) {
        lua_Number n = lua_tonumber(L, -1);
        if (n > -1e14 && n < 1e14 && n == (lua_Number)(long long)n && (n != 0 || !signbit(n))) {
            *len = format_integer(num, (long long)n);
            return num;
        }
    } else if (t != LUA_TSTRING) {
        luaL_error(L, "invalid value (%s) at index %d in table for 'concat'", lua_typename(L, t),
                   (int)i);
    }
    return lua_tolstring(L, -1, len);
}

/* Small results are joined in one pass on the C stack; larger ones are sized and checked first
 * (against the memory left), then joined in a second pass. */
static int sb_concat(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    size_t lsep;
    const char *sep = luaL_optlstring(L, 2, "", &lsep);
    lua_Integer first = luaL_optinteger(L, 3, 1);
    lua_Integer last =
        lua_isnoneornil(L, 4) ? (lua_Integer)lua_objlen(L, 1) : luaL_checkinteger(L, 4);
    lua_settop(L, 2);
    if (first > last) {
        lua_pushliteral(L, "");
        return 1;
    }
    work_meter w = {L, 0};
    char local[1024], num[32];
    size_t total = 0, len;
    for (lua_Integer i = first; i <= last; i++) {
        const char *s = concat_piece(L, i, &len, num);
        size_t add = len + (i < last ? lsep : 0);
        if (total + add <= sizeof local) {
            memcpy(local + total, s, len);
            memcpy(local + total + len, sep, add - len);
        }
        total += add;
        lua_pop(L, 1);
        meter_step(&w);
    }
    if (total <= sizeof local) {
        lua_pushlstring(L, local, total);
        return 1;
    }
    check_room(L, "table.concat", (double)total, 2.0 * (double)total);
    char *buf = lua_newuserdata(L, total);
    size_t pos = 0;
    for (lua_Integer i = first; i <= last; i++) {
        const char *s = concat_piece(L, i, &len, num);
        size_t add = len + (i < last ? lsep : 0);
        if (add > total - pos)
            luaL_error(L, "table.concat: the table changed while it was joined");
        memcpy(buf + pos, s, len);
        memcpy(buf + pos + len, sep, add - len);
        pos += add;
        lua_pop(L, 1);
        meter_step(&w);
    }
    lua_pushlstring(L, buf, pos);
    return 1;
}

/* ---- table.insert ---------------------------------------------------------------------------- */

static int sb_insert(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer end = (lua_Integer)lua_objlen(L, 1) + 1;
    int nargs = lua_gettop(L);
    if (nargs == 2) {
        lua_rawseti(L, 1, (int)end);
        return 0;
    }
    if (nargs != 3)
        return luaL_error(L, "wrong number of arguments to 'insert'");
    lua_Integer pos = luaL_checkinteger(L, 2);
    work_meter w = {L, 0};
    for (lua_Integer i = end; i > pos; i--) { /* move t[pos..end-1] up by one */
        lua_rawgeti(L, 1, (int)(i - 1));
        lua_rawseti(L, 1, (int)i);
        meter_step(&w);
    }
    lua_rawseti(L, 1, (int)pos);
    return 0;
}

/* ---- table.sort ------------------------------------------------------------------------------ */

typedef struct {
    lua_State *L;
    int has_cmp; /* argument 2 is the order function */
    work_meter w;
} sorter;

/* Is the value at a less than the one at b (negative indices, before any push)? */
static int sort_less(sorter *st, int a, int b)
{
    lua_State *L = st->L;
    meter_step(&st->w);
    if (!st->has_cmp)
        return lua_lessthan(L, a, b);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, a - 1);
    lua_pushvalue(L, b - 2);
    lua_call(L, 2, 1);
    int res = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return res;
}

/* t[i] = top, t[j] = the value below it; pops both. */
static void set2(lua_State *L, int i, int j)
{
    lua_rawseti(L, 1, i);
    lua_rawseti(L, 1, j);
}

/* Orders t[l], t[(l+u)/2], t[u] (median of three); returns the middle index. */
static int sort_three(sorter *st, int l, int u)
{
    lua_State *L = st->L;
    lua_rawgeti(L, 1, l);
    lua_rawgeti(L, 1, u);
    if (sort_less(st, -1, -2))
        set2(L, l, u);
    else
        lua_pop(L, 2);
    if (u - l == 1)
        return -1;
    int i = (l + u) / 2;
    lua_rawgeti(L, 1, i);
    lua_rawgeti(L, 1, l);
    if (sort_less(st, -2, -1)) {
        set2(L, i, l);
    } else {
        lua_pop(L, 1);
        lua_rawgeti(L, 1, u);
        if (sort_less(st, -1, -2))
            set2(L, i, u);
        else
            lua_pop(L, 2);
    }
    return u - l == 2 ? -1 : i;
}

/* Partitions t[l..u] around the pivot parked at t[u-1]; returns the pivot's final index. */
static int sort_partition(sorter *st, int l, int u)
{
    lua_State *L = st->L;
    int i = l, j = u - 1;
    for (;;) { /* invariant: t[l..i] <= P <= t[j..u]; P sits at the top of the stack */
        while (lua_rawgeti(L, 1, ++i), sort_less(st, -1, -2)) {
            if (i >= u)
                luaL_error(L, "invalid order function for sorting");
            lua_pop(L, 1);
        }
        while (lua_rawgeti(L, 1, --j), sort_less(st, -3, -1)) {
            if (j <= l)
                luaL_error(L, "invalid order function for sorting");
            lua_pop(L, 1);
        }
        if (j < i) {
            lua_pop(L, 3);
            break;
        }
        set2(L, i, j);
    }
    lua_rawgeti(L, 1, u - 1);
    lua_rawgeti(L, 1, i);
    set2(L, u - 1, i);
    return i;
}

static void sort_range(sorter *st, int l, int u)
{
    lua_State *L = st->L;
    while (l < u) {
        int i = sort_three(st, l, u);
        if (i < 0)
            return;
        lua_rawgeti(L, 1, i); /* park the pivot at t[u-1] and keep a copy on the stack */
        lua_pushvalue(L, -1);
        lua_rawgeti(L, 1, u - 1);
        set2(L, i, u - 1);
        i = sort_partition(st, l, u);
        /* Recurse into the smaller half, loop on the larger: the depth stays logarithmic. */
        if (i - l < u - i) {
            sort_range(st, l, i - 1);
            l = i + 1;
        } else {
            sort_range(st, i + 1, u);
            u = i - 1;
        }
    }
}

static int sb_sort(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    int n = (int)lua_objlen(L, 1);
    if (!lua_isnoneornil(L, 2))
        luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    luaL_checkstack(L, 40, "table.sort");
    sorter st = {L, !lua_isnil(L, 2), {L, 0}};
    sort_range(&st, 1, n);
    return 0;
}

void ms_sandbox_open_bounded(lua_State *L, int strlib, int tablib, int oslib)
{
    static const char *const transforms[] = {"upper", "lower", "reverse"};
    for (int i = 0; i < 3; i++) {
        lua_pushinteger(L, i);
        lua_pushcclosure(L, sb_transform, 1);
        lua_setfield(L, strlib, transforms[i]);
    }
    lua_pushcfunction(L, sb_rep);
    lua_setfield(L, strlib, "rep");
    wrap_stock(L, strlib, "format", sb_format);
    wrap_stock(L, oslib, "date", sb_date);
    lua_pushcfunction(L, sb_concat);
    lua_setfield(L, tablib, "concat");
    lua_pushcfunction(L, sb_insert);
    lua_setfield(L, tablib, "insert");
    lua_pushcfunction(L, sb_sort);
    lua_setfield(L, tablib, "sort");
}
