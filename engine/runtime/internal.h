/*
 * runtime internals shared by the module's files: the Lua VM and JSON bridge (vm.c, luajson.c,
 * usable without a uv loop, so inspect needs no HTTP), and the replica's task machinery
 * (tasks.c) driven by the replica main (replica.c).
 */
#ifndef MS_RUNTIME_INTERNAL_H
#define MS_RUNTIME_INTERNAL_H

#include <jansson.h>
#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "http/http.h"
#include "link/link.h"

/* ---- JSON <-> Lua (luajson.c) ----------------------------------------------------------------
 * null is the lightuserdata serve.json.null; decoded arrays carry a marker metatable so an empty
 * array encodes back as []; other tables are arrays when their keys are exactly 1..n. */
void rt_json_push(lua_State *L, const json_t *v);
/* NULL on failure with the reason in err. */
json_t *rt_json_from_lua(lua_State *L, int idx, char *err, size_t errlen);
/* Registers json_encode, json_decode, json_null and json_array into the table at the top. */
void rt_json_register(lua_State *L);
/* `s` quoted for a message: printable ASCII as is, '"' and '\\' and every other byte as \xHH;
 * cut with "..." to fit cap (>= 4). */
void rt_quote_bytes(char *out, size_t cap, const char *s, size_t len);

/* ---- VM (vm.c) ------------------------------------------------------------------------------ */
/* A replica's memory cap: its VM counts what LuaJIT allocates and, while `enforced` (Lua code of
 * a task runs), refuses an allocation that would pass `limit`, which LuaJIT raises as "not enough
 * memory" where the allocation happened. */
typedef struct rt_mem {
    size_t used, limit, after_gc; /* limit 0 = no cap */
    int enforced;
    int refused; /* an allocation was refused since the flag was last cleared */
} rt_mem_t;

/* A fresh VM whose package.path covers the engine's lua/ folder and the application file's
 * folder, allocating through `mem` (NULL: LuaJIT's own allocator); `extra` (may be NULL) is added
 * to the "moonserve.core" module. The moonserve module is loaded and left in the registry
 * (rt_vm_push_module pushes it). */
lua_State *rt_vm_new(const char *app_file, const luaL_Reg *extra, rt_mem_t *mem, char **err);
void rt_vm_push_module(lua_State *L);
/* Loads `file`, resolves `attr` (calling a builder with `args`) and pushes the root node.
 * Returns 0, or -1 with *err set (malloc'd, `file:line: message` when Lua gave a position). */
int rt_vm_load_app(lua_State *L, const char *file, const char *attr, json_t *args, char **err);
/* The message of the error value at the top of L's stack (never NULL; valid while it stays). */
const char *rt_vm_error_text(lua_State *L, int idx);
/* Replaces the error value on top of the dead coroutine co with its __tostring (run on L, the
 * VM's main state) when it is an error object, so every report of it has its message. */
void rt_vm_stringify_error(lua_State *L, lua_State *co);

/* ---- replica state and tasks (tasks.c) -------------------------------------------------------
 * A task is one coroutine run to completion across loop iterations: a request, the constructor,
 * or a control call. It is suspended in at most one wait at a time: a timer, a set of handle
 * calls (with an optional timer: core.wait), a chunk the link could not take, or a batch. */
typedef struct rt_task rt_task_t;
typedef struct rt_call rt_call_t;
typedef struct rt rt_t;
typedef struct rt_batcher rt_batcher_t;
typedef struct rt_batch rt_batch_t;

/* Called once the coroutine returned (ok=1, results on co's stack) or failed (ok=0, message on
 * top). The callback owns the task and must rt_task_free it. */
typedef void (*rt_task_done_cb)(rt_task_t *t, int ok);

