/*
 * runtime/tasks: coroutines of a Lua replica and what they wait on. Each request (and the
 * constructor, and each control call) runs as a task: a Lua thread resumed from the uv loop. A
 * task suspends in serve.sleep (a uv timer) or in core.wait on a set of handle calls (each an HTTP
 * request to the controller's Unix socket over a pooled connection), until enough of them ended
 * or its time limit passed. Cancelling a task closes its timer and the connections of its calls,
 * which in turn cancels the downstream requests. A request's deadline goes with each call it
 * makes, as the time it has left (docs/replica-protocol.md, "Deadlines").
 */
#include "runtime/internal.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

/* Idle controller connections kept for reuse; more are closed when they finish. */
#define RT_POOL_MAX 64

/* A streamed call's body that Lua has not taken yet; above this the connection stops reading,
 * so a slow reader slows the producer down (through the controller) instead of growing this. */
#define STREAM_HIGH_WATER (256 * 1024)

enum { CALL_INFLIGHT, CALL_DONE, CALL_FAILED };

struct rt_call {
    rt_t *rt;
    rt_task_t *owner;         /* task that started the call, while in flight */
    rt_call_t *next, **prevp; /* the owner's list of in-flight calls */
    rt_task_t *waiter;        /* task whose core.wait includes this call */
    ms_http_client_t *client;
    int state;
    int cancelled; /* ended by future:cancel() */
    int collected; /* the future userdata is gone: free the call when it ends */
    int stream;    /* stream = true: Lua takes the body in pieces as they arrive */
    int paused;    /* the client stopped reading: the untaken body reached STREAM_HIGH_WATER */
    int status;
    uint64_t deadline_ms; /* loop time its time limit passes (UINT64_MAX: none) */
    char *ctype;
    ms_buf_t body; /* response body, or the failure reason */
};

static const char FUTURE_MT[] = "moonserve.future";
static const char SIGNAL_MT[] = "moonserve.signal";

/* A list of tasks waiting for another task to say "go on" (serve.multiplexed's load lock). A
 * waiting task keeps the signal on its stack, so a signal with waiters is never collected. */
typedef struct rt_signal {
    rt_task_t *head;
} rt_signal_t;

/* The task library's C functions are reached from Lua without a context pointer. */
static rt_t *the_rt;

static int l_future_gc(lua_State *L);

void rt_tasks_init(rt_t *rt)
{
    the_rt = rt;
    rt_batch_init(rt->L);
    luaL_newmetatable(rt->L, FUTURE_MT);
    lua_pushcfunction(rt->L, l_future_gc);
    lua_setfield(rt->L, -2, "__gc");
    lua_pop(rt->L, 1);
    luaL_newmetatable(rt->L, SIGNAL_MT);
    lua_pop(rt->L, 1);
}

/* ---- task lifecycle ---------------------------------------------------------------------------
 */

/* At most this many finished tasks are kept for reuse; more only happen after a burst. */
#define MAX_SPARE_TASKS 256

rt_task_t *rt_task_new(rt_t *rt, const char *fn, rt_task_done_cb done)
{
    rt_task_t *t = rt->spare;
    if (t) {
        /* A coroutine that returned normally is a clean thread again: LuaJIT's lua_resume
         * starts a fresh call on it when its status is 0 and a function is pushed. */
        rt->spare = t->next_spare;
        rt->n_spare--;
        lua_State *co = t->co;
        int co_ref = t->co_ref;
        rt_call_t **wait_set = t->wait_set;
        int wait_cap = t->wait_cap;
        memset(t, 0, sizeof *t);
        t->co = co;
        t->co_ref = co_ref;
        t->wait_set = wait_set;
        t->wait_cap = wait_cap;
    } else {
        t = ms_calloc(1, sizeof *t);
        t->co = lua_newthread(rt->L);
        t->co_ref = luaL_ref(rt->L, LUA_REGISTRYINDEX);
    }
    t->rt = rt;
    t->done = done;
    rt_vm_push_module(t->co);
    lua_getfield(t->co, -1, fn);
    lua_remove(t->co, -2);
    return t;
}

static void finish_failed(rt_task_t *t, const char *msg)
{
    lua_pushstring(t->co, msg);
    t->done(t, 0);
}

/* Resumes t with nargs values on its stack, then either leaves it suspended in a wait or
 * hands it to its done callback (which frees it: t must not be used after this returns). */
/* The failure's message says when the memory cap caused it: "not enough memory" alone would not
 * tell the operator which limit to raise. The cap is off while this runs. */
