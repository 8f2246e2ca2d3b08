/*
 * sandbox: owns the lua_State of one policy script and the rules it runs under.
 *
 *  - Environment: an allow-list built from scratch (base functions, string, table, math, three
 *    os functions), never the state's real globals; reading or creating an undefined global is
 *    an error (guard metatable), because stock LuaJIT has no read-only tables.
 *  - Loading: text only. Bytecode is refused, both at the first byte and through the "t" mode
 *    of luaL_loadbufferx, since LuaJIT bytecode is not verified and can corrupt the VM.
 *  - Budget: the JIT is off for the whole state, so the count hook fires on every path (LuaJIT
 *    does not check hooks inside compiled traces unless built with LUAJIT_ENABLE_CHECKHOOK,
 *    which Debian's package is not). The hook aborts a call past its deadline or instruction
 *    cap, and keeps aborting until the call unwinds, so the script's own pcall can't swallow it.
 *  - Memory: a custom allocator counts bytes (LuaJIT here is GC64, so lua_newstate accepts an
 *    allocator) and refuses past the cap while script code runs.
 */
#include "sandbox/sandbox.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <lauxlib.h>
#include <lualib.h>
#include <luajit.h>

#include "core/core.h"
#include "sandbox/sandbox_lib.h"

/* ---- allocator ------------------------------------------------------------------------------ */

/* Plain realloc, not ms_realloc: running out must become a Lua error, not an abort. */
static void *sandbox_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    ms_sandbox_t *sb = ud;
    if (nsize == 0) {
        free(ptr);
        sb->mem_used -= ptr ? osize : 0;
        return NULL;
    }
    size_t old = ptr ? osize : 0;
    if (sb->mem_enforced && nsize > old && sb->mem_used - old + nsize > sb->mem_limit) {
        sb->mem_exceeded = 1; /* the hook turns this into an unswallowable abort */
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (p)
        sb->mem_used = sb->mem_used - old + nsize;
    return p;
}

static ms_sandbox_t *sandbox_of(lua_State *L)
{
    void *ud;
    lua_getallocf(L, &ud);
    return ud;
}

/* ---- budget hook ---------------------------------------------------------------------------- */

/* Raises the abort, from the hook or from a library function charging its own work (then the
 * innermost Lua frame is the caller's, which names the line; a tail call may leave none). The
 * first abort of a call is kept for its error: later ones only re-raise it wherever the script's
 * pcall let it go on. Re-arming with a count of 1 means that if a pcall in the script catches
 * this error, the very next instruction raises it again. */
static int hook_abort(lua_State *L, const char *what)
{
    ms_sandbox_t *sb = sandbox_of(L);
    lua_Debug ar;
    const char *msg = NULL;
    sb->hook_fast = 1;
    lua_sethook(L, lua_gethook(L), LUA_MASKCOUNT, 1);
    for (int level = 0; !msg && lua_getstack(L, level, &ar); level++) {
        if (lua_getinfo(L, "Sl", &ar) && ar.what[0] != 'C')
            msg = lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, what);
    }
    if (!msg)
        msg = lua_pushfstring(L, "%s: %s", sb->chunkname, what);
    if (!sb->abort_msg[0])
        ms_copy_str(sb->abort_msg, sizeof sb->abort_msg, msg);
    return lua_error(L);
}

void ms_sandbox_charge(lua_State *L, uint64_t ticks)
{
    ms_sandbox_t *sb = sandbox_of(L);
    if (!sb->in_call)
        return;
    if (sb->mem_exceeded)
        hook_abort(L, "memory limit exceeded");
    /* The clock is first read here, not when the call starts: a typical routing call ends well
     * before its first tick, and a clock read (~25 ns on this machine) would be a tenth of it. */
    uint64_t now = ms_now_us();
    if (sb->deadline_us == 0)
        sb->deadline_us = now + sb->budget_us;
    sb->ticks += ticks;
    if (sb->budget_exceeded || sb->ticks > sb->max_ticks || now > sb->deadline_us) {
        sb->budget_exceeded = 1;
        hook_abort(L, "budget exceeded");
    }
}

