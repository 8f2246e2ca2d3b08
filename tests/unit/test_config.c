/*
 * Unit tests for the config module: defaults, every validation rule, did-you-mean, error
 * collection and positions, import_path resolution against a temporary folder, user_config to
 * JSON, and YAML syntax errors.
 */
#include "config/config.h"
#include "test.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmpdir[PATH_MAX]; /* realpath of the mkdtemp folder holding the Lua files */

static void write_file(const char *rel, const char *text)
{
    char path[PATH_MAX * 2];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, rel);
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
}

static void make_dir(const char *rel)
{
    char path[PATH_MAX * 2];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, rel);
    mkdir(path, 0755);
}

static void setup_tmpdir(void)
{
    char tmpl[] = "/tmp/ms_test_config_XXXXXX";
    if (!mkdtemp(tmpl) || !realpath(tmpl, tmpdir)) {
        perror("mkdtemp");
        exit(1);
    }
    write_file("app.lua", "return {}\n");
    make_dir("pkg");
    write_file("pkg/model.lua", "return {}\n");
    make_dir("pkg/sub");
    write_file("pkg/sub/init.lua", "return {}\n");
    write_file("policy.lua", "return {}\n");
    write_file("router.lua", "return {}\n");
    write_file("pkg/scale.lua", "return {}\n");
    write_file("hooks.lua", "return {}\n");
}

static void cleanup_tmpdir(void)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
}

static int load(const char *yaml, ms_config_t **cfg, ms_config_errors_t *errs)
{
    memset(errs, 0, sizeof(*errs));
    return ms_config_load_string(yaml, strlen(yaml), "t.yaml", tmpdir, cfg, errs);
}

static void dump_errors(const ms_config_errors_t *errs)
{
    for (size_t i = 0; i < errs->n; i++)
        fprintf(stderr, "    %s\n", errs->items[i]);
}

/* Loads `yaml`, expects failure with exactly one error equal to `expected`. */
static void expect_error(const char *yaml, const char *expected)
{
    ms_config_t *cfg = (ms_config_t *)1;
    ms_config_errors_t errs;
    ASSERT_INT_EQ(load(yaml, &cfg, &errs), -1);
    ASSERT_TRUE(cfg == NULL);
    ASSERT_INT_EQ(errs.n, 1);
    if (errs.n != 1)
        dump_errors(&errs);
    ASSERT_STR_EQ(errs.n ? errs.items[0] : NULL, expected);
    ms_config_errors_free(&errs);
}

/* Loads `yaml` expecting success; the caller frees the config. */
static ms_config_t *expect_ok(const char *yaml)
{
    ms_config_t *cfg = NULL;
    ms_config_errors_t errs;
    int rc = load(yaml, &cfg, &errs);
    ASSERT_INT_EQ(rc, 0);
    ASSERT_INT_EQ(errs.n, 0);
    dump_errors(&errs);
    ms_config_errors_free(&errs);
    return cfg;
}

static char *tmp_path(const char *rel)
{
    static char path[PATH_MAX * 2];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, rel);
    return path;
}

static void test_defaults(void)
{
    ms_config_t *cfg = expect_ok("applications:\n"
                                 "  - import_path: app.lua:App\n"
                                 "    deployments:\n"
                                 "      - name: Model\n");
    if (!cfg)
        return;
    ASSERT_STR_EQ(cfg->path, "t.yaml");
    ASSERT_STR_EQ(cfg->dir, tmpdir);
    ASSERT_STR_EQ(cfg->http.host, "0.0.0.0");
    ASSERT_INT_EQ(cfg->http.port, 8000);
    ASSERT_TRUE(cfg->http.request_timeout_s == 0);
    ASSERT_TRUE(cfg->http.keep_alive_timeout_s == 90.0);
    ASSERT_INT_EQ(cfg->http.max_header_bytes, 32768);
    ASSERT_INT_EQ(cfg->http.max_body_bytes, 64 * 1024 * 1024);
    ASSERT_TRUE(cfg->http.header_timeout_s == 10.0);
    ASSERT_STR_EQ(cfg->logging.level, "INFO");
    ASSERT_INT_EQ(cfg->n_apps, 1);
    ms_app_config_t *app = &cfg->apps[0];
    ASSERT_STR_EQ(app->name, "default");
    ASSERT_STR_EQ(app->route_prefix, "/");
    ASSERT_STR_EQ(app->import_path, "app.lua:App");
    ASSERT_STR_EQ(app->import_file, tmp_path("app.lua"));
    ASSERT_STR_EQ(app->import_attr, "App");
    ASSERT_TRUE(json_is_object(app->args) && json_object_size(app->args) == 0);
    ASSERT_INT_EQ(app->mark.line, 2);
    ASSERT_INT_EQ(app->mark.col, 5);
    ASSERT_INT_EQ(app->import_path_mark.line, 2);
    ASSERT_INT_EQ(app->import_path_mark.col, 18);
    ASSERT_INT_EQ(app->n_deployments, 1);
    const ms_deployment_config_t *d = ms_config_find_deployment(app, "Model");
    ASSERT_TRUE(d != NULL);
    ASSERT_TRUE(ms_config_find_deployment(app, "Other") == NULL);
    if (d) {
        ASSERT_INT_EQ(d->set, 0);
        ASSERT_INT_EQ(d->num_replicas, MS_DEFAULT_NUM_REPLICAS);
        ASSERT_INT_EQ(d->max_ongoing_requests, 5);
        ASSERT_INT_EQ(d->max_queued_requests, -1);
        ASSERT_TRUE(d->user_config == NULL);
        ASSERT_TRUE(d->graceful_shutdown_wait_loop_s == 2.0);
        ASSERT_TRUE(d->graceful_shutdown_timeout_s == 20.0);
        ASSERT_TRUE(d->health_check_period_s == 10.0);
        ASSERT_TRUE(d->health_check_timeout_s == 30.0);
        ASSERT_INT_EQ(d->mark.line, 4);
        ASSERT_INT_EQ(d->mark.col, 9);
    }
    ms_config_free(cfg);
}

static void test_all_fields(void)
{
    ms_config_t *cfg = expect_ok("http_options:\n"
                                 "  host: 127.0.0.1\n"
                                 "  port: 9001\n"
                                 "  request_timeout_s: 2.5\n"
                                 "  keep_alive_timeout_s: 5\n"
                                 "  max_header_bytes: 2048\n"
                                 "  max_body_bytes: 0\n"
                                 "  header_timeout_s: 3\n"
                                 "logging_config:\n"
                                 "  log_level: DEBUG\n"
                                 "  encoding: JSON\n"
                                 "  logs_dir: /tmp/logs\n"
                                 "  enable_access_log: false\n"
                                 "  additional_log_standard_attrs: [name]\n"
                                 "proxy_location: EveryNode\n"
                                 "target_capacity: 50\n"
                                 "applications:\n"
                                 "  - name: a\n"
                                 "    route_prefix: /api\n"
                                 "    import_path: app.lua:App\n"
                                 "    args: {model: small, n: 3}\n"
                                 "    runtime_env: {}\n"
                                 "    external_scaler_enabled: false\n"
                                 "    deployments:\n"
                                 "      - name: M\n"
                                 "        num_replicas: 3\n"
                                 "        max_ongoing_requests: 7\n"
                                 "        max_queued_requests: 10\n"
                                 "        graceful_shutdown_wait_loop_s: 0\n"
                                 "        graceful_shutdown_timeout_s: 1.5\n"
                                 "        health_check_period_s: 4\n"
                                 "        health_check_timeout_s: 6\n"
                                 "        user_config: {k: 1}\n"
                                 "        ray_actor_options: {num_cpus: 1}\n"
                                 "        max_replicas_per_node: 2\n"
                                 "      - name: N\n"
                                 "        max_queued_requests: -1\n"
                                 "  - name: b\n"
                                 "    route_prefix: /other\n"
                                 "    import_path: pkg.model:Model\n");
    if (!cfg)
        return;
    ASSERT_STR_EQ(cfg->http.host, "127.0.0.1");
    ASSERT_INT_EQ(cfg->http.port, 9001);
    ASSERT_TRUE(cfg->http.request_timeout_s == 2.5);
    ASSERT_TRUE(cfg->http.keep_alive_timeout_s == 5);
    ASSERT_INT_EQ(cfg->http.max_header_bytes, 2048);
    ASSERT_INT_EQ(cfg->http.max_body_bytes, 0);
    ASSERT_TRUE(cfg->http.header_timeout_s == 3);
    ASSERT_STR_EQ(cfg->logging.level, "DEBUG");
    ASSERT_STR_EQ(cfg->logging.logs_dir, "/tmp/logs");
    ASSERT_INT_EQ(cfg->n_apps, 2);
    ms_app_config_t *a = &cfg->apps[0];
    ASSERT_STR_EQ(a->name, "a");
    ASSERT_STR_EQ(a->route_prefix, "/api");
    ASSERT_STR_EQ(json_string_value(json_object_get(a->args, "model")), "small");
    ASSERT_INT_EQ(json_integer_value(json_object_get(a->args, "n")), 3);
    const ms_deployment_config_t *m = ms_config_find_deployment(a, "M");
    ASSERT_TRUE(m != NULL);
    if (m) {
        ASSERT_INT_EQ(m->set, MS_SET_NUM_REPLICAS | MS_SET_MAX_ONGOING_REQUESTS |
                                  MS_SET_MAX_QUEUED_REQUESTS | MS_SET_USER_CONFIG |
                                  MS_SET_GRACEFUL_SHUTDOWN_WAIT_LOOP_S |
                                  MS_SET_GRACEFUL_SHUTDOWN_TIMEOUT_S |
                                  MS_SET_HEALTH_CHECK_PERIOD_S | MS_SET_HEALTH_CHECK_TIMEOUT_S);
        ASSERT_INT_EQ(m->num_replicas, 3);
        ASSERT_INT_EQ(m->max_ongoing_requests, 7);
        ASSERT_INT_EQ(m->max_queued_requests, 10);
        ASSERT_TRUE(m->graceful_shutdown_wait_loop_s == 0);
        ASSERT_TRUE(m->graceful_shutdown_timeout_s == 1.5);
        ASSERT_TRUE(m->health_check_period_s == 4);
        ASSERT_TRUE(m->health_check_timeout_s == 6);
    }
    const ms_deployment_config_t *n = ms_config_find_deployment(a, "N");
    ASSERT_TRUE(n && n->set == MS_SET_MAX_QUEUED_REQUESTS && n->max_queued_requests == -1);
    ASSERT_STR_EQ(cfg->apps[1].import_file, tmp_path("pkg/model.lua"));
    ASSERT_STR_EQ(cfg->apps[1].import_attr, "Model");
    ms_config_free(cfg);
}