static void explain_memory_error(rt_t *rt, lua_State *co)
{
    const char *msg = rt_vm_error_text(co, -1);
    lua_pushfstring(co, "%s (the replica's memory limit of %f KiB was reached)", msg,
                    (lua_Number)(rt->mem.limit / 1024)); /* %f prints an integral number whole */
    lua_replace(co, -2);
}

/* LuaJIT has no emergency collection: the garbage of a request that hit the cap, or a heap near
 * it, would make the next allocations fail too. A full collection (with the cap off) runs after
 * such a failure, and before a task once another eighth of the cap was allocated since the last
 * one above three quarters of it. */
static void collect_if_needed(rt_t *rt, int force)
{
    rt_mem_t *m = &rt->mem;
    if (!m->limit || m->enforced)
        return;
    if (force || (m->used >= m->limit / 4 * 3 && m->used >= m->after_gc + m->limit / 8)) {
        lua_gc(rt->L, LUA_GCCOLLECT, 0);
        m->after_gc = m->used;
    }
}

static void resume(rt_task_t *t, int nargs)
{
    rt_t *rt = t->rt;
    rt_task_t *prev = rt->current;
    int was_enforced = rt->mem.enforced;
    rt->current = t;
    rt->mem.enforced = 1;
    rt->mem.refused = 0;
    int st = lua_resume(t->co, nargs);
    rt->mem.enforced = was_enforced;
    rt->current = prev;
    int refused = rt->mem.refused;
    if (st == LUA_YIELD) {
        /* A bare coroutine.yield: nothing would ever resume it. */
        if (!t->timer && !t->wait_n && !t->stream_wait && !t->batcher && !t->sig_prevp)
            finish_failed(t, "coroutine.yield called outside serve.sleep / future:result()");
        collect_if_needed(rt, refused);
        return;
    }
    t->returned = st == 0;
    if (st != 0)
        rt_vm_stringify_error(rt->L, t->co);
    if (st != 0 && (st == LUA_ERRMEM || refused) && rt->mem.limit)
        explain_memory_error(rt, t->co);
    if (st != 0) {
        const char *msg = rt_vm_error_text(t->co, -1);
        luaL_traceback(rt->L, t->co, msg, 0);
        ms_debug("task failed: %s", lua_tostring(rt->L, -1));
        lua_pop(rt->L, 1);
    }
    t->done(t, st == 0); /* frees t: its coroutine is garbage now */
    collect_if_needed(rt, refused);
}

void rt_task_resume(rt_task_t *t, int nargs)
{
    resume(t, nargs);
}

rt_t *rt_current(void)
{
    return the_rt;
}

void rt_task_start(rt_task_t *t, int nargs)
{
    collect_if_needed(t->rt, 0);
    resume(t, nargs);
}

static void free_timer(uv_handle_t *h)
{
    free(h);
}

static void call_end(rt_call_t *c, int state);

static void close_timer(rt_task_t *t)
{
    if (t->timer) {
        uv_close((uv_handle_t *)t->timer, free_timer);
        t->timer = NULL;
    }
}

/* t stops listening to the calls of its core.wait. */
static void wait_forget(rt_task_t *t)
{
    for (int i = 0; i < t->wait_n; i++)
        if (t->wait_set[i]->waiter == t)
            t->wait_set[i]->waiter = NULL;
    t->wait_n = 0;
    t->wait_data = 0;
}

/* t stops waiting on its signal. */
static void signal_forget(rt_task_t *t)
{
    if (!t->sig_prevp)
        return;
    *t->sig_prevp = t->sig_next;
    if (t->sig_next)
        t->sig_next->sig_prevp = t->sig_prevp;
    t->sig_prevp = NULL;
    t->sig_next = NULL;
}

void rt_task_cancel(rt_task_t *t)
{
    close_timer(t);
    wait_forget(t);
    signal_forget(t);
    t->stream_wait = 0; /* the link forgets a pending chunk along with the stream */
    rt_batch_forget(t);
    while (t->calls) {
        rt_call_t *c = t->calls;
        ms_http_client_close(c->client); /* the controller cancels the downstream request */
        c->client = NULL;
        ms_buf_reset(&c->body);
        ms_buf_appendf(&c->body, "cancelled");
        call_end(c, CALL_FAILED);
    }
}

