/*
 * runtime/batch: serve.batch, batches formed in C inside the replica (docs/batching.md).
 *
 * A request task that calls a batched method is suspended in the method's batcher queue, its
 * argument anchored in the registry. A batch closes when its items fill max_batch_size or its
 * first item has waited the batch wait, and starts once fewer than max_concurrent_batches run:
 * it is a task of its own calling the user's function with the list of items, and its results
 * resume the callers one by one. A caller cancelled while queued leaves the queue; one
 * cancelled while its batch runs is skipped when the results come back.
 *
 * Batches form from the loop's idle phase, not inside the call that queued an item: the burst
 * of requests read in one loop turn lands in one batch, and no coroutine is resumed from
 * inside another one's call.
 */
#include "runtime/internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

static const char BATCHER_MT[] = "moonserve.batcher";
/* Ray Serve's default latency buckets (ms), for the wait and execution histograms. */
static const double BUCKETS_MS[] = {1,   2,    5,    10,   20,    50,    100,    200,    300,   400,
                                    500, 1000, 2000, 5000, 10000, 60000, 120000, 300000, 600000};
#define N_BUCKETS (sizeof BUCKETS_MS / sizeof *BUCKETS_MS)
static const double SIZE_BOUNDS[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
static const double PERCENT_BOUNDS[] = {10, 20, 30, 40, 50, 60, 70, 80, 90, 100};
#define N_SIZE    (sizeof SIZE_BOUNDS / sizeof *SIZE_BOUNDS)
#define N_PERCENT (sizeof PERCENT_BOUNDS / sizeof *PERCENT_BOUNDS)
/* Adaptive wait: weight of the newest batch in the moving average of execution time. */
#define EWMA_WEIGHT 0.2

typedef struct histogram {
    uint64_t counts[N_BUCKETS + 1]; /* the last one is +Inf; the widest bounds fit */
    double sum;
    uint64_t n;
} histogram_t;

typedef struct batch_settings {
    int max_batch_size;
    double wait_s;
    int max_concurrent;
    double target_s; /* adaptive: latency target, 0 = off */
} batch_settings_t;

struct rt_batcher {
    rt_t *rt;
    rt_batcher_t *next; /* rt->batchers: every batcher stays reachable from the replica */
    char name[64];
    int fn_ref, size_fn_ref; /* LUA_NOREF when absent */
    batch_settings_t set;
    rt_task_t *head, *tail; /* queued callers */
    size_t queued, queued_size;
    int running;
    uv_idle_t idle;
    uv_timer_t timer;
    unsigned scheduled : 1;
    unsigned warned : 1;
    /* what the metrics report */
    uint64_t batches, items;
    histogram_t wait_ms, exec_ms, size, utilization;
    double exec_full_s; /* adaptive: average execution time scaled to a full batch, 0 = unknown */
    double adaptive_s;  /* adaptive: the wait learnt from how late items still joined */
};

struct rt_batch {
    rt_batcher_t *b;
    int n;
    uint64_t started_us;
    rt_task_t *callers[]; /* NULL once a caller is cancelled */
};

static void pump(rt_batcher_t *b);

static void observe(histogram_t *h, double v, const double *bounds, size_t n)
{
    size_t i = 0;
    while (i < n && v > bounds[i])
        i++;
    h->counts[i]++;
    h->sum += v;
    h->n++;
}

/* ---- queue ---------------------------------------------------------------------------------
 */

static void unlink_caller(rt_batcher_t *b, rt_task_t *t)
{
    if (t->batch_prev)
        t->batch_prev->batch_next = t->batch_next;
    else
        b->head = t->batch_next;
    if (t->batch_next)
        t->batch_next->batch_prev = t->batch_prev;
    else
        b->tail = t->batch_prev;
    t->batch_prev = t->batch_next = NULL;
    b->queued--;
    b->queued_size -= (size_t)t->batch_size;
}

static void append_caller(rt_batcher_t *b, rt_task_t *t)
{
    t->batch_next = NULL;
    t->batch_prev = b->tail;
    if (b->tail)
        b->tail->batch_next = t;
    else
        b->head = t;
    b->tail = t;
    b->queued++;
    b->queued_size += (size_t)t->batch_size;
}

static void drop_refs(lua_State *L, rt_task_t *t)
{
    luaL_unref(L, LUA_REGISTRYINDEX, t->batch_item_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->batch_self_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->batch_model_ref);
    t->batch_item_ref = t->batch_self_ref = t->batch_model_ref = LUA_NOREF;
}

/* Whether two queued callers asked for the same multiplexed model (strings are interned: equal
 * ones are one object). */
static int same_model(lua_State *L, const rt_task_t *a, const rt_task_t *b)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, a->batch_model_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, b->batch_model_ref);
    int same = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return same;
}

