/*
 * Unit tests of the admin listener (engine/admin) and the admin CLI (engine/cli), in process.
 *
 * The main thread runs a uv loop with three admin listeners on 127.0.0.1 (port 0): one without
 * a token, one with a token, and one without callbacks (501). A driver thread talks to them with
 * blocking sockets and with ms_cli_run (whose client is blocking too), because a blocking client
 * in the loop's own thread would deadlock; when it is done it wakes the loop through a uv_async
 * and everything is closed. Stub callbacks record their arguments under a mutex and answer with
 * a status and body the driver sets beforehand.
 *
 * Covered: refusing a non-loopback host without a token; 401 without, with a wrong, a shorter,
 * a longer or a non-Bearer token (WWW-Authenticate, request_id in the body) and 200 with the
 * right one; every route and method, 405 with Allow, 404, 501 for missing callbacks; api_type
 * validation and filtering; PUT's YAML flag and empty body; error bodies normalised with a
 * request_id; scale path decoding and body validation (missing, negative, float, bool, string,
 * not JSON, not an object, empty -> 400 without calling the controller; extra keys ignored; the
 * controller's 412 passed through; Ray's message on 200); /metrics' content type. CLI: status,
 * deploy (YAML), scale (ok, 412, bad N), reload (ok and 422 with per-script lines), shutdown,
 * the token from --token and from the environment, 401 -> exit 4, connection refused -> exit 3.
 * Dashboard: names refused (traversal, dotfiles, escapes, empty segments, too long) and types,
 * files served from MOONSERVE_DASHBOARD_DIR without the token, 308, 404 for a missing file, an
 * unknown type or a folder, 405.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "admin/admin.h"
#include "cli/cli.h"
#include "core/core.h"
#include "test.h"

#define TOKEN     "s3cret-token-0123456789"
#define JSON_TYPE "Content-Type: application/json\r\n"

static uv_loop_t loop_storage;
static uv_loop_t *loop = &loop_storage;
static uv_async_t done_async;
static uv_timer_t watchdog;
static int watchdog_fired;
static ms_admin_t *open_admin, *token_admin, *null_admin;
static int open_port, token_port, null_port;
/* Listeners with admin.allowed_hosts: two names, and "*". */
static ms_admin_t *hosts_admin, *any_admin;
static int hosts_port, any_port;

/* ---- stub controller ------------------------------------------------------------------------ */

static pthread_mutex_t stub_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    char last[32]; /* name of the last callback called */
    int calls;
    char app[128], dep[128];
    long long target;
    char *text;
    int is_yaml;
    int next_status;       /* 0: 200 */
    const char *next_body; /* JSON text or NULL */
} stub;

static void stub_expect(int status, const char *body)
{
    pthread_mutex_lock(&stub_mu);
    stub.next_status = status;
    stub.next_body = body;
    stub.last[0] = '\0';
    stub.calls = 0;
    pthread_mutex_unlock(&stub_mu);
}

/* Name of the last callback and the call count since stub_expect, copied under the lock. */
static int stub_calls(char *last, size_t cap)
{
    pthread_mutex_lock(&stub_mu);
    int n = stub.calls;
    if (last)
        snprintf(last, cap, "%s", stub.last);
    pthread_mutex_unlock(&stub_mu);
    return n;
}

static int stub_answer(const char *name, json_t **body)
{
    snprintf(stub.last, sizeof stub.last, "%s", name);
    stub.calls++;
    *body = stub.next_body ? json_loads(stub.next_body, 0, NULL) : NULL;
    return stub.next_status ? stub.next_status : 200;
}

static int cb_status(void *data, json_t **body)
{
    (void)data;
    pthread_mutex_lock(&stub_mu);
    int s = stub_answer("status", body);
    pthread_mutex_unlock(&stub_mu);
    return s;
}

static int cb_deploy(void *data, const char *text, size_t len, int is_yaml, json_t **body)
{
    (void)data;
    pthread_mutex_lock(&stub_mu);
    free(stub.text);
    stub.text = strndup(text, len);
    stub.is_yaml = is_yaml;
    int s = stub_answer("deploy", body);
    pthread_mutex_unlock(&stub_mu);
    return s;
}

static int cb_shutdown(void *data, json_t **body)
{
    (void)data;
    pthread_mutex_lock(&stub_mu);
    int s = stub_answer("shutdown", body);
    pthread_mutex_unlock(&stub_mu);
    return s;
}

static int cb_scale(void *data, const char *app, const char *dep, long long target, json_t **body)
{
    (void)data;
    pthread_mutex_lock(&stub_mu);
    snprintf(stub.app, sizeof stub.app, "%s", app);
    snprintf(stub.dep, sizeof stub.dep, "%s", dep);
    stub.target = target;
    int s = stub_answer("scale", body);
    pthread_mutex_unlock(&stub_mu);
    return s;
}

static void cb_reload(void *data, ms_admin_reply_t *reply)
{
    (void)data;
    json_t *body = NULL;
    pthread_mutex_lock(&stub_mu);
    int s = stub_answer("reload", &body);
    pthread_mutex_unlock(&stub_mu);
    ms_admin_reply_send(reply, s, body);
}

static int cb_metrics(void *data, char **text)
{
    (void)data;
    pthread_mutex_lock(&stub_mu);
    json_t *ignored = NULL;
    int s = stub_answer("metrics", &ignored);
    json_decref(ignored);
    pthread_mutex_unlock(&stub_mu);
    *text = strdup("# TYPE ms_up gauge\nms_up 1\n");
    return s;
}

static const ms_admin_callbacks_t callbacks = {cb_status, cb_deploy,  cb_shutdown, cb_scale,
                                               cb_reload, cb_metrics, NULL};

/* ---- a blocking raw HTTP client (driver thread) -----------------------------------------------
 */

typedef struct reply {
    int status;
    char head[4096];
    char *body; /* NUL-terminated */
} reply_t;

static void reply_free(reply_t *r)
{
    free(r->body);
    r->body = NULL;
}

