/*
 * Unit tests of engine/link, both ends on one loop over a real Unix socket: many requests
 * arriving in one read, requests and responses passed intact (binary bodies, headers, the
 * query split), flow control of streamed bodies (the window holds a sender back until credit
 * comes), bodies passed by reference and released, cancellation answered before the slot frees
 * (also in the middle of a large request body, sent in pieces),
 * a link that breaks (requests never written may go elsewhere, written ones fail), a connect
 * that fails, and garbage from a peer closing only that connection.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "link/link.h"
#include "test.h"

static uv_loop_t *loop;
static char sock_path[108];
static uint64_t turns; /* loop iterations, counted by a check handle */

static void on_turn(uv_check_t *h)
{
    (void)h;
    turns++;
}

/* Runs the loop until *flag is set or 5 s of loop time passed. */
static void run_until(const int *flag)
{
    uint64_t deadline = uv_now(loop) + 5000;
    while (!*flag && uv_now(loop) < deadline)
        uv_run(loop, UV_RUN_ONCE);
    ASSERT_TRUE(*flag);
}

/* ---- a scriptable replica side ---------------------------------------------------------------
 */

enum { ANSWER_SMALL, ANSWER_BIG_BODY, ANSWER_STREAM, ANSWER_HOLD };

static struct server_state {
    int mode;
    int requests, cancels, releases;
    uint64_t first_turn, last_turn;
    ms_link_stream_t *held;
    char last_method[16], last_path[64], last_query[64], last_header[64];
    size_t last_body_len;
    int body_ok;
} S;

static char *big; /* 1 MiB pattern */
#define BIG_LEN (1024 * 1024)

static void on_released_body(void *ctx)
{
    (void)ctx;
    S.releases++;
}

static void srv_request(ms_link_stream_t *s, void *data)
{
    (void)data;
    ms_http_request_t *r = &s->req;
    if (S.requests++ == 0)
        S.first_turn = turns;
    S.last_turn = turns;
    snprintf(S.last_method, sizeof S.last_method, "%s", r->method);
    snprintf(S.last_path, sizeof S.last_path, "%s", r->path);
    snprintf(S.last_query, sizeof S.last_query, "%s", r->query);
    S.last_header[0] = '\0';
    for (size_t i = 0; i < r->n_headers; i++)
        if (r->headers[i].name_len == 3 && memcmp(r->headers[i].name, "X-K", 3) == 0)
            snprintf(S.last_header, sizeof S.last_header, "%.*s", (int)r->headers[i].value_len,
                     r->headers[i].value);
    S.last_body_len = r->body_len;
    S.body_ok = r->body[r->body_len] == '\0' &&
                (r->body_len != BIG_LEN || memcmp(r->body, big, BIG_LEN) == 0);
    static const ms_http_header_t h = {"X-Replica", 9, "1", 1};
    switch (S.mode) {
    case ANSWER_SMALL:
        ms_link_respond(s, 201, &h, 1, r->request_id, strlen(r->request_id), NULL, NULL);
        break;
    case ANSWER_BIG_BODY:
        ASSERT_INT_EQ(ms_link_respond(s, 200, &h, 1, big, BIG_LEN, on_released_body, NULL), 0);
        break;
    case ANSWER_STREAM:
        ms_link_start(s, 200, &h, 1);
        ASSERT_INT_EQ(ms_link_write(s, big, BIG_LEN, on_released_body, NULL), 0);
        S.held = s;
        break;
    case ANSWER_HOLD:
        S.held = s;
        break;
    }
}

static void srv_cancel(ms_link_stream_t *s, void *data)
{
    (void)data;
    S.cancels++;
    if (S.held == s)
        S.held = NULL;
}

/* ---- the controller side ---------------------------------------------------------------------
 */

typedef struct result {
    int done, status, errors, never_sent, released, ended;
    ms_link_error_t err;
    size_t body_len;
    char body[128];
    char header[32];
    int body_ok;
} result_t;

static void cl_response(void *data, int status, const ms_http_header_t *h, size_t n,
                        const char *body, size_t len)
{
    result_t *r = data;
    r->done = 1;
    r->status = status;
    r->body_len = len;
    snprintf(r->body, sizeof r->body, "%.*s", (int)len, body);
    if (n == 1)
        snprintf(r->header, sizeof r->header, "%.*s=%.*s", (int)h[0].name_len, h[0].name,
                 (int)h[0].value_len, h[0].value);
}

static ms_link_t *credit_link;
static int auto_credit;
static uint32_t credit_stream;

static void cl_head(void *data, int status, const ms_http_header_t *h, size_t n)
{
    result_t *r = data;
    (void)h;
    (void)n;
    r->status = status;
    r->body_ok = 1;
}