/* One failing case per rule, each checked with its full `file:line:col: message`. */
static void test_validation_rules(void)
{
    const char *app = "applications:\n  - import_path: app.lua:A\n";
    char buf[1024];
#define WITH_HTTP(line) (snprintf(buf, sizeof(buf), "http_options:\n  " line "\n%s", app), buf)
    expect_error(WITH_HTTP("port: 0"),
                 "t.yaml:2:9: port must be an integer in 1..65535, got \"0\"");
    expect_error(WITH_HTTP("port: 65536"),
                 "t.yaml:2:9: port must be an integer in 1..65535, got \"65536\"");
    expect_error(WITH_HTTP("host: ''"), "t.yaml:2:9: host must be a non-empty string, got \"\"");
    expect_error(WITH_HTTP("request_timeout_s: 0"),
                 "t.yaml:2:22: request_timeout_s must be a number > 0 or null, got \"0\"");
    expect_error(WITH_HTTP("keep_alive_timeout_s: -1"),
                 "t.yaml:2:25: keep_alive_timeout_s must be a number > 0, got \"-1\"");
    expect_error(WITH_HTTP("max_header_bytes: 1023"),
                 "t.yaml:2:21: max_header_bytes must be an integer >= 1024, got \"1023\"");
    expect_error(WITH_HTTP("max_body_bytes: -5"),
                 "t.yaml:2:19: max_body_bytes must be an integer >= 0, got \"-5\"");
    expect_error(WITH_HTTP("header_timeout_s: 0"),
                 "t.yaml:2:21: header_timeout_s must be a number > 0, got \"0\"");
#undef WITH_HTTP
    ms_config_t *cfg = expect_ok("http_options:\n  request_timeout_s: null\n"
                                 "applications:\n  - import_path: app.lua:A\n");
    ASSERT_TRUE(cfg && cfg->http.request_timeout_s == 0);
    ms_config_free(cfg);

#define WITH_LOG(line) (snprintf(buf, sizeof(buf), "logging_config:\n  " line "\n%s", app), buf)
    expect_error(WITH_LOG("log_level: LOUD"),
                 "t.yaml:2:14: log_level must be one of CRITICAL, FATAL, ERROR, WARNING, WARN, "
                 "INFO, DEBUG, NOTSET or 50, 40, 30, 20, 10, 0, got \"LOUD\"");
    expect_error(WITH_LOG("encoding: XML"),
                 "t.yaml:2:13: encoding must be TEXT or JSON, got \"XML\"");
    expect_error(WITH_LOG("enable_access_log: maybe"),
                 "t.yaml:2:22: enable_access_log must be true or false, got \"maybe\"");
    expect_error(WITH_LOG("additional_log_standard_attrs: x"),
                 "t.yaml:2:34: additional_log_standard_attrs must be a list of strings, got \"x\"");
#undef WITH_LOG

    expect_error("http_options: {}\n", "t.yaml:1:1: config is missing required key 'applications'");
    expect_error("applications: {}\n", "t.yaml:1:15: applications must be a list, got a mapping");
    expect_error("- a\n", "t.yaml:1:1: config must be a mapping with 'applications', got a list");
    expect_error("", "t.yaml:1:1: config is empty; expected a mapping with 'applications'");
    expect_error("applications:\n  - name: x\n",
                 "t.yaml:2:5: application 'x' is missing required key 'import_path'");
    expect_error("applications:\n  - name: ''\n    import_path: app.lua:A\n",
                 "t.yaml:2:11: name must be a non-empty string, got \"\"");
    expect_error("applications:\n  - import_path: app.lua:A\n  - import_path: app.lua:B\n"
                 "    route_prefix: /b\n",
                 "t.yaml:3:5: duplicate application name 'default' (first at line 2)");
    expect_error("applications:\n  - name: a\n    import_path: app.lua:A\n"
                 "  - name: b\n    import_path: app.lua:A\n",
                 "t.yaml:4:5: duplicate route_prefix '/' (also used by application 'a')");

    const char *bad_prefixes[] = {"api", "/api/", "/a{b}"};
    for (size_t i = 0; i < 3; i++) {
        char want[256];
        snprintf(buf, sizeof(buf),
                 "applications:\n  - import_path: app.lua:A\n    route_prefix: '%s'\n",
                 bad_prefixes[i]);
        snprintf(want, sizeof(want),
                 "t.yaml:3:19: route_prefix must be null or a path starting with '/', not ending "
                 "with '/' (unless exactly \"/\") and without '{' or '}', got \"%s\"",
                 bad_prefixes[i]);
        expect_error(buf, want);
    }
    expect_error("applications:\n  - import_path: app.lua:A\n    args: [1]\n",
                 "t.yaml:3:11: args must be a mapping or null, got a list");
    expect_error("applications:\n  - import_path: app.lua:A\n    host: 0.0.0.0\n",
                 "t.yaml:3:5: 'host' is a legacy single-application field and is not allowed in a "
                 "multi-application config; use http_options.host");

#define WITH_DEP(line)                                                                             \
    (snprintf(buf, sizeof(buf), "%s    deployments:\n      - name: D\n        " line "\n", app),   \
     buf)
    expect_error(WITH_DEP("num_replicas: abc"),
                 "t.yaml:5:23: num_replicas must be an integer > 0 or \"auto\", got \"abc\"");
    expect_error(WITH_DEP("num_replicas: 0"),
                 "t.yaml:5:23: num_replicas must be an integer > 0 or \"auto\", got \"0\"");
    expect_error(WITH_DEP("num_replicas: 1.5"),
                 "t.yaml:5:23: num_replicas must be an integer > 0 or \"auto\", got \"1.5\"");
    expect_error(WITH_DEP("max_ongoing_requests: 0"),
                 "t.yaml:5:31: max_ongoing_requests must be an integer > 0, got \"0\"");
    expect_error(WITH_DEP("max_queued_requests: 0"),
                 "t.yaml:5:30: max_queued_requests must be -1 or an integer >= 1, got \"0\"");
    expect_error(WITH_DEP("max_queued_requests: -2"),
                 "t.yaml:5:30: max_queued_requests must be -1 or an integer >= 1, got \"-2\"");
    expect_error(WITH_DEP("user_config: 5"),
                 "t.yaml:5:22: user_config must be a mapping or null, got \"5\"");
    expect_error(WITH_DEP("graceful_shutdown_wait_loop_s: -0.5"),
                 "t.yaml:5:40: graceful_shutdown_wait_loop_s must be a number >= 0, got \"-0.5\"");
    expect_error(WITH_DEP("graceful_shutdown_timeout_s: x"),
                 "t.yaml:5:38: graceful_shutdown_timeout_s must be a number >= 0, got \"x\"");
    expect_error(WITH_DEP("health_check_period_s: 0"),
                 "t.yaml:5:32: health_check_period_s must be a number > 0, got \"0\"");
    expect_error(WITH_DEP("health_check_timeout_s: null"),
                 "t.yaml:5:33: health_check_timeout_s must be a number > 0, got null");
    expect_error(WITH_DEP("max_replicas_per_node: 101"),
                 "t.yaml:5:32: max_replicas_per_node must be an integer in 1..100 or null, got "
                 "\"101\"");
    expect_error(WITH_DEP("name: E"), "t.yaml:5:9: duplicate key 'name' in deployment");
#undef WITH_DEP
    expect_error("applications:\n  - import_path: app.lua:A\n    deployments:\n"
                 "      - num_replicas: 2\n",
                 "t.yaml:4:9: deployment is missing required key 'name'");
    expect_error("applications:\n  - import_path: app.lua:A\n    deployments:\n"
                 "      - name: D\n      - name: D\n",
                 "t.yaml:5:15: duplicate deployment name 'D' in application 'default' (first at "
                 "line 4)");
    expect_error("proxy_location: Nowhere\n"
                 "applications: []\n",
                 "t.yaml:1:17: proxy_location must be one of Disabled, HeadOnly, EveryNode, got "
                 "\"Nowhere\"");
}

static void test_did_you_mean(void)
{
    expect_error("applications:\n  - import_path: app.lua:A\n    deployments:\n"
                 "      - name: D\n        max_ongoing_request: 3\n",
                 "t.yaml:5:9: unknown key 'max_ongoing_request' in deployment; did you mean "
                 "'max_ongoing_requests'?");
    expect_error("aplications: []\n",
                 "t.yaml:1:1: unknown key 'aplications' at the top level; did you mean "
                 "'applications'?");
    /* Too far for edit distance, but a long shared prefix. */
    expect_error("applications:\n  - import_path: app.lua:A\n    deployments:\n"
                 "      - name: D\n        health_check: 3\n",
                 "t.yaml:5:9: unknown key 'health_check' in deployment; did you mean "
                 "'health_check_period_s'?");
    /* Nothing close: no hint. */
    expect_error("http_options:\n  colour: blue\napplications: []\n",
                 "t.yaml:2:3: unknown key 'colour' in http_options");
}

static void test_multiple_errors(void)
{
    ms_config_t *cfg;
    ms_config_errors_t errs;
    int rc = load("http_options:\n"
                  "  port: x\n"
                  "applications:\n"
                  "  - import_path: missing.lua:A\n"
                  "    deployments:\n"
                  "      - name: D\n"
                  "        num_replicas: -1\n"
                  "        bogus: 1\n",
                  &cfg, &errs);
    ASSERT_INT_EQ(rc, -1);
    ASSERT_INT_EQ(errs.n, 4);
    if (errs.n == 4) {
        ASSERT_CONTAINS(errs.items[0], "t.yaml:2:9: port must be");
        ASSERT_CONTAINS(errs.items[1], "t.yaml:4:18: import_path \"missing.lua:A\": file ");
        ASSERT_CONTAINS(errs.items[2], "t.yaml:7:23: num_replicas must be an integer > 0");
        ASSERT_STR_EQ(errs.items[3], "t.yaml:8:9: unknown key 'bogus' in deployment");
    } else {
        dump_errors(&errs);
    }
    /* The list is appended to, not reset: a second failing load adds to it. */
    ASSERT_INT_EQ(ms_config_load_string("x: [", 4, "u.yaml", tmpdir, &cfg, &errs), -1);
    ASSERT_INT_EQ(errs.n, 5);
    ms_config_errors_free(&errs);
    ASSERT_INT_EQ(errs.n, 0);
}

static void test_route_prefix_null(void)
{
    ms_config_t *cfg = expect_ok("applications:\n"
                                 "  - name: a\n    import_path: app.lua:A\n    route_prefix: null\n"
                                 "  - name: b\n    import_path: app.lua:A\n    route_prefix: ~\n"
                                 "  - name: c\n    import_path: app.lua:A\n");
    if (!cfg)
        return;
    ASSERT_TRUE(cfg->apps[0].route_prefix == NULL);
    ASSERT_TRUE(cfg->apps[1].route_prefix == NULL);
    ASSERT_STR_EQ(cfg->apps[2].route_prefix, "/");
    ms_config_free(cfg);
}

