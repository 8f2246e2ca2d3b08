/*
 * Unit tests for engine/scale_hooks: the external-scaling judge (accept, clamp, refuse, bad
 * answers, errors, budget and memory failures that fall back to accept), the tick (due / not due,
 * targets, state across ticks), two-phase reload (success, syntax error, missing function, failing
 * self_test), status, and the example examples/policies/scale_hooks.lua.
 */
#include "policy/policy.h"
#include "scale_hooks/scale_hooks.h"
#include "test.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[PATH_MAX];

static const char *tmp_path(const char *rel)
{
    static char bufs[8][PATH_MAX * 2];
    static int next;
    char *b = bufs[next++ % 8];
    snprintf(b, PATH_MAX * 2, "%s/%s", tmpdir, rel);
    return b;
}

static void write_file(const char *rel, const char *text)
{
    const char *path = tmp_path(rel);
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
}

/* A ref as the config loader makes it (file absolute, attr after ':'). */
static ms_config_lua_ref_t *mkref(ms_config_lua_ref_t *r, const char *rel, const char *attr)
{
    static char files[8][PATH_MAX * 2];
    static int next;
    char *f = files[next++ % 8];
    snprintf(f, PATH_MAX * 2, "%s", tmp_path(rel));
    r->path = (char *)rel;
    r->file = f;
    r->attr = (char *)attr;
    r->mark = (ms_config_mark_t){1, 1};
    return r;
}

static ms_scale_hook_t *new_hook(const char *rel, json_t *kwargs, double budget_us,
                                 size_t mem_limit)
{
    ms_config_lua_ref_t r;
    char *err = NULL;
    ms_scale_hook_t *h = ms_scale_hook_new("app", mkref(&r, rel, "judge"), NULL, kwargs, 0,
                                           budget_us, mem_limit, &err);
    if (!h)
        fprintf(stderr, "load of %s failed: %s\n", rel, err ? err : "?");
    free(err);
    return h;
}

static json_t *status_get(ms_scale_hook_t *h, const char *key)
{
    static json_t *last;
    json_decref(last);
    last = h ? ms_scale_hook_status(h) : NULL; /* NULL: just release the last one */
    return json_object_get(last, key);
}

/* The hook's script object, else the tick's (each carries its own failures). */
static json_t *script_get(ms_scale_hook_t *h, const char *key)
{
    json_t *hook = status_get(h, "hook");
    return json_object_get(json_is_object(hook) ? hook : status_get(h, "tick"), key);
}

static long long failures(ms_scale_hook_t *h)
{
    return json_integer_value(script_get(h, "failures"));
}

static const char *last_error(ms_scale_hook_t *h)
{
    return json_string_value(script_get(h, "last_error"));
}

/* Reloads every script of the hook through the policy core: all committed, or none. */
static int reload_hook(ms_scale_hook_t *h, json_t **info)
{
    ms_policy_t *ps[2];
    size_t n = ms_scale_hook_policies(h, ps);
    json_t *scripts = NULL;
    int ok = ms_policy_reload_now(ps, n, &scripts);
    if (info)
        *info = scripts;
    else
        json_decref(scripts);
    return ok ? 0 : -1;
}

/* ---- judge ---------------------------------------------------------------------------------- */

