/*
 * Unit tests of ms_runtime_inspect: the bind graph, code options and handles of the shipped
 * examples, and the errors users see for a broken module or a wrong import attribute. Also the
 * replica's output checks (response headers, JSON keys) and its VM's memory cap.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/internal.h"
#include "runtime/runtime.h"
#include "test.h"

static char tmpdir[] = "/tmp/ms_test_runtime_XXXXXX";

static const char *source_dir(void)
{
    const char *d = getenv("MS_SOURCE_DIR");
    return d && *d ? d : MS_SOURCE_DIR;
}

static char *example_path(const char *rel)
{
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/examples/%s", source_dir(), rel);
    return buf;
}

static char *write_tmp(const char *name, const char *text)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    return path;
}

static json_t *find_deployment(json_t *graph, const char *name)
{
    size_t i;
    json_t *d;
    json_array_foreach(json_object_get(graph, "deployments"), i, d)
    {
        if (strcmp(json_string_value(json_object_get(d, "name")), name) == 0)
            return d;
    }
    return NULL;
}

static void test_hello(void)
{
    json_t *graph = NULL;
    char *err = NULL;
    ASSERT_INT_EQ(ms_runtime_inspect(example_path("hello/app.lua"), "app", NULL, &graph, &err), 0);
    ASSERT_TRUE(err == NULL);
    ASSERT_STR_EQ(json_string_value(json_object_get(graph, "ingress")), "Hello");
    ASSERT_INT_EQ(json_array_size(json_object_get(graph, "deployments")), 1);
    json_t *hello = find_deployment(graph, "Hello");
    ASSERT_TRUE(hello != NULL);
    json_t *opts = json_object_get(hello, "options");
    ASSERT_INT_EQ(json_integer_value(json_object_get(opts, "num_replicas")), 1);
    ASSERT_INT_EQ(json_integer_value(json_object_get(opts, "max_ongoing_requests")), 16);
    ASSERT_TRUE(json_object_get(opts, "user_config") == NULL); /* only keys the code set */
    ASSERT_TRUE(json_is_array(json_object_get(hello, "handles")));
    ASSERT_INT_EQ(json_array_size(json_object_get(hello, "handles")), 0);
    json_decref(graph);
}

static void test_compose(void)
{
    json_t *graph = NULL, *args = json_pack("{s:i}", "threshold", 2);
    char *err = NULL;
    ASSERT_INT_EQ(ms_runtime_inspect(example_path("compose/app.lua"), "app", args, &graph, &err),
                  0);
    ASSERT_TRUE(err == NULL);
    ASSERT_STR_EQ(json_string_value(json_object_get(graph, "ingress")), "Ingress");
    ASSERT_INT_EQ(json_array_size(json_object_get(graph, "deployments")), 3);

    json_t *handles = json_object_get(find_deployment(graph, "Ingress"), "handles");
    ASSERT_INT_EQ(json_array_size(handles), 2);
    char *h = json_dumps(handles, JSON_COMPACT);
    ASSERT_CONTAINS(h, "\"Preprocessor\"");
    ASSERT_CONTAINS(h, "\"Model\"");
    free(h);

    json_t *model = find_deployment(graph, "Model");
    ASSERT_TRUE(model != NULL);
    json_t *opts = json_object_get(model, "options");
    ASSERT_INT_EQ(json_integer_value(json_object_get(opts, "num_replicas")), 2);
    ASSERT_INT_EQ(json_integer_value(json_object_get(opts, "max_ongoing_requests")), 8);
    json_t *positive = json_object_get(json_object_get(opts, "user_config"), "positive");
    ASSERT_INT_EQ(json_array_size(positive), 3);
    ASSERT_INT_EQ(json_array_size(json_object_get(model, "handles")), 0);
    ASSERT_TRUE(find_deployment(graph, "Preprocessor") != NULL);
    json_decref(graph);
    json_decref(args);
}

static void expect_error(const char *file, const char *attr, const char *needle)
{
    json_t *graph = NULL;
    char *err = NULL;
    ASSERT_INT_EQ(ms_runtime_inspect(file, attr, NULL, &graph, &err), -1);
    ASSERT_TRUE(graph == NULL);
    ASSERT_CONTAINS(err, needle);
    free(err);
}