void rt_task_free(rt_task_t *t)
{
    /* Calls still in flight outlive a task that finished normally (fire and forget). */
    while (t->calls) {
        rt_call_t *c = t->calls;
        t->calls = c->next;
        if (c->next)
            c->next->prevp = &t->calls;
        c->owner = NULL;
        c->prevp = NULL;
    }
    rt_t *rt = t->rt;
    if (t->returned && rt->n_spare < MAX_SPARE_TASKS) {
        lua_settop(t->co, 0);
        t->next_spare = rt->spare;
        rt->spare = t;
        rt->n_spare++;
        return;
    }
    luaL_unref(rt->L, LUA_REGISTRYINDEX, t->co_ref);
    free(t->wait_set);
    free(t);
}

/* ---- serve.sleep ------------------------------------------------------------------------------
 */

/* The task running the Lua code in L, or a Lua error when L is not a task's own coroutine (a
 * user coroutine cannot be suspended on behalf of the request). */
rt_task_t *rt_current_task(lua_State *L, const char *what)
{
    rt_task_t *t = the_rt ? the_rt->current : NULL;
    if (!t || t->co != L)
        luaL_error(L, "%s must be called from a request (not from a nested coroutine)", what);
    return t;
}

static void on_sleep_done(uv_timer_t *timer)
{
    rt_task_t *t = timer->data;
    t->timer = NULL;
    uv_close((uv_handle_t *)timer, free_timer);
    resume(t, 0);
}

/* A duration in whole milliseconds. NaN and negatives are errors, as they are most likely a
 * bug (a subtraction gone wrong) that would otherwise pass silently as sleep(0); anything too
 * long for the timer (math.huge included) means "until the request is cancelled": libuv clamps
 * a due time past the end of its clock to never. */
static uint64_t duration_ms(lua_State *L, double s, const char *what)
{
    if (isnan(s) || s < 0)
        luaL_error(L, "%s: bad duration (%s)", what, isnan(s) ? "NaN" : "negative");
    double ms = s * 1000.0 + 0.5;
    return ms >= 18446744073709551615.0 ? UINT64_MAX : (uint64_t)ms;
}

static int l_sleep(lua_State *L)
{
    uint64_t ms = duration_ms(L, luaL_checknumber(L, 1), "serve.sleep");
    rt_task_t *t = rt_current_task(L, "serve.sleep");
    t->timer = ms_malloc(sizeof *t->timer);
    uv_timer_init(t->rt->loop, t->timer);
    t->timer->data = t;
    uv_timer_start(t->timer, on_sleep_done, ms, 0);
    return lua_yield(L, 0);
}

/* ---- signals ----------------------------------------------------------------------------------
 */