/* Header value from the raw head (case-insensitive name), copied into out; "" when absent. */
static const char *reply_header(const reply_t *r, const char *name, char *out, size_t cap)
{
    out[0] = '\0';
    size_t n = strlen(name);
    for (const char *p = strstr(r->head, "\r\n"); p && p[2]; p = strstr(p + 2, "\r\n")) {
        const char *line = p + 2;
        if (strncasecmp(line, name, n) == 0 && line[n] == ':') {
            const char *v = line + n + 1;
            while (*v == ' ')
                v++;
            size_t len = strcspn(v, "\r");
            snprintf(out, cap, "%.*s", (int)len, v);
            break;
        }
    }
    return out;
}

/* The listener's own Host, unless the test sends a Host of its own. */
static const char *host_line(int port, const char *headers)
{
    static __thread char line[64];
    if (headers && strcasestr(headers, "Host:"))
        return "";
    snprintf(line, sizeof line, "Host: 127.0.0.1:%d\r\n", port);
    return line;
}

/* Sends `method path` with extra header lines (each ending in \r\n) and a body; reads the whole
 * answer (Connection: close). */
static void request(int port, const char *method, const char *path, const char *headers,
                    const char *body, reply_t *r)
{
    memset(r, 0, sizeof *r);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        r->body = strdup("");
        return;
    }
    char head[4096];
    size_t blen = body ? strlen(body) : 0;
    int n = snprintf(head, sizeof head,
                     "%s %s HTTP/1.1\r\n%sConnection: close\r\n%sContent-Length: %zu"
                     "\r\n\r\n",
                     method, path, host_line(port, headers), headers ? headers : "", blen);
    send(fd, head, (size_t)n, MSG_NOSIGNAL);
    if (blen)
        send(fd, body, blen, MSG_NOSIGNAL);
    ms_buf_t in = {0};
    char buf[8192];
    ssize_t got;
    while ((got = recv(fd, buf, sizeof buf, 0)) > 0)
        ms_buf_append(&in, buf, (size_t)got);
    close(fd);
    ms_buf_append(&in, "", 0);
    const char *sep = in.data ? strstr(in.data, "\r\n\r\n") : NULL;
    if (sep) {
        snprintf(r->head, sizeof r->head, "%.*s", (int)(sep - in.data), in.data);
        r->body = strdup(sep + 4);
        sscanf(in.data, "HTTP/1.%*d %d", &r->status);
    } else {
        r->body = strdup("");
    }
    ms_buf_free(&in);
}

static void get(int port, const char *path, reply_t *r)
{
    request(port, "GET", path, NULL, NULL, r);
}

/* ---- driver: admin API --------------------------------------------------------------------- */

static const char *const STATUS_DOC =
    "{\"applications\": {"
    " \"hello\": {\"status\": \"RUNNING\", \"message\": \"\", \"route_prefix\": \"/hello\","
    "  \"source\": \"declarative\", \"external_scaler_enabled\": true, \"deployments\": {"
    "   \"Hello\": {\"status\": \"HEALTHY\", \"status_trigger\": \"CONFIG_UPDATE_COMPLETED\","
    "    \"message\": \"\", \"target_num_replicas\": 2,"
    "    \"autoscaling\": {\"policy\": {\"path\": \"/x/mypolicy.lua\", \"version\": 3,"
    "                    \"sha256\": \"abcdef0123456789abcdef\"}},"
    "    \"router\": {\"path\": \"/x/myrouter.lua\", \"version\": 1},"
    "    \"replicas\": [{\"replica_id\": \"a\", \"state\": \"RUNNING\", \"pid\": 1,"
    "                   \"start_time_s\": 1.0},"
    "                  {\"replica_id\": \"b\", \"state\": \"RUNNING\", \"pid\": 2,"
    "                   \"start_time_s\": 1.0},"
    "                  {\"replica_id\": \"c\", \"state\": \"STARTING\", \"pid\": 3,"
    "                   \"start_time_s\": 2.0}]}}},"
    " \"legacy\": {\"status\": \"RUNNING\", \"source\": \"imperative\", \"deployments\": {}}}}";

static void check_json_error(const reply_t *r, int status)
{
    char ct[128];
    ASSERT_INT_EQ(r->status, status);
    ASSERT_CONTAINS(reply_header(r, "Content-Type", ct, sizeof ct), "application/json");
    json_t *doc = json_loads(r->body, 0, NULL);
    ASSERT_TRUE(json_is_string(json_object_get(doc, "error")));
    ASSERT_TRUE(json_is_string(json_object_get(doc, "request_id")));
    char rid[128];
    reply_header(r, "X-Request-ID", rid, sizeof rid);
    ASSERT_TRUE(rid[0] != '\0');
    ASSERT_STR_EQ(json_string_value(json_object_get(doc, "request_id")), rid);
    json_decref(doc);
}

static void test_auth(void)
{
    reply_t r;
    char h[256];
    stub_expect(200, "{\"applications\": {}}");
    get(token_port, "/api/serve/applications/", &r);
    check_json_error(&r, 401);
    ASSERT_STR_EQ(reply_header(&r, "WWW-Authenticate", h, sizeof h), "Bearer");
    reply_free(&r);
    const char *bad[] = {"Authorization: Bearer wrong\r\n", "Authorization: Bearer " TOKEN "x\r\n",
                         "Authorization: Bearer s3cret-token-012345678\r\n",
                         "Authorization: Basic " TOKEN "\r\n", "Authorization: Bearer \r\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        request(token_port, "GET", "/api/serve/applications/", bad[i], NULL, &r);
        check_json_error(&r, 401);
        ASSERT_STR_EQ(reply_header(&r, "WWW-Authenticate", h, sizeof h), "Bearer");
        reply_free(&r);
    }
    ASSERT_INT_EQ(stub_calls(NULL, 0), 0);
    /* Unknown paths and /metrics are behind the token too: nothing leaks unauthenticated. */
    get(token_port, "/nope", &r);
    ASSERT_INT_EQ(r.status, 401);
    reply_free(&r);
    get(token_port, "/metrics", &r);
    ASSERT_INT_EQ(r.status, 401);
    reply_free(&r);
    request(token_port, "GET", "/api/serve/applications/", "Authorization: Bearer " TOKEN "\r\n",
            NULL, &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_STR_EQ(r.body, "{\"applications\": {}}");
    reply_free(&r);
    request(token_port, "GET", "/api/serve/applications/", "authorization: bearer " TOKEN "\r\n",
            NULL, &r);
    ASSERT_INT_EQ(r.status, 200);
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(NULL, 0), 2);
}

