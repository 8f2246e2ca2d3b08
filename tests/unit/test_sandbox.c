/*
 * Unit tests of the sandbox's bounded library (engine/sandbox): the pattern matcher and the
 * replaced string/table functions give the stock library's answers (each case runs in a plain
 * luaL_newstate with the stock library and in a sandbox, and the results must be equal), while
 * pathological inputs end with the unswallowable "budget exceeded" abort; and `require` from a
 * module directory (temporary directories).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <luajit.h>
#include <lualib.h>

#include "sandbox/sandbox.h"
#include "test.h"

#define BIG_BUDGET_US   5000000
#define SMALL_BUDGET_US 10000

/* Evaluates expression `expr` through pcall and flattens the results as "type:value|...". */
static const char *wrap(const char *expr)
{
    static char chunk[8192];
    snprintf(chunk, sizeof chunk,
             "local function ser(...)\n"
             "  local out = {}\n"
             "  for i = 1, select('#', ...) do\n"
             "    local v = select(i, ...)\n"
             "    out[#out + 1] = type(v) .. ':' .. tostring(v)\n"
             "  end\n"
             "  return table.concat(out, '|')\n"
             "end\n"
             "return ser(pcall(function() return %s end))\n",
             expr);
    return chunk;
}

static char *run_stock(lua_State *L, const char *expr)
{
    const char *chunk = wrap(expr);
    if (luaL_loadbuffer(L, chunk, strlen(chunk), "@case") != 0 || lua_pcall(L, 0, 1, 0) != 0) {
        char *e = strdup(lua_tostring(L, -1));
        lua_pop(L, 1);
        return e;
    }
    char *r = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
    return r;
}

/* Loads `text` into sb and calls it; returns its string result (malloc'd) or NULL (sb->err). */
static char *run_sb(ms_sandbox_t *sb, const char *text, uint64_t budget_us)
{
    if (ms_sandbox_load(sb, text, strlen(text), "case") != 0 ||
        ms_sandbox_call(sb, 0, 1, budget_us) != 0)
        return NULL;
    const char *s = lua_tostring(sb->L, -1);
    char *r = strdup(s ? s : "(not a string)");
    lua_pop(sb->L, 1);
    return r;
}

static int compare_case(lua_State *stock, ms_sandbox_t *sb, const char *expr)
{
    char *want = run_stock(stock, expr);
    char *got = run_sb(sb, wrap(expr), BIG_BUDGET_US);
    int same = got && strcmp(want, got) == 0;
    if (!same)
        fprintf(stderr, "case %s\n  stock:   %s\n  sandbox: %s\n", expr, want, got ? got : sb->err);
    free(want);
    free(got);
    return same;
}

/* ---- compatibility --------------------------------------------------------------------------- */

static const char *const subjects[] = {
    "''",
    "'hello world'",
    "'  key = value  '",
    "'a,b,,c'",
    "'THE (quick) fox, 42 jumps!'",
    "'f(a(b)c)d'",
    "'x=1;y=22;z=333'",
    "'a\\0b\\0c'",
    "'\\195\\164\\t\\r\\n\\1\\127x'",
    "'abcabcabc'",
    "'aaab'",
    "'[tag]'",
    "'a.b-c+d*e?f^g$'",
    "'0x1F 0XaB zz'",
    "12345",
};

static const char *const patterns[] = {
    "'%a+'",         "'%d+'",
    "'(%w+)=(%w+)'", "'^%s*(.-)%s*$'",
    "'%((.-)%)'",    "'%b()'",
    "'%f[%w]%w+'",   "'%f[%W]'",
    "'(a)(b)(c)'",   "'()'",
    "'(h)()(e)'",    "'[^,]*'",
    "'[%a_][%w_]*'", "'%s'",
    "'%S+'",         "'x*'",
    "'.-'",          "'(.)%1'",
    "'[a-c]+'",      "'[]]'",
    "'[^%]]+'",      "'%u%l*'",
    "'%x+'",         "'%p'",
    "'%c+'",         "'%g+'",
    "'%z'",          "'%Z+'",
    "'$'",           "'^'",
    "'a?b'",         "'a-b'",
    "'^a'",          "'b$'",
    "'[%d%.]+'",     "'%.'",
    "'[a-]'",        "'[-a]'",
    "'[^%s]+'",      "'%A+'",
    "'%D%D'",        "'%L'",
    "'%P+'",         "'%U'",
    "'%X'",          "'%W+'",
    "'%C'",          "'%G'",
    "'^(%w+)'",      "'(%w)(%w)%2%1'",
    "'[%]]'",        "'%[(.-)%]'",
    "'a*$'",         "'.'",
    "'$x'",          "'x^'",
    "'a+b+'",        "'(a+)(b?)'",
    "'%0'",          "'[]'",
    "'[^]'",         "'%'",
    "'[a'",          "'('",
    "')'",           "'%b'",
    "'%bx'",         "'%f'",
    "'%fx'",         "'%1'",
    "'(()'",         "'(a)%2'",
    "'%b{}'",        "'[%w-]+'",
    "'[0-9a-f]+'",   "'\\0'",
    "'b\\0c'",       "'((a)(b))'",
    "'%-'",          "'[!-/]+'",
};

