/*
 * http/client: one HTTP/1.1 connection that sends a request and parses the response, used for
 * the controller -> replica hop and for handle calls from replicas. Pools live with the owners;
 * this file only knows one connection.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http/internal.h"

typedef union any_stream {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
} any_stream_t;

struct ms_http_client {
    any_stream_t h;
    uv_connect_t connect_req;
    llhttp_t parser;
    ms__header_collector_t hc;
    const ms_http_client_callbacks_t *cb;
    void *cb_data;
    int pending_writes;
    ms_buf_t held; /* response bytes read but not parsed while paused */
    void (*drain_cb)(void *data);
    void *drain_data;
    int parsing;            /* llhttp_execute on the stack: pause/resume only set flags */
    unsigned body_open : 1; /* send_head: the request body is not finished yet */
    unsigned chunked : 1;   /* that body is chunk-framed by ms_http_client_write */
    unsigned paused : 1;    /* ms_http_client_pause: no callbacks, no reading */
    unsigned busy : 1;      /* a response is owed */
    unsigned broken : 1;    /* unusable: connect failed, EOF, error */
    unsigned closed : 1;    /* ms_http_client_close called */
    unsigned head_only : 1; /* the request was HEAD: the response has no body */
    unsigned complete : 1;  /* the response is parsed; on_done not yet called */
};

static ms_http_client_t *client_of_parser(llhttp_t *p)
{
    return (ms_http_client_t *)((char *)p - offsetof(ms_http_client_t, parser));
}

const char *ms_http_client_error_text(ms_http_client_error_t err)
{
    switch (err) {
    case MS_HTTP_CLIENT_CONNECT_FAILED:
        return "connect failed";
    case MS_HTTP_CLIENT_PEER_CLOSED:
        return "connection closed by peer";
    case MS_HTTP_CLIENT_RESET:
        return "connection reset";
    case MS_HTTP_CLIENT_UNEXPECTED:
        return "unexpected bytes from peer";
    case MS_HTTP_CLIENT_MALFORMED:
        return "malformed response";
    case MS_HTTP_CLIENT_WRITE_FAILED:
        return "write failed";
    }
    return "unknown error";
}

static void fail(ms_http_client_t *c, ms_http_client_error_t err)
{
    if (c->broken)
        return;
    c->broken = 1;
    if (c->busy && !c->closed) {
        c->busy = 0;
        c->cb->on_error(c->cb_data, err);
    }
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    ms__headers_add_name(&client_of_parser(p)->hc, at, n);
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    ms__headers_add_value(&client_of_parser(p)->hc, at, n);
    return 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    ms__headers_name_done(&client_of_parser(p)->hc);
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    ms__headers_value_done(&client_of_parser(p)->hc);
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    ms_http_client_t *c = client_of_parser(p);
    ms__headers_finish(&c->hc);
    if (c->busy && !c->closed) {
        int chunked = (p->flags & F_CHUNKED) != 0;
        int64_t len = (p->flags & F_CONTENT_LENGTH) ? (int64_t)p->content_length : -1;
        c->cb->on_head(c->cb_data, p->status_code, c->hc.array, c->hc.n, chunked, len);
    }
    if (c->closed)
        return -1;
    if (c->head_only)
        return 1; /* no body: only on_done is left, and deliver() holds it while paused */
    return c->paused ? HPE_PAUSED : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    ms_http_client_t *c = client_of_parser(p);
    if (c->busy && !c->closed)
        c->cb->on_body(c->cb_data, at, n);
    if (c->closed)
        return -1;
    return c->paused ? HPE_PAUSED : 0;
}

/* The parser stops after each response so that deliver() can look at what follows it. */
static int on_message_complete(llhttp_t *p)
{
    ms_http_client_t *c = client_of_parser(p);
    ms__headers_reset(&c->hc);
    c->complete = 1;
    /* A connection is reused only when nothing about its state is in doubt: the peer keeps it
     * open, it did not switch protocols, and the request went out whole before the answer
     * came (an early answer leaves the rest of the body in flight, to be read as a request). */
    if (!llhttp_should_keep_alive(p) || p->upgrade || p->status_code < 200 ||
        uv_stream_get_write_queue_size(&c->h.stream) > 0 || c->body_open)
        c->broken = 1;
    return c->closed ? -1 : HPE_PAUSED;
}

