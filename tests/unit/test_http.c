/*
 * Unit tests of the HTTP glue (engine/http), in process: one server on 127.0.0.1 (port 0) and
 * raw TCP clients (or ms_http_client) in the same loop. Covers a simple GET (status,
 * X-Request-ID, body), a client X-Request-ID echoed (and a bad one replaced), pipelining (three
 * requests in one write answered in order, also when the first is answered later from a timer
 * and the others must wait), chunked request bodies (split reads, trailers ignored), 413 on
 * Content-Length and on a chunked body over max_body_bytes, 431 on oversized headers, 400 on
 * garbage, Expect: 100-continue, the header (slowloris) timeout, the keep-alive idle timeout,
 * on_abort when a client goes away while owed a response (and on ms_http_server_close),
 * streamed responses (chunked on HTTP/1.1 and parsed by ms_http_client, close-delimited on
 * HTTP/1.0), client error codes (a refused connect is told from a closed connection),
 * ms_http_server_inflight, ms_http_client reusing a connection only when its state is certain
 * (not after extra bytes, Connection: close, 101 or an early answer; a canned peer answers),
 * and ms_http_server_stop_accepting letting in-flight
 * requests finish before their connections close. Every handle is closed and uv_loop_close must
 * succeed; a 10 s watchdog timer bounds the run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "http/http.h"
#include "test.h"

#define HEADER_TIMEOUT_S     0.2
#define KEEP_ALIVE_TIMEOUT_S 0.5
#define MAX_HEADER_BYTES     2048
#define MAX_BODY_BYTES       1024
#define MAX_HELD             4

static uv_loop_t loop_storage;
static uv_loop_t *loop = &loop_storage;
static uv_timer_t watchdog;
static int watchdog_fired;
static ms_http_server_t *server;
static int port;

/* ---- the server's owner ------------------------------------------------------------------- */

static int n_requests;                    /* requests handed to on_request */
static ms_buf_t request_log;              /* "QUERY;" per request, in arrival order */
static ms_http_request_t *held[MAX_HELD]; /* /hold requests not answered yet */
static int n_aborts;
static ms_http_request_t *last_aborted;

static uv_timer_t defer_timer;
static ms_http_request_t *deferred;
static int defer_fired;
static int requests_at_defer; /* n_requests when the deferred answer went out */
static size_t inflight_at_defer;
static size_t client_bytes_at_defer;
static size_t *defer_watch_len; /* the pipelining client's received byte count */

static uv_timer_t stream_timer;
static ms_http_request_t *streaming;

static void respond_echo(ms_http_request_t *req)
{
    size_t tlen = 0;
    const char *t = ms_http_request_header(req, "x-test", &tlen);
    char body[1024];
    int n =
        snprintf(body, sizeof body, "M=%s P=%s Q=%s B=%.*s H=%.*s N=%zu", req->method, req->path,
                 req->query, (int)req->body_len, req->body, (int)tlen, t ? t : "", req->n_headers);
    static const ms_http_header_t type = {"Content-Type", 12, "text/plain", 10};
    ms_http_respond(req, 200, &type, 1, body, (size_t)n);
}

static void on_defer_timer(uv_timer_t *t)
{
    (void)t;
    defer_fired = 1;
    requests_at_defer = n_requests;
    inflight_at_defer = ms_http_server_inflight(server);
    client_bytes_at_defer = defer_watch_len ? *defer_watch_len : 0;
    ms_http_request_t *req = deferred;
    deferred = NULL;
    char body[128];
    int n = snprintf(body, sizeof body, "deferred Q=%s", req->query);
    ms_http_respond(req, 200, NULL, 0, body, (size_t)n);
}

static void on_stream_timer(uv_timer_t *t)
{
    (void)t;
    ms_http_request_t *req = streaming;
    streaming = NULL;
    ms_http_response_chunk(req, "world", 5);
    ms_http_response_end(req);
}

/* Streamed bodies (paths under /pull): the test pulls the body, pausing after every piece and
 * resuming from a timer, so the server's pause and resume are both exercised. */
static ms_http_request_t *pulling;
static ms_buf_t pulled;
static int pulled_pieces;
static uv_timer_t pull_timer;

static int stream_body(const ms_http_request_t *req, void *data)
{
    (void)data;
    return strncmp(req->path, "/pull", 5) == 0;
}

static void on_pull_timer(uv_timer_t *t);

static void pull_data(void *data, const char *p, size_t n)
{
    (void)data;
    ms_buf_append(&pulled, p, n);
    pulled_pieces++;
    ms_http_request_body_pause(pulling);
    uv_timer_start(&pull_timer, on_pull_timer, 0, 0);
}

static void pull_end(void *data)
{
    (void)data;
    ms_http_request_t *req = pulling;
    pulling = NULL;
    uv_timer_stop(&pull_timer);
    char body[256];
    int n = snprintf(body, sizeof body, "P=%s streamed=%d len=%zu head=%.8s", req->path,
                     req->body_streamed, pulled.len, pulled.data ? pulled.data : "");
    ms_http_respond(req, 200, NULL, 0, body, (size_t)n);
}

static const ms_http_body_reader_t pull_reader = {pull_data, pull_end};

static void on_pull_timer(uv_timer_t *t)
{
    (void)t;
    if (pulling)
        ms_http_request_body_read(pulling, &pull_reader, NULL);
}

static void start_pull(ms_http_request_t *req)
{
    if (strcmp(req->query, "early") == 0) {
        /* Answered before the body is read: the connection must close after the answer. */
        ms_http_respond(req, 413, NULL, 0, "no", 2);
        return;
    }
    if (strcmp(req->query, "length") == 0) {
        ms_http_response_start_length(req, 200, NULL, 0, 10);
        ms_http_response_chunk(req, "01234", 5);
        ms_http_response_chunk(req, "56789", 5);
        ms_http_response_end(req);
        return;
    }
    ms_buf_reset(&pulled);
    pulled_pieces = 0;
    pulling = req;
    ms_http_request_body_read(req, &pull_reader, NULL);
}