static void expect_import(const char *import_path, const char *file, const char *attr)
{
    char yaml[512];
    snprintf(yaml, sizeof(yaml), "applications:\n  - import_path: '%s'\n", import_path);
    ms_config_t *cfg = expect_ok(yaml);
    if (!cfg)
        return;
    ASSERT_STR_EQ(cfg->apps[0].import_path, import_path);
    ASSERT_STR_EQ(cfg->apps[0].import_file, file);
    ASSERT_STR_EQ(cfg->apps[0].import_attr, attr);
    ms_config_free(cfg);
}

static void test_import_path(void)
{
    char abs[PATH_MAX + 32];
    expect_import("app.lua:App", tmp_path("app.lua"), "App");
    expect_import("./pkg/model.lua:M", tmp_path("pkg/model.lua"), "M");
    expect_import("pkg.model:Model", tmp_path("pkg/model.lua"), "Model");
    expect_import("pkg.model.Model", tmp_path("pkg/model.lua"), "Model");
    expect_import("app.App", tmp_path("app.lua"), "App");
    expect_import("pkg.sub:S", tmp_path("pkg/sub/init.lua"), "S");
    snprintf(abs, sizeof(abs), "%s/app.lua:X", tmpdir);
    expect_import(abs, tmp_path("app.lua"), "X");

    char want[PATH_MAX * 2];
    snprintf(want, sizeof(want),
             "t.yaml:2:18: import_path \"nope.lua:A\": file %s/nope.lua not found", tmpdir);
    expect_error("applications:\n  - import_path: nope.lua:A\n", want);
    snprintf(want, sizeof(want),
             "t.yaml:2:18: import_path \"pkg.none:A\": file %s/pkg/none.lua not found", tmpdir);
    expect_error("applications:\n  - import_path: pkg.none:A\n", want);
    expect_error("applications:\n  - import_path: 'a:b:c'\n",
                 "t.yaml:2:18: import_path must contain at most one ':', got \"a:b:c\"");
    expect_error("applications:\n  - import_path: app\n",
                 "t.yaml:2:18: import_path must look like 'path/file.lua:attr', 'module.sub:attr' "
                 "or 'module.attr', got \"app\"");
    expect_error("applications:\n  - import_path: 'app.lua:'\n",
                 "t.yaml:2:18: import_path must look like 'path/file.lua:attr', 'module.sub:attr' "
                 "or 'module.attr', got \"app.lua:\"");
    /* A folder is not a file. */
    snprintf(want, sizeof(want), "t.yaml:2:18: import_path \"pkg/:A\": file %s/pkg/ not found",
             tmpdir);
    expect_error("applications:\n  - import_path: pkg/:A\n", want);
}

static void test_user_config_json(void)
{
    ms_config_t *cfg = expect_ok("applications:\n"
                                 "  - import_path: app.lua:A\n"
                                 "    deployments:\n"
                                 "      - name: D\n"
                                 "        user_config:\n"
                                 "          i: 42\n"
                                 "          neg: -7\n"
                                 "          f: 0.5\n"
                                 "          t: true\n"
                                 "          y: yes\n"
                                 "          n: null\n"
                                 "          tilde: ~\n"
                                 "          s: hello world\n"
                                 "          qi: \"42\"\n"
                                 "          qb: 'true'\n"
                                 "          list: [1, two, 3.0]\n"
                                 "          nested: {a: {b: False}}\n"
                                 "          block: |\n"
                                 "            12\n"
                                 "      - name: E\n"
                                 "        user_config: null\n");
    if (!cfg)
        return;
    const ms_deployment_config_t *d = ms_config_find_deployment(&cfg->apps[0], "D");
    ASSERT_TRUE(d && (d->set & MS_SET_USER_CONFIG));
    if (d && d->user_config) {
        char *s = json_dumps(d->user_config, JSON_SORT_KEYS | JSON_COMPACT);
        ASSERT_STR_EQ(s,
                      "{\"block\":\"12\\n\",\"f\":0.5,\"i\":42,\"list\":[1,\"two\",3.0],"
                      "\"n\":null,\"neg\":-7,\"nested\":{\"a\":{\"b\":false}},\"qb\":\"true\","
                      "\"qi\":\"42\",\"s\":\"hello world\",\"t\":true,\"tilde\":null,\"y\":true}");
        free(s);
    }
    const ms_deployment_config_t *e = ms_config_find_deployment(&cfg->apps[0], "E");
    ASSERT_TRUE(e && e->set == MS_SET_USER_CONFIG && json_is_null(e->user_config));
    ms_config_free(cfg);

    /* A self-referencing alias must be cut off, not recursed into forever. */
    ms_config_errors_t errs;
    ASSERT_INT_EQ(load("applications:\n  - import_path: app.lua:A\n    deployments:\n"
                       "      - name: D\n        user_config: &a {x: *a}\n",
                       &cfg, &errs),
                  -1);
    ASSERT_TRUE(errs.n >= 1);
    ASSERT_CONTAINS(errs.n ? errs.items[0] : NULL, "nests deeper than");
    ms_config_errors_free(&errs);
}

static void test_yaml_syntax_error(void)
{
    expect_error("applications:\n  - import_path: app.lua:A\n    name: [a, b\n",
                 "t.yaml:4:1: YAML syntax error: while parsing a flow sequence did not find "
                 "expected ',' or ']'");
    ms_config_t *cfg;
    ms_config_errors_t errs;
    ASSERT_INT_EQ(load("a: b: c\n", &cfg, &errs), -1);
    ASSERT_INT_EQ(errs.n, 1);
    ASSERT_CONTAINS(errs.n ? errs.items[0] : NULL, "t.yaml:1:5: YAML syntax error: ");
    ms_config_errors_free(&errs);
    expect_error("applications: []\n---\napplications: []\n",
                 "t.yaml:3:1: config must be a single YAML document");
}

static void test_load_file(void)
{
    write_file("serve.yaml", "applications:\n  - import_path: pkg.model:M\n");
    char cwd[PATH_MAX];
    ASSERT_TRUE(getcwd(cwd, sizeof(cwd)) != NULL);
    /* A relative config path: imports still resolve against the file's folder. */
    ASSERT_INT_EQ(chdir(tmpdir), 0);
    ms_config_t *cfg = NULL;
    ms_config_errors_t errs = {0};
    ASSERT_INT_EQ(ms_config_load("serve.yaml", &cfg, &errs), 0);
    ASSERT_INT_EQ(chdir("/"), 0);
    if (cfg) {
        ASSERT_STR_EQ(cfg->path, "serve.yaml");
        ASSERT_STR_EQ(cfg->dir, tmpdir);
        ASSERT_STR_EQ(cfg->apps[0].import_file, tmp_path("pkg/model.lua"));
        ms_config_free(cfg);
    }
    ASSERT_INT_EQ(ms_config_load("/nonexistent/dir/serve.yaml", &cfg, &errs), -1);
    ASSERT_TRUE(cfg == NULL);
    ASSERT_INT_EQ(errs.n, 1);
    ASSERT_STR_EQ(errs.n ? errs.items[0] : NULL,
                  "/nonexistent/dir/serve.yaml:1:1: cannot read config: No such file or directory");
    ms_config_errors_free(&errs);
    ASSERT_INT_EQ(chdir(cwd), 0);
}

static void test_later_keys_accepted(void)
{
    /* These load (with warnings on stderr) and are type-checked loosely. */
    ms_config_t *cfg = expect_ok("proxy_location: HeadOnly\n"
                                 "http_options: {root_path: '', ssl_keyfile: null}\n"
                                 "grpc_options: {port: 9000}\n"
                                 "applications:\n"
                                 "  - import_path: app.lua:A\n"
                                 "    logging_config: {log_level: WARNING}\n"
                                 "    deployments:\n"
                                 "      - name: D\n"
                                 "        logging_config: {encoding: TEXT}\n"
                                 "        placement_group_bundles: [{CPU: 1}]\n"
                                 "        placement_group_strategy: SPREAD\n");
    /* The app-level logging_config does not change the process log level. */
    ASSERT_STR_EQ(cfg ? cfg->logging.level : NULL, "INFO");
    ms_config_free(cfg);
    expect_error("grpc_options: 5\napplications: []\n",
                 "t.yaml:1:15: grpc_options must be a mapping or null, got \"5\"");
    expect_error("http_options: {ssl_certfile: [a]}\napplications: []\n",
                 "t.yaml:1:30: ssl_certfile must be a string");
}

/* ---- autoscaling, routers, policies, admin, control_loop --------------------------------------
 */

#define APP_DEP "applications:\n  - import_path: app.lua:A\n    deployments:\n      - name: D\n"

static const ms_deployment_config_t *first_dep(const ms_config_t *cfg)
{
    return cfg && cfg->n_apps && cfg->apps[0].n_deployments ? &cfg->apps[0].deployments[0] : NULL;
}

static void check_as_defaults(const ms_autoscaling_config_t *a, int max)
{
    ASSERT_TRUE(a != NULL);
    if (!a)
        return;
    ASSERT_INT_EQ(a->min_replicas, 1);
    ASSERT_INT_EQ(a->initial_replicas, -1);
    ASSERT_INT_EQ(a->max_replicas, max);
    ASSERT_TRUE(a->target_ongoing_requests == 2.0);
    ASSERT_TRUE(a->metrics_interval_s == 10.0);
    ASSERT_TRUE(a->look_back_period_s == 30.0);
    ASSERT_TRUE(a->smoothing_factor == 1.0);
    ASSERT_TRUE(a->upscale_smoothing_factor < 0 && a->downscale_smoothing_factor < 0);
    ASSERT_TRUE(a->upscaling_factor < 0 && a->downscaling_factor < 0);
    ASSERT_TRUE(a->downscale_delay_s == 600.0);
    ASSERT_TRUE(a->downscale_to_zero_delay_s < 0);
    ASSERT_TRUE(a->upscale_delay_s == 30.0);
    ASSERT_STR_EQ(a->aggregation_function, "mean");
    ASSERT_TRUE(a->policy == NULL && a->policy_kwargs == NULL);
    ASSERT_INT_EQ(a->dry_run, 0);
}

