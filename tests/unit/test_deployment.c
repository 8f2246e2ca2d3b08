/*
 * Unit tests of a deployment's queue and admission (engine/deployment), in process: an
 * ms_http_server whose on_request submits to the deployment and whose on_abort aborts, and
 * replicas that are small shell scripts written to a temp dir — one that never becomes ready
 * (`exec sleep 30`, so requests stay queued) and one whose constructor fails (reports
 * {"op":"failed"} on fd 3 and exits 1). Covers backpressure (max_queued_requests -> 503), the
 * request timeout on a queued request (408), a client that disconnects while queued leaving
 * the queue, queued requests answered 503 on shutdown, and a deployment whose replicas keep
 * failing to start (after 3 failures the queue and new requests get 503 "failed to start").
 * Replicas that do become ready: a shell script that reports ready and sleeps (the running count
 * follows a scale from 40 to 5 and back), and a small Python replica that answers every request
 * with its replica id (a router that always fails still gets requests served, by the engine's
 * own least-loaded choice, which takes equally idle replicas in turn). A target of 60 starts 8
 * replicas at once and the rest over the next loop turns.
 * Each case ends with ms_deployment_shutdown + ms_deployment_free and every handle closed;
 * uv_loop_close must succeed, and a watchdog timer bounds the run.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "http/http.h"
#include "deployment/deployment.h"
#include "test.h"

static uv_loop_t loop_storage;
static uv_loop_t *loop = &loop_storage;
static uv_timer_t watchdog;
static int watchdog_fired;
static char tmpdir[] = "/tmp/ms_test_router_XXXXXX";
static char run_dir[4200];
static char never_ready_exe[4200];
static char failing_exe[4200];
static char ready_exe[4200];
static char serving_exe[4200];
static char failing_router[4200];

/* ---- waiting -------------------------------------------------------------------------------- */

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    watchdog_fired = 1;
    fprintf(stderr, "watchdog: test did not finish within 10 s\n");
    ASSERT_TRUE(!"watchdog fired");
}

static int wait_for(int (*pred)(void *), void *arg)
{
    while (!pred(arg)) {
        if (watchdog_fired)
            return 0;
        uv_run(loop, UV_RUN_ONCE);
    }
    return 1;
}

static int pred_flag(void *arg)
{
    return *(int *)arg != 0;
}

typedef struct queued_wait {
    ms_deployment_t *d;
    size_t n;
} queued_wait_t;

static int pred_queued(void *arg)
{
    queued_wait_t *w = arg;
    return ms_deployment_queued(w->d) == w->n;
}

static int wait_queued(ms_deployment_t *d, size_t n)
{
    queued_wait_t w = {d, n};
    return wait_for(pred_queued, &w);
}

/* ---- raw clients ---------------------------------------------------------------------------- */

typedef struct raw {
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    uv_write_t write_req;
    char *out;
    ms_buf_t in;
    int eof;
    uint64_t started_ms, answered_ms;
} raw_t;

static void raw_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    raw_t *r = h->data;
    (void)suggested;
    ms_buf_reserve(&r->in, 65536);
    *buf = uv_buf_init(r->in.data + r->in.len, (unsigned)(r->in.cap - r->in.len - 1));
}

/* Complete when the head and Content-Length bytes of body are in. */
static int raw_complete(const raw_t *r)
{
    if (!r->in.data)
        return 0;
    const char *hend = strstr(r->in.data, "\r\n\r\n");
    if (!hend)
        return 0;
    const char *cl = strcasestr(r->in.data, "\r\nContent-Length:");
    long n = cl && cl < hend ? strtol(cl + 17, NULL, 10) : 0;
    return (long)(r->in.len - (size_t)(hend + 4 - r->in.data)) >= n;
}

static void raw_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    raw_t *r = s->data;
    (void)buf;
    if (nread < 0) {
        r->eof = 1;
        uv_read_stop(s);
        return;
    }
    r->in.len += (size_t)nread;
    r->in.data[r->in.len] = '\0';
    if (!r->answered_ms && raw_complete(r))
        r->answered_ms = ms_now_ms();
}

static void raw_connected(uv_connect_t *req, int status)
{
    raw_t *r = req->handle->data;
    if (status < 0) {
        r->eof = 1;
        return;
    }
    uv_read_start((uv_stream_t *)&r->tcp, raw_alloc, raw_read);
}