static void on_request(ms_http_request_t *req, void *data)
{
    (void)data;
    n_requests++;
    ms_buf_appendf(&request_log, "%s;", req->query);
    if (req->body_streamed) {
        start_pull(req);
    } else if (strcmp(req->path, "/defer") == 0) {
        deferred = req;
        uv_timer_start(&defer_timer, on_defer_timer, 100, 0);
    } else if (strcmp(req->path, "/hold") == 0) {
        for (int i = 0; i < MAX_HELD; i++)
            if (!held[i]) {
                held[i] = req;
                return;
            }
        ms_http_respond_error(req, 500, "too many held requests");
    } else if (strcmp(req->path, "/stream") == 0) {
        static const ms_http_header_t h = {"X-Stream", 8, "yes", 3};
        ms_http_response_start(req, 200, &h, 1);
        ms_http_response_chunk(req, "hello ", 6);
        streaming = req;
        uv_timer_start(&stream_timer, on_stream_timer, 50, 0);
    } else {
        respond_echo(req);
    }
}

static void on_abort(ms_http_request_t *req, void *data)
{
    (void)data;
    n_aborts++;
    last_aborted = req;
    for (int i = 0; i < MAX_HELD; i++)
        if (held[i] == req)
            held[i] = NULL;
    if (deferred == req)
        deferred = NULL;
    if (streaming == req)
        streaming = NULL;
    if (pulling == req)
        pulling = NULL;
}

/* ---- waiting -------------------------------------------------------------------------------- */

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    watchdog_fired = 1;
    fprintf(stderr, "watchdog: test did not finish within 10 s\n");
    ASSERT_TRUE(!"watchdog fired");
}

/* Runs the loop until pred(arg) holds; 0 if the watchdog fired first. */
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

static int pred_ptr(void *arg)
{
    return *(void **)arg != NULL;
}

/* ---- raw clients ---------------------------------------------------------------------------- */

typedef struct raw {
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    ms_buf_t in;
    int connected;
    int connect_status;
    int eof;
    uint64_t eof_at_ms;
} raw_t;

typedef struct write_req {
    uv_write_t req;
    char bytes[];
} write_req_t;

static void raw_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    raw_t *r = h->data;
    (void)suggested;
    ms_buf_reserve(&r->in, 65536);
    *buf = uv_buf_init(r->in.data + r->in.len, (unsigned)(r->in.cap - r->in.len - 1));
}

static void raw_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    raw_t *r = s->data;
    (void)buf;
    if (nread < 0) {
        r->eof = 1;
        r->eof_at_ms = ms_now_ms();
        uv_read_stop(s);
        return;
    }
    r->in.len += (size_t)nread;
    r->in.data[r->in.len] = '\0';
}

static void raw_connected(uv_connect_t *req, int status)
{
    raw_t *r = req->handle->data;
    r->connect_status = status;
    if (status < 0) {
        r->eof = 1;
        r->eof_at_ms = ms_now_ms();
        return;
    }
    r->connected = 1;
    uv_read_start((uv_stream_t *)&r->tcp, raw_alloc, raw_read);
}

static void raw_written(uv_write_t *req, int status)
{
    (void)status;
    free(req);
}

static void raw_send(raw_t *r, const char *data, size_t len)
{
    write_req_t *w = malloc(sizeof *w + len);
    memcpy(w->bytes, data, len);
    uv_buf_t b = uv_buf_init(w->bytes, (unsigned)len);
    if (uv_write(&w->req, (uv_stream_t *)&r->tcp, &b, 1, raw_written) != 0) {
        ASSERT_TRUE(!"uv_write failed");
        free(w);
    }
}

static void raw_sends(raw_t *r, const char *text)
{
    raw_send(r, text, strlen(text));
}

/* Connects to the server and sends `text` (may be NULL) once connected. */
static raw_t *raw_open(const char *text)
{
    raw_t *r = calloc(1, sizeof *r);
    uv_tcp_init(loop, &r->tcp);
    r->tcp.data = r;
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", port, &addr);
    int rc = uv_tcp_connect(&r->connect_req, &r->tcp, (struct sockaddr *)&addr, raw_connected);
    ASSERT_INT_EQ(rc, 0);
    if (text)
        raw_sends(r, text);
    return r;
}

static void raw_freed(uv_handle_t *h)
{
    raw_t *r = h->data;
    ms_buf_free(&r->in);
    free(r);
}

static void raw_close(raw_t *r)
{
    uv_close((uv_handle_t *)&r->tcp, raw_freed);
}

/* One parsed response (Content-Length framing only). */
typedef struct resp {
    int status;
    char head[2048];
    char request_id[96];
    char body[2048];
    size_t body_len;
    int close;
} resp_t;

#define MAX_RESP 8

/* Parses as many complete responses as the buffer holds. */
static int parse_responses(const ms_buf_t *b, resp_t *out, int max)
{
    if (!b->data)
        return 0;
    const char *p = b->data, *end = b->data + b->len;
    int n = 0;
    while (p < end && n < max) {
        const char *hend = memmem(p, (size_t)(end - p), "\r\n\r\n", 4);
        if (!hend)
            break;
        size_t hl = (size_t)(hend - p);
        resp_t *r = &out[n];
        memset(r, 0, sizeof *r);
        if (hl >= sizeof r->head)
            break;
        memcpy(r->head, p, hl);
        r->head[hl] = '\0';
        sscanf(r->head, "HTTP/1.%*d %d", &r->status);
        long clen = 0;
        const char *cl = strcasestr(r->head, "\r\nContent-Length:");
        if (cl)
            clen = strtol(cl + 17, NULL, 10);
        if (end - (hend + 4) < clen)
            break;
        const char *id = strcasestr(r->head, "\r\nX-Request-ID: ");
        if (id) {
            id += 16;
            size_t idl = strcspn(id, "\r");
            if (idl < sizeof r->request_id) {
                memcpy(r->request_id, id, idl);
                r->request_id[idl] = '\0';
            }
        }
        r->close = strcasestr(r->head, "\r\nConnection: close") != NULL;
        r->body_len = (size_t)clen < sizeof r->body ? (size_t)clen : sizeof r->body - 1;
        memcpy(r->body, hend + 4, r->body_len);
        r->body[r->body_len] = '\0';
        p = hend + 4 + clen;
        n++;
    }
    return n;
}