/* Every subject against every pattern, through find, match, gsub and gmatch. */
static void test_compat_matrix(lua_State *stock, ms_sandbox_t *sb)
{
    char expr[1024];
    int failed = 0, total = 0;
    for (size_t i = 0; i < sizeof subjects / sizeof *subjects; i++) {
        for (size_t j = 0; j < sizeof patterns / sizeof *patterns; j++) {
            const char *s = subjects[i], *p = patterns[j];
            const char *forms[] = {
                "string.find(%s, %s)",
                "string.find(%s, %s, 3)",
                "string.match(%s, %s)",
                "string.match(%s, %s, -4)",
                "string.gsub(%s, %s, '<%%0>')",
                "string.gsub(%s, %s, '[%%1]', 2)",
                "(function() local r = {} for a, b in string.gmatch(%s, %s) do "
                "r[#r + 1] = tostring(a) .. '/' .. tostring(b) end "
                "return table.concat(r, ',') end)()",
            };
            for (size_t k = 0; k < sizeof forms / sizeof *forms; k++) {
                snprintf(expr, sizeof expr, forms[k], s, p);
                total++;
                failed += !compare_case(stock, sb, expr);
            }
        }
    }
    printf("compat matrix: %d cases, %d differ\n", total, failed);
    ASSERT_INT_EQ(failed, 0);
}