void rt_batch_forget(rt_task_t *t)
{
    rt_batcher_t *b = t->batcher;
    if (!b)
        return;
    if (t->batch_run) {
        t->batch_run->callers[t->batch_index] = NULL;
        t->batch_run = NULL;
    } else {
        unlink_caller(b, t);
        drop_refs(b->rt->L, t);
    }
    t->batcher = NULL;
}

/* ---- running a batch ------------------------------------------------------------------------
 */

static void schedule(rt_batcher_t *b);

/* Under a latency target, the most a batch's first item may wait: what leaves room for the
 * batch running before it and its own run (both estimated as a full batch). A target that even
 * two full batches overrun cannot be held by waiting less: the batcher then keeps its setting,
 * which gives full batches and the most throughput, so the queue drains fastest. */
static double adaptive_cap(const rt_batcher_t *b)
{
    if (b->exec_full_s <= 0)
        return fmin(b->set.wait_s, b->set.target_s / 4);
    double room = b->set.target_s - 2 * b->exec_full_s;
    return room > 0 ? room : b->set.wait_s;
}

/* How long a batch's first item may wait: the setting, or under a latency target the learnt
 * wait within the cap (docs/batching.md, "Adaptive batching"). */
static double wait_for(const rt_batcher_t *b)
{
    if (b->set.target_s <= 0)
        return b->set.wait_s;
    return fmin(b->adaptive_s, adaptive_cap(b));
}

/* Waiting pays only while items still join: the next wait moves halfway towards twice the time
 * the latest item of this batch took to arrive after its first. A lone caller (nobody joins)
 * drives it to 0; steady arrivals that keep joining until the deadline double it, up to the
 * cap. */
static void learn_wait(rt_batcher_t *b, const rt_batch_t *run)
{
    if (b->set.target_s <= 0)
        return;
    uint64_t first = run->callers[0]->batch_enq_us, last = first;
    for (int i = 1; i < run->n; i++)
        if (run->callers[i]->batch_enq_us > last)
            last = run->callers[i]->batch_enq_us;
    double want = 2.0 * (double)(last - first) / 1e6;
    b->adaptive_s = fmin(0.5 * b->adaptive_s + 0.5 * want, adaptive_cap(b));
}

static void resume_caller(rt_task_t *t, lua_State *from, int ok)
{
    t->batcher = NULL;
    t->batch_run = NULL;
    lua_pushboolean(t->co, ok);
    lua_xmove(from, t->co, 1);
    rt_task_resume(t, 2);
}

static void record_batch(rt_batcher_t *b, int n, uint64_t started_us)
{
    double exec_s = (double)(ms_now_us() - started_us) / 1e6;
    observe(&b->exec_ms, exec_s * 1000.0, BUCKETS_MS, N_BUCKETS);
    b->batches++;
    double full = exec_s * b->set.max_batch_size / n;
    b->exec_full_s =
        b->exec_full_s > 0 ? (1 - EWMA_WEIGHT) * b->exec_full_s + EWMA_WEIGHT * full : full;
}

/* The user's function returned (results on top of co) or failed (message on top). Every
 * caller still waiting gets its own result, or the batch's error. */