/* Hands over a complete response, unless the owner paused (then resume does). */
static void deliver(ms_http_client_t *c)
{
    if (!c->complete || c->paused)
        return;
    c->complete = 0;
    if (c->broken) {
        uv_read_stop(&c->h.stream);
        ms_buf_reset(&c->held);
    } else
        llhttp_resume(&c->parser);
    if (c->busy && !c->closed) {
        c->busy = 0;
        c->cb->on_done(c->cb_data);
    }
}

/* Parses n bytes at data; returns how many were taken. Fewer when the owner paused inside a
 * callback: the rest is the caller's to keep. Bytes after a complete response, before a new
 * request was sent, are another response nobody asked for: the connection is not reused. */
static size_t parse_response(ms_http_client_t *c, const char *data, size_t n)
{
    c->parsing++;
    llhttp_errno_t e = llhttp_execute(&c->parser, data, n);
    c->parsing--;
    size_t used = n;
    if (e == HPE_PAUSED) {
        used = (size_t)(llhttp_get_error_pos(&c->parser) - data);
        if (c->complete && used != n)
            c->broken = 1;
        else if (!c->complete)
            llhttp_resume(&c->parser); /* the parser goes on where it stopped */
    } else if (e != HPE_OK && !c->closed) {
        fail(c, MS_HTTP_CLIENT_MALFORMED);
        return n;
    }
    deliver(c);
    return c->broken ? n : used;
}

static const llhttp_settings_t *response_settings(void)
{
    static llhttp_settings_t s;
    static int ready;
    if (!ready) {
        llhttp_settings_init(&s);
        s.on_header_field = on_header_field;
        s.on_header_value = on_header_value;
        s.on_header_field_complete = on_header_field_complete;
        s.on_header_value_complete = on_header_value_complete;
        s.on_headers_complete = on_headers_complete;
        s.on_body = on_body;
        s.on_message_complete = on_message_complete;
        ready = 1;
    }
    return &s;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    ms_http_client_t *c = s->data;
    if (c->closed)
        return;
    if (nread < 0) {
        if (nread == UV_EOF && c->busy) {
            /* completes a close-delimited body, if that is one */
            llhttp_errno_t e = llhttp_finish(&c->parser);
            (void)e;
            c->broken = c->complete; /* a response that ends here is the connection's last */
            deliver(c);
        }
        uv_read_stop(s);
        fail(c, nread == UV_EOF ? MS_HTTP_CLIENT_PEER_CLOSED : MS_HTTP_CLIENT_RESET);
        return;
    }
    if (nread == 0)
        return;
    if (!c->busy) {
        fail(c, MS_HTTP_CLIENT_UNEXPECTED);
        return;
    }
    size_t used = parse_response(c, buf->base, (size_t)nread);
    if (used < (size_t)nread && !c->closed)
        ms_buf_append(&c->held, buf->base + used, (size_t)nread - used);
}

static void on_connect(uv_connect_t *req, int status)
{
    ms_http_client_t *c = req->handle->data;
    if (c->closed)
        return;
    if (status < 0) {
        fail(c, MS_HTTP_CLIENT_CONNECT_FAILED);
        return;
    }
    if (!c->paused)
        uv_read_start(&c->h.stream, ms__alloc_read_buffer, on_read);
}

ms_http_client_t *ms_http_client_connect(uv_loop_t *loop, const char *path, const char *host,
                                         int port)
{
    ms_http_client_t *c = ms_calloc(1, sizeof *c);
    llhttp_init(&c->parser, HTTP_RESPONSE, response_settings());
    if (path) {
        uv_pipe_init(loop, &c->h.pipe, 0);
        c->h.handle.data = c;
        uv_pipe_connect(&c->connect_req, &c->h.pipe, path, on_connect);
        return c;
    }
    uv_tcp_init(loop, &c->h.tcp);
    c->h.handle.data = c;
    struct sockaddr_storage addr;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0) {
        c->broken = 1;
        return c;
    }
    if (uv_tcp_connect(&c->connect_req, &c->h.tcp, (struct sockaddr *)&addr, on_connect) != 0)
        c->broken = 1;
    else
        uv_tcp_nodelay(&c->h.tcp, 1);
    return c;
}

static void on_write_done(void *data, int status)
{
    ms_http_client_t *c = data;
    if (c->closed)
        return;
    if (status < 0) {
        fail(c, MS_HTTP_CLIENT_WRITE_FAILED);
        return;
    }
    if (c->drain_cb && uv_stream_get_write_queue_size(&c->h.stream) == 0) {
        void (*cb)(void *) = c->drain_cb;
        c->drain_cb = NULL;
        cb(c->drain_data);
    }
}