/* core.signal() -> a new signal. */
static int l_signal(lua_State *L)
{
    rt_signal_t *sig = lua_newuserdata(L, sizeof *sig);
    sig->head = NULL;
    luaL_getmetatable(L, SIGNAL_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* core.signal_wait(sig): suspends the task until core.signal_fire(sig). */
static int l_signal_wait(lua_State *L)
{
    rt_signal_t *sig = luaL_checkudata(L, 1, SIGNAL_MT);
    rt_task_t *t = rt_current_task(L, "serve.multiplexed");
    t->sig_next = sig->head;
    if (t->sig_next)
        t->sig_next->sig_prevp = &t->sig_next;
    t->sig_prevp = &sig->head;
    sig->head = t;
    return lua_yield(L, 0);
}

/* core.signal_fire(sig): every task waiting on sig goes on, from the loop's next turn (not
 * inside the caller's own resume), in the order they began waiting. */
static int l_signal_fire(lua_State *L)
{
    rt_signal_t *sig = luaL_checkudata(L, 1, SIGNAL_MT);
    while (sig->head) {
        rt_task_t *t = sig->head;
        while (t->sig_next) /* the oldest waiter first: the list is newest first */
            t = t->sig_next;
        signal_forget(t);
        t->timer = ms_malloc(sizeof *t->timer);
        uv_timer_init(t->rt->loop, t->timer);
        t->timer->data = t;
        uv_timer_start(t->timer, on_sleep_done, 0, 0);
    }
    return 0;
}

static void on_spawned_done(rt_task_t *t, int ok)
{
    if (!ok)
        ms_warn("background task failed: %s", rt_vm_error_text(t->co, -1));
    rt_task_free(t);
}

static void on_spawn_due(uv_timer_t *timer)
{
    rt_task_t *t = timer->data;
    t->timer = NULL;
    uv_close((uv_handle_t *)timer, free_timer);
    rt_task_start(t, 2);
}

/* core.spawn(f, args): runs f(unpack(args)) as a task of its own, from the loop's next turn. It
 * belongs to no request, so no request's cancellation stops it (serve.multiplexed loads a model
 * in one: the requests waiting for it come and go). An error is logged. */
static int l_spawn(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TTABLE);
    rt_current_task(L, "serve.multiplexed");
    rt_task_t *t = rt_task_new(the_rt, "_run_spawned", on_spawned_done);
    snprintf(t->request_id, sizeof t->request_id, "background");
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_xmove(L, t->co, 2);
    t->timer = ms_malloc(sizeof *t->timer);
    uv_timer_init(the_rt->loop, t->timer);
    t->timer->data = t;
    uv_timer_start(t->timer, on_spawn_due, 0, 0);
    return 0;
}

/* ---- handle calls -----------------------------------------------------------------------------
 */

static ms_http_client_t *pool_take(rt_t *rt)
{
    while (rt->pool_len > 0) {
        ms_http_client_t *c = rt->pool[--rt->pool_len];
        if (ms_http_client_idle(c))
            return c;
        ms_http_client_close(c);
    }
    return ms_http_client_connect(rt->loop, rt->controller_path, NULL, 0);
}

static void pool_put(rt_t *rt, ms_http_client_t *c)
{
    if (rt->pool_len == RT_POOL_MAX) {
        ms_http_client_close(c);
        return;
    }
    if (rt->pool_len == rt->pool_cap) {
        rt->pool_cap = rt->pool_cap ? rt->pool_cap * 2 : 8;
        rt->pool = ms_realloc(rt->pool, rt->pool_cap * sizeof *rt->pool);
    }
    rt->pool[rt->pool_len++] = c;
}

static void call_free(rt_call_t *c)
{
    free(c->ctype);
    ms_buf_free(&c->body);
    free(c);
}

/* Pushes what result() returns: status, content type, body — or nil, reason and "cancelled",
 * "timeout" or "unavailable" when no whole answer came. A connection that ends once the call's
 * time limit passed is the controller enforcing it on an answer already under way (a stream). */
static int push_result(lua_State *L, rt_call_t *c)
{
    if (c->state == CALL_FAILED) {
        lua_pushnil(L);
        lua_pushlstring(L, c->body.data ? c->body.data : "", c->body.len);
        lua_pushstring(L, c->cancelled                            ? "cancelled"
                          : uv_now(c->rt->loop) >= c->deadline_ms ? "timeout"
                                                                  : "unavailable");
        return 3;
    }
    lua_pushinteger(L, c->status);
    if (c->ctype)
        lua_pushstring(L, c->ctype);
    else
        lua_pushnil(L);
    lua_pushlstring(L, c->body.data ? c->body.data : "", c->body.len);
    return 3;
}

static int call_failed(const rt_call_t *c)
{
    return c->state == CALL_FAILED || c->status < 200 || c->status > 299;
}

/* Ends t's core.wait (or core.wait_data), which returns ok (1: enough calls ended, or data came;
 * 0: its time limit passed). */
static void wait_end(rt_task_t *t, int ok)
{
    wait_forget(t);
    close_timer(t);
    lua_pushboolean(t->co, ok);
    resume(t, 1);
}

static void on_wait_timeout(uv_timer_t *timer)
{
    rt_task_t *t = timer->data;
    wait_end(t, 0);
}

/* The call is over: unlink it from its owner, count it for its waiter, free it if Lua dropped
 * it (then nothing waits on it: a wait's calls are anchored on the waiting coroutine's stack). */
static void call_end(rt_call_t *c, int state)
{
    c->state = state;
    if (c->prevp) {
        *c->prevp = c->next;
        if (c->next)
            c->next->prevp = c->prevp;
        c->prevp = NULL;
    }
    c->owner = NULL;
    rt_task_t *w = c->waiter;
    c->waiter = NULL;
    if (c->collected) {
        call_free(c);
    } else if (w && (--w->wait_need <= 0 || (w->wait_fail_fast && call_failed(c)))) {
        wait_end(w, 1); /* may collect and free c: do not touch it after */
    }
}

static void on_call_head(void *data, int status, const ms_http_header_t *headers, size_t n,
                         int chunked, int64_t content_length)
{
    (void)chunked;
    (void)content_length;
    rt_call_t *c = data;
    c->status = status;
    for (size_t i = 0; i < n; i++) {
        if (headers[i].name_len == 12 && strncasecmp(headers[i].name, "content-type", 12) == 0) {
            free(c->ctype);
            c->ctype = ms_strndup(headers[i].value, headers[i].value_len);
        }
    }
}

/* Whether a streamed call has body Lua may take now (a failed answer is only read whole). */
static int stream_readable(const rt_call_t *c)
{
    return c->state != CALL_FAILED && c->body.len > 0 && c->status >= 200 && c->status <= 299;
}

static void on_call_body(void *data, const char *p, size_t n)
{
    rt_call_t *c = data;
    ms_buf_append(&c->body, p, n);
    if (!c->stream || !stream_readable(c))
        return;
    if (c->body.len >= STREAM_HIGH_WATER && !c->paused) {
        c->paused = 1;
        ms_http_client_pause(c->client);
    }
    rt_task_t *w = c->waiter;
    if (w && w->wait_data)
        wait_end(w, 1); /* the reader may cancel the call: the client copes inside its callback */
}

static void on_call_done(void *data)
{
    rt_call_t *c = data;
    pool_put(c->rt, c->client);
    c->client = NULL;
    call_end(c, CALL_DONE);
}

static void on_call_error(void *data, ms_http_client_error_t err)
{
    rt_call_t *c = data;
    ms_http_client_close(c->client);
    c->client = NULL;
    ms_buf_reset(&c->body);
    ms_buf_appendf(&c->body, "%s (controller socket %s)", ms_http_client_error_text(err),
                   c->rt->controller_path);
    call_end(c, CALL_FAILED);
}

static const ms_http_client_callbacks_t call_callbacks = {
    on_call_head,
    on_call_body,
    on_call_done,
    on_call_error,
};

/* Readies the flat {name, value, ...} header list at idx for C: numbers in it become strings
 * in the table itself. This is where a Lua error can happen (a wrong type, or an allocation
 * that fails or runs a finalizer that raises), so callers run it before they allocate anything
 * a raise would leak; afterwards reading the list allocates nothing, and the strings read stay
 * alive in the table. Other values are left for the caller to skip. Returns the pair count. */
static int prepare_header_list(lua_State *L, int idx)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)lua_objlen(L, idx) / 2;
    for (int i = 1; i <= 2 * n; i++) {
        lua_rawgeti(L, idx, i);
        if (lua_type(L, -1) == LUA_TNUMBER) {
            lua_tostring(L, -1); /* converts the stack slot, which then replaces the number */
            lua_rawseti(L, idx, i);
        } else {
            lua_pop(L, 1);
        }
    }
    return n;
}