struct rt_task {
    rt_t *rt;
    lua_State *co;
    int co_ref;           /* registry anchor of co */
    uv_timer_t *timer;    /* pending serve.sleep, or the time limit of a core.wait */
    rt_call_t **wait_set; /* the calls a core.wait is suspended on (wait_n of them) */
    int wait_n, wait_cap; /* wait_set survives the task's reuse: only its length is reset */
    int wait_need;        /* how many more of them must end before the wait does */
    int wait_fail_fast;   /* a failed one ends the wait at once */
    int wait_data;        /* core.wait_data: body arriving on the one stream call ends it too */
    int has_deadline;
    uint64_t deadline_ms; /* loop time the request must be answered by (docs: Deadlines) */
    rt_call_t *calls;     /* calls this task started and that are still in flight */
    rt_task_t *sig_next, **sig_prevp; /* in the list of the signal it waits on (core.signal) */
    ms_link_stream_t *stream;         /* request tasks only */
    json_int_t ctl_id;                /* control tasks only */
    int streaming;                    /* serve.stream started the response: chunks follow */
    int stream_wait;       /* suspended in a chunk the link's window could not take yet */
    int returned;          /* the coroutine ran to completion: it can host another task */
    rt_task_t *next_spare; /* link in rt->spare */
    /* serve.batch (batch.c): a caller waits in its batcher's queue, then in a running batch */
    rt_batcher_t *batcher;
    rt_batch_t *batch_run;
    int batch_index, batch_size;
    int batch_self_ref, batch_item_ref; /* registry anchors while queued */
    int batch_model_ref;                /* its multiplexed model id (a string, or LUA_REFNIL) */
    uint64_t batch_enq_us;              /* when it was queued (monotonic) */
    rt_task_t *batch_prev, *batch_next;
    rt_batch_t *batch_ctx; /* a batch's own task: the batch it runs */
    rt_task_done_cb done;
    char request_id[80];
};

struct rt {
    uv_loop_t *loop;
    lua_State *L;
    int module_ref;     /* the moonserve module table */
    int instance_ref;   /* the constructed deployment instance */
    rt_task_t *current; /* task being resumed, if any */
    rt_task_t *spare;   /* finished tasks whose coroutines are reused (no new thread per request) */
    size_t n_spare;
    rt_mem_t mem; /* the VM's allocation count and cap */
    const char *controller_path;
    ms_http_client_t **pool; /* idle connections to the controller */
    size_t pool_len, pool_cap;
    long max_ongoing;       /* the replica's max_ongoing_requests (for batch warnings) */
    rt_batcher_t *batchers; /* every serve.batch method's batcher */
};

/* sleep, call, wait, result, done, cancel, time_left, stream_start, stream_send and the batch
 * functions for "moonserve.core" */
extern const luaL_Reg rt_task_lib[];
/* Makes rt the one the task library uses; rt->L must exist. */
void rt_tasks_init(rt_t *rt);
/* Creates a task whose coroutine will call moonserve module function `fn`: push its arguments on
 * t->co, then rt_task_start(t, nargs). */
rt_task_t *rt_task_new(rt_t *rt, const char *fn, rt_task_done_cb done);
void rt_task_start(rt_task_t *t, int nargs);
/* 0 when every header is a token name and a value without control characters (HTAB allowed),
 * else -1 with the reason in err: deployment code must not be able to inject header lines. */
int rt_check_headers(const ms_http_header_t *hs, size_t n, char *err, size_t errlen);
/* Drops a task that will never be resumed: cancels its timer and its handle calls. */
void rt_task_cancel(rt_task_t *t);
void rt_task_free(rt_task_t *t);
/* Resumes a suspended task with nargs values pushed on its coroutine. */
void rt_task_resume(rt_task_t *t, int nargs);
/* The replica's state, and the task whose coroutine is L (a Lua error naming `what` if L is not
 * a task's own coroutine). */
rt_t *rt_current(void);
rt_task_t *rt_current_task(lua_State *L, const char *what);

/* ---- batching (batch.c) --------------------------------------------------------------------- */
void rt_batch_init(lua_State *L);
/* A cancelled task leaves its batcher's queue, or its running batch's list of callers. */
void rt_batch_forget(rt_task_t *t);
/* batcher_new, batch_submit, batch_configure, batch_stats for "moonserve.core" */
int rt_l_batcher_new(lua_State *L);
int rt_l_batch_submit(lua_State *L);
int rt_l_batch_configure(lua_State *L);
int rt_l_batch_stats(lua_State *L);
/* report_models for "moonserve.core" (runtime/replica.c: it writes to the control channel) */
int rt_l_report_models(lua_State *L);

#endif