static void raw_written(uv_write_t *req, int status)
{
    (void)req;
    (void)status;
}

/* Connects to 127.0.0.1:port and sends one GET. */
static raw_t *raw_get(int port, const char *path)
{
    raw_t *r = calloc(1, sizeof *r);
    r->started_ms = ms_now_ms();
    uv_tcp_init(loop, &r->tcp);
    r->tcp.data = r;
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", port, &addr);
    ASSERT_INT_EQ(uv_tcp_connect(&r->connect_req, &r->tcp, (struct sockaddr *)&addr, raw_connected),
                  0);
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path);
    r->out = b.data;
    uv_buf_t ub = uv_buf_init(r->out, (unsigned)b.len);
    ASSERT_INT_EQ(uv_write(&r->write_req, (uv_stream_t *)&r->tcp, &ub, 1, raw_written), 0);
    return r;
}

static int pred_answered(void *arg)
{
    raw_t *r = arg;
    return r->eof || raw_complete(r);
}

static int wait_answer(raw_t *r)
{
    return wait_for(pred_answered, r);
}

static int status_of(const raw_t *r)
{
    int status = 0;
    if (r->in.data)
        sscanf(r->in.data, "HTTP/1.%*d %d", &status);
    return status;
}

static const char *body_of(const raw_t *r)
{
    const char *hend = r->in.data ? strstr(r->in.data, "\r\n\r\n") : NULL;
    return hend ? hend + 4 : "";
}

static void raw_freed(uv_handle_t *h)
{
    raw_t *r = h->data;
    ms_buf_free(&r->in);
    free(r->out);
    free(r);
}

static void raw_close(raw_t *r)
{
    uv_close((uv_handle_t *)&r->tcp, raw_freed);
}

/* ---- a deployment behind a server ----------------------------------------------------------- */

static void on_request(ms_http_request_t *req, void *data)
{
    ms_deployment_submit(data, req);
}

static void on_abort(ms_http_request_t *req, void *data)
{
    (void)data;
    ms_deployment_abort(req);
}

typedef struct fixture {
    ms_deployment_t *dep;
    ms_http_server_t *srv;
    int port;
    int shutdown_done;
} fixture_t;

typedef struct fixture_opts {
    int num_replicas;        /* 0 = 1 */
    const char *router_file; /* NULL = the built-in router */
} fixture_opts_t;

static int fixture_start_with(fixture_t *f, const char *name, const char *exe, int max_queued,
                              double request_timeout_s, const fixture_opts_t *o)
{
    memset(f, 0, sizeof *f);
    ms_deployment_settings_t s = {
        .app_name = "app",
        .name = name,
        .num_replicas = o->num_replicas ? o->num_replicas : 1,
        .router_file = o->router_file,
        .max_ongoing_requests = 4,
        .max_queued_requests = max_queued,
        .request_timeout_s = request_timeout_s,
        .graceful_shutdown_timeout_s = 0.5,
        .spec = {.exe_path = exe,
                 .run_dir = run_dir,
                 .controller_socket = "/nonexistent/controller.sock",
                 .import_path = "/nonexistent/app.lua:app",
                 .args_json = "[]",
                 .user_config_json = "null",
                 .graceful_shutdown_wait_loop_s = 0.1},
    };
    char *err = NULL;
    f->dep = ms_deployment_new(loop, &s, &err);
    ASSERT_TRUE(f->dep != NULL);
    if (!f->dep) {
        fprintf(stderr, "ms_deployment_new: %s\n", err ? err : "?");
        free(err);
        return -1;
    }
    ASSERT_STR_EQ(ms_deployment_name(f->dep), name);
    ms_http_server_config_t cfg = {
        .limits = {8192, 1 << 20, 5.0, 5.0},
        .on_request = on_request,
        .on_abort = on_abort,
        .data = f->dep,
    };
    ASSERT_INT_EQ(ms_http_server_listen_tcp(loop, "127.0.0.1", 0, &cfg, &f->srv), 0);
    f->port = ms_http_server_port(f->srv);
    return 0;
}

static int fixture_start(fixture_t *f, const char *name, const char *exe, int max_queued,
                         double request_timeout_s)
{
    fixture_opts_t o = {0};
    return fixture_start_with(f, name, exe, max_queued, request_timeout_s, &o);
}