int ms_http_client_send(ms_http_client_t *c, const char *head, size_t head_len, const char *body,
                        size_t body_len, const ms_http_client_callbacks_t *cb, void *data)
{
    if (c->busy || c->broken || c->closed)
        return -1;
    c->cb = cb;
    c->cb_data = data;
    c->busy = 1;
    c->body_open = 0;
    c->head_only = head_len >= 5 && memcmp(head, "HEAD ", 5) == 0;
    uv_buf_t bufs[2] = {uv_buf_init((char *)head, (unsigned)head_len),
                        uv_buf_init((char *)body, (unsigned)body_len)};
    int r = ms__stream_write(&c->h.stream, bufs, body_len ? 2 : 1, &c->pending_writes,
                             on_write_done, c);
    if (r < 0) {
        c->busy = 0;
        c->broken = 1;
        return -1;
    }
    return 0;
}

int ms_http_client_send_head(ms_http_client_t *c, const char *head, size_t head_len, int chunked,
                             const ms_http_client_callbacks_t *cb, void *data)
{
    if (ms_http_client_send(c, head, head_len, NULL, 0, cb, data) != 0)
        return -1;
    c->body_open = 1;
    c->chunked = chunked ? 1 : 0;
    return 0;
}

static void client_write(ms_http_client_t *c, const uv_buf_t *bufs, unsigned n)
{
    if (ms__stream_write(&c->h.stream, bufs, n, &c->pending_writes, on_write_done, c) < 0)
        fail(c, MS_HTTP_CLIENT_WRITE_FAILED);
}

void ms_http_client_write(ms_http_client_t *c, const char *p, size_t n)
{
    if (n == 0 || !c->body_open || c->broken || c->closed)
        return;
    if (!c->chunked) {
        uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
        client_write(c, &b, 1);
        return;
    }
    char size_line[24];
    int len = snprintf(size_line, sizeof size_line, "%zx\r\n", n);
    uv_buf_t bufs[3] = {uv_buf_init(size_line, (unsigned)len), uv_buf_init((char *)p, (unsigned)n),
                        uv_buf_init("\r\n", 2)};
    client_write(c, bufs, 3);
}

void ms_http_client_finish(ms_http_client_t *c)
{
    if (!c->body_open)
        return;
    c->body_open = 0;
    if (c->chunked && !c->broken && !c->closed) {
        uv_buf_t b = uv_buf_init("0\r\n\r\n", 5);
        client_write(c, &b, 1);
    }
}

size_t ms_http_client_queued(const ms_http_client_t *c)
{
    return uv_stream_get_write_queue_size(&c->h.stream);
}

void ms_http_client_on_drain(ms_http_client_t *c, void (*cb)(void *data), void *data)
{
    c->drain_cb = cb;
    c->drain_data = data;
}

void ms_http_client_pause(ms_http_client_t *c)
{
    if (c->paused || c->closed)
        return;
    c->paused = 1;
    uv_read_stop(&c->h.stream);
}

/* Parses what was kept while paused, then reads again unless paused anew. */
void ms_http_client_resume(ms_http_client_t *c)
{
    if (!c->paused || c->closed)
        return;
    c->paused = 0;
    if (c->parsing)
        return; /* inside on_body: the parse goes on when the callback returns */
    if (c->held.len > 0) {
        size_t used = parse_response(c, c->held.data, c->held.len);
        if (c->closed)
            return;
        ms_buf_consume(&c->held, used);
    } else
        deliver(c);
    if (!c->paused && !c->broken && !c->closed && c->held.len == 0 && c->connect_req.handle &&
        uv_is_readable(&c->h.stream))
        uv_read_start(&c->h.stream, ms__alloc_read_buffer, on_read);
}

int ms_http_client_idle(const ms_http_client_t *c)
{
    return !c->busy && !c->broken && !c->closed;
}

static void on_closed(uv_handle_t *h)
{
    ms_http_client_t *c = h->data;
    ms__headers_free(&c->hc);
    ms_buf_free(&c->held);
    free(c);
}

void ms_http_client_close(ms_http_client_t *c)
{
    if (c->closed)
        return;
    c->closed = 1;
    c->busy = 0;
    uv_close(&c->h.handle, on_closed);
}