/* One entry of a list prepare_header_list readied: the string (its length in *len unless len is
 * NULL), or NULL for another type. */
static const char *header_entry(lua_State *L, int idx, int i, size_t *len)
{
    lua_rawgeti(L, idx, i);
    const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, len) : NULL;
    lua_pop(L, 1); /* s stays alive: the table holds it */
    return s;
}

/* Builds the request head: method and path (strings at 2 and 3), the target deployment, the
 * parent request's id, its time limit (UINT64_MAX: none), the n forwarded headers (the list at
 * index 4, readied by prepare_header_list) and the body framing. Raises no Lua error, so head
 * cannot leak. */
static void build_head(lua_State *L, int n, ms_buf_t *head, const char *target, const char *rid,
                       uint64_t limit_ms, size_t body_len)
{
    ms_buf_appendf(head, "%s %s HTTP/1.1\r\nHost: moonserve\r\nX-Moonserve-Target: %s\r\n",
                   lua_tostring(L, 2), lua_tostring(L, 3), target);
    ms_buf_appendf(head, "X-Request-ID: %s\r\nContent-Length: %zu\r\n", rid, body_len);
    if (limit_ms != UINT64_MAX)
        ms_buf_appendf(head, MS_LINK_DEADLINE_HEADER ": %llu\r\n", (unsigned long long)limit_ms);
    for (int i = 0; i < n; i++) {
        const char *name = header_entry(L, 4, 2 * i + 1, NULL);
        const char *value = header_entry(L, 4, 2 * i + 2, NULL);
        if (name && value && !strpbrk(name, "\r\n") && !strpbrk(value, "\r\n"))
            ms_buf_appendf(head, "%s: %s\r\n", name, value);
    }
    ms_buf_append(head, "\r\n", 2);
}

/* How long a call may take in ms (UINT64_MAX: no limit): what is left of the request's deadline,
 * or the call's own timeout_s when that is sooner. Raises on a bad timeout_s. */
static uint64_t call_limit_ms(lua_State *L, const rt_task_t *t, int idx)
{
    uint64_t limit = UINT64_MAX;
    if (t->has_deadline) {
        uint64_t now = uv_now(t->rt->loop);
        limit = t->deadline_ms > now ? t->deadline_ms - now : 0;
    }
    if (!lua_isnoneornil(L, idx)) {
        uint64_t own = duration_ms(L, luaL_checknumber(L, idx), "handle:options timeout_s");
        if (own < limit)
            limit = own;
    }
    return limit;
}