static void on_batch_done(rt_task_t *bt, int ok)
{
    rt_batch_t *run = bt->batch_ctx;
    rt_batcher_t *b = run->b;
    lua_State *co = bt->co;
    char msg[300] = "";
    if (ok && (!lua_istable(co, -1) || lua_objlen(co, -1) != (size_t)run->n)) {
        snprintf(msg, sizeof msg,
                 "batched method %s returned %s for a batch of %d item(s): it must return a list "
                 "of the same length",
                 b->name, lua_istable(co, -1) ? "a list of another length" : luaL_typename(co, -1),
                 run->n);
        ok = 0;
    } else if (!ok) {
        ms_copy_str(msg, sizeof msg, rt_vm_error_text(co, -1));
    }
    if (!ok)
        ms_warn("batch of %d for %s failed: %s", run->n, b->name, msg);
    record_batch(b, run->n, run->started_us);
    for (int i = 0; i < run->n; i++) {
        rt_task_t *t = run->callers[i];
        if (!t)
            continue;
        if (ok)
            lua_rawgeti(co, -1, i + 1);
        else
            lua_pushstring(co, msg);
        resume_caller(t, co, ok);
    }
    b->running--;
    free(run);
    rt_task_free(bt);
    schedule(b);
}

/* Takes callers from the head while they fit; one that does not goes to the back of the queue
 * and closes the batch (as Ray Serve's batch_size_fn handling). A batch holds one multiplexed
 * model's items only, the head's: the others keep their places for the batches after it.
 * Returns the batch. */
static rt_batch_t *take_batch(rt_batcher_t *b)
{
    int max = b->set.max_batch_size;
    rt_batch_t *run = ms_malloc(sizeof *run + (b->queued < (size_t)max ? b->queued : (size_t)max) *
                                                  sizeof(rt_task_t *));
    run->b = b;
    run->n = 0;
    long size = 0;
    size_t looked = 0, queued = b->queued;
    rt_task_t *next = b->head;
    while (next && run->n < max && looked++ < queued) {
        rt_task_t *t = next;
        next = t->batch_next;
        if (run->n > 0 && !same_model(b->rt->L, run->callers[0], t))
            continue;
        unlink_caller(b, t);
        if (run->n > 0 && size + t->batch_size > max) {
            append_caller(b, t);
            break;
        }
        size += t->batch_size;
        t->batch_run = run;
        t->batch_index = run->n;
        run->callers[run->n++] = t;
    }
    return run;
}

static void start_batch(rt_batcher_t *b)
{
    rt_t *rt = b->rt;
    observe(&b->wait_ms, (double)(ms_now_us() - b->head->batch_enq_us) / 1000.0, BUCKETS_MS,
            N_BUCKETS);
    rt_batch_t *run = take_batch(b);
    learn_wait(b, run);
    double n = run->n;
    observe(&b->size, n, SIZE_BOUNDS, N_SIZE);
    observe(&b->utilization, 100.0 * n / b->set.max_batch_size, PERCENT_BOUNDS, N_PERCENT);
    b->items += (uint64_t)run->n;
    b->running++;
    rt_task_t *bt = rt_task_new(rt, "_run_batch", on_batch_done);
    bt->batch_ctx = run;
    ms_copy_str(bt->request_id, sizeof bt->request_id, run->callers[0]->request_id);
    lua_State *co = bt->co;
    lua_rawgeti(co, LUA_REGISTRYINDEX, b->fn_ref);
    lua_rawgeti(co, LUA_REGISTRYINDEX, run->callers[0]->batch_self_ref);
    lua_createtable(co, run->n, 0);
    lua_rawgeti(co, LUA_REGISTRYINDEX, run->callers[0]->batch_model_ref);
    lua_insert(co, -2);
    for (int i = 0; i < run->n; i++) {
        lua_rawgeti(co, LUA_REGISTRYINDEX, run->callers[i]->batch_item_ref);
        lua_rawseti(co, -2, i + 1);
        drop_refs(rt->L, run->callers[i]);
    }
    run->started_us = ms_now_us();
    rt_task_start(bt, 4); /* _run_batch(fn, self, model, items) */
}

static void on_wait_over(uv_timer_t *timer)
{
    pump(timer->data);
}

static void pump(rt_batcher_t *b)
{
    while (b->head && b->running < b->set.max_concurrent) {
        uint64_t now = ms_now_us(), due = b->head->batch_enq_us + (uint64_t)(wait_for(b) * 1e6);
        if (b->queued_size < (size_t)b->set.max_batch_size && now < due) {
            uv_timer_start(&b->timer, on_wait_over, (due - now + 999) / 1000, 0);
            return;
        }
        uv_timer_stop(&b->timer);
        start_batch(b);
    }
}