static void test_autoscaling_defaults(void)
{
    ms_config_t *cfg = expect_ok(APP_DEP "        autoscaling_config: {}\n");
    const ms_deployment_config_t *d = first_dep(cfg);
    ASSERT_TRUE(d != NULL);
    if (d) {
        ASSERT_INT_EQ(d->set, MS_SET_AUTOSCALING_CONFIG);
        ASSERT_INT_EQ(d->num_replicas_auto, 0);
        check_as_defaults(d->autoscaling, 1);
        ASSERT_INT_EQ(d->autoscaling ? d->autoscaling->max_replicas_given : -1, 0);
        ASSERT_INT_EQ(d->autoscaling ? d->autoscaling->mark.line : 0, 5);
        ASSERT_TRUE(d->router == NULL);
    }
    ms_config_free(cfg);

    /* No autoscaling anywhere: nothing allocated. */
    cfg = expect_ok(APP_DEP);
    d = first_dep(cfg);
    ASSERT_TRUE(d && !d->autoscaling && !d->num_replicas_auto && !d->router);
    ms_config_free(cfg);

    ms_autoscaling_config_t *a = ms_config_autoscaling_default(0);
    check_as_defaults(a, 1);
    ms_config_autoscaling_free(a);
    a = ms_config_autoscaling_default(1);
    check_as_defaults(a, 100);
    ms_config_autoscaling_free(a);
}

static void test_autoscaling_all_fields(void)
{
    ms_config_t *cfg = expect_ok(APP_DEP "        autoscaling_config:\n"
                                         "          min_replicas: 0\n"
                                         "          initial_replicas: 2\n"
                                         "          max_replicas: 8\n"
                                         "          target_ongoing_requests: 3.5\n"
                                         "          metrics_interval_s: 1\n"
                                         "          look_back_period_s: 5\n"
                                         "          smoothing_factor: 0.5\n"
                                         "          upscale_smoothing_factor: 2\n"
                                         "          downscale_smoothing_factor: 0.25\n"
                                         "          upscaling_factor: 1.5\n"
                                         "          downscaling_factor: 0.3\n"
                                         "          downscale_delay_s: 0\n"
                                         "          downscale_to_zero_delay_s: 120\n"
                                         "          upscale_delay_s: 0\n"
                                         "          aggregation_function: MAX\n"
                                         "          policy:\n"
                                         "            policy_function: policy.lua:decide\n"
                                         "            policy_kwargs: {step: 2}\n"
                                         "            dry_run: yes\n");
    const ms_deployment_config_t *d = first_dep(cfg);
    const ms_autoscaling_config_t *a = d ? d->autoscaling : NULL;
    ASSERT_TRUE(a != NULL);
    if (a) {
        ASSERT_INT_EQ(a->min_replicas, 0);
        ASSERT_INT_EQ(a->initial_replicas, 2);
        ASSERT_INT_EQ(a->max_replicas, 8);
        ASSERT_INT_EQ(a->max_replicas_given, 1);
        ASSERT_TRUE(a->target_ongoing_requests == 3.5);
        ASSERT_TRUE(a->metrics_interval_s == 1);
        ASSERT_TRUE(a->look_back_period_s == 5);
        ASSERT_TRUE(a->smoothing_factor == 0.5);
        ASSERT_TRUE(a->upscale_smoothing_factor == 2);
        ASSERT_TRUE(a->downscale_smoothing_factor == 0.25);
        ASSERT_TRUE(a->upscaling_factor == 1.5);
        ASSERT_TRUE(a->downscaling_factor == 0.3);
        ASSERT_TRUE(a->downscale_delay_s == 0);
        ASSERT_TRUE(a->downscale_to_zero_delay_s == 120);
        ASSERT_TRUE(a->upscale_delay_s == 0);
        ASSERT_STR_EQ(a->aggregation_function, "max");
        ASSERT_TRUE(a->policy != NULL);
        if (a->policy) {
            ASSERT_STR_EQ(a->policy->path, "policy.lua:decide");
            ASSERT_STR_EQ(a->policy->file, tmp_path("policy.lua"));
            ASSERT_STR_EQ(a->policy->attr, "decide");
        }
        ASSERT_INT_EQ(json_integer_value(json_object_get(a->policy_kwargs, "step")), 2);
        ASSERT_INT_EQ(a->dry_run, 1);
    }
    ms_config_free(cfg);

    /* Nullable fields, the module form of a policy, and Ray's name for the built-in one. */
    cfg = expect_ok(APP_DEP "        autoscaling_config:\n"
                            "          initial_replicas: null\n"
                            "          upscaling_factor: ~\n"
                            "          downscale_to_zero_delay_s: null\n"
                            "          aggregation_function: Min\n"
                            "          policy: {policy_function: pkg.scale:f}\n");
    a = first_dep(cfg) ? first_dep(cfg)->autoscaling : NULL;
    ASSERT_TRUE(a && a->initial_replicas == -1 && a->upscaling_factor < 0 &&
                a->downscale_to_zero_delay_s < 0);
    ASSERT_STR_EQ(a ? a->aggregation_function : NULL, "min");
    ASSERT_STR_EQ(a && a->policy ? a->policy->file : NULL, tmp_path("pkg/scale.lua"));
    ms_config_free(cfg);
    cfg = expect_ok(APP_DEP "        autoscaling_config:\n"
                            "          policy:\n"
                            "            policy_function: "
                            "ray.serve.autoscaling_policy:default_autoscaling_policy\n");
    a = first_dep(cfg) ? first_dep(cfg)->autoscaling : NULL;
    ASSERT_TRUE(a && a->policy == NULL);
    ms_config_free(cfg);
}

static void test_num_replicas_auto(void)
{
    /* "auto" alone: AutoscalingConfig.default(); the autoscaling bit stays clear. */
    ms_config_t *cfg = expect_ok(APP_DEP "        num_replicas: auto\n");
    const ms_deployment_config_t *d = first_dep(cfg);
    ASSERT_TRUE(d != NULL);
    if (d) {
        ASSERT_INT_EQ(d->num_replicas_auto, 1);
        ASSERT_INT_EQ(d->set, MS_SET_NUM_REPLICAS);
        ASSERT_INT_EQ(d->max_ongoing_requests, 5);
        check_as_defaults(d->autoscaling, 100);
    }
    ms_config_free(cfg);

    /* With an autoscaling_config (before or after num_replicas): user values override. */
    cfg = expect_ok(APP_DEP
                    "        autoscaling_config: {min_replicas: 2, target_ongoing_requests: 4}\n"
                    "        num_replicas: auto\n");
    d = first_dep(cfg);
    ASSERT_TRUE(d && d->autoscaling);
    if (d && d->autoscaling) {
        ASSERT_INT_EQ(d->set, MS_SET_NUM_REPLICAS | MS_SET_AUTOSCALING_CONFIG);
        ASSERT_INT_EQ(d->autoscaling->min_replicas, 2);
        ASSERT_INT_EQ(d->autoscaling->max_replicas, 100);
        ASSERT_TRUE(d->autoscaling->target_ongoing_requests == 4);
    }
    ms_config_free(cfg);
    cfg = expect_ok(APP_DEP "        num_replicas: auto\n"
                            "        autoscaling_config: {max_replicas: 7}\n");
    d = first_dep(cfg);
    ASSERT_INT_EQ(d && d->autoscaling ? d->autoscaling->max_replicas : 0, 7);
    ms_config_free(cfg);

    /* null num_replicas is as if left out and combines with autoscaling_config (max stays 1). */
    cfg = expect_ok(APP_DEP "        num_replicas: null\n"
                            "        autoscaling_config: {min_replicas: 0}\n");
    d = first_dep(cfg);
    ASSERT_TRUE(d && d->set == MS_SET_AUTOSCALING_CONFIG && !d->num_replicas_auto);
    ASSERT_INT_EQ(d && d->autoscaling ? d->autoscaling->max_replicas : 0, 1);
    ms_config_free(cfg);

    /* autoscaling_config: null is set (clears code's) and does not clash with an int. */
    cfg = expect_ok(APP_DEP "        num_replicas: 3\n"
                            "        autoscaling_config: null\n");
    d = first_dep(cfg);
    ASSERT_TRUE(d && d->set == (MS_SET_NUM_REPLICAS | MS_SET_AUTOSCALING_CONFIG) &&
                !d->autoscaling && d->num_replicas == 3);
    ms_config_free(cfg);
    cfg = expect_ok(APP_DEP "        num_replicas: auto\n"
                            "        autoscaling_config: null\n");
    d = first_dep(cfg);
    check_as_defaults(d ? d->autoscaling : NULL, 100);
    ms_config_free(cfg);

    /* An int with autoscaling_config, in either order. */
    expect_error(APP_DEP "        num_replicas: 2\n"
                         "        autoscaling_config: {min_replicas: 1}\n",
                 "t.yaml:6:9: num_replicas and autoscaling_config cannot both be set; use "
                 "num_replicas: auto or leave it out");
    expect_error(APP_DEP "        autoscaling_config: {}\n"
                         "        num_replicas: 2\n",
                 "t.yaml:5:9: num_replicas and autoscaling_config cannot both be set; use "
                 "num_replicas: auto or leave it out");
    /* Under "auto", max_replicas defaults to 100, so min 200 needs a max. */
    expect_error(APP_DEP "        num_replicas: auto\n"
                         "        autoscaling_config: {min_replicas: 200}\n",
                 "t.yaml:6:44: max_replicas (100) must be >= min_replicas (200) (max_replicas "
                 "defaults to 100 under num_replicas: auto)");
    expect_error(APP_DEP "        num_replicas: Auto\n",
                 "t.yaml:5:23: num_replicas must be an integer > 0 or \"auto\", got \"Auto\"");
}