static void test_applications(void)
{
    reply_t r;
    char h[256], last[32];
    stub_expect(200, STATUS_DOC);
    get(open_port, "/api/serve/applications/", &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_CONTAINS(reply_header(&r, "Content-Type", h, sizeof h), "application/json");
    ASSERT_TRUE(reply_header(&r, "X-Request-ID", h, sizeof h)[0] != '\0');
    json_t *doc = json_loads(r.body, 0, NULL);
    ASSERT_TRUE(json_object_get(json_object_get(doc, "applications"), "legacy") != NULL);
    /* A status document is not an error: no request_id is added to it. */
    ASSERT_TRUE(json_object_get(doc, "request_id") == NULL);
    json_decref(doc);
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(last, sizeof last), 1);
    ASSERT_STR_EQ(last, "status");

    /* Without the trailing slash too. */
    get(open_port, "/api/serve/applications", &r);
    ASSERT_INT_EQ(r.status, 200);
    reply_free(&r);

    get(open_port, "/api/serve/applications/?api_type=declarative", &r);
    ASSERT_INT_EQ(r.status, 200);
    doc = json_loads(r.body, 0, NULL);
    ASSERT_TRUE(json_object_get(json_object_get(doc, "applications"), "hello") != NULL);
    ASSERT_TRUE(json_object_get(json_object_get(doc, "applications"), "legacy") == NULL);
    json_decref(doc);
    reply_free(&r);
    get(open_port, "/api/serve/applications/?x=1&api_type=imperative", &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_TRUE(strstr(r.body, "\"hello\"") == NULL);
    reply_free(&r);

    stub_expect(200, STATUS_DOC);
    get(open_port, "/api/serve/applications/?api_type=bogus", &r);
    check_json_error(&r, 400);
    ASSERT_CONTAINS(r.body, "api_type");
    reply_free(&r);
    get(open_port, "/api/serve/applications/?api_type=", &r);
    ASSERT_INT_EQ(r.status, 400);
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(NULL, 0), 0);

    /* PUT: JSON by default, YAML by Content-Type; the body is passed through untouched. */
    stub_expect(200, NULL);
    request(open_port, "PUT", "/api/serve/applications/", "Content-Type: application/json\r\n",
            "{\"applications\": []}", &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_STR_EQ(r.body, "");
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(last, sizeof last), 1);
    ASSERT_STR_EQ(last, "deploy");
    pthread_mutex_lock(&stub_mu);
    ASSERT_STR_EQ(stub.text, "{\"applications\": []}");
    ASSERT_INT_EQ(stub.is_yaml, 0);
    pthread_mutex_unlock(&stub_mu);
    const char *yaml_types[] = {"application/yaml", "application/x-yaml", "text/YAML; q=1"};
    for (size_t i = 0; i < 3; i++) {
        char hdr[128];
        snprintf(hdr, sizeof hdr, "Content-Type: %s\r\n", yaml_types[i]);
        request(open_port, "PUT", "/api/serve/applications/", hdr, "applications: []\n", &r);
        ASSERT_INT_EQ(r.status, 200);
        reply_free(&r);
        pthread_mutex_lock(&stub_mu);
        ASSERT_INT_EQ(stub.is_yaml, 1);
        ASSERT_STR_EQ(stub.text, "applications: []\n");
        pthread_mutex_unlock(&stub_mu);
    }
    request(open_port, "PUT", "/api/serve/applications/", JSON_TYPE, "{}", &r);
    ASSERT_INT_EQ(r.status, 200);
    reply_free(&r);
    pthread_mutex_lock(&stub_mu);
    ASSERT_INT_EQ(stub.is_yaml, 0);
    pthread_mutex_unlock(&stub_mu);

    stub_expect(200, NULL);
    request(open_port, "PUT", "/api/serve/applications/", NULL, NULL, &r);
    check_json_error(&r, 400);
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(NULL, 0), 0);

    /* The controller's error body is passed through, with request_id added. */
    stub_expect(400, "{\"error\": \"invalid config\", \"errors\": [\"a:1:1: x\"]}");
    request(open_port, "PUT", "/api/serve/applications/", JSON_TYPE, "{}", &r);
    check_json_error(&r, 400);
    ASSERT_CONTAINS(r.body, "a:1:1: x");
    ASSERT_CONTAINS(r.body, "invalid config");
    reply_free(&r);
    /* An error without a body still says something. */
    stub_expect(503, NULL);
    request(open_port, "PUT", "/api/serve/applications/", JSON_TYPE, "{}", &r);
    check_json_error(&r, 503);
    reply_free(&r);
    /* A status outside 100..599 from a callback is a bug: 500. */
    stub_expect(7, NULL);
    request(open_port, "DELETE", "/api/serve/applications/", NULL, NULL, &r);
    check_json_error(&r, 500);
    reply_free(&r);

    stub_expect(200, NULL);
    request(open_port, "DELETE", "/api/serve/applications/", NULL, NULL, &r);
    ASSERT_INT_EQ(r.status, 200);
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(last, sizeof last), 1);
    ASSERT_STR_EQ(last, "shutdown");

    stub_expect(200, NULL);
    request(open_port, "POST", "/api/serve/applications/", NULL, "{}", &r);
    check_json_error(&r, 405);
    ASSERT_STR_EQ(reply_header(&r, "Allow", h, sizeof h), "GET, PUT, DELETE");
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(NULL, 0), 0);
}

static void scale_expect_400(const char *body, const char *needle)
{
    reply_t r;
    stub_expect(200, NULL);
    request(open_port, "POST", "/api/v1/applications/app/deployments/Model/scale",
            "Content-Type: application/json\r\n", body, &r);
    check_json_error(&r, 400);
    ASSERT_CONTAINS(r.body, needle);
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(NULL, 0), 0);
}