static void test_verdicts(void)
{
    write_file("verdicts.lua",
               "return { judge = function(req, kw)\n"
               "  local n = req.target_num_replicas\n"
               "  if req.deployment == 'Echo' then\n"
               "    return 'refuse', string.format('%s/%s %d %d %d %d %s', req.application,\n"
               "      req.deployment, n, req.current_target, req.running_replicas, req.time,\n"
               "      tostring(kw and kw.max))\n"
               "  end\n"
               "  if n == 7 then return 'clamp', 6 end\n"
               "  if n > kw.max then return 'clamp', kw.max, 'at most ' .. kw.max end\n"
               "  if n == 0 then return 'refuse', 'not to zero' end\n"
               "  return 'accept'\n"
               "end }\n");
    json_t *kw = json_pack("{s:i}", "max", 5);
    ms_scale_hook_t *h = new_hook("verdicts.lua", kw, 0, 0);
    json_decref(kw);
    ASSERT_TRUE(h != NULL);
    if (!h)
        return;
    char reason[MS_SCALE_HOOK_REASON_MAX];
    long long t = -1;
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Model", 3, 1, 1, 1000, &t, reason, sizeof reason),
                  MS_HOOK_ACCEPT);
    ASSERT_INT_EQ(t, 3);
    ASSERT_STR_EQ(reason, "");

    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Model", 9, 1, 1, 1000, &t, reason, sizeof reason),
                  MS_HOOK_CLAMP);
    ASSERT_INT_EQ(t, 5);
    ASSERT_STR_EQ(reason, "at most 5");
    /* A clamp without a reason gets ours. */
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Model", 7, 1, 1, 1000, &t, reason, sizeof reason),
                  MS_HOOK_CLAMP);
    ASSERT_INT_EQ(t, 6);
    ASSERT_STR_EQ(reason, "clamped to 6 by the external scaling hook");

    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Model", 0, 2, 2, 1000, &t, reason, sizeof reason),
                  MS_HOOK_REFUSE);
    ASSERT_INT_EQ(t, 2); /* the target in force */
    ASSERT_STR_EQ(reason, "not to zero");

    /* Everything the request table carries, and the kwargs. */
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Echo", 4, 2, 1, 1234, &t, reason, sizeof reason),
                  MS_HOOK_REFUSE);
    ASSERT_STR_EQ(reason, "app/Echo 4 2 1 1234 5");

    /* A reason longer than the buffer is cut, always terminated. */
    char small[8];
    ms_scale_hook_judge(h, "Model", 0, 2, 2, 1000, &t, small, sizeof small);
    ASSERT_STR_EQ(small, "not to ");

    ASSERT_INT_EQ(failures(h), 0);
    ASSERT_INT_EQ(json_integer_value(status_get(h, "accepted")), 1);
    ASSERT_INT_EQ(json_integer_value(status_get(h, "clamped")), 2);
    ASSERT_INT_EQ(json_integer_value(status_get(h, "refused")), 3);
    ASSERT_TRUE(json_is_null(script_get(h, "last_error")));
    ms_scale_hook_free(h);
}