int ms_sandbox_aborting(lua_State *L)
{
    ms_sandbox_t *sb = sandbox_of(L);
    return sb->in_call && (sb->budget_exceeded || sb->mem_exceeded);
}

size_t ms_sandbox_mem_left(lua_State *L)
{
    ms_sandbox_t *sb = sandbox_of(L);
    if (!sb->mem_enforced)
        return SIZE_MAX;
    return sb->mem_used >= sb->mem_limit ? 0 : sb->mem_limit - sb->mem_used;
}

static void budget_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    ms_sandbox_charge(L, 1);
}

/* ---- sandboxed library functions ------------------------------------------------------------ */

/* collectgarbage("count") only: a script may look at its footprint, never drive the collector. */
static int sb_collectgarbage(lua_State *L)
{
    const char *opt = luaL_optstring(L, 1, "collect");
    if (strcmp(opt, "count") != 0)
        return luaL_error(L, "collectgarbage: only \"count\" is allowed in policy scripts");
    lua_pushnumber(L, lua_gc(L, LUA_GCCOUNT, 0) + lua_gc(L, LUA_GCCOUNTB, 0) / 1024.0);
    return 1;
}

/* The parser is C: text reaches it in slices, each charged to the call's budget (one tick per
 * MS_SANDBOX_WORK_PER_TICK bytes), so compiling a huge string cannot outlast the budget. */
#define LOAD_SLICE 4096

typedef struct {
    const char *text;
    size_t left;
    int slices;
} load_reader;

static const char *read_slice(lua_State *L, void *ud, size_t *size)
{
    load_reader *r = ud;
    if (r->left == 0) {
        *size = 0;
        return NULL;
    }
    if (r->slices++ > 0) /* a short text is never charged */
        ms_sandbox_charge(L, LOAD_SLICE / MS_SANDBOX_WORK_PER_TICK);
    size_t n = r->left < LOAD_SLICE ? r->left : LOAD_SLICE;
    const char *p = r->text;
    r->text += n;
    r->left -= n;
    *size = n;
    return p;
}

int ms_sandbox_load_text(lua_State *L, const char *text, size_t len, const char *chunkname)
{
    if (len > 0 && text[0] == LUA_SIGNATURE[0]) {
        lua_pushstring(L, "attempt to load a binary chunk");
        return LUA_ERRSYNTAX;
    }
    load_reader r = {text, len, 0};
    return lua_loadx(L, read_slice, &r, chunkname, "t");
}

/* load/loadstring(text [, chunkname]): strings only (no reader functions), text only, and the
 * result runs in the sandbox environment (upvalue 1), never in the real globals. */
static int sb_load(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    const char *name = luaL_optstring(L, 2, text);
    if (ms_sandbox_load_text(L, text, len, name) != 0) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_setfenv(L, -2);
    return 1;
}

static int sb_guard_index(lua_State *L)
{
    return luaL_error(L, "attempt to read undefined global '%s'", lua_tostring(L, 2));
}

static int sb_guard_newindex(lua_State *L)
{
    return luaL_error(L, "attempt to create global '%s' (declare it local)", lua_tostring(L, 2));
}

/* ---- environment ---------------------------------------------------------------------------- */

static const char *const base_allow[] = {
    "assert",   "error",  "getmetatable", "ipairs",   "next",         "pairs",
    "rawequal", "rawget", "rawset",       "select",   "setmetatable", "tonumber",
    "tostring", "type",   "unpack",       "_VERSION", NULL,
};
static const char *const os_allow[] = {"time", "clock", "date", NULL};

static void open_lib(lua_State *L, const char *name, lua_CFunction open)
{
    /* LuaJIT wants luaopen_* called through lua_call, not directly. */
    lua_pushcfunction(L, open);
    lua_pushstring(L, name);
    lua_call(L, 1, 0);
}