static void test_scale(void)
{
    reply_t r;
    char h[256], last[32];
    stub_expect(200, NULL);
    request(open_port, "POST", "/api/v1/applications/my%20app/deployments/Mod%2Fel/scale",
            "Content-Type: application/json\r\n", "{\"target_num_replicas\": 3}", &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_CONTAINS(r.body, "Scaling request received. Deployment will get scaled "
                            "asynchronously.");
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(last, sizeof last), 1);
    ASSERT_STR_EQ(last, "scale");
    pthread_mutex_lock(&stub_mu);
    ASSERT_STR_EQ(stub.app, "my app");
    ASSERT_STR_EQ(stub.dep, "Mod/el");
    ASSERT_INT_EQ(stub.target, 3);
    pthread_mutex_unlock(&stub_mu);

    /* 0 is allowed; unknown keys are ignored as by Ray's pydantic model. */
    stub_expect(200, NULL);
    request(open_port, "POST", "/api/v1/applications/a/deployments/d/scale", JSON_TYPE,
            "{\"target_num_replicas\": 0, \"note\": \"x\"}", &r);
    ASSERT_INT_EQ(r.status, 200);
    reply_free(&r);
    pthread_mutex_lock(&stub_mu);
    ASSERT_INT_EQ(stub.target, 0);
    pthread_mutex_unlock(&stub_mu);

    /* The controller decides 400/412; its body goes out with a request_id. */
    stub_expect(412, "{\"error\": \"external_scaler_enabled is false\"}");
    request(open_port, "POST", "/api/v1/applications/a/deployments/d/scale", JSON_TYPE,
            "{\"target_num_replicas\": 1}", &r);
    check_json_error(&r, 412);
    ASSERT_CONTAINS(r.body, "external_scaler_enabled is false");
    reply_free(&r);
    stub_expect(400, "{\"error\": \"Application or Deployment not found\"}");
    request(open_port, "POST", "/api/v1/applications/a/deployments/d/scale", JSON_TYPE,
            "{\"target_num_replicas\": 1}", &r);
    check_json_error(&r, 400);
    reply_free(&r);

    scale_expect_400("{}", "field required");
    scale_expect_400("{\"target\": 2}", "field required");
    scale_expect_400("{\"target_num_replicas\": -1}", "greater than or equal to 0");
    scale_expect_400("{\"target_num_replicas\": 1.5}", "not a valid integer");
    scale_expect_400("{\"target_num_replicas\": 2.0}", "not a valid integer");
    scale_expect_400("{\"target_num_replicas\": true}", "not a valid integer");
    scale_expect_400("{\"target_num_replicas\": \"3\"}", "not a valid integer");
    scale_expect_400("{\"target_num_replicas\": null}", "not a valid integer");
    scale_expect_400("not json", "Invalid request body");
    scale_expect_400("[3]", "Invalid request body");
    scale_expect_400("{\"target_num_replicas\": 1} trailing", "Invalid request body");
    scale_expect_400(NULL, "Invalid request body");

    /* Path segments: decoded and non-empty. */
    const char *bad_paths[] = {"/api/v1/applications//deployments/d/scale",
                               "/api/v1/applications/a/deployments//scale",
                               "/api/v1/applications/a%zz/deployments/d/scale",
                               "/api/v1/applications/a%00/deployments/d/scale",
                               "/api/v1/applications/a/deployments/d%2/scale"};
    for (size_t i = 0; i < sizeof bad_paths / sizeof bad_paths[0]; i++) {
        stub_expect(200, NULL);
        request(open_port, "POST", bad_paths[i], JSON_TYPE, "{\"target_num_replicas\": 1}", &r);
        check_json_error(&r, 400);
        reply_free(&r);
        ASSERT_INT_EQ(stub_calls(NULL, 0), 0);
    }
    /* Not the scale shape at all: 404. */
    const char *not_found[] = {"/api/v1/applications/a/deployments/d",
                               "/api/v1/applications/a/deployments/d/scale/x",
                               "/api/v1/applications/a/scale", "/api/v1/applications/"};
    for (size_t i = 0; i < sizeof not_found / sizeof not_found[0]; i++) {
        request(open_port, "POST", not_found[i], JSON_TYPE, "{\"target_num_replicas\": 1}", &r);
        check_json_error(&r, 404);
        reply_free(&r);
    }

    get(open_port, "/api/v1/applications/a/deployments/d/scale", &r);
    check_json_error(&r, 405);
    ASSERT_STR_EQ(reply_header(&r, "Allow", h, sizeof h), "POST");
    reply_free(&r);
}

static void test_reload_metrics_misc(void)
{
    reply_t r;
    char h[256], last[32];
    stub_expect(200, "{\"ok\": true, \"scripts\": []}");
    request(open_port, "POST", "/api/v1/reload", NULL, NULL, &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_STR_EQ(r.body, "{\"ok\": true, \"scripts\": []}");
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(last, sizeof last), 1);
    ASSERT_STR_EQ(last, "reload");
    stub_expect(422, "{\"ok\": false, \"error\": \"x.lua:3: boom\", \"scripts\": []}");
    request(open_port, "POST", "/api/v1/reload", NULL, NULL, &r);
    check_json_error(&r, 422);
    reply_free(&r);
    get(open_port, "/api/v1/reload", &r);
    check_json_error(&r, 405);
    ASSERT_STR_EQ(reply_header(&r, "Allow", h, sizeof h), "POST");
    reply_free(&r);

    stub_expect(200, NULL);
    get(open_port, "/metrics", &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_STR_EQ(reply_header(&r, "Content-Type", h, sizeof h),
                  "text/plain; version=0.0.4; charset=utf-8");
    ASSERT_STR_EQ(r.body, "# TYPE ms_up gauge\nms_up 1\n");
    reply_free(&r);
    request(open_port, "POST", "/metrics", NULL, NULL, &r);
    check_json_error(&r, 405);
    ASSERT_STR_EQ(reply_header(&r, "Allow", h, sizeof h), "GET");
    reply_free(&r);

    get(open_port, "/nope", &r);
    check_json_error(&r, 404);
    reply_free(&r);
    get(open_port, "/", &r);
    check_json_error(&r, 404);
    reply_free(&r);

    /* No callbacks: 501 on every route, still after validation of the method. */
    get(null_port, "/api/serve/applications/", &r);
    check_json_error(&r, 501);
    reply_free(&r);
    request(null_port, "PUT", "/api/serve/applications/", JSON_TYPE, "{}", &r);
    check_json_error(&r, 501);
    reply_free(&r);
    request(null_port, "DELETE", "/api/serve/applications/", NULL, NULL, &r);
    check_json_error(&r, 501);
    reply_free(&r);
    request(null_port, "POST", "/api/v1/applications/a/deployments/d/scale", JSON_TYPE,
            "{\"target_num_replicas\": 1}", &r);
    check_json_error(&r, 501);
    reply_free(&r);
    request(null_port, "POST", "/api/v1/reload", NULL, NULL, &r);
    check_json_error(&r, 501);
    reply_free(&r);
    get(null_port, "/metrics", &r);
    check_json_error(&r, 501);
    reply_free(&r);
}

/* ---- driver: CLI --------------------------------------------------------------------------- */

typedef struct cli_result {
    int rc;
    char *out, *err;
} cli_result_t;

/* Runs `moonserve ARGS...` through ms_cli_run, capturing both streams. */
static cli_result_t cli(const char *command, ...)
{
    char *argv[16];
    int argc = 0;
    va_list ap;
    va_start(ap, command);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL && argc < 16)
        argv[argc++] = (char *)a;
    va_end(ap);
    cli_result_t r = {0};
    size_t olen, elen;
    FILE *out = open_memstream(&r.out, &olen);
    FILE *err = open_memstream(&r.err, &elen);
    r.rc = ms_cli_run(command, argc, argv, out, err);
    fclose(out);
    fclose(err);
    return r;
}