static void test_autoscaling_errors(void)
{
    char buf[1024];
    /* `autoscaling_config: {` ends at column 29, so the first key starts at column 30. */
#define AS(body)                                                                                   \
    (snprintf(buf, sizeof(buf), APP_DEP "        autoscaling_config: {" body "}\n"), buf)
    expect_error(AS("min_replicas: -1"),
                 "t.yaml:5:44: min_replicas must be an integer >= 0, got \"-1\"");
    expect_error(AS("min_replicas: 1.5"),
                 "t.yaml:5:44: min_replicas must be an integer >= 0, got \"1.5\"");
    expect_error(AS("max_replicas: 0"),
                 "t.yaml:5:44: max_replicas must be an integer > 0, got \"0\"");
    expect_error(AS("initial_replicas: -2"),
                 "t.yaml:5:48: initial_replicas must be an integer >= 0 or null, got \"-2\"");
    expect_error(AS("target_ongoing_requests: 0"),
                 "t.yaml:5:55: target_ongoing_requests must be a number > 0, got \"0\"");
    expect_error(AS("metrics_interval_s: 0"),
                 "t.yaml:5:50: metrics_interval_s must be a number > 0, got \"0\"");
    expect_error(AS("look_back_period_s: -1"),
                 "t.yaml:5:50: look_back_period_s must be a number > 0, got \"-1\"");
    expect_error(AS("smoothing_factor: 0"),
                 "t.yaml:5:48: smoothing_factor must be a number > 0, got \"0\"");
    expect_error(AS("smoothing_factor: null"),
                 "t.yaml:5:48: smoothing_factor must be a number > 0, got null");
    expect_error(AS("upscale_smoothing_factor: 0"),
                 "t.yaml:5:56: upscale_smoothing_factor must be a number > 0 or null, got \"0\"");
    expect_error(AS("downscale_smoothing_factor: x"),
                 "t.yaml:5:58: downscale_smoothing_factor must be a number > 0 or null, got \"x\"");
    expect_error(AS("upscaling_factor: -1"),
                 "t.yaml:5:48: upscaling_factor must be a number > 0 or null, got \"-1\"");
    expect_error(AS("downscaling_factor: 0"),
                 "t.yaml:5:50: downscaling_factor must be a number > 0 or null, got \"0\"");
    expect_error(AS("downscale_delay_s: -1"),
                 "t.yaml:5:49: downscale_delay_s must be a number >= 0, got \"-1\"");
    expect_error(
        AS("downscale_to_zero_delay_s: -1"),
        "t.yaml:5:57: downscale_to_zero_delay_s must be a number >= 0 or null, got \"-1\"");
    expect_error(AS("upscale_delay_s: inf"),
                 "t.yaml:5:47: upscale_delay_s must be a number >= 0, got \"inf\"");
    expect_error(AS("aggregation_function: median"),
                 "t.yaml:5:52: aggregation_function must be one of mean, max, min, got \"median\"");
    /* Across fields. */
    expect_error(AS("min_replicas: 3"),
                 "t.yaml:5:44: max_replicas (1) must be >= min_replicas (3) (max_replicas "
                 "defaults to 1)");
    expect_error(AS("min_replicas: 3, max_replicas: 2"),
                 "t.yaml:5:61: max_replicas (2) must be >= min_replicas (3)");
    expect_error(AS("min_replicas: 2, max_replicas: 4, initial_replicas: 5"),
                 "t.yaml:5:82: initial_replicas (5) must lie between min_replicas (2) and "
                 "max_replicas (4)");
    expect_error(AS("max_replicas: 4, initial_replicas: 0"),
                 "t.yaml:5:65: initial_replicas (0) must lie between min_replicas (1) and "
                 "max_replicas (4)");
    /* Unknown and duplicate keys. */
    expect_error(AS("min_replica: 1"),
                 "t.yaml:5:30: unknown key 'min_replica' in autoscaling_config; did you mean "
                 "'min_replicas'?");
    /* Ray's pre-2.32 name gets pointed at the new one. */
    expect_error(AS("target_num_ongoing_requests_per_replica: 1"),
                 "t.yaml:5:30: unknown key 'target_num_ongoing_requests_per_replica' in "
                 "autoscaling_config; did you mean 'target_ongoing_requests'? (its old name in "
                 "Ray Serve)");
    expect_error(AS("cooldown_s: 1"),
                 "t.yaml:5:30: unknown key 'cooldown_s' in autoscaling_config");
    expect_error(AS("upscale_delay_s: 1, upscale_delay_s: 2"),
                 "t.yaml:5:50: duplicate key 'upscale_delay_s' in autoscaling_config");
    /* policy */
    expect_error(AS("policy: 5"), "t.yaml:5:38: policy must be a mapping, got \"5\"");
    expect_error(AS("policy: {policy_fn: policy.lua:f}"),
                 "t.yaml:5:39: unknown key 'policy_fn' in autoscaling_config.policy; did you "
                 "mean 'policy_function'?");
    snprintf(buf, sizeof(buf),
             APP_DEP "        autoscaling_config: {policy: {policy_function: "
                     "nope.lua:f}}\n");
    char want[PATH_MAX * 3];
    snprintf(want, sizeof(want), "t.yaml:5:56: policy_function \"nope.lua:f\": file %s not found",
             tmp_path("nope.lua"));
    expect_error(buf, want);
    expect_error(AS("policy: {policy_function: a:b:c}"),
                 "t.yaml:5:56: policy_function must contain at most one ':', got \"a:b:c\"");
    expect_error(AS("policy: {policy_function: policy.lua:f, policy_kwargs: [1]}"),
                 "t.yaml:5:85: policy_kwargs must be a mapping or null, got a list");
    expect_error(AS("policy: {dry_run: maybe}"),
                 "t.yaml:5:48: dry_run must be true or false, got \"maybe\"");
    expect_error(APP_DEP "        autoscaling_config: [1]\n",
                 "t.yaml:5:29: autoscaling_config must be a mapping or null, got a list");
#undef AS

    /* Every error is reported, not just the first. */
    ms_config_t *cfg = NULL;
    ms_config_errors_t errs;
    ASSERT_INT_EQ(load(APP_DEP "        autoscaling_config:\n"
                               "          min_replicas: -1\n"
                               "          look_back_period_s: 0\n"
                               "          polcy: {}\n",
                       &cfg, &errs),
                  -1);
    ASSERT_INT_EQ(errs.n, 3);
    if (errs.n == 3) {
        ASSERT_STR_EQ(errs.items[0],
                      "t.yaml:6:25: min_replicas must be an integer >= 0, got \"-1\"");
        ASSERT_STR_EQ(errs.items[1],
                      "t.yaml:7:31: look_back_period_s must be a number > 0, got \"0\"");
        ASSERT_STR_EQ(errs.items[2], "t.yaml:8:11: unknown key 'polcy' in autoscaling_config; "
                                     "did you mean 'policy'?");
    }
    ms_config_errors_free(&errs);
}

static void test_router_config(void)
{
    ms_config_t *cfg = expect_ok(APP_DEP "        request_router_config: {}\n");
    const ms_deployment_config_t *d = first_dep(cfg);
    ASSERT_TRUE(d && d->router && d->set == MS_SET_REQUEST_ROUTER_CONFIG);
    if (d && d->router) {
        ASSERT_TRUE(d->router->router_class == NULL && d->router->kwargs == NULL);
        ASSERT_TRUE(d->router->stats_period_s == 10.0);
        ASSERT_TRUE(d->router->stats_timeout_s == 30.0);
    }
    ms_config_free(cfg);

    cfg = expect_ok(APP_DEP "        request_router_config:\n"
                            "          request_router_class: router.lua:Sticky\n"
                            "          request_router_kwargs: {header: x-user}\n"
                            "          request_routing_stats_period_s: 2\n"
                            "          request_routing_stats_timeout_s: 0.5\n");
    d = first_dep(cfg);
    ASSERT_TRUE(d && d->router && d->router->router_class);
    if (d && d->router && d->router->router_class) {
        ASSERT_STR_EQ(d->router->router_class->path, "router.lua:Sticky");
        ASSERT_STR_EQ(d->router->router_class->file, tmp_path("router.lua"));
        ASSERT_STR_EQ(d->router->router_class->attr, "Sticky");
        ASSERT_STR_EQ(json_string_value(json_object_get(d->router->kwargs, "header")), "x-user");
        ASSERT_TRUE(d->router->stats_period_s == 2);
        ASSERT_TRUE(d->router->stats_timeout_s == 0.5);
    }
    ms_config_free(cfg);

    /* Ray's default class means the built-in router; null resets to it. */
    cfg = expect_ok(APP_DEP "        request_router_config:\n"
                            "          request_router_class: "
                            "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter\n");
    d = first_dep(cfg);
    ASSERT_TRUE(d && d->router && !d->router->router_class);
    ms_config_free(cfg);
    cfg = expect_ok(APP_DEP "        request_router_config: null\n");
    d = first_dep(cfg);
    ASSERT_TRUE(d && !d->router && d->set == MS_SET_REQUEST_ROUTER_CONFIG);
    ms_config_free(cfg);

    char want[PATH_MAX * 3];
    snprintf(want, sizeof(want),
             "t.yaml:5:55: request_router_class \"missing.lua:R\": file %s not found",
             tmp_path("missing.lua"));
    expect_error(APP_DEP "        request_router_config: {request_router_class: missing.lua:R}\n",
                 want);
    expect_error(APP_DEP "        request_router_config: {request_routing_stats_period_s: 0}\n",
                 "t.yaml:5:65: request_routing_stats_period_s must be a number > 0, got \"0\"");
    expect_error(APP_DEP "        request_router_config: {request_routing_stats_timeout_s: -1}\n",
                 "t.yaml:5:66: request_routing_stats_timeout_s must be a number > 0, got \"-1\"");
    expect_error(APP_DEP "        request_router_config: {request_router_kwargs: 3}\n",
                 "t.yaml:5:56: request_router_kwargs must be a mapping or null, got \"3\"");
    expect_error(APP_DEP "        request_router_config: {request_router_clas: router.lua:R}\n",
                 "t.yaml:5:33: unknown key 'request_router_clas' in request_router_config; did "
                 "you mean 'request_router_class'?");
}

static void test_app_policy_and_external_scaler(void)
{
    ms_config_t *cfg = expect_ok("applications:\n"
                                 "  - import_path: app.lua:A\n"
                                 "    autoscaling_policy:\n"
                                 "      policy_function: policy.lua:app_policy\n"
                                 "      policy_kwargs: {weight: 2}\n"
                                 "      dry_run: true\n"
                                 "  - name: b\n"
                                 "    route_prefix: /b\n"
                                 "    import_path: app.lua:A\n"
                                 "    external_scaler_enabled: true\n"
                                 "    deployments:\n"
                                 "      - name: D\n"
                                 "        num_replicas: 2\n");
    if (cfg) {
        ms_app_config_t *a = &cfg->apps[0];
        ASSERT_TRUE(a->autoscaling_policy != NULL);
        ASSERT_STR_EQ(a->autoscaling_policy ? a->autoscaling_policy->file : NULL,
                      tmp_path("policy.lua"));
        ASSERT_STR_EQ(a->autoscaling_policy ? a->autoscaling_policy->attr : NULL, "app_policy");
        ASSERT_INT_EQ(json_integer_value(json_object_get(a->autoscaling_policy_kwargs, "weight")),
                      2);
        ASSERT_INT_EQ(a->autoscaling_policy_dry_run, 1);
        ASSERT_INT_EQ(a->external_scaler_enabled, 0);
        ASSERT_INT_EQ(cfg->apps[1].external_scaler_enabled, 1);
        ASSERT_TRUE(cfg->apps[1].autoscaling_policy == NULL);
    }
    ms_config_free(cfg);

    expect_error(
        "applications:\n  - import_path: app.lua:A\n    autoscaling_policy: {dry_run: true}\n",
        "t.yaml:3:25: autoscaling_policy is missing required key 'policy_function'");
    expect_error("applications:\n  - import_path: app.lua:A\n"
                 "    autoscaling_policy: {policy_function: policy.lua:f, kwargs: {}}\n",
                 "t.yaml:3:57: unknown key 'kwargs' in autoscaling_policy");
    expect_error("applications:\n  - import_path: app.lua:A\n    autoscaling_policy: 1\n",
                 "t.yaml:3:25: autoscaling_policy must be a mapping or null, got \"1\"");
    expect_error("applications:\n  - import_path: app.lua:A\n    external_scaler_enabled: maybe\n",
                 "t.yaml:3:30: external_scaler_enabled must be true or false, got \"maybe\"");
    /* external_scaler_enabled with autoscaling_config or num_replicas: auto (either order). */
    expect_error("applications:\n  - import_path: app.lua:A\n"
                 "    external_scaler_enabled: true\n"
                 "    deployments:\n"
                 "      - name: Fixed\n"
                 "        num_replicas: 2\n"
                 "      - name: Scaled\n"
                 "        autoscaling_config: {max_replicas: 3}\n",
                 "t.yaml:3:30: external_scaler_enabled cannot be combined with autoscaling "
                 "(deployment 'Scaled')");
    expect_error("applications:\n  - import_path: app.lua:A\n"
                 "    deployments:\n"
                 "      - name: Auto\n"
                 "        num_replicas: auto\n"
                 "    external_scaler_enabled: yes\n",
                 "t.yaml:6:30: external_scaler_enabled cannot be combined with autoscaling "
                 "(deployment 'Auto')");
}