/* Every malformed answer is a failure: accepted, counted, explained. */
static void test_bad_answers(void)
{
    struct {
        const char *ret;
        const char *msg;
    } cases[] = {
        {"nil", "judge answered nil (want \"accept\", \"clamp\" or \"refuse\")"},
        {"'maybe'", "judge answered \"maybe\" (want \"accept\", \"clamp\" or \"refuse\")"},
        {"42", "judge answered number"},
        {"'clamp'", "judge answered \"clamp\" with nil as the count (want an integer >= 0)"},
        {"'clamp', -1", "with number as the count (want an integer >= 0)"},
        {"'clamp', 1.5", "with number as the count"},
        {"'clamp', 'x'", "with string as the count"},
        {"'clamp', 2, {}", "judge answered \"clamp\" with table as the reason (want a string)"},
        {"'refuse'", "judge answered \"refuse\" with nil as the reason (want a non-empty string)"},
        {"'refuse', ''", "with string as the reason (want a non-empty string)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[256];
        snprintf(text, sizeof text, "return { judge = function() return %s end }\n", cases[i].ret);
        write_file("bad.lua", text);
        ms_scale_hook_t *h = new_hook("bad.lua", NULL, 0, 0);
        ASSERT_TRUE(h != NULL);
        if (!h)
            continue;
        char reason[MS_SCALE_HOOK_REASON_MAX];
        long long t = -1;
        ASSERT_INT_EQ(ms_scale_hook_judge(h, "Model", 3, 1, 1, 0, &t, reason, sizeof reason),
                      MS_HOOK_ACCEPT);
        ASSERT_INT_EQ(t, 3);
        ASSERT_INT_EQ(failures(h), 1);
        ASSERT_CONTAINS(last_error(h), tmp_path("bad.lua"));
        ASSERT_CONTAINS(last_error(h), cases[i].msg);
        ASSERT_CONTAINS(reason, "accepted: the external scaling hook failed");
        ms_scale_hook_free(h);
    }
}

/* Errors, a runaway loop and unbounded allocation: the request is accepted, the failure counted
 * with `file:line: message`, and the hook keeps working for the next request. */
static void test_failures(void)
{
    write_file("fail.lua", "local M = {}\n"
                           "function M.judge(req)\n"
                           "  if req.deployment == 'Err' then\n"
                           "    error('boom')\n"
                           "  elseif req.deployment == 'Loop' then\n"
                           "    while true do end\n"
                           "  elseif req.deployment == 'Mem' then\n"
                           "    local t = {}\n"
                           "    while true do t[#t + 1] = string.rep('x', 16384) .. #t end\n"
                           "  elseif req.deployment == 'Nil' then\n"
                           "    return req.missing.field\n"
                           "  end\n"
                           "  return 'clamp', 1\n"
                           "end\n"
                           "return M\n");
    ms_scale_hook_t *h = new_hook("fail.lua", NULL, 50000, 4u << 20);
    ASSERT_TRUE(h != NULL);
    if (!h)
        return;
    char reason[MS_SCALE_HOOK_REASON_MAX], want[PATH_MAX * 2 + 64];
    long long t = -1;

    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Err", 4, 1, 1, 0, &t, reason, sizeof reason),
                  MS_HOOK_ACCEPT);
    ASSERT_INT_EQ(t, 4);
    snprintf(want, sizeof want, "%s:4: boom", tmp_path("fail.lua"));
    ASSERT_STR_EQ(last_error(h), want);
    ASSERT_INT_EQ(failures(h), 1);

    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Loop", 5, 1, 1, 0, &t, reason, sizeof reason),
                  MS_HOOK_ACCEPT);
    ASSERT_INT_EQ(t, 5);
    snprintf(want, sizeof want, "%s:6: budget exceeded", tmp_path("fail.lua"));
    ASSERT_CONTAINS(last_error(h), want);
    ASSERT_INT_EQ(failures(h), 2);

    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Mem", 6, 1, 1, 0, &t, reason, sizeof reason),
                  MS_HOOK_ACCEPT);
    ASSERT_INT_EQ(t, 6);
    ASSERT_CONTAINS(last_error(h), "memory limit exceeded");
    ASSERT_CONTAINS(last_error(h), tmp_path("fail.lua"));
    ASSERT_INT_EQ(failures(h), 3);

    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Nil", 7, 1, 1, 0, &t, reason, sizeof reason),
                  MS_HOOK_ACCEPT);
    snprintf(want, sizeof want, "%s:11: attempt to index field 'missing'", tmp_path("fail.lua"));
    ASSERT_CONTAINS(last_error(h), want);
    ASSERT_INT_EQ(failures(h), 4);

    /* Still alive: the next request is judged normally. */
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "Model", 8, 1, 1, 0, &t, reason, sizeof reason),
                  MS_HOOK_CLAMP);
    ASSERT_INT_EQ(t, 1);
    ASSERT_INT_EQ(failures(h), 4);
    ms_scale_hook_free(h);
}

/* Reasons reach JSON bodies and logs: invalid UTF-8 and control characters are made safe. */
static void test_reason_text(void)
{
    write_file("utf8.lua", "return { judge = function()\n"
                           "  return 'refuse', 'caf\\195\\169 \\255 a\\nb'\n"
                           "end }\n");
    ms_scale_hook_t *h = new_hook("utf8.lua", NULL, 0, 0);
    ASSERT_TRUE(h != NULL);
    if (!h)
        return;
    char reason[MS_SCALE_HOOK_REASON_MAX];
    long long t;
    ms_scale_hook_judge(h, "Model", 0, 1, 1, 0, &t, reason, sizeof reason);
    ASSERT_STR_EQ(reason, "caf\xc3\xa9 ? a b");
    /* A cut never splits the two-byte character. */
    char small[5];
    ms_scale_hook_judge(h, "Model", 0, 1, 1, 0, &t, small, sizeof small);
    ASSERT_STR_EQ(small, "caf");
    ms_scale_hook_free(h);
}