/* env[name] = a shallow copy of the real global library `name`, minus `deny` (may be NULL). */
static void copy_lib(lua_State *L, int env, const char *name, const char *deny)
{
    lua_newtable(L);
    lua_getglobal(L, name);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        if (deny && lua_type(L, -2) == LUA_TSTRING && strcmp(lua_tostring(L, -2), deny) == 0) {
            lua_pop(L, 1);
            continue;
        }
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, -5);
    }
    lua_pop(L, 1);
    lua_setfield(L, env, name);
}

/* env[name] = { f = real[name][f] for f in allow } */
static void copy_some(lua_State *L, int env, const char *name, const char *const *allow)
{
    lua_newtable(L);
    lua_getglobal(L, name);
    for (const char *const *f = allow; *f; f++) {
        lua_getfield(L, -1, *f);
        lua_setfield(L, -3, *f);
    }
    lua_pop(L, 1);
    lua_setfield(L, env, name);
}

/* pcall and xpcall of the sandbox. Two things LuaJIT's own cannot do: a budget or memory abort
 * caught inside goes on at once to the caller's pcall, and so on up to the engine's (the hook
 * would re-raise it at the next instruction anyway, but one level per instruction, and a pcall
 * that fails before running an instruction — a stack overflow — would never give it one); and the
 * nesting is bounded. Unbounded pcall recursion otherwise reaches Lua's stack limit, where every
 * further call fails inside LuaJIT's stack growth without running an instruction, so neither the
 * hook nor the clock is ever consulted again: the controller hung there. */
#define SB_MAX_PCALL_DEPTH 200

/* Raises the abort of the call in progress, or returns when there is none. */
static void propagate_abort(lua_State *L)
{
    ms_sandbox_t *sb = sandbox_of(L);
    if (!ms_sandbox_aborting(L))
        return;
    if (!sb->abort_msg[0])
        hook_abort(L, sb->budget_exceeded ? "budget exceeded" : "memory limit exceeded");
    lua_pushstring(L, sb->abort_msg);
    lua_error(L);
}

/* Calls the function at `fn` with everything above it, under handler `handler` (0: none), and
 * turns the outcome into pcall's results. */
static int protected_call(lua_State *L, int fn, int handler)
{
    ms_sandbox_t *sb = sandbox_of(L);
    if (sb->pcall_depth >= SB_MAX_PCALL_DEPTH)
        return luaL_error(L, "too many nested pcalls (more than %d)", SB_MAX_PCALL_DEPTH);
    sb->pcall_depth++;
    int status = lua_pcall(L, lua_gettop(L) - fn, LUA_MULTRET, handler);
    sb->pcall_depth--;
    propagate_abort(L);
    lua_pushboolean(L, status == 0);
    lua_insert(L, fn);
    return lua_gettop(L) - fn + 1;
}

static int sb_pcall(lua_State *L)
{
    luaL_checkany(L, 1);
    return protected_call(L, 1, 0);
}

/* xpcall(f, handler, ...): the handler runs under the same budget as everything else. */
static int sb_xpcall(lua_State *L)
{
    luaL_checkany(L, 2);
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_replace(L, 1); /* the handler at 1 */
    lua_replace(L, 2); /* the function at 2, its arguments above */
    return protected_call(L, 2, 1);
}

/* String values share one metatable whose __index is the real string library: point it at the
 * sandbox copy (which has no string.dump) and hide the metatable from getmetatable(""). */
static void protect_string_metatable(lua_State *L, int env)
{
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    lua_getfield(L, env, "string");
    lua_setfield(L, -2, "__index");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 2);
}

