/*
 * policy: the one mechanism every policy script goes through — request routers, deployment and
 * application autoscaling policies, external-scaling hooks, and whatever kind comes next.
 *
 * A policy is a Lua file named by the config. The core owns everything the kinds have in common:
 *
 *  - loading: the file is read, hashed (sha256) and compiled into a fresh sandbox (engine/sandbox);
 *    the chunk must return a table. A *class* kind (routers) takes its class from that table (or
 *    from its field `attr`), instantiates `self = setmetatable({}, {__index = class})` and calls
 *    `initialize_state(self, kwargs)`; a *function* kind takes the functions the config names from
 *    the table. Functions are looked up with raw accesses only, following `__index` *tables* of
 *    metatables (class inheritance), never running script code outside a budgeted call.
 *  - checks: required functions present, optional ones functions when present, an optional
 *    `self_test` run (an error, or `false` returned, fails the load);
 *  - versions: the first load is version 1, each committed reload adds one; with the sha256 of the
 *    file's content they show in status, logs and metrics;
 *  - failures: every failed call is counted with its message (`file:line: message`, made valid
 *    UTF-8), logged once per new message, and the kind's built-in answer takes over;
 *  - reload in two phases over any set of policies: prepare all (off the event loop, on a worker
 *    thread: a fresh lua_State shares nothing), then on the loop commit all or none; old states
 *    are closed on a worker thread too;
 *  - state hand-over at commit, with one rule (see ms_policy_copy_value);
 *  - one status shape (ms_policy_info) for every kind.
 *
 * A kind adds a small table (ms_policy_kind_t): its name, whether it is a class, its default call
 * budget and three optional callbacks for the persistent tables it shares with scripts. The kind's
 * own module builds the context a call receives and parses the answer.
 *
 * Tables C shares with scripts must be touched by C with raw access only, and carry a protected
 * metatable so no script can attach metamethods to them: use the helpers at the end of this file.
 */
#ifndef MS_POLICY_H
#define MS_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <lua.h>
#include <uv.h>

#include "sandbox/sandbox.h"

/* Functions a policy may name besides initialize_state and self_test. */
#define MS_POLICY_MAX_FNS 6

typedef struct ms_policy ms_policy_t;
typedef struct ms_policy_version ms_policy_version_t;

/* One loaded copy of a script: its sandbox and what the core found in it. The kind reaches its
 * own per-version data through `kind_data`. */
struct ms_policy_version {
    ms_sandbox_t *sb;
    lua_State *L;
    int fn_ref[MS_POLICY_MAX_FNS];  /* LUA_NOREF: absent (optional function) */
    int fn_line[MS_POLICY_MAX_FNS]; /* where each function is defined, for messages */
    int self_ref;                   /* class kinds: the instance; LUA_NOREF otherwise */
    int class_ref;                  /* class kinds: the class; function kinds: the module */
    int kwargs_ref;                 /* LUA_NOREF: no kwargs (pushes nil) */
    int state_ref;                  /* the kind's state value, handed over on reload */
    int protect_ref;                /* {__metatable = false}: the protected metatable */
    char sha256[65];
    void *kind_data;
};

typedef struct ms_policy_kind {
    const char *name;        /* "router", "autoscaling_policy", ...: status, metrics, logs */
    int is_class;            /* see the top of this file */
    uint64_t call_budget_us; /* each call's wall-clock budget when the owner gives none */
    const char *fallback;    /* what happens when a call fails, for the log line */
    /* Builds the kind's persistent tables in a freshly loaded version, after self_test. May run
     * on a worker thread: touch nothing but `v`. 0, or -1 with a message in err. */
    int (*setup)(ms_policy_version_t *v, char *err, size_t errlen);
    /* Frees what setup allocated outside Lua (any thread). */
    void (*release)(ms_policy_version_t *v);
    /* At commit, on the loop, after the core's own hand-over: moves the kind's run-time state
     * (e.g. the router's replica tables) from the version in force to the new one. */
    void (*carry)(ms_policy_t *p, ms_policy_version_t *from, ms_policy_version_t *to);
} ms_policy_kind_t;

