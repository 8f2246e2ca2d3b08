/*
 * upstream: pooled HTTP/1.1 connections to one process replica. See upstream.h.
 *
 * Each connection carries one stream at a time. A stream id is the connection's slot in the pool
 * plus a generation (id = gen << 20 | slot + 1), so a late cancel or credit for a stream that has
 * ended finds a different generation and does nothing.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "upstream/upstream.h"

#define SLOT_BITS 20
#define SLOT_MASK ((1u << SLOT_BITS) - 1)
/* Request body bytes queued for the replica's socket before the client's reading pauses. */
#define UPSTREAM_WRITE_LIMIT (256 * 1024)

typedef struct up_conn {
    ms_upstream_t *u;
    ms_http_client_t *client; /* NULL: the slot has no connection */
    uint32_t id;              /* current stream, 0 = none */
    uint32_t gen;
    const ms_link_callbacks_t *cb;
    void *data;
    int reused;      /* the connection served a request before this one */
    int idempotent;  /* the stream's method may run twice (a retry after a lost race) */
    int got_head;    /* response head seen */
    int whole;       /* no-body response (HEAD, 204, 304): delivered at its end */
    int status;      /* whole: the status */
    int release_due; /* cancelled: on_released runs from the idle handle */
    /* A streamed body: the client's request it comes from (NULL once read or let go), whether
     * its reading waits for the idle handle to start, and whether any byte was taken from it
     * (then the request cannot be sent again elsewhere). */
    ms_http_request_t *src;
    int body_due;
    int body_taken;
    size_t unacked;     /* response body bytes passed on and not credited back */
    int paused;         /* the response is paused: unacked went past MS_LINK_WINDOW */
    ms_buf_t head_copy; /* whole: the headers, kept until the end */
    ms_http_header_t *hdrs;
    size_t n_hdrs, hdrs_cap;
} up_conn_t;

struct ms_upstream {
    uv_loop_t *loop;
    char *path;
    int port;
    up_conn_t **conns;
    size_t n_conns;
    size_t open_streams;
    ms_buf_t head;      /* request head scratch */
    uv_idle_t deferred; /* releases cancelled streams, starts streamed bodies */
    int closing;
};

static void on_deferred(uv_idle_t *h);

ms_upstream_t *ms_upstream_new(uv_loop_t *loop, const char *path, int port)
{
    ms_upstream_t *u = ms_calloc(1, sizeof *u);
    u->loop = loop;
    u->path = path ? ms_strdup(path) : NULL;
    u->port = port;
    uv_idle_init(loop, &u->deferred);
    u->deferred.data = u;
    return u;
}

static up_conn_t *conn_of(ms_upstream_t *u, uint32_t id)
{
    uint32_t slot = (id & SLOT_MASK) - 1;
    if (id == 0 || slot >= u->n_conns || u->conns[slot]->id != id)
        return NULL;
    return u->conns[slot];
}

static void drop_client(up_conn_t *c)
{
    if (c->client)
        ms_http_client_close(c->client);
    c->client = NULL;
}

/* The client's request is no longer read from: its owner may finish or free it next. */
static void let_go_source(up_conn_t *c)
{
    if (c->src && !c->body_due)
        ms_http_request_body_pause(c->src);
    c->src = NULL;
    c->body_due = 0;
}

/* The stream is over (any way): the slot is free for the next one. */
static void end_stream(up_conn_t *c)
{
    let_go_source(c);
    if (c->paused && c->client)
        ms_http_client_resume(c->client);
    c->paused = 0;
    c->id = 0;
    c->u->open_streams--;
}

static int hop_by_hop(const ms_http_header_t *h)
{
    static const char *const skip[] = {"connection",   "keep-alive",      "transfer-encoding",
                                       "te",           "trailer",         "upgrade",
                                       "x-request-id", "proxy-connection"};
    for (size_t i = 0; i < sizeof skip / sizeof *skip; i++)
        if (ms_http_header_is(h, skip[i]))
            return 1;
    return 0;
}

static int is_content_length(const ms_http_header_t *h)
{
    return ms_http_header_is(h, "content-length");
}