/* Hand-picked calls: options, replacement kinds, start positions, the other replaced functions. */
static const char *const extra_cases[] = {
    "string.find('abc', '', 10)",
    "string.find('abc', 'b', -1)",
    "string.find('abc', 'b', -10)",
    "string.find('abc', 'b', 0)",
    "string.find('a.b', '.', 1, true)",
    "string.find('a.b', '.', 2, 1)",
    "string.find('a+b', '+', 1, true)",
    "string.find('abc', '', 1, true)",
    "string.find('abc', 'c', 4)",
    "string.find('abc', 'c', '2')",
    "string.find('abc', {})",
    "string.find(nil, 'x')",
    "('x'):rep(3):find('xx', 2)",
    "string.match('  trim  ', '^%s*(.-)%s*$')",
    "string.match('2024-01-02', '(%d+)-(%d+)-(%d+)')",
    "string.match('key=val', '()=()')",
    "string.gsub('hello world', '%w+', '%0 %0')",
    "string.gsub('hello world', '(%w+)', '<%1>')",
    "string.gsub('hello world', '%w+', '%2')",
    "string.gsub('hello', '', '-')",
    "string.gsub('abc', '%w', '%%')",
    "string.gsub('abc', '%w', '%')",
    "string.gsub('abc', '%w', '%x')",
    "string.gsub('abc', 'b', 7)",
    "string.gsub('abc', '%w', {a = 1, b = true})",
    "string.gsub('abc', '%w', {a = false})",
    "string.gsub('abc', '%w', {a = {}})",
    "string.gsub('abc', '(%w)', function(c) return c:upper() end)",
    "string.gsub('abc', '%w', function(c) if c == 'b' then return nil end return c .. c end)",
    "string.gsub('abc', '%w', function() return {} end)",
    "string.gsub('a b c', '%w', '#', 0)",
    "string.gsub('a b c', '%w', '#', -1)",
    "string.gsub('a b c', '%w', '#', 2.7)",
    "string.gsub('aaa', '^a', 'b')",
    "string.gsub('abc', '.', true)",
    "string.gsub('x = 1, y = 2', '(%w+) = (%w+)', '%2 = %1')",
    "string.gsub('abc', '', '')",
    "string.gsub('', '', 'x')",
    "string.gsub('abc', '()', '%1')",
    "string.gsub('THE (quick) fox', '%f[%a]%a+', string.lower)",
    "(function() local r = {} for k in ('^a^b'):gmatch('^%w') do r[#r+1] = k end "
    "return table.concat(r, ',') end)()",
    "(function() local r = {} for p in ('abc'):gmatch('()') do r[#r+1] = p end "
    "return table.concat(r, ',') end)()",
    "(function() local r = {} for k, v in ('a=1, b=2'):gmatch('(%w+)=(%w+)') do "
    "r[#r+1] = k .. v end return table.concat(r, ',') end)()",
    "(function() local it = ('ab'):gmatch('.') return it(), it(), it(), it() end)()",
    "string.match(string.rep('a', 300), string.rep('(a)', 33))",
    "string.match(string.rep('a', 300), string.rep('a?', 250))",
    "string.match(string.rep('(', 250) .. 'x', string.rep('%(', 250))",
    "string.rep('ab', 3)",
    "string.rep('ab', 3, ',')",
    "string.rep('ab', 0)",
    "string.rep('ab', -1, ',')",
    "string.rep('', 5)",
    "string.rep('x', 1, ',')",
    "string.rep(5, 2)",
    "table.concat({1, 2, 'x', 3.5})",
    "table.concat({1, 2, 3}, ', ')",
    "table.concat({1, 2, 3}, ', ', 2)",
    "table.concat({1, 2, 3}, ', ', 2, 3)",
    "table.concat({1, 2, 3}, ', ', 3, 2)",
    "table.concat({}, 'x')",
    "table.concat({1, {}, 3})",
    "table.concat({1, 2}, '', 1, 3)",
    "table.concat({1e15, 2^53, -0.5, 1/0, -1/0})",
    "table.concat({-0, 0, -7, 1e14 - 1, 1e14, -1e14 + 1, -1e14, 2^31, -2^31, 2^63, 0.1}, ' ')",
    "table.concat({'x', 5}, string.rep('-', 600))",
    "table.concat({string.rep('a', 1020), 'bcdefgh', 1})",
    "table.concat({string.rep('y', 3000), 'z'}, string.rep('-', 10))",
    "table.concat({'a'}, 1)",
    "(function() local t = {3, 1, 2} table.insert(t, 9) table.insert(t, 1, 0) "
    "table.insert(t, 3, 'm') return table.concat(t, ',') end)()",
    "(function() local t = {} table.insert(t, 5, 'x') return t[5], #t end)()",
    "table.insert({}, 1, 2, 3)",
    "table.insert({})",
    "(function() local t = {5, 3, 8, 1, 9, 2, 7, 4, 6, 0} table.sort(t) "
    "return table.concat(t, ',') end)()",
    "(function() local t = {5, 3, 8, 1, 9, 2, 7, 4, 6, 0} table.sort(t, function(a, b) "
    "return a > b end) return table.concat(t, ',') end)()",
    "(function() local t = {'pear', 'apple', 'fig', 'banana'} table.sort(t) "
    "return table.concat(t, ',') end)()",
    "(function() local t = {} for i = 1, 500 do t[i] = (i * 7919) % 1009 end table.sort(t) "
    "for i = 2, 500 do if t[i - 1] > t[i] then return 'unsorted' end end return #t end)()",
    "(function() local t = {2, 1} table.sort(t) return t[1], t[2] end)()",
    "(function() local t = {3, 'a', 1} table.sort(t) end)()",
    "(function() local t = {1, 2, 3} table.sort(t, 5) end)()",
    "(function() local t = {} for i = 1, 100 do t[i] = i % 3 end "
    "table.sort(t, function(a, b) return true end) end)()",
    "(function() local t = {} table.sort(t) return #t end)()",
    "select('#', unpack({}, 1, 7000))",
    "unpack({}, 1, 1e7)",
    "string.format('%5.1f|%-5d|%s|%q', 3.14159, 42, 'x', 'a\\nb')",
    "string.format('%y', 1)",
    "(function() local x = string.format('%d', {}) return x end)()",
    "(function() local x = ('%s-%s'):format('a', 1) return x end)()",
    "string.format('%q', '\\0\\1\\r\\n\\\\\\\"')",
    "string.format()",
    "os.date('!%Y-%m-%d %H:%M:%S', 86400 * 365)",
    "os.date('!*t', 3600).hour",
    "(function() local x = os.date({}) return x end)()",
    "string.upper('abc XYZ 123 \\200\\255 z{')",
    "string.lower('ABC xyz @[ \\192')",
    "string.reverse('abc\\0def')",
    "string.upper(12)",
    "string.upper(string.rep('ab', 100000)) == string.rep('AB', 100000)",
    "string.reverse(string.rep('ab', 100000)) == string.rep('ba', 100000)",
    "string.lower(string.rep('xY', 70000)) == string.rep('xy', 70000)",
    "(function() local x = string.upper() return x end)()",
    "('x'):rep(100000) == string.rep('x', 100000)",
    "#string.rep('abc', 100000, '--')",
    "string.rep('abc', 100000, '--') == (function() local t = {} for i = 1, 100000 do "
    "t[i] = 'abc' end return table.concat(t, '--') end)()",
};