/* external_scaler (ours): the Lua hooks of the external scaling API. */
static void test_external_scaler_hooks(void)
{
    ms_config_t *cfg = expect_ok("applications:\n"
                                 "  - import_path: app.lua:A\n"
                                 "    external_scaler_enabled: true\n"
                                 "    external_scaler:\n"
                                 "      hook: hooks.lua:judge\n"
                                 "      tick: pkg.scale:tick\n"
                                 "      tick_interval_s: 2.5\n"
                                 "      kwargs: {max_replicas: 4}\n"
                                 "  - name: b\n"
                                 "    route_prefix: /b\n"
                                 "    import_path: app.lua:A\n"
                                 "    external_scaler_enabled: true\n"
                                 "    external_scaler: {hook: hooks.lua:judge}\n"
                                 "  - name: c\n"
                                 "    route_prefix: /c\n"
                                 "    import_path: app.lua:A\n");
    if (cfg) {
        ms_app_config_t *a = &cfg->apps[0];
        ASSERT_TRUE(a->scale_hook != NULL && a->scale_tick != NULL);
        ASSERT_STR_EQ(a->scale_hook ? a->scale_hook->file : NULL, tmp_path("hooks.lua"));
        ASSERT_STR_EQ(a->scale_hook ? a->scale_hook->attr : NULL, "judge");
        ASSERT_STR_EQ(a->scale_hook ? a->scale_hook->path : NULL, "hooks.lua:judge");
        ASSERT_INT_EQ(a->scale_hook ? a->scale_hook->mark.line : 0, 5);
        ASSERT_INT_EQ(a->scale_hook ? a->scale_hook->mark.col : 0, 13);
        ASSERT_STR_EQ(a->scale_tick ? a->scale_tick->file : NULL, tmp_path("pkg/scale.lua"));
        ASSERT_STR_EQ(a->scale_tick ? a->scale_tick->attr : NULL, "tick");
        ASSERT_TRUE(a->scale_tick_interval_s == 2.5);
        ASSERT_INT_EQ(json_integer_value(json_object_get(a->scale_hook_kwargs, "max_replicas")), 4);
        /* Only a hook: no tick, the default interval, no kwargs. */
        ms_app_config_t *b = &cfg->apps[1];
        ASSERT_TRUE(b->scale_hook != NULL && b->scale_tick == NULL);
        ASSERT_TRUE(b->scale_tick_interval_s == 1.0);
        ASSERT_TRUE(b->scale_hook_kwargs == NULL);
        /* Absent key: nothing set. */
        ms_app_config_t *c = &cfg->apps[2];
        ASSERT_TRUE(c->scale_hook == NULL && c->scale_tick == NULL && !c->scale_hook_kwargs);
    }
    ms_config_free(cfg);

#define ES_APP "applications:\n  - import_path: app.lua:A\n"
    /* The hooks belong to the external scaling API: without it they are an error. */
    expect_error(ES_APP "    external_scaler: {hook: hooks.lua:judge}\n",
                 "t.yaml:3:5: external_scaler needs external_scaler_enabled: true");
    expect_error(ES_APP "    external_scaler_enabled: false\n"
                        "    external_scaler: {tick: hooks.lua:tick}\n",
                 "t.yaml:4:5: external_scaler needs external_scaler_enabled: true");
#define ES_ON ES_APP "    external_scaler_enabled: true\n"
    expect_error(ES_ON "    external_scaler: {tick_interval_s: 2}\n",
                 "t.yaml:4:22: external_scaler needs at least one of 'hook' or 'tick'");
    expect_error(ES_ON "    external_scaler: {hook: null}\n",
                 "t.yaml:4:22: external_scaler needs at least one of 'hook' or 'tick'");
    expect_error(ES_ON "    external_scaler: 3\n",
                 "t.yaml:4:22: external_scaler must be a mapping, got \"3\"");
    {
        /* The file must exist at load time, as every policy reference (the message names it). */
        ms_config_t *bad = NULL;
        ms_config_errors_t errs;
        ASSERT_INT_EQ(load(ES_ON "    external_scaler: {hook: missing.lua:judge}\n", &bad, &errs),
                      -1);
        ASSERT_INT_EQ(errs.n, 1);
        ASSERT_CONTAINS(errs.n ? errs.items[0] : NULL, "t.yaml:4:29: hook \"missing.lua:judge\"");
        ASSERT_CONTAINS(errs.n ? errs.items[0] : NULL, "missing.lua not found");
        ms_config_errors_free(&errs);
    }
    expect_error(ES_ON "    external_scaler: {tick: 5}\n",
                 "t.yaml:4:29: tick must be a string 'file.lua:attr' or 'module.sub:attr', got "
                 "\"5\"");
    expect_error(ES_ON "    external_scaler: {hook: hooks.lua:judge, tick_interval_s: 0}\n",
                 "t.yaml:4:63: tick_interval_s must be a number > 0, got \"0\"");
    expect_error(ES_ON "    external_scaler: {hook: hooks.lua:judge, kwargs: [1]}\n",
                 "t.yaml:4:54: kwargs must be a mapping or null, got a list");
    expect_error(ES_ON "    external_scaler: {hook: hooks.lua:judge, tik: hooks.lua:tick}\n",
                 "t.yaml:4:46: unknown key 'tik' in external_scaler; did you mean 'tick'?");
#undef ES_ON
#undef ES_APP
}

static void test_admin_and_control_loop(void)
{
    ms_config_t *cfg = expect_ok("applications: []\n");
    if (cfg) {
        ASSERT_STR_EQ(cfg->admin.host, "127.0.0.1");
        ASSERT_INT_EQ(cfg->admin.port, 8265);
        ASSERT_TRUE(cfg->admin.token == NULL);
        ASSERT_TRUE(cfg->control_loop_interval_s == 0.1);
    }
    ms_config_free(cfg);
    cfg = expect_ok("admin: {host: 0.0.0.0, port: 9265, token: s3cret}\n"
                    "control_loop: {interval_s: 0.25}\n"
                    "applications: []\n");
    if (cfg) {
        ASSERT_STR_EQ(cfg->admin.host, "0.0.0.0");
        ASSERT_INT_EQ(cfg->admin.port, 9265);
        ASSERT_STR_EQ(cfg->admin.token, "s3cret");
        ASSERT_TRUE(cfg->control_loop_interval_s == 0.25);
    }
    ms_config_free(cfg);
    cfg = expect_ok("admin: {token: null}\ncontrol_loop: null\napplications: []\n");
    ASSERT_TRUE(cfg && !cfg->admin.token && cfg->control_loop_interval_s == 0.1);
    ms_config_free(cfg);

    expect_error("admin: {port: 0}\napplications: []\n",
                 "t.yaml:1:15: port must be an integer in 1..65535, got \"0\"");
    expect_error("admin: {port: 70000}\napplications: []\n",
                 "t.yaml:1:15: port must be an integer in 1..65535, got \"70000\"");
    expect_error("admin: {host: ''}\napplications: []\n",
                 "t.yaml:1:15: host must be a non-empty string, got \"\"");
    expect_error("admin: {token: ''}\napplications: []\n",
                 "t.yaml:1:16: token must be a non-empty string, got \"\"");
    expect_error("admin: {tokn: x}\napplications: []\n",
                 "t.yaml:1:9: unknown key 'tokn' in admin; did you mean 'token'?");
    expect_error("admin: 1\napplications: []\n",
                 "t.yaml:1:8: admin must be a mapping or null, got \"1\"");
    expect_error("control_loop: {interval_s: 0}\napplications: []\n",
                 "t.yaml:1:28: interval_s must be a number > 0, got \"0\"");
    expect_error("control_loop: {interval: 1}\napplications: []\n",
                 "t.yaml:1:16: unknown key 'interval' in control_loop; did you mean 'interval_s'?");
    expect_error("control_loops: {}\napplications: []\n",
                 "t.yaml:1:1: unknown key 'control_loops' at the top level; did you mean "
                 "'control_loop'?");
}