static void cl_data(void *data, const char *p, size_t n)
{
    result_t *r = data;
    if (memcmp(p, big + r->body_len, n) != 0)
        r->body_ok = 0;
    r->body_len += n;
    if (auto_credit)
        ms_link_credit(credit_link, credit_stream, n);
}

static void cl_end(void *data)
{
    result_t *r = data;
    r->done = r->ended = 1;
}

static void cl_error(void *data, ms_link_error_t err, int never_sent)
{
    result_t *r = data;
    r->done = 1;
    r->errors++;
    r->err = err;
    r->never_sent = never_sent;
}

static void cl_released(void *data)
{
    result_t *r = data;
    r->done = r->released = 1;
}

static const ms_link_callbacks_t cbs = {cl_response, cl_head,  cl_data,
                                        cl_end,      cl_error, cl_released};

static int link_down_count;
static void on_down(void *owner, ms_link_error_t err)
{
    (void)owner;
    (void)err;
    link_down_count++;
}
static const ms_link_events_t events = {on_down};

static ms_link_server_t *start_server(int mode)
{
    memset(&S, 0, sizeof S);
    S.mode = mode;
    ms_link_server_config_t cfg = {.on_request = srv_request, .on_cancel = srv_cancel};
    ms_link_server_t *srv = NULL;
    ASSERT_INT_EQ(ms_link_listen_unix(loop, sock_path, &cfg, &srv), 0);
    return srv;
}

static ms_link_request_t request(const char *target, const char *rid, const char *body,
                                 size_t body_len)
{
    static const ms_http_header_t h[] = {{"X-K", 3, "v1", 2}, {"Host", 4, "h", 1}};
    return (ms_link_request_t){"POST", target, strlen(target), rid, h, 2, body, body_len};
}

/* 100 requests queued in one turn reach the replica in one turn (one write, one read) and
 * each answer finds its own caller. */