typedef struct count_wait {
    ms_deployment_t *d;
    size_t running, listed;
} count_wait_t;

static int pred_counts(void *arg)
{
    count_wait_t *w = arg;
    return ms_deployment_running_replicas(w->d) == w->running &&
           ms_deployment_replicas(w->d, NULL, 0) == w->listed;
}

/* Until exactly `n` replicas exist and all of them run. */
static int wait_running(ms_deployment_t *d, size_t n)
{
    count_wait_t w = {d, n, n};
    return wait_for(pred_counts, &w);
}

static void on_shutdown_done(void *data)
{
    ((fixture_t *)data)->shutdown_done = 1;
}

static void fixture_stop(fixture_t *f)
{
    ms_deployment_shutdown(f->dep, on_shutdown_done, f);
    ASSERT_TRUE(wait_for(pred_flag, &f->shutdown_done));
    ASSERT_INT_EQ(ms_deployment_queued(f->dep), 0);
    ms_http_server_close(f->srv);
    ms_deployment_free(f->dep);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_backpressure_and_disconnect(void)
{
    fixture_t f;
    if (fixture_start(&f, "Slow", never_ready_exe, 1, 0) != 0)
        return;
    ASSERT_INT_EQ(ms_deployment_running_replicas(f.dep), 0);

    raw_t *first = raw_get(f.port, "/first");
    ASSERT_TRUE(wait_queued(f.dep, 1));
    ASSERT_INT_EQ(ms_http_server_inflight(f.srv), 1);

    /* The queue is full: the second is dropped at once. */
    raw_t *second = raw_get(f.port, "/second");
    ASSERT_TRUE(wait_answer(second));
    ASSERT_INT_EQ(status_of(second), 503);
    ASSERT_CONTAINS(body_of(second), "backpressure");
    ASSERT_CONTAINS(body_of(second), "max_queued_requests=1");
    ASSERT_CONTAINS(body_of(second), "\"request_id\"");
    ASSERT_TRUE(second->answered_ms - second->started_ms < 1000);
    ASSERT_INT_EQ(ms_deployment_queued(f.dep), 1);
    ASSERT_TRUE(!first->eof && first->in.len == 0);

    /* The queued client goes away: it leaves the queue. */
    raw_close(first);
    ASSERT_TRUE(wait_queued(f.dep, 0));
    ASSERT_INT_EQ(ms_http_server_inflight(f.srv), 0);

    /* There is room again; a third request is queued, not dropped. */
    raw_t *third = raw_get(f.port, "/third");
    ASSERT_TRUE(wait_queued(f.dep, 1));
    ASSERT_INT_EQ(third->in.len, 0);

    /* Shutdown answers what is still queued. */
    fixture_stop(&f);
    ASSERT_TRUE(wait_answer(third));
    ASSERT_INT_EQ(status_of(third), 503);
    ASSERT_CONTAINS(body_of(third), "shutting down");
    raw_close(second);
    raw_close(third);
}

static void test_request_timeout(void)
{
    fixture_t f;
    if (fixture_start(&f, "Timeout", never_ready_exe, -1, 0.3) != 0)
        return;
    raw_t *a = raw_get(f.port, "/a");
    raw_t *b = raw_get(f.port, "/b");
    ASSERT_TRUE(wait_queued(f.dep, 2));
    ASSERT_TRUE(wait_answer(a));
    ASSERT_TRUE(wait_answer(b));
    ASSERT_INT_EQ(status_of(a), 408);
    ASSERT_CONTAINS(body_of(a), "timed out");
    ASSERT_CONTAINS(body_of(a), "\"request_id\"");
    ASSERT_INT_EQ(status_of(b), 408);
    uint64_t waited = a->answered_ms - a->started_ms;
    ASSERT_TRUE(waited >= 250);
    ASSERT_TRUE(waited < 3000);
    ASSERT_INT_EQ(ms_deployment_queued(f.dep), 0);
    ASSERT_INT_EQ(ms_http_server_inflight(f.srv), 0);

    /* A disconnect before the timeout, then the timer must not touch the gone request. */
    raw_t *c = raw_get(f.port, "/c");
    ASSERT_TRUE(wait_queued(f.dep, 1));
    raw_close(c);
    ASSERT_TRUE(wait_queued(f.dep, 0));
    uv_sleep(400);
    uv_run(loop, UV_RUN_NOWAIT);
    ASSERT_INT_EQ(ms_deployment_queued(f.dep), 0);

    fixture_stop(&f);
    raw_close(a);
    raw_close(b);
}

static void test_failed_to_start(void)
{
    fixture_t f;
    if (fixture_start(&f, "Broken", failing_exe, -1, 0) != 0)
        return;
    /* Queued while the constructor keeps failing; answered once the deployment gives up. */
    raw_t *a = raw_get(f.port, "/a");
    ASSERT_TRUE(wait_answer(a));
    ASSERT_INT_EQ(status_of(a), 503);
    ASSERT_CONTAINS(body_of(a), "failed to start");
    ASSERT_CONTAINS(body_of(a), "boom");
    ASSERT_CONTAINS(body_of(a), "Broken");
    /* Three failures with 0.1 s and 0.2 s backoffs in between. */
    ASSERT_TRUE(a->answered_ms - a->started_ms >= 250);
    ASSERT_INT_EQ(ms_deployment_queued(f.dep), 0);
    ASSERT_INT_EQ(ms_deployment_running_replicas(f.dep), 0);

    /* New requests are refused at once. */
    raw_t *b = raw_get(f.port, "/b");
    ASSERT_TRUE(wait_answer(b));
    ASSERT_INT_EQ(status_of(b), 503);
    ASSERT_CONTAINS(body_of(b), "failed to start: boom");
    ASSERT_TRUE(b->answered_ms - b->started_ms < 1000);

    fixture_stop(&f);
    raw_close(a);
    raw_close(b);
}

/* The running count is kept as replicas start, stop and exit, not counted per request. */
static void test_running_count_follows_scaling(void)
{
    fixture_t f;
    fixture_opts_t o = {.num_replicas = 40};
    if (fixture_start_with(&f, "Many", ready_exe, -1, 0, &o) != 0)
        return;
    ASSERT_TRUE(wait_running(f.dep, 40));
    ms_deployment_set_target(f.dep, 5);
    /* The surplus leaves RUNNING at once (it drains), and is listed until its process exits. */
    ASSERT_TRUE(ms_deployment_running_replicas(f.dep) == 5);
    ASSERT_TRUE(wait_running(f.dep, 5));
    ms_deployment_set_target(f.dep, 40);
    ASSERT_TRUE(wait_running(f.dep, 40));
    fixture_stop(&f);
}

/* A large target starts its replicas a few per loop turn (8), not all in the call that set it,
 * so the loop serves its other work in between; the rest follow on the next turns. */
static void test_spawns_in_steps(void)
{
    fixture_t f;
    fixture_opts_t o = {.num_replicas = 60};
    if (fixture_start_with(&f, "Stepped", ready_exe, -1, 0, &o) != 0)
        return;
    ASSERT_INT_EQ(ms_deployment_replicas(f.dep, NULL, 0), 8);
    /* Turns that only read replica output add none; the first that starts more adds at most a
     * step per loop time it sees (three in a UV_RUN_ONCE: its start, after the poll, and the
     * final timer pass), however many replicas report ready in it, never the whole rest. */
    size_t n = 8;
    for (int turns = 0; n == 8 && turns < 10000; turns++) {
        uv_run(loop, UV_RUN_ONCE);
        n = ms_deployment_replicas(f.dep, NULL, 0);
    }
    ASSERT_TRUE(n > 8 && n <= 32);
    ASSERT_TRUE(wait_running(f.dep, 60));
    fixture_stop(&f);
}

/* The router fails on every request: the engine's own choice (least loaded, ties in turn) still
 * serves every request, from every replica. */
static void test_fallback_when_the_router_fails(void)
{
    fixture_t f;
    fixture_opts_t o = {.num_replicas = 3, .router_file = failing_router};
    if (fixture_start_with(&f, "Fallback", serving_exe, -1, 0, &o) != 0)
        return;
    ASSERT_TRUE(wait_running(f.dep, 3));
    int seen[3] = {0};
    char first[3][32] = {{0}};
    for (int i = 0; i < 6; i++) {
        raw_t *r = raw_get(f.port, "/x");
        ASSERT_TRUE(wait_answer(r));
        ASSERT_INT_EQ(status_of(r), 200);
        const char *id = body_of(r);
        for (int k = 0; k < 3; k++) {
            if (!first[k][0])
                snprintf(first[k], sizeof first[k], "%s", id);
            if (strcmp(first[k], id) == 0) {
                seen[k]++;
                break;
            }
        }
        raw_close(r);
    }
    /* Sequential requests find every replica idle: each is taken in turn, twice. */
    ASSERT_INT_EQ(seen[0], 2);
    ASSERT_INT_EQ(seen[1], 2);
    ASSERT_INT_EQ(seen[2], 2);
    fixture_stop(&f);
}

/* A replica process that speaks the data link (docs/replica-protocol.md) on its --socket: every
 * REQUEST frame is answered by a RESPONSE frame (status 200, no headers) carrying its
 * --replica-id. */
static const char SERVING_REPLICA[] =
    "#!/usr/bin/env python3\n"
    "import os, socket, struct, sys, threading\n"
    "arg = lambda k: sys.argv[sys.argv.index(k) + 1]\n"
    "body = arg('--replica-id').encode()\n"
    "srv = socket.socket(socket.AF_UNIX)\n"
    "srv.bind(arg('--socket'))\n"
    "srv.listen(16)\n"
    "os.write(3, b'{\"op\":\"ready\"}\\n')\n"
    "def serve(c):\n"
    "    buf = b''\n"
    "    while True:\n"
    "        while len(buf) < 12 or len(buf) < 12 + struct.unpack_from('<I', buf)[0]:\n"
    "            more = c.recv(65536)\n"
    "            if not more:\n"
    "                return\n"
    "            buf += more\n"
    "        n, stream, kind = struct.unpack_from('<IIB', buf)\n"
    "        buf = buf[12 + n:]\n"
    "        if kind == 1:\n"
    "            payload = struct.pack('<II', 200, 0) + body\n"
    "            c.sendall(struct.pack('<IIBBH', len(payload), stream, 2, 0, 0) + payload)\n"
    "while True:\n"
    "    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()\n";

static char *write_script(char *path, size_t cap, const char *name, const char *text)
{
    snprintf(path, cap, "%s/%s", tmpdir, name);
    FILE *fp = fopen(path, "w");
    ASSERT_TRUE(fp != NULL);
    if (fp) {
        fputs(text, fp);
        fclose(fp);
    }
    ASSERT_INT_EQ(chmod(path, 0755), 0);
    return path;
}

static void remove_tree(void)
{
    char cmd[4400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
}

int main(void)
{
    ms_log_min_level = MS_LOG_ERROR + 1; /* the failing replica logs errors on purpose */
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(run_dir, sizeof run_dir, "%s/run", tmpdir);
    ASSERT_INT_EQ(mkdir(run_dir, 0700), 0);
    write_script(never_ready_exe, sizeof never_ready_exe, "never_ready.sh",
                 "#!/bin/sh\nexec sleep 30\n");
    write_script(failing_exe, sizeof failing_exe, "failing.sh",
                 "#!/bin/sh\necho '{\"op\":\"failed\",\"error\":\"boom\"}' >&3\nexit 1\n");
    write_script(ready_exe, sizeof ready_exe, "ready.sh",
                 "#!/bin/sh\necho '{\"op\":\"ready\"}' >&3\nexec sleep 30\n");
    write_script(serving_exe, sizeof serving_exe, "serving.py", SERVING_REPLICA);
    write_script(failing_router, sizeof failing_router, "failing_router.lua",
                 "return { choose_replicas = function() error('no choice') end }\n");

    ASSERT_INT_EQ(uv_loop_init(loop), 0);
    uv_timer_init(loop, &watchdog);
    uv_timer_start(&watchdog, on_watchdog, 10000, 0);

    test_backpressure_and_disconnect();
    test_request_timeout();
    test_failed_to_start();
    test_running_count_follows_scaling();
    test_spawns_in_steps();
    test_fallback_when_the_router_fails();

    uv_close((uv_handle_t *)&watchdog, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    ASSERT_INT_EQ(uv_loop_close(loop), 0);
    remove_tree();
    return TEST_DONE();
}
