/*
 * Internal to engine/sandbox (not a public header): what the sandbox's own library functions
 * (patterns.c, bounded.c) need from the sandbox core, and how the core installs them.
 *
 * Library functions written in C run inside one C call, where the count hook never fires; the
 * ones that can run long count their own work and charge it here, so the budget still holds.
 */
#ifndef MS_SANDBOX_LIB_H
#define MS_SANDBOX_LIB_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

/* Units of C work (matcher steps, elements visited, comparisons) that count as one tick, the
 * hook's 1000 instructions: about a microsecond each, so ticks keep meaning the same thing. */
#define MS_SANDBOX_WORK_PER_TICK 256

/* Charges `ticks` to the call in progress and checks the budget exactly as the count hook does;
 * past it, raises the hook's unswallowable abort (and does not return). Idle outside calls. */
void ms_sandbox_charge(lua_State *L, uint64_t ticks);

/* Bytes the allocator still grants to the call in progress; SIZE_MAX while the cap is off. */
size_t ms_sandbox_mem_left(lua_State *L);

/* Compiles text (never bytecode) as lua_load does, feeding the parser in slices that each charge
 * the call's budget. Returns 0 with the function pushed, or non-zero with the message pushed. */
int ms_sandbox_load_text(lua_State *L, const char *text, size_t len, const char *chunkname);

/* Pushes a fresh `require` (modules.c) for sb->module_dir, with a cache of its own. */
struct ms_sandbox;
void ms_sandbox_push_require(struct ms_sandbox *sb);

/* Replace find, match, gmatch and gsub in the string table at `strlib` (patterns.c). */
void ms_sandbox_open_patterns(lua_State *L, int strlib);

/* Replace string.rep, upper, lower, reverse, format, os.date, table.concat, insert and sort in
 * the tables at `strlib`, `tablib`, `oslib` (bounded.c). */
void ms_sandbox_open_bounded(lua_State *L, int strlib, int tablib, int oslib);

/* Is the call in progress being aborted (budget or memory)? Such errors must pass untouched. */
int ms_sandbox_aborting(lua_State *L);

#endif