static void test_compat_extra(lua_State *stock, ms_sandbox_t *sb)
{
    int failed = 0;
    for (size_t i = 0; i < sizeof extra_cases / sizeof *extra_cases; i++)
        failed += !compare_case(stock, sb, extra_cases[i]);
    printf("compat extra: %zu cases, %d differ\n", sizeof extra_cases / sizeof *extra_cases,
           failed);
    ASSERT_INT_EQ(failed, 0);
}

/* ---- budget ---------------------------------------------------------------------------------- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* A call that must end with "budget exceeded" soon after its 10 ms budget, and leave the state
 * working. */
static void expect_budget_abort(ms_sandbox_t *sb, const char *text)
{
    double t0 = now_ms();
    char *r = run_sb(sb, text, SMALL_BUDGET_US);
    double ms = now_ms() - t0;
    printf("aborted after %.1f ms: %s\n", ms, r ? r : sb->err);
    ASSERT_TRUE(r == NULL);
    ASSERT_CONTAINS(sb->err, "budget exceeded");
    ASSERT_TRUE(ms < 250); /* the budget is 10 ms: generous for a loaded machine, not a hang */
    free(r);
    r = run_sb(sb, "return (('abc'):find('b')) .. ':' .. ('x'):rep(2)", SMALL_BUDGET_US);
    ASSERT_STR_EQ(r, "2:xx");
    free(r);
}

static void test_pathological(ms_sandbox_t *sb)
{
    expect_budget_abort(sb, "return string.find(string.rep('a', 200000), '.-.-.-.-b')");
    expect_budget_abort(sb, "return (('a'):rep(1e5):match('(a*)*b'))");
    expect_budget_abort(sb, "return (string.gsub(string.rep('a', 100000), 'a*a*a*b', 'x'))");
    expect_budget_abort(sb, "for _ in string.gmatch(string.rep('a', 100000), '(.-)%1b') do end");
    expect_budget_abort(sb, "local s = string.rep('a', 50000) .. 'b'\n"
                            "return (s:match(string.rep('a*', 20) .. 'c'))");
    expect_budget_abort(sb, "return (string.rep('(', 100000):find('%b()'))");
    /* The script's own pcall catches the first raise, but the abort comes back at once. */
    expect_budget_abort(sb, "local ok = pcall(string.find, string.rep('a', 200000), '.-.-.-b')\n"
                            "local n = 0\n"
                            "for i = 1, 1e9 do n = n + 1 end\n"
                            "return 'survived'");
    expect_budget_abort(sb, "local ok = pcall(function()\n"
                            "  return string.rep('a', 200000):find('.-.-.-b')\n"
                            "end)\n"
                            "return 'survived'");
    /* Swallowed on the call's last instruction: the call still fails. */
    expect_budget_abort(sb, "return pcall(string.find, string.rep('a', 200000), '.-.-.-b')");
    /* C work outside the matcher. */
    expect_budget_abort(sb, "return string.format('%q', string.rep('\\0', 4e6))");
    expect_budget_abort(sb, "return os.date(string.rep('%c', 1e6))");
    expect_budget_abort(sb, "local s = string.rep('a', 8e6)\n"
                            "for i = 1, 10 do s = s:upper():lower():reverse() end");
    expect_budget_abort(sb, "return load(string.rep('x = 1 ', 1e6))");
    expect_budget_abort(sb, "return (load(string.rep('x = 1 ', 1e6)) and 'compiled')");
}