static void on_idle(uv_idle_t *idle)
{
    rt_batcher_t *b = idle->data;
    uv_idle_stop(idle);
    b->scheduled = 0;
    pump(b);
}

static void schedule(rt_batcher_t *b)
{
    if (b->scheduled)
        return;
    b->scheduled = 1;
    uv_idle_start(&b->idle, on_idle);
}

/* ---- Lua API (moonserve.core) -----------------------------------------------------------------
 */

static int get_int_field(lua_State *L, int idx, const char *name, int dflt, int min)
{
    lua_getfield(L, idx, name);
    double v = lua_isnil(L, -1) ? dflt : luaL_checknumber(L, -1);
    lua_pop(L, 1);
    if (v != floor(v) || v < min || v > 1e6)
        luaL_error(L, "serve.batch: %s must be an integer >= %d", name, min);
    return (int)v;
}

static double get_num_field(lua_State *L, int idx, const char *name, double dflt)
{
    lua_getfield(L, idx, name);
    double v = lua_isnil(L, -1) ? dflt : luaL_checknumber(L, -1);
    lua_pop(L, 1);
    if (!(v >= 0) || v > 1e6)
        luaL_error(L, "serve.batch: %s must be a number >= 0", name);
    return v;
}

static void read_settings(lua_State *L, int idx, batch_settings_t *s)
{
    s->max_batch_size = get_int_field(L, idx, "max_batch_size", 10, 1);
    s->wait_s = get_num_field(L, idx, "batch_wait_timeout_s", 0.01);
    s->max_concurrent = get_int_field(L, idx, "max_concurrent_batches", 1, 1);
    s->target_s = get_num_field(L, idx, "latency_target_s", 0);
}

static rt_batcher_t *check_batcher(lua_State *L, int idx)
{
    return *(rt_batcher_t **)luaL_checkudata(L, idx, BATCHER_MT);
}

/* Ray Serve warns when the replica's cap keeps a batch from ever filling. */
static void warn_if_unfillable(rt_batcher_t *b)
{
    long cap = b->rt->max_ongoing;
    long need = (long)b->set.max_batch_size * b->set.max_concurrent;
    if (cap > 0 && cap < need && !b->warned) {
        b->warned = 1;
        ms_warn("batched method %s: max_ongoing_requests (%ld) < max_batch_size * "
                "max_concurrent_batches (%ld): its batches can never fill",
                b->name, cap, need);
    }
}

/* batcher_new(fn, opts, name) -> batcher. opts are validated by the Lua side as well. */
int rt_l_batcher_new(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TTABLE);
    const char *name = luaL_optstring(L, 3, "batched");
    batch_settings_t set;
    read_settings(L, 2, &set);
    lua_getfield(L, 2, "batch_size_fn");
    int has_size_fn = lua_isfunction(L, -1);
    lua_pop(L, 1);
    rt_t *rt = rt_current();
    if (!rt)
        return luaL_error(L, "serve.batch: only available inside a replica");
    rt_batcher_t *b = ms_calloc(1, sizeof *b);
    b->rt = rt;
    b->next = rt->batchers;
    rt->batchers = b;
    b->set = set;
    b->adaptive_s = set.wait_s; /* the first learnt wait starts from the setting */
    ms_copy_str(b->name, sizeof b->name, name);
    lua_pushvalue(L, 1);
    b->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    b->size_fn_ref = LUA_NOREF;
    if (has_size_fn) {
        lua_getfield(L, 2, "batch_size_fn");
        b->size_fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    uv_idle_init(rt->loop, &b->idle);
    uv_timer_init(rt->loop, &b->timer);
    b->idle.data = b->timer.data = b;
    /* Batchers live as long as the replica: the class holds them. */
    *(rt_batcher_t **)lua_newuserdata(L, sizeof b) = b;
    luaL_getmetatable(L, BATCHER_MT);
    lua_setmetatable(L, -2);
    warn_if_unfillable(b);
    return 1;
}