static void test_load_errors(void)
{
    ms_config_lua_ref_t r, r2;
    char *err = NULL;
    write_file("nofn.lua", "return { other = function() end }\n");
    ASSERT_TRUE(
        !ms_scale_hook_new("app", mkref(&r, "nofn.lua", "judge"), NULL, NULL, 0, 0, 0, &err));
    ASSERT_CONTAINS(err, "nofn.lua: the returned table has no function 'judge'");
    free(err);
    err = NULL;
    write_file("notfn.lua", "return { tick = 3 }\n");
    ASSERT_TRUE(
        !ms_scale_hook_new("app", NULL, mkref(&r, "notfn.lua", "tick"), NULL, 0, 0, 0, &err));
    ASSERT_CONTAINS(err, "notfn.lua: 'tick' must be a function, got number");
    free(err);
    err = NULL;
    write_file("syntax.lua", "return {\n  judge = function( end\n}\n");
    ASSERT_TRUE(
        !ms_scale_hook_new("app", mkref(&r, "syntax.lua", "judge"), NULL, NULL, 0, 0, 0, &err));
    ASSERT_CONTAINS(err, "syntax.lua:2:");
    free(err);
    err = NULL;
    write_file("selftest.lua", "return { judge = function() return 'accept' end,\n"
                               "  self_test = function() assert(1 == 2, 'arithmetic') end }\n");
    ASSERT_TRUE(
        !ms_scale_hook_new("app", mkref(&r, "selftest.lua", "judge"), NULL, NULL, 0, 0, 0, &err));
    ASSERT_CONTAINS(err, "selftest.lua:2: arithmetic (self_test)");
    free(err);
    err = NULL;
    write_file("notable.lua", "return 3\n");
    ASSERT_TRUE(
        !ms_scale_hook_new("app", mkref(&r, "notable.lua", "judge"), NULL, NULL, 0, 0, 0, &err));
    ASSERT_CONTAINS(err, "the chunk must return a table, got number");
    free(err);
    err = NULL;
    ASSERT_TRUE(
        !ms_scale_hook_new("app", mkref(&r, "absent.lua", "judge"), NULL, NULL, 0, 0, 0, &err));
    ASSERT_CONTAINS(err, "absent.lua: No such file");
    free(err);
    err = NULL;
    /* The hook loads but the tick's file does not: nothing is created. */
    write_file("ok.lua", "return { judge = function() return 'accept' end }\n");
    ASSERT_TRUE(!ms_scale_hook_new("app", mkref(&r, "ok.lua", "judge"),
                                   mkref(&r2, "nofn.lua", "tick"), NULL, 0, 0, 0, &err));
    ASSERT_CONTAINS(err, "no function 'tick'");
    free(err);
    err = NULL;
    ASSERT_TRUE(!ms_scale_hook_new("app", NULL, NULL, NULL, 0, 0, 0, &err));
    ASSERT_CONTAINS(err, "at least one");
    free(err);
}

/* ---- tick ----------------------------------------------------------------------------------- */

static json_t *dep_state(int a_target, int b_target)
{
    return json_pack("{s:{s:i, s:i}, s:{s:i, s:i}}", "A", "current_target", a_target,
                     "running_replicas", a_target, "B", "current_target", b_target,
                     "running_replicas", b_target - 1);
}