/* table.sort of a large table without a comparator, and concat of many numbers, built by an
 * earlier call (state persists between calls, so size is bounded by memory, not the budget). */
static void test_big_table_work(void)
{
    char *err = NULL;
    ms_sandbox_t *sb = ms_sandbox_new(256u << 20, &err);
    const char *setup = "local t = {}\n"
                        "for i = 1, 2000000 do t[i] = (i * 7919) % 2000003 end\n"
                        "return function(what)\n"
                        "  if what == 'sort' then table.sort(t) end\n"
                        "  if what == 'cmp' then table.sort(t, math.max) end\n"
                        "  if what == 'concat' then return #table.concat(t, ',') end\n"
                        "  if what == 'insert' then for i = 1, 100 do table.insert(t, 1, i) end "
                        "end\n"
                        "  return 'done'\n"
                        "end\n";
    ASSERT_INT_EQ(ms_sandbox_load(sb, setup, strlen(setup), "big"), 0);
    ASSERT_INT_EQ(ms_sandbox_call(sb, 0, 1, BIG_BUDGET_US), 0);
    int fn = lua_gettop(sb->L);
    const char *whats[] = {"sort", "cmp", "concat", "insert"};
    for (size_t i = 0; i < sizeof whats / sizeof *whats; i++) {
        lua_pushvalue(sb->L, fn);
        lua_pushstring(sb->L, whats[i]);
        double t0 = now_ms();
        int rc = ms_sandbox_call(sb, 1, 1, 2000);
        double ms = now_ms() - t0;
        printf("%s of 2M elements under a 2 ms budget: rc %d after %.1f ms (%s)\n", whats[i], rc,
               ms, rc ? sb->err : "finished");
        ASSERT_INT_EQ(rc, -1);
        ASSERT_CONTAINS(sb->err, "budget exceeded");
        ASSERT_TRUE(ms < 250);
    }
    ms_sandbox_free(sb);
}

/* Results past the memory left are refused before anything is allocated, as ordinary errors. */
static void test_memory_refusals(ms_sandbox_t *sb)
{
    char *r = run_sb(
        sb,
        "local ok, e = pcall(string.rep, 'x', 1e8)\n"
        "local ok4, e4 = pcall(string.rep, 'ab', 2^31)\n"
        "local ok2, e2 = pcall(string.rep, 'ab', 1e7, string.rep('-', 100))\n"
        "local t = {} for i = 1, 100 do t[i] = string.rep('y', 100000) end\n"
        "local ok3, e3 = pcall(table.concat, t, string.rep('z', 1e6))\n"
        "return e .. '\\n' .. e4 .. '\\n' .. e2 .. '\\n' .. e3 .. '\\n' .. #string.rep('ok', 1e6)",
        BIG_BUDGET_US);
    ASSERT_TRUE(r != NULL);
    if (!r)
        return;
    printf("memory refusals:\n%s\n", r);
    ASSERT_CONTAINS(r, "string.rep: memory limit exceeded: a result of 100000000 bytes");
    ASSERT_CONTAINS(r, "string.rep: memory limit exceeded: a result of 1019999900 bytes");
    ASSERT_CONTAINS(r, "string.rep: memory limit exceeded: a result of 4294967296 bytes");
    ASSERT_CONTAINS(r, "table.concat: memory limit exceeded: a result of 109000000 bytes");
    ASSERT_CONTAINS(r, "\n2000000");
    free(r);
}

/* Ordinary string work: the sandbox's functions against the stock ones on the same loop, best
 * of five rounds each (printed for the record; the machine is shared, so nothing is asserted). */