/* core.call(target, method, path, headers, body[, timeout_s[, stream]]) -> future userdata; sends
 * at once. A stream call's body is taken in pieces by core.take as it arrives. */
static int l_call(lua_State *L)
{
    /* Everything that can raise comes first: a Lua error unwinds past C frees. */
    const char *target = luaL_checkstring(L, 1);
    luaL_checkstring(L, 2);
    luaL_checkstring(L, 3);
    int n_headers = prepare_header_list(L, 4);
    size_t body_len;
    const char *body = luaL_checklstring(L, 5, &body_len);
    rt_task_t *t = rt_current_task(L, "handle:remote");
    uint64_t limit_ms = call_limit_ms(L, t, 6);
    int stream = lua_toboolean(L, 7);
    rt_t *rt = t->rt;
    if (!rt->controller_path)
        return luaL_error(L, "handle:remote: this replica was started without --controller");
    rt_call_t **ud = lua_newuserdata(L, sizeof *ud);
    *ud = NULL; /* collected before it holds a call: nothing to free */
    luaL_getmetatable(L, FUTURE_MT);
    lua_setmetatable(L, -2);

    rt_call_t *c = ms_calloc(1, sizeof *c);
    *ud = c;
    c->rt = rt;
    c->state = CALL_INFLIGHT;
    c->stream = stream;
    c->deadline_ms = limit_ms == UINT64_MAX ? UINT64_MAX : uv_now(rt->loop) + limit_ms;
    c->owner = t;
    c->next = t->calls;
    if (c->next)
        c->next->prevp = &c->next;
    c->prevp = &t->calls;
    t->calls = c;

    ms_buf_t head = {0};
    build_head(L, n_headers, &head, target, t->request_id, limit_ms, body_len);
    c->client = pool_take(rt);
    if (ms_http_client_send(c->client, head.data, head.len, body, body_len, &call_callbacks, c) !=
        0) {
        ms_http_client_close(c->client);
        c->client = NULL;
        ms_buf_appendf(&c->body, "cannot send to the controller");
        call_end(c, CALL_FAILED);
    }
    ms_buf_free(&head);
    return 1;
}

/* The call of the future at idx, or NULL when the value there is not a future. */
static rt_call_t *to_call(lua_State *L, int idx)
{
    rt_call_t **ud = lua_touserdata(L, idx);
    if (!ud || !lua_getmetatable(L, idx))
        return NULL;
    luaL_getmetatable(L, FUTURE_MT);
    int same = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return same ? *ud : NULL;
}

static rt_call_t *check_call(lua_State *L, int idx)
{
    rt_call_t *c = to_call(L, idx);
    if (!c)
        luaL_argerror(L, idx, "not a future");
    return c;
}

/* The call at position i (1-based) of the list at index 1 of a core.wait, or the future there. */
static rt_call_t *wait_item(lua_State *L, int i)
{
    if (lua_type(L, 1) == LUA_TUSERDATA)
        return check_call(L, 1);
    lua_rawgeti(L, 1, i);
    rt_call_t *c = to_call(L, -1);
    lua_pop(L, 1); /* the list keeps the future alive */
    if (!c)
        luaL_error(L, "serve.wait: item %d is not a future", i);
    return c;
}

/* core.wait(futures, need[, timeout_s[, fail_fast]]) -> true once `need` of the distinct futures
 * in the list (or the one future given instead) have ended (or, with fail_fast, one of them
 * failed), false when timeout_s passed first. Suspends the task only when it must. The list stays
 * on the caller's stack, so its futures cannot be collected while the task waits on them. */
static int l_wait(lua_State *L)
{
    int n = lua_type(L, 1) == LUA_TUSERDATA
                ? 1
                : (luaL_checktype(L, 1, LUA_TTABLE), (int)lua_objlen(L, 1));
    int need = (int)luaL_checkinteger(L, 2);
    int has_limit = !lua_isnoneornil(L, 3);
    uint64_t limit_ms = has_limit ? duration_ms(L, luaL_checknumber(L, 3), "serve.wait") : 0;
    int fail_fast = lua_toboolean(L, 4);
    rt_task_t *t = rt_current_task(L, "serve.wait");
    int ended = 0, failed = 0;
    for (int i = 1; i <= n; i++) { /* everything that can raise, before any state changes */
        rt_call_t *c = wait_item(L, i);
        if (c->state != CALL_INFLIGHT) {
            ended++;
            failed |= call_failed(c);
        } else if (c->waiter) {
            return luaL_error(L, "serve.wait: another request is already waiting on item %d", i);
        }
    }
    if (ended >= need || (fail_fast && failed) || (has_limit && limit_ms == 0)) {
        lua_pushboolean(L, ended >= need || (fail_fast && failed));
        return 1;
    }
    if (t->wait_cap < n) {
        t->wait_cap = n;
        t->wait_set = ms_realloc(t->wait_set, (size_t)n * sizeof *t->wait_set);
    }
    t->wait_n = 0;
    for (int i = 1; i <= n; i++) {
        rt_call_t *c = wait_item(L, i);
        if (c->state == CALL_INFLIGHT && !c->waiter) {
            c->waiter = t;
            t->wait_set[t->wait_n++] = c;
        }
    }
    t->wait_need = need - ended;
    t->wait_fail_fast = fail_fast;
    if (has_limit) {
        t->timer = ms_malloc(sizeof *t->timer);
        uv_timer_init(t->rt->loop, t->timer);
        t->timer->data = t;
        uv_timer_start(t->timer, on_wait_timeout, limit_ms, 0);
    }
    return lua_yield(L, 0);
}