static void test_tick(void)
{
    /* Counts its runs in ctx.state (in place), sets A to the count, mirrors B's running count,
     * and echoes what it saw into a replaced state. */
    write_file("tick.lua", "local M = {}\n"
                           "function M.tick(ctx, kw)\n"
                           "  ctx.state.n = (ctx.state.n or 0) + 1\n"
                           "  local seen = ctx.application .. ' ' .. ctx.time .. ' ' .. kw.k\n"
                           "  local st = { n = ctx.state.n, seen = seen }\n"
                           "  if ctx.state.n == 3 then return nil, st end\n"
                           "  return { A = ctx.state.n, B = ctx.deployments.B.running_replicas },"
                           " st\n"
                           "end\n"
                           "function M.judge() return 'accept' end\n"
                           "return M\n");
    ms_config_lua_ref_t r;
    char *err = NULL;
    json_t *kw = json_pack("{s:s}", "k", "v");
    ms_scale_hook_t *h =
        ms_scale_hook_new("app", NULL, mkref(&r, "tick.lua", "tick"), kw, 10, 0, 0, &err);
    json_decref(kw);
    ASSERT_TRUE(h != NULL);
    if (!h) {
        fprintf(stderr, "%s\n", err);
        free(err);
        return;
    }
    ASSERT_TRUE(ms_scale_hook_has_tick(h));
    /* A tick-only application judges nothing: every request is accepted without a failure. */
    char reason[MS_SCALE_HOOK_REASON_MAX];
    long long t;
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "A", 3, 1, 1, 0, &t, reason, sizeof reason),
                  MS_HOOK_ACCEPT);
    ASSERT_INT_EQ(t, 3);

    json_t *st = dep_state(5, 3);
    json_t *out = ms_scale_hook_tick(h, 100, st); /* first call: due at once */
    ASSERT_TRUE(out != NULL);
    /* A -> 1 (changed from 5); B -> running 2 (changed from 3). */
    ASSERT_INT_EQ(json_object_size(out), 2);
    ASSERT_INT_EQ(json_integer_value(json_object_get(out, "A")), 1);
    ASSERT_INT_EQ(json_integer_value(json_object_get(out, "B")), 2);
    json_decref(out);
    ASSERT_TRUE(ms_scale_hook_tick(h, 105, st) == NULL); /* not due */
    ASSERT_INT_EQ(json_integer_value(status_get(h, "ticks")), 1);
    json_decref(st);

    /* Due again after tick_interval_s: the state carried n = 1, so A -> 2. B is already at its
     * target (current 2): only changes come back. */
    st = dep_state(5, 2);
    json_object_set_new(json_object_get(st, "B"), "running_replicas", json_integer(2));
    out = ms_scale_hook_tick(h, 110, st);
    ASSERT_INT_EQ(json_object_size(out), 1);
    ASSERT_INT_EQ(json_integer_value(json_object_get(out, "A")), 2);
    json_decref(out);
    /* The third run answers nil: nothing to change. */
    ASSERT_TRUE(ms_scale_hook_tick(h, 120, st) == NULL);
    /* Nothing to change when every target already holds. */
    json_decref(st);
    st = dep_state(4, 1);
    json_object_set_new(json_object_get(st, "B"), "running_replicas", json_integer(1));
    ASSERT_TRUE(ms_scale_hook_tick(h, 130, st) == NULL);
    ASSERT_INT_EQ(failures(h), 0);
    ASSERT_INT_EQ(json_integer_value(status_get(h, "ticks")), 4);
    ASSERT_TRUE(json_real_value(status_get(h, "last_tick")) == 130);
    ASSERT_TRUE(json_real_value(status_get(h, "tick_interval_s")) == 10);
    json_decref(st);
    ms_scale_hook_free(h);
}