static void measure_speed(lua_State *stock, ms_sandbox_t *sb)
{
    static const struct {
        const char *what, *body;
    } loops[] = {
        {"match",
         "local m, p = line:match('^(%u+)%s+(%S+)') local t = line:match('tenant=([%w_-]+)')"},
        {"find plain", "local a = line:find('llama', 1, true) local b = line:find('HTTP')"},
        {"gsub", "local s = line:gsub('%s+', ' ')"},
        {"gmatch", "for k, v in line:gmatch('(%w+)=(%w+)') do end"},
        {"format", "local s = ('%s:%d'):format('replica', 7)"},
        {"concat", "local s = table.concat({'a', 'b', 'c', 7}, ',')"},
        {"upper", "local s = line:upper()"},
        {"sort", "local t = {5, 3, 8, 1, 9, 2, 7} table.sort(t)"},
    };
    luaJIT_setmode(stock, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF); /* the sandbox has no JIT */
    for (size_t k = 0; k < sizeof loops / sizeof *loops; k++) {
        char text[1024];
        snprintf(text, sizeof text,
                 "local line = 'GET /api/v1/models/llama-3-8b?user=alice&tenant=acme HTTP/1.1'\n"
                 "for i = 1, 20000 do %s end\n"
                 "return 'ok'",
                 loops[k].body);
        double best_stock = 1e9, best_sb = 1e9;
        for (int round = 0; round < 5; round++) {
            double t0 = now_ms();
            if (luaL_loadbuffer(stock, text, strlen(text), "speed") || lua_pcall(stock, 0, 1, 0))
                fprintf(stderr, "stock: %s\n", lua_tostring(stock, -1));
            double t1 = now_ms();
            lua_pop(stock, 1);
            char *r = run_sb(sb, text, BIG_BUDGET_US);
            double t2 = now_ms();
            ASSERT_STR_EQ(r, "ok");
            free(r);
            best_stock = t1 - t0 < best_stock ? t1 - t0 : best_stock;
            best_sb = t2 - t1 < best_sb ? t2 - t1 : best_sb;
        }
        printf("speed %-10s 20000 iterations: stock %.2f ms, sandbox %.2f ms (%.2fx)\n",
               loops[k].what, best_stock, best_sb, best_sb / best_stock);
    }
}

/* ---- require --------------------------------------------------------------------------------- */

static char moddir[] = "/tmp/ms_test_sandbox_XXXXXX";

static void write_module(const char *rel, const char *text, size_t len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", moddir, rel);
    char *slash = strrchr(path, '/');
    *slash = '\0';
    mkdir(path, 0755);
    *slash = '/';
    FILE *f = fopen(path, "wb");
    fwrite(text, 1, len, f);
    fclose(f);
}

#define MODULE(rel, text) write_module(rel, text, sizeof text - 1)

static void test_require(void)
{
    ASSERT_TRUE(mkdtemp(moddir) != NULL);
    MODULE("util.lua", "local M = {loads = 0}\n"
                       "M.loads = M.loads + 1\n"
                       "function M.upper(s) return (s:gsub('%l', string.upper)) end\n"
                       "return M\n");
    MODULE("pkg/inner.lua", "local util = require 'util'\n"
                            "return {shout = function(s) return util.upper(s) .. '!' end}\n");
    MODULE("noreturn.lua", "local x = 1\n");
    MODULE("cyc_a.lua", "return require 'cyc_b'\n");
    MODULE("cyc_b.lua", "return require 'cyc_a'\n");
    MODULE("spin.lua", "while true do end\n");
    MODULE("global.lua", "leaked = 1\n");
    MODULE("broken.lua", "return {\n");
    MODULE("bytecode.lua", "\033LJ\002junk");
    MODULE("fails.lua", "error('module failed on purpose')\n");

    char *err = NULL;
    ms_sandbox_t *sb = ms_sandbox_new(0, &err);
    char *r = run_sb(sb, "return require 'util'", BIG_BUDGET_US);
    ASSERT_TRUE(r == NULL);
    ASSERT_CONTAINS(sb->err, "undefined global 'require'"); /* absent without a directory */
    free(r);

    ms_sandbox_set_module_dir(sb, moddir);
    r = run_sb(sb,
               "local inner = require 'pkg.inner'\n"
               "local u1, u2 = require 'util', require('util')\n"
               "return inner.shout('hi') .. ' ' .. tostring(u1 == u2) .. ' ' .. u1.loads .. "
               "' ' .. tostring(require 'noreturn')",
               BIG_BUDGET_US);
    ASSERT_STR_EQ(r, "HI! true 1 true");
    free(r);
    r = run_sb(sb, "return tostring(require('util').loads)", BIG_BUDGET_US); /* cached */
    ASSERT_STR_EQ(r, "1");
    free(r);

    struct {
        const char *call, *want;
    } errors[] = {
        {"require 'cyc_a'", "require cycle: cyc_a -> cyc_b -> cyc_a"},
        {"require 'missing'", "module 'missing' not found in "},
        {"require 'pkg.missing'", "(no file pkg/missing.lua)"},
        {"require '../etc/passwd'", "invalid module name '../etc/passwd'"},
        {"require '/etc/passwd'", "invalid module name"},
        {"require 'a..b'", "invalid module name"},
        {"require '.a'", "invalid module name"},
        {"require 'pkg/inner'", "invalid module name"},
        {"require ''", "invalid module name"},
        {"require 'global'", "global.lua:1: attempt to create global 'leaked'"},
        {"require 'broken'", "broken.lua:"},
        {"require 'bytecode'", "precompiled bytecode, which is not accepted"},
        {"require 'fails'", "fails.lua:1: module failed on purpose"},
        {"require 'fails'", "fails.lua:1: module failed on purpose"},  /* not cached */
        {"require 'cyc_b'", "require cycle: cyc_b -> cyc_a -> cyc_b"}, /* no marker left */
    };
    for (size_t i = 0; i < sizeof errors / sizeof *errors; i++) {
        r = run_sb(sb, errors[i].call, BIG_BUDGET_US);
        ASSERT_TRUE(r == NULL);
        ASSERT_CONTAINS(sb->err, errors[i].want);
        free(r);
    }
    r = run_sb(sb, "require 'missing'", BIG_BUDGET_US);
    ASSERT_CONTAINS(sb->err, moddir);
    free(r);

    /* The module runs under the budget of the call that requires it, pcall or not. */
    r = run_sb(sb, "pcall(require, 'spin') return 'survived'", SMALL_BUDGET_US);
    ASSERT_TRUE(r == NULL);
    ASSERT_CONTAINS(sb->err, "spin.lua:1: budget exceeded");
    free(r);
    r = run_sb(sb, "return require('pkg.inner').shout('ok')", SMALL_BUDGET_US);
    ASSERT_STR_EQ(r, "OK!");
    free(r);

    const char *none[] = {NULL, ""};
    for (int i = 0; i < 2; i++) {
        ms_sandbox_set_module_dir(sb, moddir);
        ms_sandbox_set_module_dir(sb, none[i]);
        r = run_sb(sb, "return require 'util'", BIG_BUDGET_US);
        ASSERT_TRUE(r == NULL);
        ASSERT_CONTAINS(sb->err, "undefined global 'require'");
        free(r);
    }
    ms_sandbox_free(sb);

    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", moddir);
    ASSERT_INT_EQ(system(cmd), 0);
}

