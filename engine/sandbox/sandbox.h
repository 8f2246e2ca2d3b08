/*
 * sandbox: one lua_State per policy script (request routers, autoscaling policies, external
 * scaling hooks), with everything that makes running untrusted policy code inside the controller
 * safe — the allow-listed environment, text-only loading, the JIT turned off, a per-call
 * instruction + wall-clock budget enforced by a count hook, a memory cap enforced by the
 * allocator, and one pcall helper that every entry into Lua goes through.
 */
#ifndef MS_SANDBOX_H
#define MS_SANDBOX_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

/* Instructions between two looks at the clock. Small enough that a runaway loop is noticed within
 * a few microseconds, large enough that the hook costs nothing measurable on a normal call. */
#define MS_SANDBOX_HOOK_COUNT 1000

/* Default memory cap of a policy state (the allocator refuses past it while script code runs). */
#define MS_SANDBOX_DEFAULT_MEM_LIMIT (32u << 20)

/* The bottom of the state's stack is pinned: slot 1 always holds the message handler, so every
 * pcall names it by index instead of fetching and inserting it; script.c pins its own hot values
 * (function, self, candidates, request) just above. Nothing may ever pop below its own base. */
#define MS_SANDBOX_HANDLER_SLOT 1

typedef struct ms_sandbox {
    lua_State *L;
    int env_ref; /* the allow-listed environment table */

    /* Allocator state. The cap is enforced only while script code runs (mem_enforced), so the
     * C-side updates made outside calls can never fail half-way. */
    size_t mem_used;
    size_t mem_limit;
    size_t mem_after_gc; /* mem_used after the last full collection the sandbox ran */
    int mem_enforced;
    int mem_exceeded;

    /* Budget of the call in progress, read by the count hook. */
    int in_call;
    int hook_fast;   /* an abort left the hook firing on every instruction */
    int pcall_depth; /* pcall/xpcall calls nested inside the call in progress */
    int budget_exceeded;
    uint64_t deadline_us;
    uint64_t budget_us;
    uint64_t ticks;
    uint64_t max_ticks;

    char *module_dir; /* where `require` looks (NULL: no require) */

    char abort_msg[256]; /* the first budget or memory abort of the call, where it happened */
    char chunkname[256]; /* file name of the last chunk loaded, for messages */
    char err[512];       /* last error, first line only: `file:line: message` */
} ms_sandbox_t;

/* Creates the state and its environment. Returns NULL (and a malloc'd *err) on failure. */
ms_sandbox_t *ms_sandbox_new(size_t mem_limit, char **err);
void ms_sandbox_free(ms_sandbox_t *sb);

/* Compiles text (never bytecode) into a function whose environment is the sandbox, and pushes
 * it. `chunkname` is the file name shown in errors. Returns 0, or -1 with sb->err set. */
int ms_sandbox_load(ms_sandbox_t *sb, const char *buf, size_t len, const char *chunkname);

/* Calls the function below `nargs` arguments on the stack under a budget of budget_us wall-clock
 * microseconds (and about 1000 instructions per microsecond). On success leaves `nres` results
 * in place of the function and arguments; on failure pops them, sets sb->err and returns -1. */
int ms_sandbox_call(ms_sandbox_t *sb, int nargs, int nres, uint64_t budget_us);

/* Gives scripts `require`: `require "a.b"` loads DIR/a/b.lua (text only; names are dot-separated
 * words of letters, digits, '_' and '-', so no absolute path or ".." can be named; no C modules),
 * runs it in the sandbox environment under the budget of the call in progress and caches its
 * value per state; a cycle and a missing file are clear errors. "moonserve.metrics" is the
 * engine's own module, loaded from its Lua folder (ms_lua_dir). Setting
 * it again starts a fresh cache; NULL or "" removes `require`. Call it before loading the script
 * that requires. */
void ms_sandbox_set_module_dir(ms_sandbox_t *sb, const char *dir);

/* Pushes the value `require(name)` returned in this state, when it is a table and the module has
 * been loaded; returns 0, or -1 (nothing pushed). Runs no Lua code: raw reads only. */
int ms_sandbox_push_loaded(ms_sandbox_t *sb, const char *name);

/* Decodes JSON text into a Lua value and pushes it (objects and arrays become tables, null
 * becomes nil). NULL or "" pushes an empty table. Returns 0, or -1 with sb->err set. */
int ms_sandbox_push_json(ms_sandbox_t *sb, const char *json);

#endif