/* Keeps the end-to-end headers of a response, copied (they live only during on_head), and
 * Content-Length when the body's length passes on (a body of known length, not re-framed). The
 * buffer is sized first, so it does not move while the pointers into it are taken. */
static void keep_headers(up_conn_t *c, const ms_http_header_t *h, size_t n, int keep_length)
{
    ms_buf_reset(&c->head_copy);
    if (c->hdrs_cap < n) {
        c->hdrs_cap = n;
        c->hdrs = ms_realloc(c->hdrs, n * sizeof *c->hdrs);
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += h[i].name_len + h[i].value_len;
    ms_buf_reserve(&c->head_copy, total + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (hop_by_hop(&h[i]) || (!keep_length && is_content_length(&h[i])))
            continue;
        ms_http_header_t *x = &c->hdrs[k++];
        x->name = c->head_copy.data + c->head_copy.len;
        x->name_len = h[i].name_len;
        ms_buf_append(&c->head_copy, h[i].name, h[i].name_len);
        x->value = c->head_copy.data + c->head_copy.len;
        x->value_len = h[i].value_len;
        ms_buf_append(&c->head_copy, h[i].value, h[i].value_len);
    }
    c->n_hdrs = k;
}

static void on_up_head(void *data, int status, const ms_http_header_t *headers, size_t n,
                       int chunked, int64_t content_length)
{
    up_conn_t *c = data;
    c->got_head = 1;
    c->whole = c->whole || status == 204 || status == 304 || (status >= 100 && status < 200);
    /* A body of known length keeps its Content-Length on the way to the client (the relay
     * passes it on unframed); any other is re-framed (chunked). */
    keep_headers(c, headers, n, !c->whole && !chunked && content_length >= 0);
    if (c->whole) {
        c->status = status;
        return;
    }
    c->cb->on_head(c->data, status, c->hdrs, c->n_hdrs);
}

/* Past MS_LINK_WINDOW bytes the owner has not credited back (its client reads slowly) the
 * connection stops reading, so the replica's socket fills and the replica waits. */
static void on_up_body(void *data, const char *p, size_t n)
{
    up_conn_t *c = data;
    if (c->whole || !n)
        return;
    c->unacked += n;
    if (c->unacked > MS_LINK_WINDOW && !c->paused) {
        c->paused = 1;
        ms_http_client_pause(c->client);
    }
    c->cb->on_data(c->data, p, n);
}

static void on_up_done(void *data)
{
    up_conn_t *c = data;
    const ms_link_callbacks_t *cb = c->cb;
    void *cb_data = c->data;
    int whole = c->whole, status = c->status;
    end_stream(c);
    if (whole)
        cb->on_response(cb_data, status, c->hdrs, c->n_hdrs, "", 0);
    else
        cb->on_end(cb_data);
}

static void on_up_error(void *data, ms_http_client_error_t err)
{
    up_conn_t *c = data;
    const ms_link_callbacks_t *cb = c->cb;
    void *cb_data = c->data;
    /* Surely unsent: the connect failed. Or a kept-alive connection the server had just closed
     * (a race every HTTP client meets): an idempotent request may go again. */
    int never_sent =
        !c->body_taken && (err == MS_HTTP_CLIENT_CONNECT_FAILED ||
                           (c->reused && c->idempotent && !c->got_head &&
                            (err == MS_HTTP_CLIENT_PEER_CLOSED || err == MS_HTTP_CLIENT_RESET)));
    drop_client(c);
    end_stream(c);
    ms_link_error_t le = err == MS_HTTP_CLIENT_CONNECT_FAILED ? MS_LINK_ERR_CONNECT
                         : err == MS_HTTP_CLIENT_MALFORMED    ? MS_LINK_ERR_PROTOCOL
                         : err == MS_HTTP_CLIENT_PEER_CLOSED  ? MS_LINK_ERR_CLOSED
                                                              : MS_LINK_ERR_IO;
    cb->on_error(cb_data, le, never_sent);
}

static const ms_http_client_callbacks_t client_callbacks = {
    .on_head = on_up_head,
    .on_body = on_up_body,
    .on_done = on_up_done,
    .on_error = on_up_error,
};

/* A slot whose connection is idle and still good, else one without a connection (a new slot
 * when every one is busy). */
static up_conn_t *take_slot(ms_upstream_t *u)
{
    up_conn_t *empty = NULL;
    for (size_t i = 0; i < u->n_conns; i++) {
        up_conn_t *c = u->conns[i];
        if (c->id || c->release_due)
            continue;
        if (c->client && ms_http_client_idle(c->client))
            return c;
        drop_client(c); /* the server closed it meanwhile */
        if (!empty)
            empty = c;
    }
    if (empty)
        return empty;
    if (u->n_conns >= SLOT_MASK)
        return NULL;
    u->conns = ms_realloc(u->conns, (u->n_conns + 1) * sizeof *u->conns);
    up_conn_t *c = ms_calloc(1, sizeof *c);
    c->u = u;
    u->conns[u->n_conns++] = c;
    return c;
}

static int is_idempotent(const char *m)
{
    return !strcmp(m, "GET") || !strcmp(m, "HEAD") || !strcmp(m, "OPTIONS") || !strcmp(m, "PUT") ||
           !strcmp(m, "DELETE");
}

/* body_length: the body's length, or -1 for a chunked one. */
static void build_head(ms_upstream_t *u, const ms_link_request_t *lr, int64_t body_length)
{
    ms_buf_t *h = &u->head;
    ms_buf_reset(h);
    ms_buf_appendf(h, "%s %.*s HTTP/1.1\r\n", lr->method, (int)lr->target_len, lr->target);
    int has_host = 0;
    for (size_t i = 0; i < lr->n_headers; i++) {
        const ms_http_header_t *x = &lr->headers[i];
        has_host |= x->name_len == 4 && strncasecmp(x->name, "host", 4) == 0;
        ms_buf_append(h, x->name, x->name_len);
        ms_buf_append(h, ": ", 2);
        ms_buf_append(h, x->value, x->value_len);
        ms_buf_append(h, "\r\n", 2);
    }
    if (!has_host)
        ms_buf_append_str(h, "Host: localhost\r\n");
    ms_buf_appendf(h, "X-Request-ID: %s\r\n", lr->request_id);
    if (body_length < 0)
        ms_buf_append_str(h, "Transfer-Encoding: chunked\r\n\r\n");
    else
        ms_buf_appendf(h, "Content-Length: %lld\r\n\r\n", (long long)body_length);
}

/* ---- streamed request bodies ---------------------------------------------------------------- */

static void on_src_data(void *data, const char *p, size_t n);
static void on_src_end(void *data);
static const ms_http_body_reader_t src_reader = {on_src_data, on_src_end};

static void on_up_drained(void *data)
{
    up_conn_t *c = data;
    if (c->src)
        ms_http_request_body_read(c->src, &src_reader, c);
}

/* A piece of the client's body goes to the replica; past UPSTREAM_WRITE_LIMIT queued for its
 * socket the client's reading pauses until the socket drains. */
static void on_src_data(void *data, const char *p, size_t n)
{
    up_conn_t *c = data;
    uint32_t id = c->id;
    c->body_taken = 1;
    ms_http_client_write(c->client, p, n);
    if (c->id != id || !c->src)
        return; /* the write failed: the stream is over, and the slot may be someone else's */
    if (ms_http_client_queued(c->client) > UPSTREAM_WRITE_LIMIT) {
        ms_http_request_body_pause(c->src);
        ms_http_client_on_drain(c->client, on_up_drained, c);
    }
}

static void on_src_end(void *data)
{
    up_conn_t *c = data;
    c->src = NULL;
    ms_http_client_finish(c->client);
}

/* Reading starts from the loop, never inside ms_upstream_send: bytes already there would be
 * written at once, and a write failure would call the owner back before it has the stream id. */
static void start_body(up_conn_t *c)
{
    c->body_due = 0;
    ms_http_request_body_read(c->src, &src_reader, c);
}

uint32_t ms_upstream_send(ms_upstream_t *u, const ms_link_request_t *lr,
                          ms_http_request_t *body_source, const ms_link_callbacks_t *cb, void *data)
{
    up_conn_t *c = u->closing ? NULL : take_slot(u);
    if (!c)
        return 0;
    c->reused = c->client != NULL;
    if (!c->client)
        c->client = ms_http_client_connect(u->loop, u->path, "127.0.0.1", u->port);
    c->gen = (c->gen + 1) & ((1u << (32 - SLOT_BITS)) - 1);
    size_t slot = 0;
    while (u->conns[slot] != c)
        slot++;
    c->id = (c->gen << SLOT_BITS) | (uint32_t)(slot + 1);
    c->cb = cb;
    c->data = data;
    c->got_head = 0;
    c->whole = strcmp(lr->method, "HEAD") == 0;
    c->idempotent = is_idempotent(lr->method);
    c->body_taken = 0;
    c->unacked = 0;
    c->paused = 0;
    u->open_streams++;
    uint32_t id = c->id;
    int rc;
    if (body_source) {
        int64_t len = body_source->body_length;
        build_head(u, lr, len);
        rc = ms_http_client_send_head(c->client, u->head.data, u->head.len, len < 0,
                                      &client_callbacks, c);
    } else {
        build_head(u, lr, (int64_t)lr->body_len);
        rc = ms_http_client_send(c->client, u->head.data, u->head.len, lr->body, lr->body_len,
                                 &client_callbacks, c);
    }
    if (rc != 0) {
        drop_client(c);
        end_stream(c);
        return 0;
    }
    if (body_source) {
        c->src = body_source;
        c->body_due = 1;
        uv_idle_start(&u->deferred, on_deferred);
    }
    return id;
}

static void on_deferred(uv_idle_t *h)
{
    ms_upstream_t *u = h->data;
    uv_idle_stop(h);
    for (size_t i = 0; i < u->n_conns; i++) {
        up_conn_t *c = u->conns[i];
        if (c->body_due && c->id) {
            start_body(c);
        } else if (c->release_due) {
            c->release_due = 0;
            c->cb->on_released(c->data);
        }
    }
}

void ms_upstream_cancel(ms_upstream_t *u, uint32_t id)
{
    up_conn_t *c = conn_of(u, id);
    if (!c)
        return;
    end_stream(c);
    drop_client(c);
    c->release_due = 1;
    uv_idle_start(&u->deferred, on_deferred);
}

void ms_upstream_credit(ms_upstream_t *u, uint32_t id, size_t n)
{
    up_conn_t *c = conn_of(u, id);
    if (!c)
        return;
    c->unacked = n < c->unacked ? c->unacked - n : 0;
    if (c->paused && c->unacked <= MS_LINK_WINDOW) {
        c->paused = 0;
        ms_http_client_resume(c->client);
    }
}

size_t ms_upstream_open_streams(const ms_upstream_t *u)
{
    return u->open_streams;
}

static void on_releaser_closed(uv_handle_t *h)
{
    ms_upstream_t *u = h->data;
    for (size_t i = 0; i < u->n_conns; i++) {
        ms_buf_free(&u->conns[i]->head_copy);
        free(u->conns[i]->hdrs);
        free(u->conns[i]);
    }
    free(u->conns);
    ms_buf_free(&u->head);
    free(u->path);
    free(u);
}

void ms_upstream_close(ms_upstream_t *u)
{
    u->closing = 1;
    for (size_t i = 0; i < u->n_conns; i++) {
        up_conn_t *c = u->conns[i];
        if (c->release_due) {
            c->release_due = 0;
            c->cb->on_released(c->data);
        } else if (c->id) {
            const ms_link_callbacks_t *cb = c->cb;
            void *cb_data = c->data;
            drop_client(c);
            end_stream(c);
            cb->on_error(cb_data, MS_LINK_ERR_CLOSED, 0);
        }
        drop_client(c);
    }
    uv_close((uv_handle_t *)&u->deferred, on_releaser_closed);
}