static void test_many_requests_one_turn(void)
{
    ms_link_server_t *srv = start_server(ANSWER_SMALL);
    ms_link_t *l = ms_link_connect(loop, sock_path, &events, NULL);
    static result_t res[100];
    memset(res, 0, sizeof res);
    char rids[100][16];
    for (int i = 0; i < 100; i++) {
        snprintf(rids[i], sizeof rids[i], "rid-%d", i);
        ms_link_request_t rq = request("/a/b?x=1&y=2", rids[i], "\0bin\xff", 5);
        ASSERT_TRUE(ms_link_send(l, &rq, &cbs, &res[i]) != 0);
    }
    ASSERT_INT_EQ(ms_link_open_streams(l), 100);
    run_until(&res[99].done);
    ASSERT_INT_EQ(S.requests, 100);
    ASSERT_TRUE(S.first_turn == S.last_turn);
    int right = 0;
    for (int i = 0; i < 100; i++)
        right += res[i].status == 201 && strcmp(res[i].body, rids[i]) == 0;
    ASSERT_INT_EQ(right, 100);
    ASSERT_STR_EQ(res[0].header, "X-Replica=1");
    ASSERT_STR_EQ(S.last_method, "POST");
    ASSERT_STR_EQ(S.last_path, "/a/b");
    ASSERT_STR_EQ(S.last_query, "x=1&y=2");
    ASSERT_STR_EQ(S.last_header, "v1");
    ASSERT_INT_EQ(S.last_body_len, 5);
    ASSERT_TRUE(S.body_ok);
    ASSERT_INT_EQ(ms_link_open_streams(l), 0);
    ms_link_close(l);
    ms_link_server_close(srv);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* A 1 MiB request body arrives whole; a 1 MiB response body passed by reference is held back
 * by the window until credit comes, then released once queued. */
static void test_big_bodies_and_window(int mode)
{
    ms_link_server_t *srv = start_server(mode);
    ms_link_t *l = ms_link_connect(loop, sock_path, &events, NULL);
    result_t res = {0};
    ms_link_request_t rq = request("/big", "rid-big", big, BIG_LEN);
    uint32_t id = ms_link_send(l, &rq, &cbs, &res);
    ASSERT_TRUE(id != 0);
    /* Without credit exactly one window of body arrives, however long the loop runs on. */
    uint64_t deadline = uv_now(loop) + 5000;
    while (res.body_len < MS_LINK_WINDOW && uv_now(loop) < deadline)
        uv_run(loop, UV_RUN_ONCE);
    for (int i = 0; i < 50; i++)
        uv_run(loop, UV_RUN_NOWAIT);
    ASSERT_INT_EQ(res.body_len, MS_LINK_WINDOW);
    ASSERT_INT_EQ(S.releases, 0);
    ASSERT_INT_EQ(S.last_body_len, BIG_LEN);
    ASSERT_TRUE(S.body_ok);
    /* Credit for what arrived, and from then on as it arrives: the rest follows. */
    credit_link = l;
    credit_stream = id;
    auto_credit = 1;
    ms_link_credit(l, id, res.body_len);
    if (mode == ANSWER_STREAM) {
        deadline = uv_now(loop) + 5000;
        while (S.releases == 0 && uv_now(loop) < deadline)
            uv_run(loop, UV_RUN_ONCE);
        ASSERT_INT_EQ(S.releases, 1);
        ms_link_end(S.held);
    }
    run_until(&res.ended);
    auto_credit = 0;
    ASSERT_INT_EQ(res.status, 200);
    ASSERT_INT_EQ(res.body_len, BIG_LEN);
    ASSERT_TRUE(res.body_ok);
    ASSERT_INT_EQ(S.releases, 1);
    ms_link_close(l);
    ms_link_server_close(srv);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* A cancelled stream reaches the replica's owner, and its slot is released only once the
 * replica has answered. */
static void test_cancel(void)
{
    ms_link_server_t *srv = start_server(ANSWER_HOLD);
    ms_link_t *l = ms_link_connect(loop, sock_path, &events, NULL);
    result_t res = {0};
    ms_link_request_t rq = request("/hold", "rid-hold", "", 0);
    uint32_t id = ms_link_send(l, &rq, &cbs, &res);
    int got = 0;
    uint64_t deadline = uv_now(loop) + 5000;
    while (!(got = S.requests == 1) && uv_now(loop) < deadline)
        uv_run(loop, UV_RUN_ONCE);
    ASSERT_TRUE(got);
    ms_link_cancel(l, id);
    ASSERT_INT_EQ(ms_link_open_streams(l), 1); /* still held until the replica answers */
    run_until(&res.released);
    ASSERT_INT_EQ(S.cancels, 1);
    ASSERT_INT_EQ(res.errors, 0);
    ASSERT_INT_EQ(ms_link_open_streams(l), 0);
    ms_link_close(l);
    ms_link_server_close(srv);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* A large body goes in pieces; a stream cancelled before its last piece never reaches the
 * replica's owner, and its slot is released on the replica's answer. */
static void test_cancel_during_body(void)
{
    ms_link_server_t *srv = start_server(ANSWER_SMALL);
    ms_link_t *l = ms_link_connect(loop, sock_path, &events, NULL);
    size_t n = 8 * BIG_LEN;
    char *body = malloc(n);
    memset(body, 'b', n);
    result_t res = {0}, ok = {0};
    ms_link_request_t rq = request("/up", "rid-up", body, n);
    uint32_t id = ms_link_send(l, &rq, &cbs, &res);
    uv_run(loop, UV_RUN_NOWAIT); /* some pieces go out, not all 8 MiB at once */
    ms_link_cancel(l, id);
    free(body); /* nothing refers to it after the cancel */
    ms_link_request_t rq2 = request("/after", "rid-after", "x", 1);
    ms_link_send(l, &rq2, &cbs, &ok);
    run_until(&ok.done);
    run_until(&res.released);
    ASSERT_INT_EQ(S.requests, 1); /* only the second one */
    ASSERT_STR_EQ(ok.body, "rid-after");
    ASSERT_INT_EQ(res.errors, 0);
    ms_link_close(l);
    ms_link_server_close(srv);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* The replica side goes away with a request on it: the request fails as sent; the link reports
 * itself down; a new send is refused. A connect that fails fails its requests as never sent. */
static void test_link_down(void)
{
    ms_link_server_t *srv = start_server(ANSWER_HOLD);
    link_down_count = 0;
    ms_link_t *l = ms_link_connect(loop, sock_path, &events, NULL);
    result_t res = {0};
    ms_link_request_t rq = request("/hold", "rid-1", "", 0);
    ASSERT_TRUE(ms_link_send(l, &rq, &cbs, &res) != 0);
    int got = 0;
    uint64_t deadline = uv_now(loop) + 5000;
    while (!(got = S.requests == 1) && uv_now(loop) < deadline)
        uv_run(loop, UV_RUN_ONCE);
    ASSERT_TRUE(got);
    ms_link_server_close(srv);
    run_until(&res.done);
    ASSERT_INT_EQ(res.errors, 1);
    ASSERT_INT_EQ(res.never_sent, 0);
    ASSERT_INT_EQ(link_down_count, 1);
    ASSERT_INT_EQ(S.cancels, 1);
    ASSERT_TRUE(!ms_link_is_up(l));
    ASSERT_INT_EQ(ms_link_send(l, &rq, &cbs, &res), 0);
    ms_link_close(l);

    result_t res2 = {0};
    ms_link_t *l2 = ms_link_connect(loop, "/nonexistent/dir/sock", &events, NULL);
    ASSERT_TRUE(ms_link_send(l2, &rq, &cbs, &res2) != 0);
    run_until(&res2.done);
    ASSERT_INT_EQ(res2.errors, 1);
    ASSERT_INT_EQ(res2.err, MS_LINK_ERR_CONNECT);
    ASSERT_INT_EQ(res2.never_sent, 1);
    ms_link_close(l2);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* Garbage on one connection closes it; the server keeps serving others. */
static void test_garbage_closes_one_connection(void)
{
    ms_link_server_t *srv = start_server(ANSWER_SMALL);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock_path);
    ASSERT_INT_EQ(connect(fd, (struct sockaddr *)&addr, sizeof addr), 0);
    /* A REQUEST frame whose header count runs past its payload, then bytes that are no frame. */
    static const char bad[] = "\x08\0\0\0\x01\0\0\0\x01\0\0\0"
                              "\x01\0\0\0G\xff\xff\xff";
    ASSERT_INT_EQ(write(fd, bad, sizeof bad - 1), (long)(sizeof bad - 1));
    ms_link_t *l = ms_link_connect(loop, sock_path, &events, NULL);
    result_t res = {0};
    ms_link_request_t rq = request("/", "rid-ok", "", 0);
    ms_link_send(l, &rq, &cbs, &res);
    run_until(&res.done);
    ASSERT_INT_EQ(res.status, 201);
    char buf[16];
    int closed = 0;
    uint64_t deadline = uv_now(loop) + 5000;
    while (!closed && uv_now(loop) < deadline) {
        uv_run(loop, UV_RUN_NOWAIT);
        closed = recv(fd, buf, sizeof buf, MSG_DONTWAIT) == 0;
    }
    ASSERT_TRUE(closed);
    close(fd);
    ms_link_close(l);
    ms_link_server_close(srv);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* The deadline header: digits only, case-insensitive name, the smallest of repeats. */
static void test_deadline_header(void)
{
    uint64_t ms = 7;
    ms_http_header_t none[] = {{"Host", 4, "x", 1}};
    ASSERT_INT_EQ(ms_link_deadline(none, 1, &ms), 0);
    ms_http_header_t two[] = {{"x-moonserve-timeout-ms", 22, "1500", 4},
                              {"Host", 4, "x", 1},
                              {"X-MOONSERVE-TIMEOUT-MS", 22, "250", 3}};
    ASSERT_INT_EQ(ms_link_deadline(two, 3, &ms), 1);
    ASSERT_INT_EQ((long long)ms, 250);
    ms_http_header_t zero[] = {{"X-Moonserve-Timeout-Ms", 22, "0", 1}};
    ASSERT_INT_EQ(ms_link_deadline(zero, 1, &ms), 1);
    ASSERT_INT_EQ((long long)ms, 0);
    const char *bad[] = {"", "-5", "1.5", "10s", " 10", "1234567890123"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ms_http_header_t h = {"X-Moonserve-Timeout-Ms", 22, bad[i], strlen(bad[i])};
        ASSERT_INT_EQ(ms_link_deadline(&h, 1, &ms), -1);
    }
    ms_http_header_t max = {"X-Moonserve-Timeout-Ms", 22, "999999999999", 12};
    ASSERT_INT_EQ(ms_link_deadline(&max, 1, &ms), 1);
    ASSERT_TRUE(ms == 999999999999ULL);
}

int main(void)
{
    test_deadline_header();
    loop = uv_default_loop();
    snprintf(sock_path, sizeof sock_path, "/tmp/ms_test_link_%d.sock", (int)getpid());
    uv_check_t check;
    uv_check_init(loop, &check);
    uv_check_start(&check, on_turn);
    uv_unref((uv_handle_t *)&check);
    big = malloc(BIG_LEN);
    for (size_t i = 0; i < BIG_LEN; i++)
        big[i] = (char)(i * 31 + (i >> 12));
    test_many_requests_one_turn();
    test_big_bodies_and_window(ANSWER_BIG_BODY);
    test_big_bodies_and_window(ANSWER_STREAM);
    test_cancel();
    test_cancel_during_body();
    test_link_down();
    test_garbage_closes_one_connection();
    uv_close((uv_handle_t *)&check, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    unlink(sock_path);
    free(big);
    return TEST_DONE();
}