static void test_errors(void)
{
    char expect[4200];
    char *bad = write_tmp("syntax.lua", "local serve = require 'moonserve'\n\nlocal x = = 1\n");
    snprintf(expect, sizeof expect, "%s:3:", bad);
    expect_error(bad, "app", expect);

    char *boom =
        write_tmp("boom.lua", "local serve = require 'moonserve'\nerror('no model file')\n");
    snprintf(expect, sizeof expect, "%s:2: no model file", boom);
    expect_error(boom, "app", expect);

    expect_error(example_path("hello/app.lua"), "missing", "attribute 'missing' not found");

    char *opt = write_tmp("opt.lua", "local serve = require 'moonserve'\n"
                                     "local A = serve.deployment{name='A', num_replica=2}\n"
                                     "return {app = A:bind()}\n");
    snprintf(expect, sizeof expect, "%s:2: serve.deployment A: unknown option 'num_replica'", opt);
    expect_error(opt, "app", expect);

    char *notnode = write_tmp("notnode.lua", "return {app = 42}\n");
    expect_error(notnode, "app", "not an application");

    char *dup = write_tmp("dup.lua", "local serve = require 'moonserve'\n"
                                     "local A = serve.deployment{name='A'}\n"
                                     "function A:__call() end\n"
                                     "local B = serve.deployment{name='B'}\n"
                                     "function B:__call() end\n"
                                     "return {app = B:bind(A:bind(1), A:bind(2))}\n");
    expect_error(dup, "app", "'A' is bound twice");

    char *nocall = write_tmp("nocall.lua", "local serve = require 'moonserve'\n"
                                           "local A = serve.deployment{name='A'}\n"
                                           "return {app = A:bind()}\n");
    expect_error(nocall, "app", "deployment 'A' has no __call method");
}

/* A module may also return the application node itself when the attribute is "app", and
 * nested tables of bound nodes are found at any depth. */
static void test_direct_node(void)
{
    char *f = write_tmp("direct.lua", "local serve = require 'moonserve'\n"
                                      "local A = serve.deployment{name='A'}\n"
                                      "function A:__call() end\n"
                                      "local B = serve.deployment{name='B'}\n"
                                      "function B:__call() end\n"
                                      "local a = A:bind()\n"
                                      "return B:bind({deep = {list = {a}}}, a)\n");
    json_t *graph = NULL;
    char *err = NULL;
    ASSERT_INT_EQ(ms_runtime_inspect(f, "app", NULL, &graph, &err), 0);
    ASSERT_TRUE(err == NULL);
    ASSERT_STR_EQ(json_string_value(json_object_get(graph, "ingress")), "B");
    json_t *handles = json_object_get(find_deployment(graph, "B"), "handles");
    ASSERT_INT_EQ(json_array_size(handles), 1);
    ASSERT_STR_EQ(json_string_value(json_array_get(handles, 0)), "A");
    json_decref(graph);
}

static int headers_ok(const char *name, const char *value, size_t value_len, char *err)
{
    ms_http_header_t h = {name, name ? strlen(name) : 0, value, value_len};
    return rt_check_headers(&h, 1, err, 200);
}

static void test_header_checks(void)
{
    char err[200];
    ASSERT_INT_EQ(headers_ok("X-Fine_1.a!#$%&'*+^`|~", "a\tb \x80\xff", 6, err), 0);
    ASSERT_INT_EQ(headers_ok("x-a", "", 0, err), 0);
    ASSERT_INT_EQ(headers_ok("x-a", "ok\r\nSet-Cookie: x", 19, err), -1);
    ASSERT_STR_EQ(err, "invalid response header \"x-a\": it has a value with CR or LF (refused: it "
                       "would inject header lines)");
    ASSERT_INT_EQ(headers_ok("x-a", "a\nb", 3, err), -1);
    ASSERT_INT_EQ(headers_ok("x-a", "a\rb", 3, err), -1);
    ASSERT_INT_EQ(headers_ok("x-a", "a\0b", 3, err), -1); /* a NUL inside the value counts */
    ASSERT_TRUE(strstr(err, "control character") != NULL);
    ASSERT_INT_EQ(headers_ok("x-a", "a\x7f", 2, err), -1);
    ASSERT_INT_EQ(headers_ok("", "v", 1, err), -1);
    ASSERT_TRUE(strstr(err, "empty name") != NULL);
    ASSERT_INT_EQ(headers_ok("x a", "v", 1, err), -1);
    ASSERT_INT_EQ(headers_ok("x:a", "v", 1, err), -1);
    ASSERT_INT_EQ(headers_ok("x\r\ny", "v", 1, err), -1);
    ASSERT_STR_EQ(err, "invalid response header \"x\\x0d\\x0ay\": it has a name with a character "
                       "not allowed in a header name");
    ASSERT_INT_EQ(headers_ok(NULL, "v", 1, err), -1);
    ASSERT_INT_EQ(headers_ok("x", NULL, 0, err), -1);
}

