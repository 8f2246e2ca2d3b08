/*
 * Unit tests of ms_runtime_inspect: the bind graph, code options and handles of the shipped
 * examples, and the errors users see for a broken module or a wrong import attribute.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return TEST_DONE();
}