typedef struct resp_wait {
    raw_t *r;
    int n;
} resp_wait_t;

static int pred_responses(void *arg)
{
    resp_wait_t *w = arg;
    resp_t tmp[MAX_RESP];
    return w->r->eof || parse_responses(&w->r->in, tmp, MAX_RESP) >= w->n;
}

/* Waits until n responses arrived (or the connection ended) and parses them into out. */
static int wait_responses(raw_t *r, int n, resp_t *out)
{
    resp_wait_t w = {r, n};
    wait_for(pred_responses, &w);
    return parse_responses(&r->in, out, MAX_RESP);
}

static int pred_eof(void *arg)
{
    return ((raw_t *)arg)->eof;
}

static int wait_eof(raw_t *r)
{
    return wait_for(pred_eof, r);
}

static int is_hex_id(const char *s)
{
    if (strlen(s) != 32)
        return 0;
    for (; *s; s++)
        if (!strchr("0123456789abcdef", *s))
            return 0;
    return 1;
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_simple_get(void)
{
    raw_t *c = raw_open("GET /echo?a=1&b=2 HTTP/1.1\r\nHost: x\r\nX-Test: hi\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 200);
    ASSERT_CONTAINS(r[0].head, "HTTP/1.1 200 OK\r\n");
    ASSERT_CONTAINS(r[0].head, "Content-Type: text/plain");
    ASSERT_TRUE(is_hex_id(r[0].request_id)); /* generated */
    ASSERT_STR_EQ(r[0].body, "M=GET P=/echo Q=a=1&b=2 B= H=hi N=2");
    ASSERT_TRUE(!r[0].close);
    ASSERT_TRUE(!c->eof); /* kept alive */
    ASSERT_INT_EQ(ms_http_server_inflight(server), 0);

    /* Same connection, a POST with a Content-Length body. */
    raw_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde");
    ASSERT_INT_EQ(wait_responses(c, 2, r), 2);
    ASSERT_INT_EQ(r[1].status, 200);
    ASSERT_STR_EQ(r[1].body, "M=POST P=/echo Q= B=abcde H= N=2");
    ASSERT_TRUE(strcmp(r[0].request_id, r[1].request_id) != 0);
    raw_close(c);
}

/* A header with an empty value must stay its own header, not swallow the next name. */
static void test_empty_header_value(void)
{
    raw_t *c = raw_open("GET /echo HTTP/1.1\r\nX-Empty:\r\nX-Test: after\r\nHost: x\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 200);
    ASSERT_STR_EQ(r[0].body, "M=GET P=/echo Q= B= H=after N=3");
    raw_close(c);
}

static void test_expect_continue(void)
{
    raw_t *c = raw_open(
        "POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 100);
    raw_sends(c, "abc");
    ASSERT_INT_EQ(wait_responses(c, 2, r), 2);
    ASSERT_INT_EQ(r[1].status, 200);
    ASSERT_STR_EQ(r[1].body, "M=POST P=/echo Q= B=abc H= N=3");
    raw_close(c);
}

static void test_request_id(void)
{
    raw_t *c = raw_open("GET /echo HTTP/1.1\r\nHost: t\r\nX-Request-ID: my-id-123\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 200);
    ASSERT_STR_EQ(r[0].request_id, "my-id-123");
    /* Exactly one X-Request-ID header. */
    const char *first = strstr(r[0].head, "X-Request-ID");
    ASSERT_TRUE(first && !strstr(first + 1, "X-Request-ID"));

    /* An id with a quote is not echoed into headers/JSON; a fresh one is generated. */
    raw_sends(c, "GET /echo HTTP/1.1\r\nHost: t\r\nX-Request-ID: bad\"id\r\n\r\n");
    ASSERT_INT_EQ(wait_responses(c, 2, r), 2);
    ASSERT_TRUE(is_hex_id(r[1].request_id));
    /* Too long for request_id[80]: replaced as well. */
    char big[256];
    snprintf(big, sizeof big, "GET /echo HTTP/1.1\r\nHost: t\r\nX-Request-ID: %0100d\r\n\r\n", 7);
    raw_sends(c, big);
    ASSERT_INT_EQ(wait_responses(c, 3, r), 3);
    ASSERT_TRUE(is_hex_id(r[2].request_id));
    raw_close(c);
}

static void test_pipelining(void)
{
    ms_buf_reset(&request_log);
    raw_t *c = raw_open("GET /echo?n=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                        "GET /echo?n=2 HTTP/1.1\r\nHost: t\r\n\r\n"
                        "GET /echo?n=3 HTTP/1.1\r\nHost: t\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 3, r), 3);
    ASSERT_STR_EQ(r[0].body, "M=GET P=/echo Q=n=1 B= H= N=1");
    ASSERT_STR_EQ(r[1].body, "M=GET P=/echo Q=n=2 B= H= N=1");
    ASSERT_STR_EQ(r[2].body, "M=GET P=/echo Q=n=3 B= H= N=1");
    ASSERT_STR_EQ(request_log.data, "n=1;n=2;n=3;");
    ASSERT_TRUE(!c->eof);
    raw_close(c);
}

static void test_pipelining_deferred(void)
{
    ms_buf_reset(&request_log);
    int before = n_requests;
    defer_fired = 0;
    raw_t *c = raw_open(
        "GET /defer?n=1 HTTP/1.1\r\nHost: t\r\nX-Request-ID: p1\r\n\r\n"
        "GET /echo?n=2 HTTP/1.1\r\nHost: t\r\nX-Request-ID: p2\r\n\r\n"
        "POST /echo?n=3 HTTP/1.1\r\nHost: t\r\nX-Request-ID: p3\r\nContent-Length: 3\r\n\r\nxyz");
    defer_watch_len = &c->in.len;
    ASSERT_TRUE(wait_for(pred_flag, &defer_fired));
    defer_watch_len = NULL;
    /* While the first was owed, the 2nd and 3rd were not handed over and nothing was sent. */
    ASSERT_INT_EQ(requests_at_defer - before, 1);
    ASSERT_INT_EQ(inflight_at_defer, 1);
    ASSERT_INT_EQ(client_bytes_at_defer, 0);
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 3, r), 3);
    ASSERT_STR_EQ(r[0].body, "deferred Q=n=1");
    ASSERT_STR_EQ(r[0].request_id, "p1");
    ASSERT_STR_EQ(r[1].body, "M=GET P=/echo Q=n=2 B= H= N=2");
    ASSERT_STR_EQ(r[1].request_id, "p2");
    ASSERT_STR_EQ(r[2].body, "M=POST P=/echo Q=n=3 B=xyz H= N=3");
    ASSERT_STR_EQ(r[2].request_id, "p3");
    ASSERT_STR_EQ(request_log.data, "n=1;n=2;n=3;");
    ASSERT_INT_EQ(ms_http_server_inflight(server), 0);
    ASSERT_TRUE(!c->eof);
    raw_close(c);
}

static void test_chunked_body(void)
{
    raw_t *c =
        raw_open("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
    /* Let the first piece be read on its own before the rest arrives. */
    ASSERT_TRUE(wait_for(pred_flag, &c->connected));
    uv_run(loop, UV_RUN_NOWAIT);
    raw_sends(c, "lo\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 200);
    /* Host + Transfer-Encoding; the trailer is not added to the request headers. */
    ASSERT_STR_EQ(r[0].body, "M=POST P=/echo Q= B=hello world H= N=2");
    ASSERT_TRUE(!c->eof);

    /* A following request on the same connection sees only its own headers. */
    raw_sends(c, "GET /echo HTTP/1.1\r\nHost: t\r\nX-Test: again\r\n\r\n");
    ASSERT_INT_EQ(wait_responses(c, 2, r), 2);
    ASSERT_STR_EQ(r[1].body, "M=GET P=/echo Q= B= H=again N=2");
    raw_close(c);
}

/* A streamed body arrives in pieces through the reader, with pauses, and is not bounded by
 * max_body_bytes; the request behind it on the connection is served after it, in order. */
static void test_streamed_body(void)
{
    size_t big = 3 * MAX_BODY_BYTES;
    ms_buf_t req = {0};
    ms_buf_appendf(&req, "POST /pull HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n", big);
    for (size_t i = 0; i < big; i++)
        ms_buf_append(&req, i == 0 ? "S" : "b", 1);
    ms_buf_appendf(&req, "POST /pull HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nT: 1\r\n\r\n"
                         "GET /echo?after HTTP/1.1\r\nHost: x\r\n\r\n");
    raw_t *c = raw_open(NULL);
    raw_send(c, req.data, req.len);
    ms_buf_free(&req);
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 3, r), 3);
    ASSERT_INT_EQ(r[0].status, 200);
    char want[128];
    snprintf(want, sizeof want, "P=/pull streamed=1 len=%zu head=Sbbbbbbb", big);
    ASSERT_STR_EQ(r[0].body, want);
    ASSERT_STR_EQ(r[1].body, "P=/pull streamed=1 len=7 head=abcdefg");
    ASSERT_STR_EQ(r[2].body, "M=GET P=/echo Q=after B= H= N=1");
    ASSERT_TRUE(pulled_pieces >= 2);
    ASSERT_TRUE(!c->eof);
    raw_close(c);
}

/* Answering before the streamed body is read leaves the connection unusable: it closes. */
static void test_streamed_body_answered_early(void)
{
    raw_t *c = raw_open("POST /pull?early HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                        "only a little");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 413);
    ASSERT_TRUE(wait_eof(c));
    raw_close(c);
}

/* A response with a known length carries Content-Length and unframed bytes. */
static void test_response_with_length(void)
{
    raw_t *c = raw_open("POST /pull?length HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 200);
    ASSERT_TRUE(strstr(r[0].head, "Content-Length: 10") != NULL);
    ASSERT_TRUE(strstr(r[0].head, "chunked") == NULL);
    ASSERT_STR_EQ(r[0].body, "0123456789");
    raw_close(c);
}

static void test_body_too_large(void)
{
    int before = n_requests;
    raw_t *c = raw_open(
        "POST /echo HTTP/1.1\r\nHost: t\r\nX-Request-ID: big-1\r\nContent-Length: 100000\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 413);
    ASSERT_CONTAINS(r[0].head, "Content-Type: application/json");
    ASSERT_CONTAINS(r[0].body, "\"request_id\": \"big-1\"");
    ASSERT_CONTAINS(r[0].body, "\"error\"");
    ASSERT_TRUE(r[0].close);
    ASSERT_TRUE(wait_eof(c));
    ASSERT_INT_EQ(n_requests, before);
    raw_close(c);

    /* A chunked body growing past the limit. */
    ms_buf_t req = {0};
    ms_buf_appendf(&req,
                   "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n",
                   MAX_BODY_BYTES + 10);
    for (int i = 0; i < MAX_BODY_BYTES + 10; i++)
        ms_buf_append(&req, "a", 1);
    ms_buf_append(&req, "\r\n0\r\n\r\n", 7);
    c = raw_open(NULL);
    raw_send(c, req.data, req.len);
    ms_buf_free(&req);
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 413);
    ASSERT_CONTAINS(r[0].body, "\"request_id\"");
    ASSERT_TRUE(wait_eof(c));
    ASSERT_INT_EQ(n_requests, before);
    raw_close(c);
    ASSERT_INT_EQ(ms_http_server_inflight(server), 0);
}

static void test_headers_too_large(void)
{
    int before = n_requests;
    ms_buf_t req = {0};
    ms_buf_appendf(&req, "GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: ");
    for (int i = 0; i < MAX_HEADER_BYTES + 100; i++)
        ms_buf_append(&req, "b", 1);
    ms_buf_append(&req, "\r\n\r\n", 4);
    raw_t *c = raw_open(NULL);
    raw_send(c, req.data, req.len);
    ms_buf_free(&req);
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 431);
    ASSERT_CONTAINS(r[0].body, "\"request_id\"");
    ASSERT_TRUE(r[0].close);
    ASSERT_TRUE(wait_eof(c));
    ASSERT_INT_EQ(n_requests, before);
    raw_close(c);

    /* Many small headers add up too. */
    ms_buf_t many = {0};
    ms_buf_appendf(&many, "GET /echo HTTP/1.1\r\nHost: t\r\n");
    for (int i = 0; i < 200; i++)
        ms_buf_appendf(&many, "X-H%d: v\r\n", i);
    ms_buf_append(&many, "\r\n", 2);
    c = raw_open(NULL);
    raw_send(c, many.data, many.len);
    ms_buf_free(&many);
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 431);
    ASSERT_TRUE(wait_eof(c));
    raw_close(c);
}

static void test_garbage(void)
{
    int before = n_requests;
    raw_t *c = raw_open("\x01\x02 garbage garbage\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 400);
    ASSERT_CONTAINS(r[0].body, "malformed request");
    ASSERT_CONTAINS(r[0].body, "\"request_id\"");
    ASSERT_TRUE(is_hex_id(r[0].request_id));
    ASSERT_TRUE(wait_eof(c));
    raw_close(c);

    /* Garbage after a good request: the good one is answered, then 400 and close. */
    c = raw_open("GET /echo?ok HTTP/1.1\r\nHost: t\r\n\r\nBLAH BLAH BLAH\r\n\r\n");
    ASSERT_INT_EQ(wait_responses(c, 2, r), 2);
    ASSERT_INT_EQ(r[0].status, 200);
    ASSERT_INT_EQ(r[1].status, 400);
    ASSERT_TRUE(wait_eof(c));
    ASSERT_INT_EQ(n_requests, before + 1);
    raw_close(c);
}

static void test_header_timeout(void)
{
    uint64_t start = ms_now_ms();
    raw_t *c = raw_open("GET /echo HTTP/1.1\r\nHost: x\r\n");
    ASSERT_TRUE(wait_eof(c));
    uint64_t elapsed = c->eof_at_ms - start;
    ASSERT_TRUE(elapsed >= 150);
    ASSERT_TRUE(elapsed < 2000);
    ASSERT_INT_EQ(c->in.len, 0); /* closed without a response */
    raw_close(c);

    /* A connection that sends nothing at all is closed too. */
    start = ms_now_ms();
    c = raw_open(NULL);
    ASSERT_TRUE(wait_eof(c));
    elapsed = c->eof_at_ms - start;
    ASSERT_TRUE(elapsed >= 150 && elapsed < 2000);
    raw_close(c);
}

static void test_keep_alive_timeout(void)
{
    raw_t *c = raw_open("GET /echo HTTP/1.1\r\nHost: t\r\n\r\n");
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(c, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 200);
    uint64_t answered = ms_now_ms();
    ASSERT_TRUE(wait_eof(c));
    uint64_t idle = c->eof_at_ms - answered;
    /* The idle timer (0.5 s), not the header timer (0.2 s), closed it. */
    ASSERT_TRUE(idle >= 400);
    ASSERT_TRUE(idle < 3000);
    raw_close(c);
}

static int pred_aborts(void *arg)
{
    return n_aborts >= *(int *)arg;
}

static void test_abort(void)
{
    int want = n_aborts + 1;
    raw_t *c = raw_open("GET /hold?a HTTP/1.1\r\nHost: t\r\n\r\n");
    ASSERT_TRUE(wait_for(pred_ptr, &held[0]));
    ms_http_request_t *req = held[0];
    ASSERT_INT_EQ(ms_http_server_inflight(server), 1);
    /* Owed a response: neither timer closes it. */
    uv_sleep(300);
    uv_run(loop, UV_RUN_NOWAIT);
    ASSERT_TRUE(!c->eof);
    ASSERT_INT_EQ(n_aborts, want - 1);
    raw_close(c);
    ASSERT_TRUE(wait_for(pred_aborts, &want));
    ASSERT_TRUE(last_aborted == req);
    ASSERT_TRUE(held[0] == NULL);
    ASSERT_INT_EQ(ms_http_server_inflight(server), 0);
}

/* ---- streaming through ms_http_client ------------------------------------------------------- */

typedef struct client_state {
    int status;
    int chunked;
    int64_t content_length;
    int saw_stream_header;
    char request_id[96];
    ms_buf_t body;
    int done;
    int error;
    ms_http_client_error_t error_code;
    int heads;
    ms_http_client_t *cl; /* when set, idle_at_done records whether it could be reused */
    int idle_at_done;
} client_state_t;

static void cl_head(void *data, int status, const ms_http_header_t *h, size_t n, int chunked,
                    int64_t content_length)
{
    client_state_t *s = data;
    s->heads++;
    s->status = status;
    s->chunked = chunked;
    s->content_length = content_length;
    for (size_t i = 0; i < n; i++) {
        if (h[i].name_len == 8 && strncasecmp(h[i].name, "x-stream", 8) == 0)
            s->saw_stream_header = 1;
        if (h[i].name_len == 12 && strncasecmp(h[i].name, "x-request-id", 12) == 0 &&
            h[i].value_len < sizeof s->request_id) {
            memcpy(s->request_id, h[i].value, h[i].value_len);
            s->request_id[h[i].value_len] = '\0';
        }
    }
}

static void cl_body(void *data, const char *p, size_t n)
{
    ms_buf_append(&((client_state_t *)data)->body, p, n);
}

static void cl_done(void *data)
{
    client_state_t *s = data;
    s->done = 1;
    /* A pool puts the connection back from here: what it sees now decides reuse. */
    if (s->cl)
        s->idle_at_done = ms_http_client_idle(s->cl);
}

static void cl_error(void *data, ms_http_client_error_t err)
{
    client_state_t *s = data;
    s->error = 1;
    s->error_code = err;
}

static const ms_http_client_callbacks_t client_cb = {cl_head, cl_body, cl_done, cl_error};

static int pred_client(void *arg)
{
    client_state_t *s = arg;
    return s->done || s->error;
}

static void test_client_and_streaming(void)
{
    ms_http_client_t *cl = ms_http_client_connect(loop, NULL, "127.0.0.1", port);
    ASSERT_TRUE(ms_http_client_idle(cl));

    client_state_t s = {0};
    static const char get[] = "GET /echo?c=1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: cl-1\r\n\r\n";
    ASSERT_INT_EQ(ms_http_client_send(cl, get, sizeof get - 1, NULL, 0, &client_cb, &s), 0);
    ASSERT_TRUE(!ms_http_client_idle(cl));
    /* Busy: a second send is refused. */
    ASSERT_INT_EQ(ms_http_client_send(cl, get, sizeof get - 1, NULL, 0, &client_cb, &s), -1);
    ASSERT_TRUE(wait_for(pred_client, &s));
    ASSERT_INT_EQ(s.error, 0);
    ASSERT_INT_EQ(s.status, 200);
    ASSERT_INT_EQ(s.chunked, 0);
    ASSERT_INT_EQ(s.content_length, (int64_t)s.body.len);
    ASSERT_STR_EQ(s.request_id, "cl-1");
    ASSERT_STR_EQ(s.body.data, "M=GET P=/echo Q=c=1 B= H= N=2");
    ASSERT_TRUE(ms_http_client_idle(cl));
    ms_buf_free(&s.body);

    /* Streamed response on the same connection. */
    memset(&s, 0, sizeof s);
    static const char sget[] = "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n";
    ASSERT_INT_EQ(ms_http_client_send(cl, sget, sizeof sget - 1, NULL, 0, &client_cb, &s), 0);
    ASSERT_TRUE(wait_for(pred_client, &s));
    ASSERT_INT_EQ(s.error, 0);
    ASSERT_INT_EQ(s.heads, 1);
    ASSERT_INT_EQ(s.status, 200);
    ASSERT_INT_EQ(s.chunked, 1);
    ASSERT_INT_EQ(s.content_length, -1);
    ASSERT_TRUE(s.saw_stream_header);
    ASSERT_TRUE(is_hex_id(s.request_id));
    ASSERT_STR_EQ(s.body.data, "hello world");
    ASSERT_TRUE(ms_http_client_idle(cl));
    ASSERT_INT_EQ(ms_http_server_inflight(server), 0);
    ms_buf_free(&s.body);

    /* A POST with a body, after the stream, still on the same connection. */
    memset(&s, 0, sizeof s);
    static const char post[] = "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n";
    ASSERT_INT_EQ(ms_http_client_send(cl, post, sizeof post - 1, "data", 4, &client_cb, &s), 0);
    ASSERT_TRUE(wait_for(pred_client, &s));
    ASSERT_STR_EQ(s.body.data, "M=POST P=/echo Q= B=data H= N=2");
    ms_buf_free(&s.body);
    ms_http_client_close(cl);

    /* The raw bytes of a streamed response are chunk-framed. */
    raw_t *c = raw_open("GET /stream HTTP/1.1\r\nHost: t\r\n\r\n");
    ms_buf_t *in = &c->in;
    while (!c->eof && !watchdog_fired && !(in->data && strstr(in->data, "0\r\n\r\n")))
        uv_run(loop, UV_RUN_ONCE);
    ASSERT_CONTAINS(in->data, "Transfer-Encoding: chunked\r\n");
    ASSERT_CONTAINS(in->data, "\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n");
    ASSERT_TRUE(!strstr(in->data ? in->data : "", "Content-Length"));
    raw_close(c);

    /* HTTP/1.0 has no chunked encoding: the body is close-delimited. */
    c = raw_open("GET /stream HTTP/1.0\r\n\r\n");
    ASSERT_TRUE(wait_eof(c));
    ASSERT_CONTAINS(c->in.data, "HTTP/1.0 200 OK\r\n");
    ASSERT_CONTAINS(c->in.data, "Connection: close\r\n");
    ASSERT_TRUE(!strstr(c->in.data ? c->in.data : "", "Transfer-Encoding"));
    const char *hend = c->in.data ? strstr(c->in.data, "\r\n\r\n") : NULL;
    ASSERT_STR_EQ(hend ? hend + 4 : NULL, "hello world");
    raw_close(c);
}

/* A TCP port nothing listens on: bound by the kernel's choice, then closed. */
static int closed_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0)
        return -1;
    close(fd);
    return ntohs(a.sin_port);
}

/* Callers tell failures apart by code: only a failed connect surely never reached the peer. */
static void test_client_errors(void)
{
    client_state_t s = {0};
    static const char get[] = "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n";
    ms_http_client_t *cl = ms_http_client_connect(loop, NULL, "127.0.0.1", closed_port());
    ASSERT_INT_EQ(ms_http_client_send(cl, get, sizeof get - 1, NULL, 0, &client_cb, &s), 0);
    ASSERT_TRUE(wait_for(pred_client, &s));
    ASSERT_INT_EQ(s.error, 1);
    ASSERT_INT_EQ(s.error_code, MS_HTTP_CLIENT_CONNECT_FAILED);
    ASSERT_STR_EQ(ms_http_client_error_text(s.error_code), "connect failed");
    ASSERT_TRUE(!ms_http_client_idle(cl));
    ms_http_client_close(cl);

    /* The server answers a malformed request and closes: the next request on the connection
     * finds it closed by the peer. */
    memset(&s, 0, sizeof s);
    cl = ms_http_client_connect(loop, NULL, "127.0.0.1", port);
    static const char bad[] = "GET /echo HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n";
    ASSERT_INT_EQ(ms_http_client_send(cl, bad, sizeof bad - 1, NULL, 0, &client_cb, &s), 0);
    ASSERT_TRUE(wait_for(pred_client, &s));
    ASSERT_INT_EQ(s.status, 400);
    ms_buf_free(&s.body);
    memset(&s, 0, sizeof s);
    if (ms_http_client_send(cl, get, sizeof get - 1, NULL, 0, &client_cb, &s) == 0) {
        ASSERT_TRUE(wait_for(pred_client, &s));
        ASSERT_INT_EQ(s.error, 1);
        ASSERT_TRUE(s.error_code == MS_HTTP_CLIENT_PEER_CLOSED ||
                    s.error_code == MS_HTTP_CLIENT_RESET);
        ASSERT_TRUE(s.error_code != MS_HTTP_CLIENT_CONNECT_FAILED);
    }
    ms_http_client_close(cl);
    ASSERT_STR_EQ(ms_http_client_error_text(MS_HTTP_CLIENT_PEER_CLOSED),
                  "connection closed by peer");
}

/* ---- a peer that answers with canned bytes ------------------------------------------------ */

/* Accepts one connection, reads once (the head of whatever arrives), writes `reply` and stops
 * reading, so a large request body stays unsent. */
typedef struct canned {
    uv_tcp_t listener, conn;
    const char *reply;
    int port, accepted, conn_closed;
} canned_t;

static void canned_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static char scratch[4096];
    (void)h;
    (void)suggested;
    *buf = uv_buf_init(scratch, sizeof scratch);
}

static void canned_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    canned_t *cn = st->data;
    (void)buf;
    if (nread == 0)
        return;
    uv_read_stop(st);
    if (nread < 0)
        return;
    write_req_t *w = malloc(sizeof *w);
    uv_buf_t b = uv_buf_init((char *)cn->reply, (unsigned)strlen(cn->reply));
    if (uv_write(&w->req, st, &b, 1, raw_written) != 0)
        free(w);
}

static void canned_accept(uv_stream_t *l, int status)
{
    canned_t *cn = l->data;
    if (status < 0 || cn->accepted)
        return;
    uv_tcp_init(loop, &cn->conn);
    cn->conn.data = cn;
    if (uv_accept(l, (uv_stream_t *)&cn->conn) == 0) {
        cn->accepted = 1;
        uv_read_start((uv_stream_t *)&cn->conn, canned_alloc, canned_read);
    }
}

static void canned_start(canned_t *cn, const char *reply)
{
    memset(cn, 0, sizeof *cn);
    cn->reply = reply;
    uv_tcp_init(loop, &cn->listener);
    cn->listener.data = cn;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    ASSERT_INT_EQ(uv_tcp_bind(&cn->listener, (struct sockaddr *)&a, 0), 0);
    ASSERT_INT_EQ(uv_listen((uv_stream_t *)&cn->listener, 4, canned_accept), 0);
    struct sockaddr_in got;
    int len = sizeof got;
    uv_tcp_getsockname(&cn->listener, (struct sockaddr *)&got, &len);
    cn->port = ntohs(got.sin_port);
}

static void canned_handle_closed(uv_handle_t *h)
{
    ((canned_t *)h->data)->conn_closed++;
}

static int pred_canned_closed(void *arg)
{
    canned_t *cn = arg;
    return cn->conn_closed == 1 + cn->accepted;
}

static void canned_stop(canned_t *cn)
{
    if (cn->accepted)
        uv_close((uv_handle_t *)&cn->conn, canned_handle_closed);
    uv_close((uv_handle_t *)&cn->listener, canned_handle_closed);
    ASSERT_TRUE(wait_for(pred_canned_closed, cn));
}

/* Sends one request (with `body_len` bytes of body) to a peer answering `reply`; returns
 * whether the connection was reusable when the response was handed over (-1: no response). */
static int idle_after(const char *reply, size_t body_len)
{
    canned_t cn;
    canned_start(&cn, reply);
    ms_http_client_t *cl = ms_http_client_connect(loop, NULL, "127.0.0.1", cn.port);
    client_state_t s = {.cl = cl};
    char *body = calloc(1, body_len + 1);
    char head[96];
    int n = snprintf(head, sizeof head, "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %zu\r\n\r\n",
                     body_len);
    ASSERT_INT_EQ(ms_http_client_send(cl, head, (size_t)n, body, body_len, &client_cb, &s), 0);
    ASSERT_TRUE(wait_for(pred_client, &s));
    int idle = s.done ? s.idle_at_done : -1;
    ms_http_client_close(cl);
    canned_stop(&cn);
    free(body);
    ms_buf_free(&s.body);
    return idle;
}

/* A replica connection is pooled again only when its state is certain. */
static void test_client_reuse_only_when_certain(void)
{
    /* A plain answer: reusable. */
    ASSERT_INT_EQ(idle_after("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 3), 1);
    /* Bytes after the response nobody asked for: another answer would be misattributed. */
    ASSERT_INT_EQ(idle_after("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                             "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                             3),
                  0);
    /* The peer is closing it. */
    ASSERT_INT_EQ(
        idle_after("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 3), 0);
    /* It switched protocols. */
    ASSERT_INT_EQ(idle_after("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                             "Upgrade: websocket\r\n\r\n",
                             3),
                  0);
    /* An early answer while most of an 8 MiB body is still unsent. */
    ASSERT_INT_EQ(
        idle_after("HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n", 8u << 20), 0);
}

static void test_stop_accepting(void)
{
    /* Two requests in flight on two connections, and one idle keep-alive connection. */
    raw_t *a = raw_open("GET /hold?a HTTP/1.1\r\nHost: t\r\n\r\n");
    raw_t *b = raw_open("GET /hold?b HTTP/1.1\r\nHost: t\r\n\r\n");
    raw_t *idle = raw_open("GET /echo HTTP/1.1\r\nHost: t\r\n\r\n");
    ASSERT_TRUE(wait_for(pred_ptr, &held[0]));
    ASSERT_TRUE(wait_for(pred_ptr, &held[1]));
    resp_t r[MAX_RESP];
    ASSERT_INT_EQ(wait_responses(idle, 1, r), 1);
    ASSERT_INT_EQ(ms_http_server_inflight(server), 2);

    ms_http_server_stop_accepting(server);
    ASSERT_TRUE(wait_eof(idle)); /* idle keep-alive connection closed */
    raw_t *late = raw_open("GET /echo HTTP/1.1\r\nHost: t\r\n\r\n");
    ASSERT_TRUE(wait_eof(late)); /* refused (or closed unanswered) */
    ASSERT_TRUE(late->connect_status < 0 || late->in.len == 0);
    ASSERT_TRUE(!a->eof && !b->eof);
    ASSERT_INT_EQ(ms_http_server_inflight(server), 2);

    /* Finishing the in-flight responses lets them out, then the connections close. */
    ms_http_request_t *ra = held[0], *rb = held[1];
    held[0] = held[1] = NULL;
    ASSERT_STR_EQ(ra->query, "a");
    ms_http_respond(ra, 200, NULL, 0, "done-a", 6);
    ASSERT_INT_EQ(ms_http_server_inflight(server), 1);
    ASSERT_INT_EQ(wait_responses(a, 1, r), 1);
    ASSERT_INT_EQ(r[0].status, 200);
    ASSERT_STR_EQ(r[0].body, "done-a");
    ASSERT_TRUE(r[0].close);
    ASSERT_TRUE(wait_eof(a));
    ASSERT_TRUE(!b->eof);

    ms_http_response_start(rb, 200, NULL, 0);
    ms_http_response_chunk(rb, "part", 4);
    ms_http_response_end(rb);
    ASSERT_INT_EQ(ms_http_server_inflight(server), 0);
    ASSERT_TRUE(wait_eof(b));
    ASSERT_CONTAINS(b->in.data, "Connection: close\r\n");
    ASSERT_CONTAINS(b->in.data, "4\r\npart\r\n0\r\n\r\n");

    raw_close(a);
    raw_close(b);
    raw_close(idle);
    raw_close(late);
}

static void test_close_aborts(void)
{
    /* ms_http_server_close aborts what is still owed. Needs a listening server. */
    ms_http_server_config_t cfg = {
        .limits = {MAX_HEADER_BYTES, MAX_BODY_BYTES, HEADER_TIMEOUT_S, KEEP_ALIVE_TIMEOUT_S},
        .on_request = on_request,
        .on_abort = on_abort,
        .stream_body = stream_body,
    };
    ms_http_server_t *srv2 = NULL;
    ASSERT_INT_EQ(ms_http_server_listen_tcp(loop, "127.0.0.1", 0, &cfg, &srv2), 0);
    int saved_port = port;
    port = ms_http_server_port(srv2);
    raw_t *c = raw_open("GET /hold?z HTTP/1.1\r\nHost: t\r\n\r\n");
    ASSERT_TRUE(wait_for(pred_ptr, &held[0]));
    ASSERT_INT_EQ(ms_http_server_inflight(srv2), 1);
    int want = n_aborts + 1;
    ms_http_server_close(srv2);
    ASSERT_INT_EQ(n_aborts, want);
    ASSERT_TRUE(held[0] == NULL);
    ASSERT_TRUE(wait_eof(c));
    raw_close(c);
    port = saved_port;
}

int main(void)
{
    ms_log_min_level = MS_LOG_WARN;
    ASSERT_INT_EQ(uv_loop_init(loop), 0);
    uv_timer_init(loop, &watchdog);
    uv_timer_start(&watchdog, on_watchdog, 10000, 0);
    uv_timer_init(loop, &defer_timer);
    uv_timer_init(loop, &stream_timer);
    uv_timer_init(loop, &pull_timer);

    ms_http_server_config_t cfg = {
        .limits = {MAX_HEADER_BYTES, MAX_BODY_BYTES, HEADER_TIMEOUT_S, KEEP_ALIVE_TIMEOUT_S},
        .on_request = on_request,
        .on_abort = on_abort,
        .stream_body = stream_body,
    };
    ASSERT_INT_EQ(ms_http_server_listen_tcp(loop, "127.0.0.1", 0, &cfg, &server), 0);
    port = ms_http_server_port(server);
    ASSERT_TRUE(port > 0);

    test_simple_get();
    test_empty_header_value();
    test_request_id();
    test_expect_continue();
    test_pipelining();
    test_pipelining_deferred();
    test_chunked_body();
    test_streamed_body();
    test_streamed_body_answered_early();
    test_response_with_length();
    test_body_too_large();
    test_headers_too_large();
    test_garbage();
    test_header_timeout();
    test_keep_alive_timeout();
    test_abort();
    test_client_and_streaming();
    test_client_errors();
    test_client_reuse_only_when_certain();
    test_close_aborts();
    test_stop_accepting();

    ms_http_server_close(server);
    uv_close((uv_handle_t *)&defer_timer, NULL);
    uv_close((uv_handle_t *)&stream_timer, NULL);
    uv_close((uv_handle_t *)&pull_timer, NULL);
    uv_close((uv_handle_t *)&watchdog, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    ASSERT_INT_EQ(uv_loop_close(loop), 0);
    ms_buf_free(&request_log);
    ms_buf_free(&pulled);
    return TEST_DONE();
}