static void test_autoscaling_from_json(void)
{
    ms_config_errors_t errs = {0};
    ms_config_mark_t m = {12, 3};
    char file[PATH_MAX * 2];
    snprintf(file, sizeof(file), "%s/app.lua", tmpdir);

    json_t *j = json_pack("{}");
    ms_autoscaling_config_t *a = ms_config_autoscaling_from_json(j, 0, file, m, "x", &errs);
    check_as_defaults(a, 1);
    ASSERT_INT_EQ(a ? a->mark.line : 0, 12);
    ms_config_autoscaling_free(a);
    a = ms_config_autoscaling_from_json(j, 1, file, m, "x", &errs);
    check_as_defaults(a, 100);
    ms_config_autoscaling_free(a);
    json_decref(j);
    ASSERT_INT_EQ(errs.n, 0);

    /* Lua numbers may arrive as reals; integral ones are integers. Policies resolve against the
     * folder of `file`. */
    j = json_pack("{s:f, s:i, s:f, s:s, s:{s:s, s:{s:i}, s:b}}", "min_replicas", 2.0,
                  "max_replicas", 6, "upscale_delay_s", 1.5, "aggregation_function", "Max",
                  "policy", "policy_function", "pkg.scale:f", "policy_kwargs", "k", 1, "dry_run",
                  1);
    a = ms_config_autoscaling_from_json(j, 0, file, m, "deployment 'D'", &errs);
    json_decref(j);
    ASSERT_INT_EQ(errs.n, 0);
    ASSERT_TRUE(a != NULL);
    if (a) {
        ASSERT_INT_EQ(a->min_replicas, 2);
        ASSERT_INT_EQ(a->max_replicas, 6);
        ASSERT_TRUE(a->upscale_delay_s == 1.5);
        ASSERT_STR_EQ(a->aggregation_function, "max");
        ASSERT_STR_EQ(a->policy ? a->policy->file : NULL, tmp_path("pkg/scale.lua"));
        ASSERT_INT_EQ(json_integer_value(json_object_get(a->policy_kwargs, "k")), 1);
        ASSERT_INT_EQ(a->dry_run, 1);
    }
    ms_config_autoscaling_free(a);

    /* Errors: all at the mark, prefixed by `what`, every one reported. */
    j = json_pack("{s:f, s:i, s:s, s:{s:i}}", "min_replicas", 1.5, "look_back_period_s", 0,
                  "target_ongoing_request", "3", "policy", "bogus", 1);
    a = ms_config_autoscaling_from_json(j, 0, "app.lua", m, "deployment 'D'", &errs);
    json_decref(j);
    ASSERT_TRUE(a == NULL);
    ASSERT_INT_EQ(errs.n, 4);
    if (errs.n == 4) {
        ASSERT_STR_EQ(errs.items[0], "app.lua:12:3: deployment 'D': min_replicas must be an "
                                     "integer >= 0, got \"1.5\"");
        ASSERT_STR_EQ(errs.items[1], "app.lua:12:3: deployment 'D': look_back_period_s must be "
                                     "a number > 0, got \"0\"");
        ASSERT_STR_EQ(errs.items[2], "app.lua:12:3: deployment 'D': unknown key "
                                     "'target_ongoing_request' in autoscaling_config; did you "
                                     "mean 'target_ongoing_requests'?");
        ASSERT_STR_EQ(errs.items[3], "app.lua:12:3: deployment 'D': unknown key 'bogus' in "
                                     "autoscaling_config.policy");
    }
    ms_config_errors_free(&errs);

    j = json_pack("{s:i, s:i}", "min_replicas", 5, "max_replicas", 2);
    a = ms_config_autoscaling_from_json(j, 0, "app.lua", m, "deployment 'D'", &errs);
    json_decref(j);
    ASSERT_TRUE(a == NULL);
    ASSERT_INT_EQ(errs.n, 1);
    ASSERT_STR_EQ(errs.n ? errs.items[0] : NULL,
                  "app.lua:12:3: deployment 'D': max_replicas (2) must be >= min_replicas (5)");
    ms_config_errors_free(&errs);

    j = json_pack("[]");
    a = ms_config_autoscaling_from_json(j, 0, "app.lua", m, "deployment 'D'", &errs);
    json_decref(j);
    ASSERT_TRUE(a == NULL);
    ASSERT_STR_EQ(errs.n ? errs.items[0] : NULL,
                  "app.lua:12:3: deployment 'D': autoscaling_config must be a mapping, got a list");
    ms_config_errors_free(&errs);

    j = json_pack("{s:{s:s}}", "policy", "policy_function", "nope.lua:f");
    a = ms_config_autoscaling_from_json(j, 0, file, m, "deployment 'D'", &errs);
    json_decref(j);
    ASSERT_TRUE(a == NULL);
    ASSERT_CONTAINS(errs.n ? errs.items[0] : "",
                    "deployment 'D': policy_function \"nope.lua:f\": file ");
    ms_config_errors_free(&errs);
}

/* ---- Ray Serve compatibility: built-in names, old keys, newer keys, log levels, numbers ---- */

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* Every spelling of Ray's built-in policy and router means the built-in, as if left out. */
static void test_ray_builtin_names(void)
{
    static const char *const policies[] = {
        "ray.serve.autoscaling_policy:default_autoscaling_policy",
        "ray.serve.autoscaling_policy.default_autoscaling_policy",
        "ray.serve.autoscaling_policy:replica_queue_length_autoscaling_policy",
        "ray.serve.autoscaling_policy.replica_queue_length_autoscaling_policy",
    };
    static const char *const routers[] = {
        "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
        "ray.serve._private.request_router.PowerOfTwoChoicesRequestRouter",
        "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter",
        "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter",
    };
    char buf[1024];
    for (size_t i = 0; i < N_OF(policies); i++) {
        snprintf(buf, sizeof(buf),
                 APP_DEP "        autoscaling_config: {policy: {policy_function: %s}}\n",
                 policies[i]);
        ms_config_t *cfg = expect_ok(buf);
        const ms_deployment_config_t *d = first_dep(cfg);
        check_as_defaults(d ? d->autoscaling : NULL, 1);
        ms_config_free(cfg);

        /* Application level: Ray has no built-in of its own there, and its default decides per
         * deployment, so the application gets no policy at all, kwargs and dry_run included. */
        snprintf(buf, sizeof(buf),
                 "applications:\n  - import_path: app.lua:A\n    autoscaling_policy:\n"
                 "      policy_function: %s\n      policy_kwargs: {k: 1}\n      dry_run: true\n",
                 policies[i]);
        cfg = expect_ok(buf);
        if (cfg) {
            ASSERT_TRUE(cfg->apps[0].autoscaling_policy == NULL);
            ASSERT_TRUE(cfg->apps[0].autoscaling_policy_kwargs == NULL);
            ASSERT_INT_EQ(cfg->apps[0].autoscaling_policy_dry_run, 0);
        }
        ms_config_free(cfg);
    }
    for (size_t i = 0; i < N_OF(routers); i++) {
        snprintf(buf, sizeof(buf),
                 APP_DEP "        request_router_config:\n"
                         "          request_router_class: %s\n",
                 routers[i]);
        ms_config_t *cfg = expect_ok(buf);
        const ms_deployment_config_t *d = first_dep(cfg);
        ASSERT_TRUE(d && d->router && d->router->router_class == NULL);
        ms_config_free(cfg);
    }

    /* Only those names: a neighbour is an ordinary reference, and null at the application level
     * still names nothing. */
    char want[PATH_MAX * 3];
    snprintf(want, sizeof(want),
             "t.yaml:5:56: policy_function \"ray.serve.autoscaling_policy.my_policy\": file "
             "%s not found",
             tmp_path("ray/serve/autoscaling_policy.lua"));
    expect_error(APP_DEP "        autoscaling_config: {policy: {policy_function: "
                         "ray.serve.autoscaling_policy.my_policy}}\n",
                 want);
    expect_error("applications:\n  - import_path: app.lua:A\n"
                 "    autoscaling_policy: {policy_function: null}\n",
                 "t.yaml:3:25: autoscaling_policy.policy_function must name a Lua function "
                 "('file.lua:attr' or 'module.sub:attr')");
}

/* Keys Ray Serve renamed or moved: an error with today's name, and nothing else reported. */
static void test_ray_old_keys(void)
{
    expect_error(APP_DEP "        max_concurrent_queries: 3\n",
                 "t.yaml:5:9: unknown key 'max_concurrent_queries' in deployment; did you mean "
                 "'max_ongoing_requests'? (its old name in Ray Serve)");
    expect_error(APP_DEP "        route_prefix: /d\n",
                 "t.yaml:5:9: 'route_prefix' is no longer a deployment option in Ray Serve; set "
                 "route_prefix on the application");
    expect_error("applications:\n  - app_name: a\n    import_path: app.lua:A\n",
                 "t.yaml:2:5: unknown key 'app_name' in application; did you mean 'name'? (its "
                 "old name in Ray Serve)");
    expect_error(APP_DEP "        autoscaling_config: {policy: {name: policy.lua:f}}\n",
                 "t.yaml:5:39: unknown key 'name' in autoscaling_config.policy; did you mean "
                 "'policy_function'? (its old name in Ray Serve)");
    /* At the application level this is also not "missing policy_function". */
    expect_error("applications:\n  - import_path: app.lua:A\n"
                 "    autoscaling_policy: {name: policy.lua:f}\n",
                 "t.yaml:3:26: unknown key 'name' in autoscaling_policy; did you mean "
                 "'policy_function'? (its old name in Ray Serve)");

    /* The same from code. */
    ms_config_errors_t errs = {0};
    json_t *j = json_pack("{s:i}", "target_num_ongoing_requests_per_replica", 2);
    ms_autoscaling_config_t *a =
        ms_config_autoscaling_from_json(j, 0, "app.lua", (ms_config_mark_t){4, 1}, "d", &errs);
    json_decref(j);
    ASSERT_TRUE(a == NULL);
    ASSERT_STR_EQ(errs.n == 1 ? errs.items[0] : NULL,
                  "app.lua:4:1: d: unknown key 'target_num_ongoing_requests_per_replica' in "
                  "autoscaling_config; did you mean 'target_ongoing_requests'? (its old name in "
                  "Ray Serve)");
    ms_config_errors_free(&errs);
}

/* Newer Ray Serve keys load, loosely checked, with a warning and no effect. */
static void test_ray_newer_keys(void)
{
    ms_config_t *cfg =
        expect_ok("tracing_config: {exporter_import_path: x.y:z}\n" APP_DEP
                  "        gang_scheduling_config: {gang_size: 2}\n"
                  "        deployment_actors: [{name: counter}]\n"
                  "        backpressure_config: {status_code: 429}\n"
                  "        rolling_update_percentage: 20\n"
                  "        request_router_config: {ingress_router_fallback: true}\n");
    const ms_deployment_config_t *d = first_dep(cfg);
    ASSERT_TRUE(d && d->set == MS_SET_REQUEST_ROUTER_CONFIG && d->router &&
                !d->router->router_class);
    ms_config_free(cfg);
    cfg = expect_ok("tracing_config: null\n" APP_DEP "        gang_scheduling_config: null\n"
                    "        deployment_actors: null\n"
                    "        rolling_update_percentage: 100\n"
                    "        request_router_config: {ingress_router_fallback: {}}\n");
    ms_config_free(cfg);

    expect_error("tracing_config: [1]\napplications: []\n",
                 "t.yaml:1:17: tracing_config must be a mapping or null, got a list");
    expect_error(APP_DEP "        gang_scheduling_config: 2\n",
                 "t.yaml:5:33: gang_scheduling_config must be a mapping or null, got \"2\"");
    expect_error(APP_DEP "        deployment_actors: {name: c}\n",
                 "t.yaml:5:28: deployment_actors must be a list of mappings, got a mapping");
    expect_error(APP_DEP "        backpressure_config: on\n",
                 "t.yaml:5:30: backpressure_config must be a mapping or null, got \"on\"");
    expect_error(APP_DEP "        rolling_update_percentage: 0\n",
                 "t.yaml:5:36: rolling_update_percentage must be a number in (0, 100] or null, "
                 "got \"0\"");
    expect_error(APP_DEP "        rolling_update_percentage: 101\n",
                 "t.yaml:5:36: rolling_update_percentage must be a number in (0, 100] or null, "
                 "got \"101\"");
    expect_error(APP_DEP "        request_router_config: {ingress_router_fallback: 5}\n",
                 "t.yaml:5:58: ingress_router_fallback must be true, false, a mapping or null, "
                 "got \"5\"");
}

