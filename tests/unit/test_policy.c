/*
 * Unit tests for engine/policy, the one mechanism under every policy script: loading and checks
 * (required and optional functions found raw, through __index tables only), the status shape,
 * failures, the state-copy rule (depth, size, sharing, cycles), protected shared tables, and the
 * two-phase reload (all or none; prepared on a worker thread while the loop keeps running; a
 * policy freed while its reload is in flight).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "core/core.h"
#include "policy/policy.h"
#include "test.h"

static const ms_policy_kind_t fn_kind = {.name = "test_fn", .call_budget_us = 20000};
static const ms_policy_kind_t class_kind = {
    .name = "test_class", .is_class = 1, .call_budget_us = 20000};

static char *write_tmp(const char *text)
{
    char path[] = "/tmp/ms_test_policy_XXXXXX.lua";
    int fd = mkstemps(path, 4);
    if (fd < 0)
        return NULL;
    ssize_t w = write(fd, text, strlen(text));
    (void)w;
    close(fd);
    return strdup(path);
}

static void rewrite(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static ms_policy_t *load(const ms_policy_kind_t *kind, const char *path, const char *fn, char **err)
{
    ms_policy_spec_t spec = {.kind = kind, .file = path, .fns = {fn}, .required = 1};
    return ms_policy_new(&spec, err);
}

/* Calls fns[0]() and returns its number, or -1 on failure. */
static double call_number(ms_policy_t *p)
{
    lua_State *L = ms_policy_current(p)->L;
    ms_policy_push_fn(p, 0);
    if (ms_policy_call(p, 0, 1, 0) != 0)
        return -1;
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

/* ---- loading and checks -----------------------------------------------------------------------
 */

static void expect_load_error(const ms_policy_kind_t *kind, const char *text, const char *msg)
{
    char *path = write_tmp(text);
    char *err = NULL;
    ms_policy_t *p = load(kind, path, "f", &err);
    ASSERT_TRUE(p == NULL);
    ASSERT_CONTAINS(err, msg);
    ASSERT_CONTAINS(err, path); /* every message names the file */
    free(err);
    ms_policy_free(p);
    unlink(path);
    free(path);
}

static void test_load_checks(void)
{
    expect_load_error(&fn_kind, "return 5", "the chunk must return a table, got number");
    expect_load_error(&fn_kind, "return {}", "has no function 'f'");
    expect_load_error(&fn_kind, "return { f = 3 }", "'f' must be a function, got number");
    expect_load_error(&fn_kind,
                      "return { f = function() end,\n self_test = function() end,\n"
                      " initialize_state = 1 }",
                      "'initialize_state' must be a function");
    expect_load_error(&fn_kind,
                      "return { f = function() end,\n self_test = function() error('no') end }",
                      ":2: no (self_test)");
    expect_load_error(&fn_kind,
                      "return { f = function() end, self_test = function() return false end }",
                      "self_test returned false");
    expect_load_error(&fn_kind, "return { f = function( }", "near '}'");
    expect_load_error(&fn_kind, "\033Lua", "bytecode");
    /* A lookup never runs script code: an __index *function* is not followed. */
    expect_load_error(&fn_kind,
                      "return setmetatable({}, { __index = function() while true do end end })",
                      "has no function 'f'");
    /* A self_test that never ends is stopped by the load budget. */
    expect_load_error(&fn_kind,
                      "return { f = function() end, self_test = function() while true do end end }",
                      "budget exceeded");

    /* Inheritance through __index tables is followed (class kinds and function kinds alike). */
    char *path = write_tmp("local Base = { f = function() return 7 end }\n"
                           "return setmetatable({}, { __index = Base })\n");
    char *err = NULL;
    ms_policy_t *p = load(&fn_kind, path, "f", &err);
    ASSERT_TRUE(p != NULL);
    if (p)
        ASSERT_TRUE(call_number(p) == 7);
    ms_policy_free(p);
    unlink(path);
    free(path);
}

/* A class kind: self from the class, initialize_state(self, kwargs), persist on reload. */
static void test_class_and_kwargs(void)
{
    char *path = write_tmp("local C = { persist = { 'n' } }\n"
                           "function C:initialize_state(kw) self.n = kw.start end\n"
                           "function C:f() self.n = self.n + 1; return self.n end\n"
                           "return { C = C }\n");
    json_t *kwargs = json_pack("{s:i}", "start", 10);
    ms_policy_spec_t spec = {.kind = &class_kind,
                             .file = path,
                             .attr = "C",
                             .fns = {"f"},
                             .required = 1,
                             .kwargs = kwargs};
    char *err = NULL;
    ms_policy_t *p = ms_policy_new(&spec, &err);
    json_decref(kwargs);
    ASSERT_TRUE(p != NULL);
    if (!p)
        return;
    lua_State *L = ms_policy_current(p)->L;
    ms_policy_push_fn(p, 0);
    ms_policy_push_self(p);
    ASSERT_INT_EQ(ms_policy_call(p, 1, 1, 0), 0);
    ASSERT_INT_EQ(lua_tonumber(L, -1), 11);
    lua_pop(L, 1);
    /* persist carries self.n over; initialize_state runs again but is overridden */
    rewrite(path, "local C = { persist = { 'n' } }\n"
                  "function C:initialize_state(kw) self.n = 0 end\n"
                  "function C:f() self.n = self.n + 100; return self.n end\n"
                  "return { C = C }\n");
    ASSERT_INT_EQ(ms_policy_reload_now(&p, 1, NULL), 1);
    L = ms_policy_current(p)->L;
    ms_policy_push_fn(p, 0);
    ms_policy_push_self(p);
    ASSERT_INT_EQ(ms_policy_call(p, 1, 1, 0), 0);
    ASSERT_INT_EQ(lua_tonumber(L, -1), 111);
    lua_pop(L, 1);
    ms_policy_free(p);
    unlink(path);
    free(path);
}

/* ---- failures and status ----------------------------------------------------------------------
 */

static void test_failures_and_info(void)
{
    char *path = write_tmp("return { f = function() error('bad \\255 byte') end }\n");
    ms_policy_spec_t spec = {.kind = &fn_kind,
                             .file = path,
                             .fns = {"f"},
                             .required = 1,
                             .application = "app",
                             .deployment = "Dep",
                             .role = "r"};
    char *err = NULL;
    ms_policy_t *p = ms_policy_new(&spec, &err);
    ASSERT_TRUE(p != NULL);
    if (!p)
        return;
    ASSERT_TRUE(call_number(p) == -1);
    ASSERT_TRUE(call_number(p) == -1);
    ms_policy_fail(p, "%s: a bad answer", path);
    ASSERT_INT_EQ(ms_policy_failures(p), 3);
    ASSERT_CONTAINS(ms_policy_last_error(p), "a bad answer");
    json_t *info = ms_policy_info(p);
    static const char *const keys[] = {
        "kind",       "application",     "deployment",       "role",   "path",
        "function",   "builtin",         "version",          "sha256", "failures",
        "last_error", "reload_failures", "last_reload_error"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        ASSERT_TRUE(json_object_get(info, keys[i]) != NULL);
    ASSERT_STR_EQ(json_string_value(json_object_get(info, "kind")), "test_fn");
    ASSERT_STR_EQ(json_string_value(json_object_get(info, "deployment")), "Dep");
    ASSERT_INT_EQ(json_integer_value(json_object_get(info, "version")), 1);
    ASSERT_INT_EQ(strlen(json_string_value(json_object_get(info, "sha256"))), 64);
    json_decref(info);
    /* The non-UTF-8 byte of the first error was made safe: the message is valid JSON text. */
    ms_policy_t *q = p;
    rewrite(path, "return { f = function() error('\\255\\254 again') end }\n");
    ASSERT_INT_EQ(ms_policy_reload_now(&q, 1, NULL), 1);
    ASSERT_TRUE(call_number(p) == -1);
    json_t *s = json_string(ms_policy_last_error(p));
    ASSERT_TRUE(s != NULL);
    json_decref(s);
    ms_policy_free(p);
    unlink(path);
    free(path);
}

/* ---- the copy rule ----------------------------------------------------------------------------
 */

static void test_copy_rule(void)
{
    lua_State *from = luaL_newstate(), *to = luaL_newstate();
    luaL_openlibs(from);
    luaL_dostring(from, "local shared = { x = 1 }\n"
                        "local t = { a = shared, b = shared, f = print, s = 'str', n = 2.5 }\n"
                        "t.self = t\n"
                        "setmetatable(t, { __index = function() error('never') end })\n"
                        "return t\n");
    ASSERT_INT_EQ(ms_policy_copy_value(from, -1, to), 0);
    ASSERT_TRUE(lua_istable(to, -1));
    ASSERT_TRUE(lua_getmetatable(to, -1) == 0); /* metatables are not copied */
    lua_getfield(to, -1, "a");
    lua_getfield(to, -2, "b");
    ASSERT_TRUE(lua_rawequal(to, -1, -2)); /* sharing kept */
    lua_pop(to, 2);
    lua_getfield(to, -1, "self");
    ASSERT_TRUE(lua_rawequal(to, -1, -2)); /* the cycle kept */
    lua_pop(to, 1);
    lua_getfield(to, -1, "f");
    ASSERT_TRUE(lua_isnil(to, -1)); /* functions left out */
    lua_pop(to, 2);

    /* Too deep, or too many values: nothing at all. */
    int top = lua_gettop(to);
    luaL_dostring(from, "local t = {} local c = t for i = 1, 40 do c.x = {} c = c.x end return t");
    ASSERT_INT_EQ(ms_policy_copy_value(from, -1, to), -1);
    ASSERT_INT_EQ(lua_gettop(to), top);
    luaL_dostring(from, "local t = {} for i = 1, 200000 do t[i] = i end return t");
    ASSERT_INT_EQ(ms_policy_copy_value(from, -1, to), -1);
    ASSERT_INT_EQ(lua_gettop(to), top);
    luaL_dostring(from, "local t = {} local c = t for i = 1, 30 do c.x = {} c = c.x end return t");
    ASSERT_INT_EQ(ms_policy_copy_value(from, -1, to), 0); /* within the depth limit */
    lua_close(from);
    lua_close(to);
}

/* ---- protected tables --------------------------------------------------------------------------
 */

static void test_protected_tables(void)
{
    char *path = write_tmp("return { f = function(t)\n"
                           "  local ok = pcall(setmetatable, t, { __newindex = error })\n"
                           "  assert(not ok, 'setmetatable on a shared table must fail')\n"
                           "  assert(getmetatable(t) == false)\n"
                           "  t.sub = setmetatable({}, { __newindex = function() while true do "
                           "end end })\n"
                           "  return 1 end }\n");
    char *err = NULL;
    ms_policy_t *p = load(&fn_kind, path, "f", &err);
    ASSERT_TRUE(p != NULL);
    if (!p)
        return;
    ms_policy_version_t *v = ms_policy_current(p);
    lua_State *L = v->L;
    int base = lua_gettop(L);
    ms_policy_new_table(v, 0, 1);
    int t = lua_gettop(L);
    ms_policy_push_fn(p, 0);
    lua_pushvalue(L, t);
    ASSERT_INT_EQ(ms_policy_call(p, 1, 1, 0), 0);
    lua_pop(L, 1);
    /* The script put a table with a hostile metatable at t.sub: C gets a fresh protected one. */
    ms_policy_subtable(v, t, "sub", 0, 1);
    ms_policy_set_number(L, -1, "x", 1); /* would loop forever through __newindex */
    lua_pop(L, 1);
    ms_policy_get(L, t, "sub");
    ms_policy_get(L, -1, "x");
    ASSERT_INT_EQ(lua_tonumber(L, -1), 1);
    lua_settop(L, base);
    ms_policy_free(p);
    unlink(path);
    free(path);
}

/* ---- reload ------------------------------------------------------------------------------------
 */

/* Two scripts whose f() answers 1 and 2. */
static int load_two(ms_policy_t *ps[2], char **pa, char **pb)
{
    *pa = write_tmp("return { f = function() return 1 end }");
    *pb = write_tmp("return { f = function() return 2 end }");
    char *err = NULL;
    ps[0] = load(&fn_kind, *pa, "f", &err);
    ps[1] = load(&fn_kind, *pb, "f", &err);
    ASSERT_TRUE(ps[0] && ps[1]);
    return ps[0] && ps[1] ? 0 : -1;
}

/* All or none: one broken script keeps every script at its version. */
static void test_reload_all_or_none(void)
{
    char *pa, *pb;
    ms_policy_t *ps[2];
    if (load_two(ps, &pa, &pb) != 0)
        return;
    rewrite(pa, "return { f = function() return 10 end }");
    rewrite(pb, "return { f = function( }");
    json_t *scripts = NULL;
    ASSERT_INT_EQ(ms_policy_reload_now(ps, 2, &scripts), 0);
    ASSERT_INT_EQ(json_array_size(scripts), 2);
    ASSERT_TRUE(json_is_true(json_object_get(json_array_get(scripts, 0), "ok")));
    ASSERT_TRUE(json_is_false(json_object_get(json_array_get(scripts, 1), "ok")));
    json_decref(scripts);
    ASSERT_TRUE(call_number(ps[0]) == 1); /* not committed: its partner failed */
    ASSERT_TRUE(call_number(ps[1]) == 2);
    rewrite(pb, "return { f = function() return 20 end }");
    ASSERT_INT_EQ(ms_policy_reload_now(ps, 2, NULL), 1);
    ASSERT_TRUE(call_number(ps[0]) == 10);
    ASSERT_TRUE(call_number(ps[1]) == 20);
    json_t *info = ms_policy_info(ps[1]);
    ASSERT_INT_EQ(json_integer_value(json_object_get(info, "version")), 2);
    ASSERT_INT_EQ(json_integer_value(json_object_get(info, "reload_failures")), 1);
    json_decref(info);
    ms_policy_free(ps[0]);
    ms_policy_free(ps[1]);
    unlink(pa);
    unlink(pb);
    free(pa);
    free(pb);
}

typedef struct async_probe {
    int ticks_before_done;
    int done, ok;
    size_t nscripts;
    uv_timer_t timer;
} async_probe_t;

static void on_tick(uv_timer_t *t)
{
    async_probe_t *a = t->data;
    if (!a->done)
        a->ticks_before_done++;
}

static void on_done(void *data, json_t *scripts, int ok)
{
    async_probe_t *a = data;
    a->done = 1;
    a->ok = ok;
    a->nscripts = json_array_size(scripts);
    uv_timer_stop(&a->timer);
    uv_close((uv_handle_t *)&a->timer, NULL);
}

/* The prepare (a self_test burning 300 ms) runs off the loop: the loop's 5 ms timer keeps firing
 * while it runs, and the commit happens on the loop afterwards. */
static void test_reload_off_loop(void)
{
    char *path = write_tmp("return { f = function() return 1 end }");
    char *err = NULL;
    ms_policy_t *p = load(&fn_kind, path, "f", &err);
    ASSERT_TRUE(p != NULL);
    if (!p)
        return;
    rewrite(path, "return { f = function() return 2 end,\n"
                  "  self_test = function() local t = os.clock()\n"
                  "    while os.clock() - t < 0.3 do end end }");
    uv_loop_t loop;
    uv_loop_init(&loop);
    async_probe_t a = {0};
    uv_timer_init(&loop, &a.timer);
    a.timer.data = &a;
    uv_timer_start(&a.timer, on_tick, 5, 5);
    ASSERT_INT_EQ(ms_policy_reload_start(&loop, &p, 1, on_done, &a), 0);
    ASSERT_TRUE(call_number(p) == 1); /* the version in force serves meanwhile */
    uv_run(&loop, UV_RUN_DEFAULT);
    ASSERT_TRUE(a.done && a.ok);
    ASSERT_INT_EQ(a.nscripts, 1);
    /* 300 ms of self_test at a 5 ms period: a blocked loop would have seen none of these. */
    ASSERT_TRUE(a.ticks_before_done >= 10);
    ASSERT_TRUE(call_number(p) == 2);
    ms_policy_free(p);
    uv_loop_close(&loop);
    unlink(path);
    free(path);
}

/* A policy freed by its owner while its reload is in flight is dropped, not committed. */
static void test_free_during_reload(void)
{
    char *pa, *pb;
    ms_policy_t *ps[2];
    if (load_two(ps, &pa, &pb) != 0)
        return;
    uv_loop_t loop;
    uv_loop_init(&loop);
    async_probe_t a = {0};
    uv_timer_init(&loop, &a.timer);
    a.timer.data = &a;
    uv_timer_start(&a.timer, on_tick, 5, 5);
    ASSERT_INT_EQ(ms_policy_reload_start(&loop, ps, 2, on_done, &a), 0);
    ms_policy_free(ps[0]);
    uv_run(&loop, UV_RUN_DEFAULT);
    ASSERT_TRUE(a.done && a.ok);
    ASSERT_INT_EQ(a.nscripts, 1); /* only the one still alive is reported */
    ms_policy_free(ps[1]);
    uv_loop_close(&loop);
    unlink(pa);
    unlink(pb);
    free(pa);
    free(pb);
}

int main(void)
{
    setenv("MOONSERVE_LOG_LEVEL", "ERROR", 0);
    test_load_checks();
    test_class_and_kwargs();
    test_failures_and_info();
    test_copy_rule();
    test_protected_tables();
    test_reload_all_or_none();
    test_reload_off_loop();
    test_free_during_reload();
    return TEST_DONE();
}