static void build_env(ms_sandbox_t *sb)
{
    lua_State *L = sb->L;
    lua_newtable(L);
    int env = lua_gettop(L);
    lua_getglobal(L, "_G");
    for (const char *const *f = base_allow; *f; f++) {
        lua_getfield(L, -1, *f);
        lua_setfield(L, env, *f);
    }
    lua_pop(L, 1);
    copy_lib(L, env, "string", "dump");
    copy_lib(L, env, "table", NULL);
    copy_some(L, env, "os", os_allow);
    lua_getfield(L, env, "string");
    lua_getfield(L, env, "table");
    lua_getfield(L, env, "os");
    ms_sandbox_open_patterns(L, env + 1);
    ms_sandbox_open_bounded(L, env + 1, env + 2, env + 3);
    lua_pop(L, 3);
    copy_lib(L, env, "math", NULL);
    lua_pushcfunction(L, sb_collectgarbage);
    lua_setfield(L, env, "collectgarbage");
    lua_pushcfunction(L, sb_pcall);
    lua_setfield(L, env, "pcall");
    lua_pushcfunction(L, sb_xpcall);
    lua_setfield(L, env, "xpcall");
    lua_pushvalue(L, env);
    lua_pushcclosure(L, sb_load, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, env, "load");
    lua_setfield(L, env, "loadstring");
    lua_pushvalue(L, env);
    lua_setfield(L, env, "_G");
    protect_string_metatable(L, env);

    lua_newtable(L); /* the guard goes on last: filling the table above needs no permission */
    lua_pushcfunction(L, sb_guard_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, sb_guard_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, env);
    sb->env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* ---- calls ---------------------------------------------------------------------------------- */

/* Pushes "file:line: (error object is a T value)" for the innermost Lua function on the stack, so
 * a script raising a table, nil or an object still shows where. */
static const char *push_where(lua_State *L, const char *type)
{
    lua_Debug ar;
    for (int level = 1; lua_getstack(L, level, &ar); level++) {
        if (lua_getinfo(L, "Sl", &ar) && ar.what[0] != 'C' && ar.currentline > 0)
            return lua_pushfstring(L, "%s:%d: (error object is a %s value)", ar.short_src,
                                   ar.currentline, type);
    }
    return lua_pushfstring(L, "(error object is a %s value)", type);
}

/* Message handler for every pcall: adds a traceback to string errors. It is a C function, so the
 * armed count hook never fires inside it, and it lifts the memory cap so building the message
 * can't fail. */
static int message_handler(lua_State *L)
{
    ms_sandbox_t *sb = sandbox_of(L);
    sb->mem_enforced = 0;
    const char *msg = lua_tostring(L, 1);
    if (!msg) /* never its __tostring: that would be script code outside the budget */
        msg = push_where(L, luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void set_err(ms_sandbox_t *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(ms_sandbox_t *sb, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sb->err, sizeof sb->err, fmt, ap);
    va_end(ap);
}

/* Keeps the first line of the error (`file:line: message`); the traceback goes to the debug
 * log only, since failing calls can be frequent and the message alone identifies the spot. */
static void record_call_error(ms_sandbox_t *sb, int rc)
{
    lua_State *L = sb->L;
    const char *msg = lua_tostring(L, -1);
    if (sb->mem_exceeded && !sb->budget_exceeded && sb->abort_msg[0]) {
        set_err(sb, "%s (limit %zu KiB)", sb->abort_msg, sb->mem_limit >> 10);
    } else if (rc == LUA_ERRMEM || (sb->mem_exceeded && !sb->budget_exceeded)) {
        /* The allocator refused: the message couldn't always be built, so say it from here. */
        set_err(sb, "%s: memory limit exceeded (limit %zu KiB)", sb->chunkname,
                sb->mem_limit >> 10);
    } else if (sb->budget_exceeded && sb->abort_msg[0]) {
        set_err(sb, "%s (%llu us)", sb->abort_msg, (unsigned long long)sb->budget_us);
    } else if (sb->budget_exceeded && msg) {
        size_t n = strcspn(msg, "\n");
        set_err(sb, "%.*s (%llu us)", (int)n, msg, (unsigned long long)sb->budget_us);
    } else if (msg) {
        set_err(sb, "%.*s", (int)strcspn(msg, "\n"), msg);
    } else {
        set_err(sb, "unknown error (code %d)", rc);
    }
    ms_debug("policy script: %s", msg ? msg : sb->err);
}

static void arm(ms_sandbox_t *sb, uint64_t budget_us)
{
    sb->budget_us = budget_us;
    sb->deadline_us = 0; /* set by the first tick */
    sb->ticks = 0;
    /* ~1000 instructions per microsecond is about what the interpreter runs; the instruction cap
     * makes an abort deterministic on an idle machine, the clock bounds it on a busy one. */
    sb->max_ticks = budget_us < 100 ? 100 : budget_us;
    sb->budget_exceeded = 0;
    sb->pcall_depth = 0;
    sb->abort_msg[0] = '\0';
    sb->mem_exceeded = 0;
    sb->mem_enforced = 1;
    sb->in_call = 1;
    /* The hook stays installed between calls and is idle outside them (in_call); it is re-set
     * only to undo the count of 1 left by an abort. The count carries over from call to call, so
     * a call's first tick may come early: harmless, it only starts the clock sooner. */
    if (sb->hook_fast) {
        sb->hook_fast = 0;
        lua_sethook(sb->L, budget_hook, LUA_MASKCOUNT, MS_SANDBOX_HOOK_COUNT);
    }
}

/* Outside calls the hook is idle (in_call is 0) and the memory cap is off. */
static void disarm(ms_sandbox_t *sb)
{
    sb->in_call = 0;
    sb->mem_enforced = 0;
}

/* LuaJIT has no emergency collection: its next cycle starts at twice the live size, so a state
 * whose live data is above half the cap would hit the cap with garbage alone. Near the cap, a full
 * collection runs before the call — only once another eighth of the cap has been allocated since
 * the last one, so a state that is simply large does not collect on every call. */
static void collect_near_cap(ms_sandbox_t *sb)
{
    if (sb->mem_used < sb->mem_limit / 4 * 3 || sb->mem_used < sb->mem_after_gc + sb->mem_limit / 8)
        return;
    lua_gc(sb->L, LUA_GCCOLLECT, 0);
    sb->mem_after_gc = sb->mem_used;
}

int ms_sandbox_call(ms_sandbox_t *sb, int nargs, int nres, uint64_t budget_us)
{
    lua_State *L = sb->L;
    int fn = lua_gettop(L) - nargs;
    collect_near_cap(sb);
    arm(sb, budget_us);
    int rc = lua_pcall(L, nargs, nres, MS_SANDBOX_HANDLER_SLOT);
    disarm(sb);
    if (rc == 0 && (sb->budget_exceeded || sb->mem_exceeded)) {
        /* The abort was caught and the call returned before its next instruction could raise
         * it again (`return load(huge)`, `return pcall(f)`): the call still failed. */
        lua_settop(L, fn - 1);
        lua_pushstring(L, sb->abort_msg[0] ? sb->abort_msg : "aborted");
        rc = LUA_ERRRUN;
    }
    if (rc == 0)
        return 0;
    record_call_error(sb, rc);
    lua_settop(L, fn - 1);
    if (sb->mem_exceeded)
        lua_gc(L, LUA_GCCOLLECT, 0); /* give the garbage of the aborted call back at once */
    return -1;
}

/* ---- loading -------------------------------------------------------------------------------- */

int ms_sandbox_load(ms_sandbox_t *sb, const char *buf, size_t len, const char *chunkname)
{
    lua_State *L = sb->L;
    if (len > 0 && buf[0] == LUA_SIGNATURE[0]) {
        set_err(sb, "%s: precompiled bytecode is not accepted", chunkname);
        return -1;
    }
    char name[512];
    snprintf(name, sizeof name, "@%s", chunkname);
    ms_copy_str(sb->chunkname, sizeof sb->chunkname, chunkname);
    if (luaL_loadbufferx(L, buf, len, name, "t") != 0) {
        const char *msg = lua_tostring(L, -1);
        set_err(sb, "%s", msg ? msg : "load failed");
        lua_pop(L, 1);
        return -1;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->env_ref);
    lua_setfenv(L, -2);
    return 0;
}

/* ---- JSON ----------------------------------------------------------------------------------- */

static void push_json_value(lua_State *L, json_t *v);

static void push_json_object(lua_State *L, json_t *v)
{
    const char *key;
    json_t *item;
    lua_createtable(L, 0, (int)json_object_size(v));
    json_object_foreach(v, key, item)
    {
        push_json_value(L, item);
        lua_setfield(L, -2, key);
    }
}

static void push_json_array(lua_State *L, json_t *v)
{
    size_t i;
    json_t *item;
    lua_createtable(L, (int)json_array_size(v), 0);
    json_array_foreach(v, i, item)
    {
        push_json_value(L, item);
        lua_rawseti(L, -2, (int)i + 1);
    }
}

static void push_json_value(lua_State *L, json_t *v)
{
    luaL_checkstack(L, 4, "JSON nested too deeply");
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        push_json_object(L, v);
        break;
    case JSON_ARRAY:
        push_json_array(L, v);
        break;
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
        lua_pushnil(L);
        break;
    }
}

int ms_sandbox_push_json(ms_sandbox_t *sb, const char *json)
{
    if (!json || !*json) {
        lua_newtable(sb->L);
        return 0;
    }
    json_error_t jerr;
    json_t *root = json_loads(json, JSON_DECODE_ANY, &jerr);
    if (!root) {
        set_err(sb, "kwargs:%d:%d: %s", jerr.line, jerr.column, jerr.text);
        return -1;
    }
    push_json_value(sb->L, root);
    json_decref(root);
    return 0;
}

/* ---- lifecycle ------------------------------------------------------------------------------ */

static int panic_handler(lua_State *L)
{
    ms_fatal("unprotected error in policy Lua: %s", lua_tostring(L, -1));
}

ms_sandbox_t *ms_sandbox_new(size_t mem_limit, char **err)
{
    ms_sandbox_t *sb = ms_calloc(1, sizeof *sb);
    sb->mem_limit = mem_limit ? mem_limit : MS_SANDBOX_DEFAULT_MEM_LIMIT;
    sb->L = lua_newstate(sandbox_alloc, sb);
    if (!sb->L) {
        /* Non-GC64 x86-64 LuaJIT refuses custom allocators; this build never is (see docs). */
        *err = ms_strdup("cannot create a Lua state with a counting allocator");
        free(sb);
        return NULL;
    }
    lua_State *L = sb->L;
    lua_atpanic(L, panic_handler);
    open_lib(L, "", luaopen_base);
    open_lib(L, LUA_STRLIBNAME, luaopen_string);
    open_lib(L, LUA_TABLIBNAME, luaopen_table);
    open_lib(L, LUA_MATHLIBNAME, luaopen_math);
    open_lib(L, LUA_OSLIBNAME, luaopen_os); /* only to lend os.time/clock/date to the env */
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    build_env(sb);
    lua_settop(L, 0);
    lua_pushcfunction(L, message_handler); /* pinned: see MS_SANDBOX_HANDLER_SLOT */
    sb->hook_fast = 1;                     /* install the hook on the first call */
    return sb;
}

void ms_sandbox_set_module_dir(ms_sandbox_t *sb, const char *dir)
{
    lua_State *L = sb->L;
    if (dir && !*dir)
        dir = NULL; /* "" would make every module path absolute */
    free(sb->module_dir);
    sb->module_dir = dir ? ms_strdup(dir) : NULL;
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->env_ref);
    lua_pushliteral(L, "require");
    if (dir)
        ms_sandbox_push_require(sb);
    else
        lua_pushnil(L);
    lua_rawset(L, -3); /* raw: the environment's guard refuses new globals */
    lua_pop(L, 1);
}

void ms_sandbox_free(ms_sandbox_t *sb)
{
    if (!sb)
        return;
    lua_close(sb->L);
    free(sb->module_dir);
    free(sb);
}