/* core.wait_data(future) -> true once a stream call has body to take or has ended; suspends the
 * task until then. */
static int l_wait_data(lua_State *L)
{
    rt_call_t *c = check_call(L, 1);
    rt_task_t *t = rt_current_task(L, "stream:next");
    if (!c->stream)
        return luaL_argerror(L, 1, "not a stream call");
    if (c->state != CALL_INFLIGHT || stream_readable(c)) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (c->waiter)
        return luaL_error(L, "stream:next: another request is already reading this stream");
    if (t->wait_cap < 1) {
        t->wait_cap = 1;
        t->wait_set = ms_realloc(t->wait_set, sizeof *t->wait_set);
    }
    c->waiter = t;
    t->wait_set[0] = c;
    t->wait_n = 1;
    t->wait_need = 1;
    t->wait_fail_fast = 0;
    t->wait_data = 1;
    return lua_yield(L, 0);
}

/* core.take(future) -> the body a stream call received since the last take, and the answer's
 * content type; nil when there is none (yet, or the answer failed: result() tells). */
static int l_take(lua_State *L)
{
    rt_call_t *c = check_call(L, 1);
    if (!c->stream)
        return luaL_argerror(L, 1, "not a stream call");
    if (!stream_readable(c))
        return 0;
    lua_pushlstring(L, c->body.data, c->body.len);
    if (c->ctype)
        lua_pushstring(L, c->ctype);
    else
        lua_pushnil(L);
    ms_buf_reset(&c->body);
    if (c->paused && c->client) {
        c->paused = 0;
        ms_http_client_resume(c->client); /* may parse what it held, even to the answer's end */
    }
    return 2;
}

/* core.result(future) -> status, content_type, body (or nil, reason, kind); the call must have
 * ended (the Lua side waits first). */
static int l_result(lua_State *L)
{
    rt_call_t *c = check_call(L, 1);
    if (c->state == CALL_INFLIGHT)
        return luaL_error(L, "future:result: the call has not ended");
    return push_result(L, c);
}

/* core.done(future) -> whether the call has ended. */
static int l_done(lua_State *L)
{
    lua_pushboolean(L, check_call(L, 1)->state != CALL_INFLIGHT);
    return 1;
}

/* core.cancel(future): a call in flight ends now as cancelled; closing its connection makes the
 * controller cancel the request downstream, at every depth. A task waiting on it is woken. */
static int l_cancel(lua_State *L)
{
    rt_call_t *c = check_call(L, 1);
    if (c->state != CALL_INFLIGHT)
        return 0;
    ms_http_client_close(c->client);
    c->client = NULL;
    c->cancelled = 1;
    ms_buf_reset(&c->body);
    ms_buf_appendf(&c->body, "cancelled by the caller");
    call_end(c, CALL_FAILED);
    return 0;
}

/* core.time_left() -> seconds left of the request's deadline (0 once past), or nil without one. */
static int l_time_left(lua_State *L)
{
    rt_task_t *t = rt_current_task(L, "serve.time_left");
    if (!t->has_deadline)
        return 0;
    uint64_t now = uv_now(t->rt->loop);
    lua_pushnumber(L, t->deadline_ms > now ? (double)(t->deadline_ms - now) / 1000.0 : 0.0);
    return 1;
}

/* core.now() -> seconds on the monotonic clock (for durations). */
static int l_now(lua_State *L)
{
    lua_pushnumber(L, (double)ms_now_us() / 1e6);
    return 1;
}