/* What to load. Strings are copied. */
typedef struct ms_policy_spec {
    const ms_policy_kind_t *kind;
    const char *file;
    /* Class kinds: the class's field in the returned table (NULL/"": the table itself).
     * Function kinds: unused (name the functions in fns). */
    const char *attr;
    /* Function names, in the order the kind indexes them (ms_policy_push_fn); NULL ends the
     * list. Bit i of `required` makes fns[i] required. */
    const char *fns[MS_POLICY_MAX_FNS + 1];
    unsigned required;
    json_t *kwargs;     /* passed to initialize_state (class) or kept for calls; may be NULL */
    uint64_t budget_us; /* per call; 0: the kind's default */
    size_t mem_limit;   /* bytes per state; 0: MS_SANDBOX_DEFAULT_MEM_LIMIT */
    int builtin;        /* shown in status: the engine's own script */
    /* Who the policy serves, for status, logs and metrics (may be NULL). */
    const char *application, *deployment, *role;
} ms_policy_spec_t;

/* The folder `require` resolves against in every policy created from now on (the config's folder,
 * so a policy can share Lua modules with the application, as Ray allows); NULL: no `require`.
 * Each policy keeps the folder it was created with, for its reloads too. Call on the loop. */
void ms_policy_set_module_dir(const char *dir);

/* Loads version 1 synchronously. NULL with *err (malloc'd, `file:line: message`) on failure. */
ms_policy_t *ms_policy_new(const ms_policy_spec_t *spec, char **err);
/* Frees the policy; a reload in flight that holds it drops it instead of committing it. */
void ms_policy_free(ms_policy_t *p);

/* Replaces the labels of status, logs and metrics (NULL: none). */
void ms_policy_set_labels(ms_policy_t *p, const char *application, const char *deployment,
                          const char *role);
/* The owner's pointer, for kind callbacks. */
void ms_policy_set_owner(ms_policy_t *p, void *owner);
void *ms_policy_owner(const ms_policy_t *p);

ms_policy_version_t *ms_policy_current(const ms_policy_t *p);
const char *ms_policy_file(const ms_policy_t *p);
const char *ms_policy_fn_name(const ms_policy_t *p, int i); /* fns[i] of the spec */
uint64_t ms_policy_budget_us(const ms_policy_t *p);
int ms_policy_has_fn(const ms_policy_t *p, int i);
void ms_policy_set_memory_limit(ms_policy_t *p, size_t bytes);

/* ---- calls ------------------------------------------------------------------------------------
 * The stack of the current version starts with the sandbox's message handler. */

/* Pushes fns[i] of the current version (nil when absent). */
void ms_policy_push_fn(ms_policy_t *p, int i);
/* Pushes self (class kinds), kwargs (nil without), the state value (nil until set). */
void ms_policy_push_self(ms_policy_t *p);
void ms_policy_push_kwargs(ms_policy_t *p);
void ms_policy_push_state(ms_policy_t *p);
/* Replaces the state value with the value on top of the stack (popped). */
void ms_policy_set_state(ms_policy_t *p);

/* Calls the function below nargs arguments under the policy's budget (budget_us 0: the policy's
 * own). 0 with nres results left, or -1 with nothing left and the failure counted. */
int ms_policy_call(ms_policy_t *p, int nargs, int nres, uint64_t budget_us);
/* "file:line" of fns[i]'s definition in the version in force: bad answers are reported there,
 * since the line of the `return` is gone once the call returned. Valid until the next call. */