static void cli_free(cli_result_t *r)
{
    free(r->out);
    free(r->err);
}

static void test_cli(void)
{
    char addr[64], tok_addr[64], localhost_addr[64], last[32];
    snprintf(addr, sizeof addr, "http://127.0.0.1:%d", open_port);
    snprintf(tok_addr, sizeof tok_addr, "http://127.0.0.1:%d/", token_port);
    snprintf(localhost_addr, sizeof localhost_addr, "localhost:%d", open_port);

    stub_expect(200, STATUS_DOC);
    cli_result_t r = cli("status", "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, 0);
    ASSERT_CONTAINS(r.out, "applications:\n  hello:\n    status: RUNNING\n");
    ASSERT_CONTAINS(r.out, "route_prefix: /hello");
    ASSERT_CONTAINS(r.out, "      Hello:\n        status: HEALTHY\n");
    ASSERT_CONTAINS(r.out, "status_trigger: CONFIG_UPDATE_COMPLETED");
    ASSERT_CONTAINS(r.out, "target_num_replicas: 2");
    ASSERT_CONTAINS(r.out, "replica_states:\n          RUNNING: 2\n          STARTING: 1\n");
    ASSERT_CONTAINS(r.out, "autoscaling_policy: /x/mypolicy.lua v3 (sha256 abcdef012345)");
    ASSERT_CONTAINS(r.out, "request_router: /x/myrouter.lua v1");
    ASSERT_CONTAINS(r.out, "external_scaler_enabled: true");
    ASSERT_STR_EQ(r.err, "");
    cli_free(&r);
    stub_expect(200, "{\"applications\": {}}");
    r = cli("status", "-a", localhost_addr, NULL);
    ASSERT_INT_EQ(r.rc, 0);
    ASSERT_CONTAINS(r.out, "no applications");
    cli_free(&r);
    r = cli("status",
            "--address="
            "http://127.0.0.1:1/",
            "extra", NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_USAGE);
    cli_free(&r);

    /* deploy: the file goes out verbatim as YAML. */
    char path[] = "/tmp/ms_test_admin_XXXXXX.yaml";
    int fd = mkstemps(path, 5);
    const char *yaml = "applications:\n  - name: hello\n";
    ASSERT_TRUE(write(fd, yaml, strlen(yaml)) == (ssize_t)strlen(yaml));
    close(fd);
    stub_expect(200, NULL);
    r = cli("deploy", path, "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, 0);
    ASSERT_CONTAINS(r.out, "Sent deploy request successfully.");
    cli_free(&r);
    pthread_mutex_lock(&stub_mu);
    ASSERT_STR_EQ(stub.text, yaml);
    ASSERT_INT_EQ(stub.is_yaml, 1);
    pthread_mutex_unlock(&stub_mu);
    stub_expect(400, "{\"error\": \"hello.yaml:2:5: unknown key\"}");
    r = cli("deploy", path, "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_REJECTED);
    ASSERT_CONTAINS(r.err, "HTTP 400");
    ASSERT_CONTAINS(r.err, "hello.yaml:2:5: unknown key");
    cli_free(&r);
    unlink(path);
    r = cli("deploy", "/nonexistent/x.yaml", "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_USAGE);
    ASSERT_CONTAINS(r.err, "cannot read /nonexistent/x.yaml");
    cli_free(&r);

    /* scale */
    stub_expect(200, NULL);
    r = cli("scale", "my app", "Model", "4", "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, 0);
    ASSERT_CONTAINS(r.out, "my app/Model: target_num_replicas 4 requested");
    cli_free(&r);
    ASSERT_INT_EQ(stub_calls(last, sizeof last), 1);
    pthread_mutex_lock(&stub_mu);
    ASSERT_STR_EQ(stub.app, "my app");
    ASSERT_STR_EQ(stub.dep, "Model");
    ASSERT_INT_EQ(stub.target, 4);
    pthread_mutex_unlock(&stub_mu);
    stub_expect(412, "{\"error\": \"external_scaler_enabled is false for app\"}");
    r = cli("scale", "app", "Model", "0", "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_REJECTED);
    ASSERT_CONTAINS(r.err, "HTTP 412");
    ASSERT_CONTAINS(r.err, "external_scaler_enabled is false for app");
    cli_free(&r);
    const char *bad_n[] = {"-1", "1.5", "x", "", "+3"};
    for (size_t i = 0; i < sizeof bad_n / sizeof bad_n[0]; i++) {
        r = cli("scale", "app", "Model", "--", bad_n[i], "--address", addr, NULL);
        ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_USAGE);
        cli_free(&r);
    }
    r = cli("scale", "app", "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_USAGE);
    cli_free(&r);

    /* reload: per-script lines on success and on failure. */
    stub_expect(200,
                "{\"ok\": true, \"scripts\": [{\"path\": \"/x/p.lua\", \"kind\": "
                "\"policy\", \"ok\": true, \"version\": 2, \"sha256\": \"00ff00ff00ff00ff\"}]}");
    r = cli("reload", "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, 0);
    ASSERT_CONTAINS(r.out, "ok   policy /x/p.lua v2 (sha256 00ff00ff00ff)");
    cli_free(&r);
    stub_expect(422, "{\"ok\": false, \"error\": \"reload failed\", \"scripts\": [{\"path\": "
                     "\"/x/p.lua\", \"ok\": false, \"error\": \"/x/p.lua:3: syntax\"}]}");
    r = cli("reload", "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_REJECTED);
    ASSERT_CONTAINS(r.err, "FAIL /x/p.lua: /x/p.lua:3: syntax");
    ASSERT_CONTAINS(r.err, "HTTP 422): reload failed");
    cli_free(&r);

    stub_expect(200, NULL);
    r = cli("shutdown", "--address", addr, NULL);
    ASSERT_INT_EQ(r.rc, 0);
    cli_free(&r);
    ASSERT_INT_EQ(stub_calls(last, sizeof last), 1);
    ASSERT_STR_EQ(last, "shutdown");

    /* Tokens: none, wrong, --token, and from the environment. */
    stub_expect(200, "{\"applications\": {}}");
    r = cli("status", "--address", tok_addr, NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_AUTH);
    ASSERT_CONTAINS(r.err, "requires a token");
    ASSERT_CONTAINS(r.err, "MOONSERVE_ADMIN_TOKEN");
    cli_free(&r);
    r = cli("shutdown", "--address", tok_addr, "--token", "nope", NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_AUTH);
    ASSERT_CONTAINS(r.err, "rejected the token");
    cli_free(&r);
    ASSERT_INT_EQ(stub_calls(NULL, 0), 0);
    r = cli("status", "--address", tok_addr, "--token=" TOKEN, NULL);
    ASSERT_INT_EQ(r.rc, 0);
    cli_free(&r);
    setenv("MOONSERVE_ADMIN_TOKEN", TOKEN, 1);
    setenv("MOONSERVE_ADMIN_ADDRESS", tok_addr, 1);
    r = cli("status", NULL);
    ASSERT_INT_EQ(r.rc, 0);
    cli_free(&r);
    unsetenv("MOONSERVE_ADMIN_TOKEN");
    unsetenv("MOONSERVE_ADMIN_ADDRESS");

    /* Connection refused: a port that was just free. */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    socklen_t alen = sizeof a;
    bind(s, (struct sockaddr *)&a, sizeof a);
    getsockname(s, (struct sockaddr *)&a, &alen);
    close(s);
    char dead[64];
    snprintf(dead, sizeof dead, "http://127.0.0.1:%d", ntohs(a.sin_port));
    r = cli("status", "--address", dead, NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_UNREACHABLE);
    ASSERT_CONTAINS(r.err, "cannot reach the admin API at ");
    ASSERT_CONTAINS(r.err, dead);
    ASSERT_CONTAINS(r.err, "refused");
    ASSERT_TRUE(strchr(r.err, '\n') == r.err + strlen(r.err) - 1); /* one line */
    cli_free(&r);
    r = cli("reload", "--address", "https://127.0.0.1:1", NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_USAGE);
    cli_free(&r);
    r = cli("status", "--bogus", NULL);
    ASSERT_INT_EQ(r.rc, MS_CLI_EXIT_USAGE);
    cli_free(&r);
    ASSERT_TRUE(ms_cli_is_command("scale"));
    ASSERT_TRUE(!ms_cli_is_command("run"));
}

/* Host, Origin and Content-Type: what a web page could make a browser send is refused before
 * any callback runs. */
static void expect_refused(int port, const char *method, const char *path, const char *headers,
                           const char *body, int status, const char *needle)
{
    reply_t r;
    stub_expect(200, NULL);
    request(port, method, path, headers, body, &r);
    check_json_error(&r, status);
    ASSERT_CONTAINS(r.body, needle);
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(NULL, 0), 0);
}

static void expect_ok(int port, const char *method, const char *path, const char *headers,
                      const char *body)
{
    reply_t r;
    stub_expect(200, "{\"ok\": true}");
    request(port, method, path, headers, body, &r);
    ASSERT_INT_EQ(r.status, 200);
    reply_free(&r);
    ASSERT_INT_EQ(stub_calls(NULL, 0), 1);
}

static void test_cross_site(void)
{
    const char *scale = "/api/v1/applications/a/deployments/d/scale";
    const char *body = "{\"target_num_replicas\": 2}";
    char own[128], h[256];
    snprintf(own, sizeof own, "Host: localhost:%d\r\n", open_port);
    expect_ok(open_port, "GET", "/api/serve/applications/", own, NULL);
    snprintf(h, sizeof h, "Host: [::1]:%d\r\n", open_port);
    expect_ok(open_port, "GET", "/api/serve/applications/", h, NULL);
    /* No Host at all (HTTP/1.0 tools): no browser, nothing to rebind. */
    expect_ok(open_port, "GET", "/api/serve/applications/", "Host:\r\n", NULL);
    const char *foreign[] = {"Host: evil.example\r\n", "Host: localhost\r\n",
                             "Host: localhost:1\r\n", "Host: 127.0.0.2\r\n",
                             "Host: localhost.evil.example\r\n"};
    for (size_t i = 0; i < sizeof foreign / sizeof foreign[0]; i++)
        expect_refused(open_port, "GET", "/api/serve/applications/", foreign[i], NULL, 403,
                       "allowed_hosts");
    /* Refused before the token is even looked at. */
    expect_refused(token_port, "GET", "/api/serve/applications/", "Host: evil.example\r\n", NULL,
                   403, "allowed_hosts");

    /* Origin: only the listener's own (http or https, same host and port). */
    snprintf(h, sizeof h, "Origin: http://127.0.0.1:%d\r\n" JSON_TYPE, open_port);
    expect_ok(open_port, "POST", scale, h, body);
    const char *origins[] = {"Origin: http://evil.example\r\n", "Origin: null\r\n", "Origin: \r\n",
                             "Origin: http://127.0.0.1\r\n"};
    for (size_t i = 0; i < sizeof origins / sizeof origins[0]; i++) {
        char hdr[256];
        snprintf(hdr, sizeof hdr, "%s" JSON_TYPE, origins[i]);
        expect_refused(open_port, "POST", scale, hdr, body, 403, "Origin");
    }

    /* Content types a form or a no-cors fetch can send are refused on every state change. */
    const char *simple[] = {"Content-Type: text/plain\r\n",
                            "Content-Type: application/x-www-form-urlencoded\r\n",
                            "Content-Type: multipart/form-data; boundary=b\r\n",
                            "Content-Type: text/plain; charset=application/json\r\n"};
    for (size_t i = 0; i < sizeof simple / sizeof simple[0]; i++) {
        expect_refused(open_port, "POST", scale, simple[i], body, 415, "application/json");
        expect_refused(open_port, "POST", "/api/v1/reload", simple[i], "x", 415,
                       "application/json");
        expect_refused(open_port, "PUT", "/api/serve/applications/", simple[i], "{}", 415,
                       "application/yaml");
        expect_refused(open_port, "DELETE", "/api/serve/applications/", simple[i], NULL, 415,
                       "application/json");
    }
    expect_refused(open_port, "POST", scale, NULL, body, 415, "got none");
    expect_refused(open_port, "PUT", "/api/serve/applications/", NULL, "{}", 415, "got none");
    /* Parameters and case do not matter; a bodyless reload needs no type. */
    expect_ok(open_port, "POST", scale, "Content-Type: Application/JSON; charset=utf-8\r\n", body);
    expect_ok(open_port, "POST", "/api/v1/reload", NULL, NULL);
    expect_ok(open_port, "POST", "/api/v1/reload", JSON_TYPE, NULL);
}

/* allowed_hosts: names with or without a port, and "*". */
static void test_allowed_hosts(void)
{
    int port = hosts_port;
    expect_ok(port, "GET", "/api/serve/applications/", "Host: serve.internal\r\n", NULL);
    expect_ok(port, "GET", "/api/serve/applications/", "Host: SERVE.INTERNAL:81\r\n", NULL);
    expect_ok(port, "GET", "/api/serve/applications/", "Host: proxy.example:9000\r\n", NULL);
    expect_refused(port, "GET", "/api/serve/applications/", "Host: proxy.example\r\n", NULL, 403,
                   "allowed_hosts");
    expect_refused(port, "GET", "/api/serve/applications/", "Host: other.internal\r\n", NULL, 403,
                   "allowed_hosts");
    expect_ok(any_port, "GET", "/api/serve/applications/", "Host: other.internal\r\n", NULL);
    /* Any Host, but Origin must still be that Host's. */
    expect_refused(any_port, "GET", "/api/serve/applications/",
                   "Host: other.internal\r\nOrigin: http://evil.example\r\n", NULL, 403, "Origin");
}

/* ---- driver: the dashboard's files ----------------------------------------------------------- */

static char dash_dir[64];

static void write_text(const char *dir, const char *name, const char *text)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    ASSERT_TRUE(f != NULL);
    fputs(text, f);
    fclose(f);
}

static void test_dashboard(void)
{
    static const char *const good[] = {"index.html", "dashboard.js", "a-b_c.1.css", "img/x.png"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        ASSERT_TRUE(ms_dashboard_name_ok(good[i]));
    static const char *const bad[] = {"",       "..",         "../x.js", "a/../x.js",  "/etc/x.js",
                                      ".env",   "a/.git.css", "a//b.js", "a/",         "%2e%2e.js",
                                      "a b.js", "a\\b.js",    "x.js?",   "\xc3\xa9.js"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ASSERT_TRUE(!ms_dashboard_name_ok(bad[i]));
    char longname[200];
    memset(longname, 'a', sizeof longname - 4);
    memcpy(longname + sizeof longname - 4, ".js", 4);
    ASSERT_TRUE(!ms_dashboard_name_ok(longname));
    ASSERT_STR_EQ(ms_dashboard_content_type("index.html"), "text/html; charset=utf-8");
    ASSERT_STR_EQ(ms_dashboard_content_type("x/dashboard.js"), "text/javascript; charset=utf-8");
    ASSERT_STR_EQ(ms_dashboard_content_type("dashboard.css"), "text/css; charset=utf-8");
    ASSERT_STR_EQ(ms_dashboard_content_type("i.svg"), "image/svg+xml");
    ASSERT_TRUE(ms_dashboard_content_type("config.yaml") == NULL);
    ASSERT_TRUE(ms_dashboard_content_type("index") == NULL);
    ASSERT_TRUE(ms_dashboard_content_type("app.lua") == NULL);

    reply_t r;
    char h[256];
    /* served without the token, which the rest still needs */
    get(token_port, "/dashboard/", &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_STR_EQ(r.body, "<p>dash</p>");
    ASSERT_STR_EQ(reply_header(&r, "Content-Type", h, sizeof h), "text/html; charset=utf-8");
    ASSERT_STR_EQ(reply_header(&r, "Cache-Control", h, sizeof h), "no-cache");
    reply_free(&r);
    get(token_port, "/dashboard/app.js", &r);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_STR_EQ(reply_header(&r, "Content-Type", h, sizeof h), "text/javascript; charset=utf-8");
    reply_free(&r);
    get(token_port, "/dashboard", &r);
    ASSERT_INT_EQ(r.status, 308);
    ASSERT_STR_EQ(reply_header(&r, "Location", h, sizeof h), "/dashboard/");
    reply_free(&r);
    get(token_port, "/dashboard/secret.yaml", &r); /* present, but not a type we serve */
    check_json_error(&r, 404);
    reply_free(&r);
    get(token_port, "/dashboard/gone.css", &r);
    check_json_error(&r, 404);
    reply_free(&r);
    get(token_port, "/dashboard/../secret.yaml", &r);
    check_json_error(&r, 400);
    reply_free(&r);
    get(token_port, "/dashboard/sub", &r); /* a folder, whatever its name says */
    check_json_error(&r, 404);
    reply_free(&r);
    request(token_port, "POST", "/dashboard/", JSON_TYPE, "{}", &r);
    ASSERT_INT_EQ(r.status, 405);
    ASSERT_STR_EQ(reply_header(&r, "Allow", h, sizeof h), "GET, HEAD");
    reply_free(&r);
    get(token_port, "/dashboardx", &r);
    ASSERT_INT_EQ(r.status, 401);
    reply_free(&r);
}

static void *driver(void *arg)
{
    (void)arg;
    test_dashboard();
    test_cross_site();
    test_allowed_hosts();
    test_auth();
    test_applications();
    test_scale();
    test_reload_metrics_misc();
    test_cli();
    uv_async_send(&done_async);
    return NULL;
}

/* ---- main ---------------------------------------------------------------------------------- */

static void on_done(uv_async_t *h)
{
    (void)h;
    ms_admin_close(open_admin);
    ms_admin_close(token_admin);
    ms_admin_close(null_admin);
    ms_admin_close(hosts_admin);
    ms_admin_close(any_admin);
    uv_close((uv_handle_t *)&done_async, NULL);
    uv_close((uv_handle_t *)&watchdog, NULL);
}

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    watchdog_fired = 1;
    fprintf(stderr, "watchdog fired: the driver thread did not finish\n");
    exit(1);
}

static void test_start_rules(void)
{
    ms_admin_t *a = NULL;
    char *err = NULL;
    const char *exposed[] = {"0.0.0.0", "::", "10.1.2.3", "192.168.0.1"};
    for (size_t i = 0; i < sizeof exposed / sizeof exposed[0]; i++) {
        ASSERT_INT_EQ(ms_admin_start(loop, exposed[i], 0, NULL, &callbacks, NULL, &a, &err), -1);
        ASSERT_TRUE(a == NULL);
        ASSERT_CONTAINS(err, "token");
        free(err);
        err = NULL;
        /* An empty token is no token. */
        ASSERT_INT_EQ(ms_admin_start(loop, exposed[i], 0, "", &callbacks, NULL, &a, &err), -1);
        free(err);
        err = NULL;
    }
    const char *loopback[] = {"127.0.0.1", "127.5.6.7", "localhost", "::1"};
    for (size_t i = 0; i < sizeof loopback / sizeof loopback[0]; i++) {
        int rc = ms_admin_start(loop, loopback[i], 0, NULL, &callbacks, NULL, &a, &err);
        /* ::1 may be missing in a container without IPv6: only the token rule matters here. */
        if (rc != 0) {
            ASSERT_TRUE(err && !strstr(err, "token"));
            free(err);
            err = NULL;
            continue;
        }
        ASSERT_TRUE(ms_admin_port(a) > 0);
        ms_admin_close(a);
    }
    ASSERT_INT_EQ(ms_admin_start(loop, "0.0.0.0", 0, TOKEN, &callbacks, NULL, &a, &err), 0);
    ms_admin_close(a);
    /* A port in use is reported, not crashed on. */
    ASSERT_INT_EQ(ms_admin_start(loop, "127.0.0.1", 0, NULL, &callbacks, NULL, &a, &err), 0);
    ms_admin_t *b = NULL;
    ASSERT_INT_EQ(
        ms_admin_start(loop, "127.0.0.1", ms_admin_port(a), NULL, &callbacks, NULL, &b, &err), -1);
    ASSERT_CONTAINS(err, "cannot listen");
    free(err);
    ms_admin_close(a);
}

int main(void)
{
    uv_loop_init(loop);
    /* The dashboard's folder: read on every request, so set before the driver starts. */
    snprintf(dash_dir, sizeof dash_dir, "/tmp/ms-test-dash-XXXXXX");
    ASSERT_TRUE(mkdtemp(dash_dir) != NULL);
    write_text(dash_dir, "index.html", "<p>dash</p>");
    write_text(dash_dir, "app.js", "1;");
    write_text(dash_dir, "secret.yaml", "token: x");
    char sub[128];
    snprintf(sub, sizeof sub, "%s/sub", dash_dir);
    ASSERT_INT_EQ(mkdir(sub, 0700), 0);
    setenv("MOONSERVE_DASHBOARD_DIR", dash_dir, 1);
    test_start_rules();
    char *err = NULL;
    ASSERT_INT_EQ(ms_admin_start(loop, "127.0.0.1", 0, NULL, &callbacks, NULL, &open_admin, &err),
                  0);
    ASSERT_INT_EQ(ms_admin_start(loop, "127.0.0.1", 0, TOKEN, &callbacks, NULL, &token_admin, &err),
                  0);
    ASSERT_INT_EQ(ms_admin_start(loop, "127.0.0.1", 0, NULL, NULL, NULL, &null_admin, &err), 0);
    if (!open_admin || !token_admin || !null_admin) {
        fprintf(stderr, "cannot start admin listeners: %s\n", err ? err : "?");
        return 1;
    }
    open_port = ms_admin_port(open_admin);
    token_port = ms_admin_port(token_admin);
    null_port = ms_admin_port(null_admin);
    ASSERT_INT_EQ(ms_admin_start(loop, "127.0.0.1", 0, NULL, &callbacks, NULL, &hosts_admin, &err),
                  0);
    ASSERT_INT_EQ(ms_admin_start(loop, "127.0.0.1", 0, NULL, &callbacks, NULL, &any_admin, &err),
                  0);
    char *hosts[] = {"serve.internal", "Proxy.Example:9000"}, *any[] = {"*"};
    ms_admin_allow_hosts(hosts_admin, hosts, 2);
    ms_admin_allow_hosts(any_admin, any, 1);
    hosts_port = ms_admin_port(hosts_admin);
    any_port = ms_admin_port(any_admin);
    uv_async_init(loop, &done_async, on_done);
    uv_timer_init(loop, &watchdog);
    uv_timer_start(&watchdog, on_watchdog, 30000, 0);
    pthread_t th;
    pthread_create(&th, NULL, driver, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    pthread_join(th, NULL);
    ASSERT_INT_EQ(uv_loop_close(loop), 0);
    ASSERT_TRUE(!watchdog_fired);
    free(stub.text);
    static const char *const files[] = {"index.html", "app.js", "secret.yaml", "sub"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char path[128];
        snprintf(path, sizeof path, "%s/%s", dash_dir, files[i]);
        remove(path);
    }
    rmdir(dash_dir);
    return TEST_DONE();
}