/* A state whose live data is two thirds of its cap, making garbage on every call, never hits the
 * cap: LuaJIT would start its next cycle only at twice the live size, past the cap. */
static void test_garbage_near_cap(void)
{
    char *err = NULL;
    ms_sandbox_t *sb = ms_sandbox_new(4u << 20, &err);
    ASSERT_TRUE(sb != NULL);
    if (!sb)
        return;
    static const char chunk[] = "local keep = {}\n"
                                "for i = 1, 20000 do keep[i] = ('k'):rep(100) .. i end\n"
                                "return function()\n"
                                "  local g = {}\n"
                                "  for i = 1, 2000 do g[i] = { i } end\n"
                                "  return #keep\n"
                                "end\n";
    ASSERT_INT_EQ(ms_sandbox_load(sb, chunk, strlen(chunk), "near_cap"), 0);
    ASSERT_INT_EQ(ms_sandbox_call(sb, 0, 1, 2000000), 0);
    int fn = lua_gettop(sb->L);
    ASSERT_TRUE(sb->mem_used > (2u << 20)); /* the live data: well above half the cap */
    int failed = 0;
    for (int i = 0; i < 300 && !failed; i++) {
        lua_pushvalue(sb->L, fn);
        failed = ms_sandbox_call(sb, 0, 1, 1000000) != 0;
        if (failed)
            fprintf(stderr, "call %d: %s\n", i, sb->err);
        else
            lua_pop(sb->L, 1);
    }
    ASSERT_TRUE(!failed);
    ms_sandbox_free(sb);
}

int main(void)
{
    lua_State *stock = luaL_newstate();
    luaL_openlibs(stock);
    char *err = NULL;
    ms_sandbox_t *sb = ms_sandbox_new(0, &err);
    ASSERT_TRUE(sb != NULL);

    test_compat_matrix(stock, sb);
    test_compat_extra(stock, sb);
    test_pathological(sb);
    test_memory_refusals(sb);
    test_big_table_work();
    measure_speed(stock, sb);
    test_require();
    test_garbage_near_cap();

    ms_sandbox_free(sb);
    lua_close(stock);
    return TEST_DONE();
}