static const char *top_level_of(const char *value)
{
    static char buf[256];
    snprintf(buf, sizeof(buf), "logging_config: {log_level: %s}\napplications: []\n", value);
    ms_config_t *cfg = expect_ok(buf);
    snprintf(buf, sizeof(buf), "%s", cfg ? cfg->logging.level : "(failed)");
    ms_config_free(cfg);
    return buf;
}

/* Ray's whole set, names (case matters) and unquoted numbers, each to our nearest level. */
static void test_ray_log_levels(void)
{
    static const char *const cases[][2] = {
        {"CRITICAL", "ERROR"}, {"FATAL", "ERROR"}, {"ERROR", "ERROR"}, {"WARNING", "WARNING"},
        {"WARN", "WARNING"},   {"INFO", "INFO"},   {"DEBUG", "DEBUG"}, {"NOTSET", "DEBUG"},
        {"50", "ERROR"},       {"40", "ERROR"},    {"30", "WARNING"},  {"20", "INFO"},
        {"10", "DEBUG"},       {"0", "DEBUG"},     {"'INFO'", "INFO"},
    };
    for (size_t i = 0; i < N_OF(cases); i++)
        ASSERT_STR_EQ(top_level_of(cases[i][0]), cases[i][1]);

    const char *desc = "log_level must be one of CRITICAL, FATAL, ERROR, WARNING, WARN, INFO, "
                       "DEBUG, NOTSET or 50, 40, 30, 20, 10, 0, got ";
    char want[512];
    snprintf(want, sizeof(want),
             "t.yaml:1:29: %s\"debug\"; did you mean 'DEBUG'? (names are upper "
             "case)",
             desc);
    expect_error("logging_config: {log_level: debug}\napplications: []\n", want);
    snprintf(want, sizeof(want), "t.yaml:1:29: %s\"10\"", desc);
    expect_error("logging_config: {log_level: '10'}\napplications: []\n", want);
    snprintf(want, sizeof(want), "t.yaml:1:29: %s\"15\"", desc);
    expect_error("logging_config: {log_level: 15}\napplications: []\n", want);
    /* Checked the same where logging_config has no effect yet. */
    snprintf(want, sizeof(want),
             "t.yaml:5:37: %s\"Info\"; did you mean 'INFO'? (names are upper "
             "case)",
             desc);
    expect_error(APP_DEP "        logging_config: {log_level: Info}\n", want);
}

/* logs_dir and its rotation (docs/logging.md): Ray's defaults, a relative folder resolved
 * against the config's, null for stderr only, overrides per level, and bad folders refused at
 * the value. */
static void test_log_files(void)
{
    ms_config_t *cfg = expect_ok("applications: []\n");
    if (cfg) {
        ASSERT_STR_EQ(cfg->logging.logs_dir, "");
        ASSERT_TRUE(cfg->logging.rotation_max_bytes == 512LL * 1024 * 1024);
        ASSERT_INT_EQ(cfg->logging.rotation_backup_count, 5);
    }
    ms_config_free(cfg);
    cfg = expect_ok("logging_config: {logs_dir: out/logs/, rotation_max_bytes: 1000,\n"
                    "                 rotation_backup_count: 0}\n"
                    "applications:\n"
                    "  - import_path: app.lua:A\n"
                    "    logging_config: {logs_dir: null}\n"
                    "    deployments:\n"
                    "      - name: D\n"
                    "        logging_config: {logs_dir: /tmp/d, rotation_backup_count: 3}\n");
    if (cfg) {
        ASSERT_STR_EQ(cfg->logging.logs_dir, tmp_path("out/logs"));
        ASSERT_TRUE(cfg->logging.rotation_max_bytes == 1000);
        ASSERT_INT_EQ(cfg->logging.rotation_backup_count, 0);
        const ms_app_config_t *a = &cfg->apps[0];
        ms_logging_config_t app = ms_config_logging_merge(cfg->logging, a->logging);
        ASSERT_STR_EQ(app.logs_dir, "");
        ASSERT_TRUE(app.rotation_max_bytes == 1000);
        const ms_deployment_config_t *d = ms_config_find_deployment(a, "D");
        ms_logging_config_t dep = ms_config_logging_merge(app, d ? d->logging : app);
        ASSERT_STR_EQ(dep.logs_dir, "/tmp/d");
        ASSERT_INT_EQ(dep.rotation_backup_count, 3);
        ASSERT_TRUE(dep.rotation_max_bytes == 1000);
    }
    ms_config_free(cfg);

    write_file("plain", "not a folder\n");
    char want[PATH_MAX * 3];
    snprintf(want, sizeof want,
             "t.yaml:1:28: logs_dir '%s/plain/logs' cannot hold log files: '%s/plain' is not a "
             "folder",
             tmpdir, tmpdir);
    expect_error("logging_config: {logs_dir: plain/logs}\napplications: []\n", want);
    snprintf(want, sizeof want,
             "t.yaml:5:36: logs_dir '%s/plain' cannot hold log files: '%s/plain' is not a "
             "folder",
             tmpdir, tmpdir);
    expect_error(APP_DEP "        logging_config: {logs_dir: plain}\n", want);
    expect_error("logging_config: {logs_dir: ''}\napplications: []\n",
                 "t.yaml:1:28: logs_dir must be a non-empty string, got \"\"");
    expect_error("logging_config: {rotation_max_bytes: 1.5}\napplications: []\n",
                 "t.yaml:1:38: rotation_max_bytes must be an integer >= 0 (bytes; 0 = never "
                 "rotate), got \"1.5\"");
    expect_error("logging_config: {rotation_backup_count: 1001}\napplications: []\n",
                 "t.yaml:1:41: rotation_backup_count must be an integer from 0 to 1000, got "
                 "\"1001\"");
}

/* Each field follows its pydantic type in Ray's schema: lax ints and floats take quoted
 * numbers, StrictInt and the int-or-"auto" union do not. */
static void test_ray_number_types(void)
{
    ms_config_t *cfg =
        expect_ok("http_options: {port: '8080'}\n" APP_DEP "        num_replicas: 3.0\n"
                  "        max_ongoing_requests: '7.0'\n"
                  "        graceful_shutdown_timeout_s: \"2.5\"\n"
                  "        max_queued_requests: 4\n"
                  "      - name: E\n"
                  "        num_replicas: \"auto\"\n"
                  "        max_ongoing_requests: 6.0\n"
                  "        autoscaling_config:\n"
                  "          min_replicas: '2'\n"
                  "          max_replicas: 4.0\n"
                  "          initial_replicas: '3.'\n"
                  "          target_ongoing_requests: '1.5'\n");
    if (cfg) {
        ASSERT_INT_EQ(cfg->http.port, 8080);
        const ms_deployment_config_t *d = &cfg->apps[0].deployments[0];
        ASSERT_INT_EQ(d->num_replicas, 3);
        ASSERT_INT_EQ(d->max_ongoing_requests, 7);
        ASSERT_TRUE(d->graceful_shutdown_timeout_s == 2.5);
        ASSERT_INT_EQ(d->max_queued_requests, 4);
        const ms_deployment_config_t *e = &cfg->apps[0].deployments[1];
        ASSERT_INT_EQ(e->num_replicas_auto, 1);
        ASSERT_INT_EQ(e->max_ongoing_requests, 6);
        ASSERT_TRUE(e->autoscaling != NULL);
        if (e->autoscaling) {
            ASSERT_INT_EQ(e->autoscaling->min_replicas, 2);
            ASSERT_INT_EQ(e->autoscaling->max_replicas, 4);
            ASSERT_INT_EQ(e->autoscaling->initial_replicas, 3);
            ASSERT_TRUE(e->autoscaling->target_ongoing_requests == 1.5);
        }
    }
    ms_config_free(cfg);

    expect_error(APP_DEP "        num_replicas: \"3\"\n",
                 "t.yaml:5:23: num_replicas must be an integer > 0 or \"auto\", got the string "
                 "\"3\"; write the number without quotes (Ray Serve rejects a quoted one here "
                 "too)");
    expect_error(APP_DEP "        num_replicas: '3.0'\n",
                 "t.yaml:5:23: num_replicas must be an integer > 0 or \"auto\", got the string "
                 "\"3.0\"; write the number without quotes (Ray Serve rejects a quoted one here "
                 "too)");
    expect_error(APP_DEP "        max_queued_requests: \"5\"\n",
                 "t.yaml:5:30: max_queued_requests must be -1 or an integer >= 1, got the string "
                 "\"5\"; write the number without quotes (Ray Serve rejects a quoted one here "
                 "too)");
    expect_error(APP_DEP "        max_queued_requests: 5.0\n",
                 "t.yaml:5:30: max_queued_requests must be -1 or an integer >= 1, got \"5.0\"");
    expect_error(APP_DEP "        max_ongoing_requests: '5.5'\n",
                 "t.yaml:5:31: max_ongoing_requests must be an integer > 0, got \"5.5\"");
    expect_error(APP_DEP "        max_ongoing_requests: 5.5\n",
                 "t.yaml:5:31: max_ongoing_requests must be an integer > 0, got \"5.5\"");
}

int main(void)
{
    setup_tmpdir();
    test_defaults();
    test_all_fields();
    test_validation_rules();
    test_did_you_mean();
    test_multiple_errors();
    test_route_prefix_null();
    test_import_path();
    test_user_config_json();
    test_yaml_syntax_error();
    test_load_file();
    test_later_keys_accepted();
    test_autoscaling_defaults();
    test_autoscaling_all_fields();
    test_num_replicas_auto();
    test_autoscaling_errors();
    test_router_config();
    test_app_policy_and_external_scaler();
    test_external_scaler_hooks();
    test_admin_and_control_loop();
    test_autoscaling_from_json();
    test_ray_builtin_names();
    test_ray_old_keys();
    test_ray_newer_keys();
    test_ray_log_levels();
    test_log_files();
    test_ray_number_types();
    cleanup_tmpdir();
    return TEST_DONE();
}