static void test_quote_bytes(void)
{
    char out[16];
    rt_quote_bytes(out, sizeof out, "a\"b\\\xff", 5);
    ASSERT_STR_EQ(out, "a\\x22b\\x5c\\xff"); /* 14 bytes: fits */
    rt_quote_bytes(out, sizeof out, "abcdefghijklmnopqrstuvwxyz", 26);
    ASSERT_STR_EQ(out, "abcdefghijkl..."); /* 15 bytes and the NUL */
    rt_quote_bytes(out, sizeof out, "\x01\x02\x03\x04\x05", 5);
    ASSERT_STR_EQ(out, "\\x01\\x02\\x03...");
}

/* Runs `code` (a chunk returning a value) in a VM without the replica and encodes the result. */
static json_t *encode_lua(const char *code, char *err, size_t errlen)
{
    char *perr = NULL;
    lua_State *L = rt_vm_new(write_tmp("enc.lua", "return {}"), NULL, NULL, &perr);
    ASSERT_TRUE(L != NULL);
    if (!L) {
        free(perr);
        return NULL;
    }
    json_t *j = NULL;
    if (luaL_dostring(L, code) == 0)
        j = rt_json_from_lua(L, -1, err, errlen);
    else
        snprintf(err, errlen, "%s", lua_tostring(L, -1));
    lua_close(L);
    return j;
}

static void test_json_keys(void)
{
    char err[160] = "";
    json_t *j = encode_lua("return { ['caf\\255'] = 1, ok = 2 }", err, sizeof err);
    ASSERT_TRUE(j == NULL);
    ASSERT_STR_EQ(err, "cannot encode the table key \"caf\\xff\" as JSON: not valid UTF-8");
    j = encode_lua("return { ['caf\\195\\169'] = 1, ['a\\0b'] = 2 }", err, sizeof err);
    ASSERT_TRUE(j != NULL);
    ASSERT_INT_EQ(json_integer_value(json_object_get(j, "caf\xc3\xa9")), 1);
    ASSERT_INT_EQ(json_integer_value(json_object_getn(j, "a\0b", 3)), 2); /* NUL kept */
    json_decref(j);
}

/* The cap refuses only while enforced, LuaJIT raises "not enough memory" at the allocation, and
 * the state stays usable: what the replica relies on to keep serving. */
static void test_memory_cap(void)
{
    rt_mem_t mem = {.limit = 4 << 20};
    char *err = NULL;
    lua_State *L = rt_vm_new(write_tmp("mem.lua", "return {}"), NULL, &mem, &err);
    ASSERT_TRUE(L != NULL);
    if (!L) {
        free(err);
        return;
    }
    ASSERT_TRUE(mem.used > 0 && mem.used < mem.limit);
    const char *hog = "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i end";
    mem.enforced = 1;
    ASSERT_INT_EQ(luaL_loadstring(L, hog), 0);
    ASSERT_INT_EQ(lua_pcall(L, 0, 0, 0), LUA_ERRMEM);
    ASSERT_STR_EQ(lua_tostring(L, -1), "not enough memory");
    ASSERT_TRUE(mem.refused);
    ASSERT_TRUE(mem.used <= mem.limit);
    lua_pop(L, 1);
    mem.enforced = 0;
    lua_gc(L, LUA_GCCOLLECT, 0);
    ASSERT_TRUE(mem.used < mem.limit / 2);
    mem.enforced = 1;
    ASSERT_INT_EQ(luaL_dostring(L, "return string.rep('y', 1000)"), 0);
    ASSERT_INT_EQ(lua_objlen(L, -1), 1000);
    mem.enforced = 0;
    lua_close(L);
    ASSERT_INT_EQ(mem.used, 0); /* every allocation was counted, and freed */
}

int main(void)
{
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_hello();
    test_compose();
    test_errors();
    test_direct_node();
    test_header_checks();
    test_quote_bytes();
    test_json_keys();
    test_memory_cap();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return TEST_DONE();
}