static int l_future_gc(lua_State *L)
{
    rt_call_t *c = *(rt_call_t **)lua_touserdata(L, 1);
    if (!c)
        return 0;
    if (c->state == CALL_INFLIGHT)
        c->collected = 1;
    else
        call_free(c);
    return 0;
}

/* RFC 9110 token characters, the only ones a field name may hold. */
static int is_tchar(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static const char *bad_header(const ms_http_header_t *h)
{
    if (!h->name || !h->value)
        return "is not a pair of strings";
    if (h->name_len == 0)
        return "has an empty name";
    for (size_t i = 0; i < h->name_len; i++)
        if (!is_tchar((unsigned char)h->name[i]))
            return "has a name with a character not allowed in a header name";
    for (size_t i = 0; i < h->value_len; i++) {
        unsigned char ch = (unsigned char)h->value[i];
        if (ch == '\r' || ch == '\n')
            return "has a value with CR or LF (refused: it would inject header lines)";
        if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
            return "has a value with a control character";
    }
    return NULL;
}

int rt_check_headers(const ms_http_header_t *hs, size_t n, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        const char *why = bad_header(&hs[i]);
        if (why) {
            char name[64] = "?";
            if (hs[i].name)
                rt_quote_bytes(name, sizeof name, hs[i].name, hs[i].name_len);
            snprintf(err, errlen, "invalid response header \"%s\": it %s", name, why);
            return -1;
        }
    }
    return 0;
}

/* ---- streamed responses ----------------------------------------------------------------------
 */

/* stream_start(status, {name, value, ...}): sends the response head; the body follows in chunks
 * (Transfer-Encoding: chunked) and ends when the request's coroutine returns. */
static int l_stream_start(lua_State *L)
{
    rt_task_t *t = rt_current_task(L, "serve.stream");
    int status = (int)luaL_checkinteger(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (!t->stream || t->streaming)
        return luaL_error(L, "serve.stream: the response has already started");
    if (status < 200 || status > 599)
        return luaL_error(L,
                          "serve.stream: invalid status %d (a response needs a final status, "
                          "200-599)",
                          status);
    int n = prepare_header_list(L, 2);
    ms_http_header_t *hs = ms_calloc((size_t)n + 1, sizeof *hs);
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        ms_http_header_t *h = &hs[k];
        h->name = header_entry(L, 2, 2 * i + 1, &h->name_len);
        h->value = header_entry(L, 2, 2 * i + 2, &h->value_len);
        k += h->name && h->value; /* a pair that is not two strings is skipped */
    }
    char err[200];
    int bad = rt_check_headers(hs, k, err, sizeof err);
    if (!bad)
        ms_link_start(t->stream, status, hs, k);
    free(hs);
    if (bad) /* nothing is sent yet: the request fails with a 500 like any handler error */
        return luaL_error(L, "serve.stream: %s", err);
    t->streaming = 1;
    return 0;
}

/* The link queued the last byte of a chunk it could not take at once: the sender goes on. */
static void on_chunk_queued(void *ctx)
{
    rt_task_t *t = ctx;
    if (!t->stream_wait)
        return;
    t->stream_wait = 0;
    resume(t, 0);
}

/* stream_send(chunk): one piece of a streamed body. When the controller has not yet passed on
 * what was sent before (its client reads slowly), the task waits here until it has: the chunk
 * stays referenced by this call's own stack slot meanwhile. */
static int l_stream_send(lua_State *L)
{
    rt_task_t *t = rt_current_task(L, "serve.stream");
    size_t len;
    const char *chunk = luaL_checklstring(L, 1, &len);
    if (!t->streaming)
        return luaL_error(L, "serve.stream: the response has not started");
    if (ms_link_write(t->stream, chunk, len, on_chunk_queued, t))
        return 0;
    t->stream_wait = 1;
    return lua_yield(L, 0);
}

const luaL_Reg rt_task_lib[] = {
    {"sleep", l_sleep},
    {"call", l_call},
    {"wait", l_wait},
    {"result", l_result},
    {"wait_data", l_wait_data},
    {"take", l_take},
    {"done", l_done},
    {"cancel", l_cancel},
    {"time_left", l_time_left},
    {"signal", l_signal},
    {"signal_wait", l_signal_wait},
    {"signal_fire", l_signal_fire},
    {"spawn", l_spawn},
    {"now", l_now},
    {"stream_start", l_stream_start},
    {"stream_send", l_stream_send},
    {"batcher_new", rt_l_batcher_new},
    {"batch_submit", rt_l_batch_submit},
    {"batch_configure", rt_l_batch_configure},
    {"batch_stats", rt_l_batch_stats},
    {"report_models", rt_l_report_models},
    {NULL, NULL},
};