const char *ms_policy_where(ms_policy_t *p, int i);
/* Counts a failure found by the kind (a bad answer). The message is made valid UTF-8. */
void ms_policy_fail(ms_policy_t *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t ms_policy_failures(const ms_policy_t *p);
/* 1 at the first load, +1 at each committed reload. */
uint64_t ms_policy_version(const ms_policy_t *p);
const char *ms_policy_last_error(const ms_policy_t *p); /* "" if none */

/* {"kind", "application", "deployment", "role", "path", "function", "builtin", "version",
 *  "sha256", "failures", "last_error", "reload_failures", "last_reload_error"}: the one status
 * shape of every policy script. New reference. */
json_t *ms_policy_info(const ms_policy_t *p);

/* The custom metrics the script defined through `require "moonserve.metrics"`, in the shape of a
 * replica's metrics snapshot ({name: {type, description, boundaries, series}}), or NULL when it
 * defined none (policy/metrics.c; reads the state raw, runs no Lua). */
json_t *ms_policy_metrics(const ms_policy_t *p);

/* ---- reload -----------------------------------------------------------------------------------
 */

/* Called on the loop when a reload finished: `scripts` (borrowed) is one object per policy
 * {labels..., "path", "function", "version", "sha256", "ok", "error"}; ok is 1 when every script
 * prepared and all were committed, 0 when none changed. */
typedef void (*ms_policy_reload_cb)(void *data, json_t *scripts, int ok);

/* Prepares every policy of ps on a worker thread, then on `loop` commits all or none and calls
 * cb. The policies may be freed meanwhile (they are then left out). Returns 0, or -1 if the work
 * could not be queued (cb is then not called). */
int ms_policy_reload_start(uv_loop_t *loop, ms_policy_t *const *ps, size_t n,
                           ms_policy_reload_cb cb, void *data);
/* The same in the calling thread; returns ok and sets *scripts (new reference) if non-NULL. */
int ms_policy_reload_now(ms_policy_t *const *ps, size_t n, json_t **scripts);

/* ---- state copies ------------------------------------------------------------------------------
 * The one rule for handing a value from one state to another: nil, booleans, numbers, strings and
 * tables of them are copied with raw accesses (no script code runs); pairs whose key or value is
 * anything else (functions, userdata, threads) are left out; shared subtables stay shared and
 * cycles are kept; metatables are not copied. A value nested deeper than MS_POLICY_COPY_MAX_DEPTH
 * or a copy of more than MS_POLICY_COPY_MAX_VALUES values fails as a whole: nothing is pushed. */
#define MS_POLICY_COPY_MAX_DEPTH  32
#define MS_POLICY_COPY_MAX_VALUES 100000
int ms_policy_copy_value(lua_State *from, int idx, lua_State *to);

/* ---- tables shared with scripts ---------------------------------------------------------------
 */

/* Pushes a new table carrying the version's protected metatable. */
void ms_policy_new_table(ms_policy_version_t *v, int narr, int nrec);
/* Pushes a new metatable for a shared table that needs metamethods of its own: it is protected
 * (__metatable = false), so getmetatable() hides it and setmetatable() fails. */
void ms_policy_new_metatable(lua_State *L, int nrec);
/* Pushes t[key] (t at index t), replacing it first with a new protected table when the script
 * put anything else there: C writes into the result with raw access. */
void ms_policy_subtable(ms_policy_version_t *v, int t, const char *key, int narr, int nrec);
/* Raw stores into the table at index t. */
void ms_policy_set_number(lua_State *L, int t, const char *key, double v);
void ms_policy_set_string(lua_State *L, int t, const char *key, const char *s);
void ms_policy_set_bool(lua_State *L, int t, const char *key, int b);
void ms_policy_set_nil(lua_State *L, int t, const char *key);
/* Raw store of the value on top of the stack (popped) into t[key]. */
void ms_policy_set_value(lua_State *L, int t, const char *key);
/* Raw read: pushes t[key]. */
void ms_policy_get(lua_State *L, int t, const char *key);

/* Makes s (n bytes) safe for JSON and a log line: ms_utf8_copy, then control characters become
 * spaces. out may be s. */
void ms_policy_clean_text(char *out, size_t cap, const char *s, size_t n);
/* snprintf, then ms_policy_clean_text. */
void ms_policy_format_text(char *out, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