static void test_tick_failures(void)
{
    struct {
        const char *body;
        const char *msg;
    } cases[] = {
        {"return { Nope = 2 }", "tick returned a target for unknown deployment 'Nope'"},
        {"return { A = -1 }", "tick returned a bad target for 'A' (want an integer >= 0)"},
        {"return { A = 1, 3 }", "tick returned a key that is not a deployment name (number)"},
        {"return 5", "tick returned number as the targets (want a table or nil)"},
        {"return {}, 5", "tick returned number as the state (want a table or nil)"},
        {"error('down')", "tick.lua:1: down"},
        {"while true do end", "budget exceeded"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[256];
        snprintf(text, sizeof text, "return { tick = function(ctx) %s end }\n", cases[i].body);
        write_file("badtick.lua", text);
        ms_config_lua_ref_t r;
        char *err = NULL;
        ms_scale_hook_t *h = ms_scale_hook_new("app", NULL, mkref(&r, "badtick.lua", "tick"), NULL,
                                               1, 5000, 0, &err);
        ASSERT_TRUE(h != NULL);
        free(err);
        if (!h)
            continue;
        json_t *st = dep_state(1, 1);
        ASSERT_TRUE(ms_scale_hook_tick(h, 10, st) == NULL);
        ASSERT_INT_EQ(failures(h), 1);
        ASSERT_CONTAINS(last_error(h), cases[i].msg);
        /* A failed run still counts as a run: not retried before the interval. */
        ASSERT_TRUE(ms_scale_hook_tick(h, 10.5, st) == NULL);
        ASSERT_INT_EQ(failures(h), 1);
        json_decref(st);
        ms_scale_hook_free(h);
    }
}

/* A hook and a tick in one file share a sandbox: module locals are common to both. */
static void test_shared_file(void)
{
    write_file("both.lua", "local last = 0\n"
                           "return {\n"
                           "  judge = function(req) last = req.target_num_replicas;"
                           " return 'accept' end,\n"
                           "  tick = function(ctx) return { A = last } end,\n"
                           "}\n");
    ms_config_lua_ref_t r1, r2;
    char *err = NULL;
    ms_scale_hook_t *h = ms_scale_hook_new("app", mkref(&r1, "both.lua", "judge"),
                                           mkref(&r2, "both.lua", "tick"), NULL, 1, 0, 0, &err);
    ASSERT_TRUE(h != NULL);
    free(err);
    if (!h)
        return;
    char reason[MS_SCALE_HOOK_REASON_MAX];
    long long t;
    ms_scale_hook_judge(h, "A", 7, 1, 1, 0, &t, reason, sizeof reason);
    json_t *st = dep_state(1, 1);
    json_t *out = ms_scale_hook_tick(h, 1, st);
    ASSERT_INT_EQ(json_integer_value(json_object_get(out, "A")), 7);
    json_decref(out);
    json_decref(st);
    json_t *s = ms_scale_hook_status(h);
    ASSERT_STR_EQ(json_string_value(json_object_get(json_object_get(s, "hook"), "sha256")),
                  json_string_value(json_object_get(json_object_get(s, "tick"), "sha256")));
    ASSERT_STR_EQ(json_string_value(json_object_get(json_object_get(s, "tick"), "function")),
                  "tick");
    json_decref(s);
    ms_scale_hook_free(h);
}

/* ---- reload --------------------------------------------------------------------------------- */

static const char *V1 = "return {\n"
                        "  judge = function() return 'clamp', 1 end,\n"
                        "  tick = function(ctx)\n"
                        "    ctx.state.n = (ctx.state.n or 0) + 1\n"
                        "    return { A = ctx.state.n }\n"
                        "  end,\n"
                        "}\n";
static const char *V2 = "return {\n"
                        "  judge = function() return 'clamp', 2 end,\n"
                        "  tick = function(ctx)\n"
                        "    ctx.state.n = (ctx.state.n or 0) + 100\n"
                        "    return { A = ctx.state.n }\n"
                        "  end,\n"
                        "  self_test = function() assert(true) end,\n"
                        "}\n";

static long long judged(ms_scale_hook_t *h)
{
    char reason[MS_SCALE_HOOK_REASON_MAX];
    long long t = -1;
    ms_scale_hook_judge(h, "A", 9, 0, 0, 0, &t, reason, sizeof reason);
    return t;
}

static long long ticked(ms_scale_hook_t *h, double now)
{
    json_t *st = dep_state(0, 0);
    json_t *out = ms_scale_hook_tick(h, now, st);
    long long v = out ? json_integer_value(json_object_get(out, "A")) : -1;
    json_decref(out);
    json_decref(st);
    return v;
}

static const char *info_str(json_t *info, size_t i, const char *key)
{
    return json_string_value(json_object_get(json_array_get(info, i), key));
}

static void expect_rejected(ms_scale_hook_t *h, const char *text, const char *msg)
{
    write_file("reload.lua", text);
    json_t *info = NULL;
    ASSERT_INT_EQ(reload_hook(h, &info), -1);
    ASSERT_INT_EQ(json_array_size(info), 1); /* hook and tick: one file, one script */
    ASSERT_TRUE(json_is_false(json_object_get(json_array_get(info, 0), "ok")));
    ASSERT_CONTAINS(info_str(info, 0, "error"), msg);
    ASSERT_CONTAINS(json_string_value(script_get(h, "last_reload_error")), msg);
    json_decref(info);
    /* The old version stays in force, with its state. */
    ASSERT_INT_EQ(judged(h), 2);
    json_t *hook = status_get(h, "hook");
    ASSERT_INT_EQ(json_integer_value(json_object_get(hook, "version")), 2);
}

static void test_reload(void)
{
    write_file("reload.lua", V1);
    ms_config_lua_ref_t r1, r2;
    char *err = NULL;
    ms_scale_hook_t *h = ms_scale_hook_new("app", mkref(&r1, "reload.lua", "judge"),
                                           mkref(&r2, "reload.lua", "tick"), NULL, 1, 0, 0, &err);
    ASSERT_TRUE(h != NULL);
    free(err);
    if (!h)
        return;
    ASSERT_INT_EQ(judged(h), 1);
    ASSERT_INT_EQ(ticked(h, 1), 1);
    char sha1[65];
    snprintf(sha1, sizeof sha1, "%s",
             json_string_value(json_object_get(status_get(h, "hook"), "sha256")));

    /* Success: swapped in at commit, with the tick's state carried over (n = 1 + 100). */
    write_file("reload.lua", V2);
    json_t *info = NULL;
    ASSERT_INT_EQ(reload_hook(h, &info), 0);
    ASSERT_INT_EQ(json_array_size(info), 1);
    ASSERT_STR_EQ(info_str(info, 0, "role"), "hook+tick");
    ASSERT_STR_EQ(info_str(info, 0, "kind"), "scale_hook");
    ASSERT_STR_EQ(info_str(info, 0, "path"), tmp_path("reload.lua"));
    ASSERT_INT_EQ(json_integer_value(json_object_get(json_array_get(info, 0), "version")), 2);
    ASSERT_TRUE(json_is_true(json_object_get(json_array_get(info, 0), "ok")));
    ASSERT_TRUE(strcmp(info_str(info, 0, "sha256"), sha1) != 0);
    json_decref(info);
    ASSERT_INT_EQ(judged(h), 2);
    ASSERT_INT_EQ(ticked(h, 2), 101);
    ASSERT_TRUE(json_is_null(script_get(h, "last_reload_error")));

    expect_rejected(h, "return {\n  judge = function( end\n}\n", "reload.lua:2:");
    expect_rejected(h, "return { tick = function() end }\n", "no function 'judge'");
    expect_rejected(h,
                    "return { judge = function() return 'accept' end,\n"
                    "  tick = function() end,\n"
                    "  self_test = function() error('not today') end }\n",
                    "reload.lua:3: not today (self_test)");
    ASSERT_INT_EQ(ticked(h, 3), 201); /* old tick, state intact */
    ms_scale_hook_free(h);
}

/* ---- config and the example ----------------------------------------------------------------- */

static void test_from_config(void)
{
    ms_app_config_t app = {0};
    app.name = "app";
    char *err = (char *)1;
    ASSERT_TRUE(ms_scale_hook_from_config(&app, 0, 0, &err) == NULL);
    ASSERT_TRUE(err == NULL);
    ms_config_lua_ref_t r;
    app.scale_hook = mkref(&r, "ok.lua", "judge");
    app.scale_tick_interval_s = 5;
    ms_scale_hook_t *h = ms_scale_hook_from_config(&app, 0, 0, &err);
    ASSERT_TRUE(h != NULL);
    ASSERT_TRUE(!ms_scale_hook_has_tick(h));
    ASSERT_TRUE(json_is_null(status_get(h, "tick")));
    ms_scale_hook_free(h);
}

static void test_example(void)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/examples/policies/scale_hooks.lua", MS_SOURCE_DIR);
    ms_config_lua_ref_t judge = {"scale_hooks.lua:judge", path, "judge", {1, 1}};
    ms_config_lua_ref_t tick = {"scale_hooks.lua:tick", path, "tick", {1, 1}};
    json_error_t jerr;
    json_t *kw = json_loads("{\"utc\": true, \"max_replicas\": 6, \"start_hour\": 9,"
                            " \"end_hour\": 17, \"schedule\": [{\"start_hour\": 8,"
                            " \"end_hour\": 18, \"replicas\": {\"A\": 4, \"Other\": 2}},"
                            " {\"start_hour\": 22, \"end_hour\": 6, \"replicas\": {\"A\": 9}}],"
                            " \"off_hours\": {\"A\": 1}}",
                            0, &jerr);
    char *err = NULL;
    ms_scale_hook_t *h = ms_scale_hook_new("app", &judge, &tick, kw, 60, 0, 0, &err);
    json_decref(kw);
    ASSERT_TRUE(h != NULL);
    if (!h) {
        fprintf(stderr, "%s\n", err);
        free(err);
        return;
    }
    const double day = 86400 * 3, noon = day + 12 * 3600, evening = day + 19 * 3600,
                 night = day + 23 * 3600;
    char reason[MS_SCALE_HOOK_REASON_MAX];
    long long t;
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "A", 0, 2, 2, noon, &t, reason, sizeof reason),
                  MS_HOOK_REFUSE);
    ASSERT_STR_EQ(reason, "A cannot scale to 0 during business hours (09:00-17:00)");
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "A", 0, 2, 2, evening, &t, reason, sizeof reason),
                  MS_HOOK_ACCEPT);
    ASSERT_INT_EQ(t, 0);
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "A", 20, 2, 2, noon, &t, reason, sizeof reason),
                  MS_HOOK_CLAMP);
    ASSERT_INT_EQ(t, 6);
    ASSERT_STR_EQ(reason, "at most 6 replicas per deployment");
    ASSERT_INT_EQ(ms_scale_hook_judge(h, "A", 3, 2, 2, noon, &t, reason, sizeof reason),
                  MS_HOOK_ACCEPT);

    /* The schedule: the day window opens (Other is not in this application: ignored), nothing
     * within it, off hours in the evening, the night window (wraps midnight, clamped to 6). */
    json_t *st = json_pack("{s:{s:i, s:i}}", "A", "current_target", 1, "running_replicas", 1);
    json_t *out = ms_scale_hook_tick(h, noon, st);
    ASSERT_INT_EQ(json_object_size(out), 1);
    ASSERT_INT_EQ(json_integer_value(json_object_get(out, "A")), 4);
    json_decref(out);
    ASSERT_TRUE(ms_scale_hook_tick(h, noon + 60, st) == NULL);
    out = ms_scale_hook_tick(h, evening, st);
    ASSERT_TRUE(out == NULL); /* off hours want 1, and A is at 1 already */
    out = ms_scale_hook_tick(h, night, st);
    ASSERT_INT_EQ(json_integer_value(json_object_get(out, "A")), 6);
    json_decref(out);
    json_decref(st);
    ASSERT_INT_EQ(failures(h), 0);
    ms_scale_hook_free(h);
}

int main(void)
{
    char tmpl[] = "/tmp/ms_test_hooks_XXXXXX";
    if (!mkdtemp(tmpl) || !realpath(tmpl, tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_verdicts();
    test_bad_answers();
    test_failures();
    test_reason_text();
    test_load_errors();
    test_tick();
    test_tick_failures();
    test_shared_file();
    test_reload();
    test_from_config();
    test_example();
    status_get(NULL, "");
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return TEST_DONE();
}
