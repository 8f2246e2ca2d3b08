/*
 * http/client: one HTTP/1.1 connection that sends a request and parses the response, used for
 * the controller -> replica hop and for handle calls from replicas. Pools live with the owners;
 * this file only knows one connection.
 */
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
    return c->head_only ? 1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    ms_http_client_t *c = client_of_parser(p);
    if (c->busy && !c->closed)
        c->cb->on_body(c->cb_data, at, n);
    return c->closed ? -1 : 0;
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
        uv_stream_get_write_queue_size(&c->h.stream) > 0)
        c->broken = 1;
    return c->closed ? -1 : HPE_PAUSED;
}

/* After a parse of `n` bytes at `data` that returned `e`: hands over a complete response.
 * Bytes after it, before a new request was sent, are another response nobody asked for: the
 * connection is not reused. */
static void deliver(ms_http_client_t *c, llhttp_errno_t e, const char *data, size_t n)
{
    if (!c->complete)
        return;
    c->complete = 0;
    if (e == HPE_PAUSED && llhttp_get_error_pos(&c->parser) != data + n)
        c->broken = 1;
    if (c->broken)
        uv_read_stop(&c->h.stream);
    else
        llhttp_resume(&c->parser);
    if (c->busy && !c->closed) {
        c->busy = 0;
        c->cb->on_done(c->cb_data);
    }
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
            c->broken = c->complete; /* a response that ends here is the connection's last */
            deliver(c, e, NULL, 0);
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
    llhttp_errno_t e = llhttp_execute(&c->parser, buf->base, (size_t)nread);
    if (e == HPE_PAUSED) {
        deliver(c, e, buf->base, (size_t)nread);
        return;
    }
    if (e != HPE_OK && !c->closed)
        fail(c, MS_HTTP_CLIENT_MALFORMED);
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
    if (status < 0 && !c->closed)
        fail(c, MS_HTTP_CLIENT_WRITE_FAILED);
}

int ms_http_client_send(ms_http_client_t *c, const char *head, size_t head_len, const char *body,
                        size_t body_len, const ms_http_client_callbacks_t *cb, void *data)
{
    if (c->busy || c->broken || c->closed)
        return -1;
    c->cb = cb;
    c->cb_data = data;
    c->busy = 1;
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

int ms_http_client_idle(const ms_http_client_t *c)
{
    return !c->busy && !c->broken && !c->closed;
}

static void on_closed(uv_handle_t *h)
{
    ms_http_client_t *c = h->data;
    ms__headers_free(&c->hc);
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