/* The size of one item: batch_size_fn({item}), or 1. */
static long item_size(lua_State *L, rt_batcher_t *b)
{
    if (b->size_fn_ref == LUA_NOREF)
        return 1;
    lua_rawgeti(L, LUA_REGISTRYINDEX, b->size_fn_ref);
    lua_createtable(L, 1, 0);
    lua_pushvalue(L, 3);
    lua_rawseti(L, -2, 1);
    lua_call(L, 1, 1);
    double v = lua_tonumber(L, -1);
    if (!lua_isnumber(L, -1) || v != floor(v) || v < 0)
        luaL_error(L, "serve.batch: batch_size_fn must return an integer >= 0");
    lua_pop(L, 1);
    if (v > b->set.max_batch_size)
        luaL_error(L, "serve.batch: an item of size %d is larger than max_batch_size %d", (int)v,
                   b->set.max_batch_size);
    return (long)v;
}

/* batch_submit(batcher, self, item[, model_id]) -> ok, result_or_error, suspending until its
 * batch ran. */
int rt_l_batch_submit(lua_State *L)
{
    rt_batcher_t *b = check_batcher(L, 1);
    lua_settop(L, 4);
    rt_task_t *t = rt_current_task(L, "a batched method");
    long size = item_size(L, b);
    lua_pushvalue(L, 2);
    t->batch_self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 3);
    t->batch_item_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 4);
    t->batch_model_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* nil: LUA_REFNIL, equal to itself */
    t->batcher = b;
    t->batch_run = NULL;
    t->batch_size = (int)size;
    t->batch_enq_us = ms_now_us();
    append_caller(b, t);
    schedule(b);
    return lua_yield(L, 0);
}

/* batch_configure(batcher, opts): new settings for the batches formed from now on. */
int rt_l_batch_configure(lua_State *L)
{
    rt_batcher_t *b = check_batcher(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    read_settings(L, 2, &b->set);
    b->warned = 0;
    warn_if_unfillable(b);
    schedule(b);
    return 0;
}

static void push_histogram(lua_State *L, const histogram_t *h, const double *bounds, size_t n,
                           const char *name)
{
    lua_createtable(L, 0, 3);
    lua_pushnumber(L, (double)h->n);
    lua_setfield(L, -2, "count");
    lua_pushnumber(L, h->sum);
    lua_setfield(L, -2, "sum");
    lua_createtable(L, (int)n + 1, 0);
    uint64_t cum = 0;
    for (size_t i = 0; i <= n; i++) {
        cum += h->counts[i];
        lua_createtable(L, 2, 0);
        if (i < n)
            lua_pushnumber(L, bounds[i]);
        else
            lua_pushliteral(L, "+Inf");
        lua_rawseti(L, -2, 1);
        lua_pushnumber(L, (double)cum);
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "buckets");
    lua_setfield(L, -2, name);
}

/* batch_stats(batcher) -> table (docs/batching.md, "Metrics"). */
int rt_l_batch_stats(lua_State *L)
{
    rt_batcher_t *b = check_batcher(L, 1);
    lua_createtable(L, 0, 10);
    lua_pushnumber(L, (double)b->batches);
    lua_setfield(L, -2, "batches_processed");
    lua_pushnumber(L, (double)b->items);
    lua_setfield(L, -2, "items_processed");
    lua_pushnumber(L, (double)b->queued);
    lua_setfield(L, -2, "queue_length");
    lua_pushnumber(L, b->running);
    lua_setfield(L, -2, "running_batches");
    lua_pushnumber(L, wait_for(b));
    lua_setfield(L, -2, "wait_s");
    lua_pushnumber(L, b->set.max_batch_size);
    lua_setfield(L, -2, "max_batch_size");
    push_histogram(L, &b->wait_ms, BUCKETS_MS, N_BUCKETS, "wait_time_ms");
    push_histogram(L, &b->exec_ms, BUCKETS_MS, N_BUCKETS, "execution_time_ms");
    push_histogram(L, &b->size, SIZE_BOUNDS, N_SIZE, "batch_size");
    push_histogram(L, &b->utilization, PERCENT_BOUNDS, N_PERCENT, "utilization_percent");
    return 1;
}

void rt_batch_init(lua_State *L)
{
    luaL_newmetatable(L, BATCHER_MT);
    lua_pop(L, 1);
}
