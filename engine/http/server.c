/*
 * http/server: HTTP/1.1 server connections on libuv streams (TCP or Unix sockets).
 *
 * One request per connection is owed a response at a time. Pipelined requests that arrive
 * meanwhile stay unparsed in the connection's input buffer (the parser is paused after each
 * message) and are handed over once the response before them is finished, so responses go out
 * in order without the server holding more than one request's state per connection.
 *
 * Memory: every buffer of a connection (input, target, headers, body, response head) is reused
 * from request to request; a steady stream of small keep-alive requests allocates nothing.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "http/internal.h"

/* Unparsed input kept while a response is owed; past this the connection stops reading so a
 * client cannot make us buffer without bound by pipelining. */
#define PIPELINE_BUFFER_LIMIT (256 * 1024)

typedef union any_stream {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
} any_stream_t;

typedef struct conn conn_t;

struct ms_http_server {
    uv_loop_t *loop;
    any_stream_t listener;
    ms_http_server_config_t cfg;
    char *unix_path; /* unlinked on close */
    conn_t *conns;   /* intrusive list of live connections */
    size_t inflight;
    int listener_open;
    int stopping; /* no new connections; close each after its current response */
    int closing;  /* ms_http_server_close called; freed when the last handle closes */
    size_t open_handles;
};

struct conn {
    any_stream_t h;
    uv_timer_t timer;
    ms_http_server_t *srv;
    conn_t *prev, *next;
    llhttp_t parser;
    ms_buf_t in;     /* received bytes not yet parsed */
    ms_buf_t target; /* request target, then path and query, NUL-separated */
    ms__header_collector_t hc;
    ms_buf_t body;
    ms_buf_t out; /* response head scratch */
    size_t head_bytes;
    int error_status;         /* 400/413/431/501 chosen inside a parser callback */
    const char *error_reason; /* its message (static text); NULL: llhttp's reason */
    const char *scan_from;    /* head bytes before this were checked for obs-fold */
    const char *scan_end;     /* end of the bytes llhttp_execute was given */
    size_t name_len;          /* bytes of the header name being parsed */
    ms_http_request_t req;
    ms_http_drain_cb drain_cb; /* waits for the queued response bytes to be written */
    void *drain_data;
    ms_http_body_reader_t reader; /* of a streamed body */
    void *reader_data;
    uint64_t resp_left;      /* bytes a start_length response still owes */
    unsigned paused : 1;     /* parser paused after a complete message */
    unsigned in_message : 1; /* bytes of a request arrived, not yet complete */
    unsigned req_active : 1; /* request handed to the owner, response owed */
    unsigned keep_alive : 1; /* of the active request */
    unsigned head_only : 1;  /* HEAD: no body bytes in the response */
    unsigned resp_started : 1;
    unsigned resp_chunked : 1;
    unsigned close_after_write : 1;
    unsigned closing : 1;
    unsigned reading : 1;
    unsigned in_respond : 1;
    unsigned body_phase : 1;    /* head parsed, body still arriving */
    unsigned head_scan : 1;     /* between the request target and the blank line ending the head */
    unsigned scan_lf : 1;       /* the last head byte checked was LF */
    unsigned scan_cr : 1;       /* ... was CR: the next must be LF */
    unsigned absolute : 1;      /* absolute-form target (http://host/path) */
    unsigned asterisk : 1;      /* OPTIONS * */
    unsigned streamed : 1;      /* the active request's body is pulled by the owner */
    unsigned body_reading : 1;  /* a reader is set and not paused */
    unsigned body_complete : 1; /* the streamed body was parsed to its end */
    unsigned end_told : 1;      /* on_end was called */
    unsigned resp_length : 1;   /* start_length response: resp_left counts down */
    unsigned resp_over : 1;     /* more bytes were offered than declared */
    int parsing;                /* depth of parse loops on the stack */
    int pending_writes;
    int open_handles;
    uint64_t deadline_ms; /* loop time at which the connection times out; 0 = none */
    int resp_status;      /* of the active request's response, once its head is built */
};

static const llhttp_settings_t *request_settings(void);
static void conn_close(conn_t *c);
static void tell_complete(conn_t *c, int status, int disconnected);
static void conn_start_reading(conn_t *c);
static void conn_drain_input(conn_t *c);

/* ---- timers ------------------------------------------------------------------------------- */

/* Timeouts are lazy: a connection keeps one deadline (0 = none) and the uv timer is only
 * (re)started when the deadline moves earlier than its due time. Re-arming on every request
 * would cost a timer-heap update per request; this way a busy keep-alive connection touches the
 * heap about once per timeout period. */
static void on_conn_timeout(uv_timer_t *t)
{
    conn_t *c = t->data;
    /* The owner bounds the time a request may take, except while it is reading a streamed
     * body: then a silent client is the slow one. */
    int reading_body = c->streamed && c->body_reading && !c->body_complete;
    if ((c->req_active && !reading_body) || c->deadline_ms == 0)
        return;
    uint64_t now = uv_now(t->loop);
    if (now < c->deadline_ms) {
        uv_timer_start(&c->timer, on_conn_timeout, c->deadline_ms - now, 0);
        return;
    }
    ms_debug("http: closing %s connection after timeout", c->in_message ? "slow" : "idle");
    conn_close(c);
}

static void conn_arm_timer(conn_t *c, double seconds)
{
    if (c->closing)
        return;
    uint64_t ms = seconds > 0 ? (uint64_t)(seconds * 1000.0) : 0;
    if (ms == 0) {
        c->deadline_ms = 0;
        return;
    }
    c->deadline_ms = uv_now(c->timer.loop) + ms;
    if (!uv_is_active((uv_handle_t *)&c->timer) || uv_timer_get_due_in(&c->timer) > ms)
        uv_timer_start(&c->timer, on_conn_timeout, ms, 0);
}

static void conn_disarm_timer(conn_t *c)
{
    c->deadline_ms = 0;
}

/* ---- closing ------------------------------------------------------------------------------ */

static void server_handle_closed(ms_http_server_t *srv)
{
    if (--srv->open_handles == 0 && srv->closing) {
        if (srv->unix_path)
            unlink(srv->unix_path);
        free(srv->unix_path);
        free(srv);
    }
}

static void on_conn_handle_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    if (--c->open_handles > 0)
        return;
    ms_http_server_t *srv = c->srv;
    ms_buf_free(&c->in);
    ms_buf_free(&c->target);
    ms_buf_free(&c->body);
    ms_buf_free(&c->out);
    ms__headers_free(&c->hc);
    free(c);
    server_handle_closed(srv);
}

static void conn_close(conn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    ms_http_server_t *srv = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->req_active) {
        c->req_active = 0;
        srv->inflight--;
        tell_complete(c, MS_HTTP_DISCONNECTED, 1);
        if (srv->cfg.on_abort)
            srv->cfg.on_abort(&c->req, srv->cfg.data);
    }
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
    uv_close(&c->h.handle, on_conn_handle_closed);
}

/* ---- writing ------------------------------------------------------------------------------ */

static void on_conn_write_done(void *data, int status)
{
    conn_t *c = data;
    if (c->closing)
        return;
    if (status < 0) {
        /* Closing here while the owner is inside a respond call would abort a request under
         * its feet; finish_request closes instead. */
        if (c->in_respond)
            c->close_after_write = 1;
        else
            conn_close(c);
        return;
    }
    if (c->close_after_write && c->pending_writes == 0 && !c->req_active)
        conn_close(c);
    else if (c->drain_cb && c->pending_writes == 0) {
        ms_http_drain_cb cb = c->drain_cb;
        c->drain_cb = NULL;
        cb(&c->req, c->drain_data);
    }
}

static void conn_write(conn_t *c, const uv_buf_t *bufs, unsigned n)
{
    if (c->closing)
        return;
    int r = ms__stream_write(&c->h.stream, bufs, n, &c->pending_writes, on_conn_write_done, c);
    if (r < 0)
        on_conn_write_done(c, r);
}

/* Builds the status line and headers into c->out. content_length < 0 means a streamed body. */
static void build_head(conn_t *c, int status, const ms_http_header_t *headers, size_t n_headers,
                       long long content_length)
{
    ms_buf_t *b = &c->out;
    ms_buf_reset(b);
    c->resp_status = status;
    ms_buf_append(b, c->req.http_minor == 0 ? "HTTP/1.0 " : "HTTP/1.1 ", 9);
    ms_buf_append_uint(b, (uint64_t)status);
    ms_buf_append(b, " ", 1);
    ms_buf_append_str(b, ms_http_status_text(status));
    ms_buf_append(b, "\r\n", 2);
    for (size_t i = 0; i < n_headers; i++) {
        const ms_http_header_t *h = &headers[i];
        /* Framing and the request id are the server's business, whatever the owner passes. */
        if (ms_http_header_is(h, "content-length") || ms_http_header_is(h, "transfer-encoding") ||
            ms_http_header_is(h, "connection") || ms_http_header_is(h, "x-request-id"))
            continue;
        ms_buf_append(b, h->name, h->name_len);
        ms_buf_append(b, ": ", 2);
        ms_buf_append(b, h->value, h->value_len);
        ms_buf_append(b, "\r\n", 2);
    }
    ms_buf_append(b, "X-Request-ID: ", 14);
    ms_buf_append_str(b, c->req.request_id);
    ms_buf_append(b, "\r\n", 2);
    if (content_length >= 0) {
        ms_buf_append(b, "Content-Length: ", 16);
        ms_buf_append_uint(b, (uint64_t)content_length);
        ms_buf_append(b, "\r\n", 2);
    } else if (c->resp_chunked)
        ms_buf_append(b, "Transfer-Encoding: chunked\r\n", 28);
    if (c->srv->stopping)
        c->keep_alive = 0;
    if (!c->keep_alive)
        ms_buf_append(b, "Connection: close\r\n", 19);
    else if (c->req.http_minor == 0)
        ms_buf_append(b, "Connection: keep-alive\r\n", 24);
    ms_buf_append(b, "\r\n", 2);
}

static void reset_request_state(conn_t *c)
{
    ms_buf_reset(&c->target);
    ms_buf_reset(&c->body);
    ms__headers_reset(&c->hc);
    c->head_bytes = 0;
    c->error_status = 0;
    c->error_reason = NULL;
    c->name_len = 0;
    c->head_scan = 0;
    c->absolute = 0;
    c->asterisk = 0;
    c->resp_started = 0;
    c->resp_chunked = 0;
    c->resp_length = 0;
    c->resp_over = 0;
    c->streamed = 0;
    c->body_reading = 0;
    c->body_complete = 0;
    c->end_told = 0;
    c->req.body_streamed = 0;
    c->req.body_length = 0;
    c->head_only = 0;
    c->drain_cb = NULL;
    c->req.user = NULL;
    c->req.route = NULL;
    c->req.route_prefix = NULL;
    c->req.served_by[0] = '\0';
    c->resp_status = 0;
}

static void conn_start_reading(conn_t *c);

/* The response of the active request is fully queued: release the request and move on to the
 * next pipelined one, or wait for it. */
static void tell_complete(conn_t *c, int status, int disconnected)
{
    ms_http_server_t *srv = c->srv;
    if (srv->cfg.on_complete)
        srv->cfg.on_complete(&c->req, status, disconnected, uv_hrtime() - c->req.started_ns,
                             srv->cfg.data);
}

static void finish_request(conn_t *c)
{
    ms_http_server_t *srv = c->srv;
    c->req_active = 0;
    srv->inflight--;
    tell_complete(c, c->resp_status, 0);
    /* Unread body bytes would be parsed as the next request: the connection ends here. */
    if (c->streamed && !c->body_complete)
        c->close_after_write = 1;
    reset_request_state(c);
    if (c->closing)
        return;
    if (!c->keep_alive || srv->stopping || c->close_after_write) {
        c->close_after_write = 1;
        uv_read_stop(&c->h.stream);
        c->reading = 0;
        if (c->pending_writes == 0)
            conn_close(c);
        return;
    }
    conn_start_reading(c);
    if (c->parsing == 0 && c->in.len > 0)
        conn_drain_input(c);
    if (!c->req_active && !c->closing && !c->in_message)
        conn_arm_timer(c, srv->cfg.limits.keep_alive_timeout_s);
}

int ms_http_response_started(const ms_http_request_t *req)
{
    const conn_t *c = (const conn_t *)((const char *)req - offsetof(conn_t, req));
    return c->resp_started;
}

static conn_t *conn_of(ms_http_request_t *req)
{
    return (conn_t *)((char *)req - offsetof(conn_t, req));
}

size_t ms_http_response_queued(ms_http_request_t *req)
{
    return uv_stream_get_write_queue_size(&conn_of(req)->h.stream);
}

void ms_http_response_on_drain(ms_http_request_t *req, ms_http_drain_cb cb, void *data)
{
    conn_t *c = conn_of(req);
    c->drain_cb = cb;
    c->drain_data = data;
}

void ms_http_respond(ms_http_request_t *req, int status, const ms_http_header_t *headers,
                     size_t n_headers, const char *body, size_t body_len)
{
    conn_t *c = conn_of(req);
    c->in_respond = 1;
    c->resp_started = 1;
    build_head(c, status, headers, n_headers, (long long)body_len);
    uv_buf_t bufs[2] = {uv_buf_init(c->out.data, (unsigned)c->out.len),
                        uv_buf_init((char *)body, (unsigned)body_len)};
    conn_write(c, bufs, (c->head_only || body_len == 0) ? 1 : 2);
    c->in_respond = 0;
    finish_request(c);
}

/* The message as the inside of a JSON string. It may hold script text and cuts made by
 * snprintf, so it is made valid UTF-8 first, and the escaped copy ends between characters. */
static size_t json_escape_into(char *out, size_t cap, const char *message)
{
    char clean[1024];
    size_t len = ms_utf8_copy(clean, sizeof clean, message, strlen(message));
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)clean[i];
        /* Room for the longest escape of a lead byte, and the rest of its character. */
        if ((ch & 0xc0) != 0x80 && n + 7 >= cap)
            break;
        if (ch == '"' || ch == '\\') {
            out[n++] = '\\';
            out[n++] = (char)ch;
        } else if (ch < 0x20) {
            n += (size_t)snprintf(out + n, cap - n, "\\u%04x", ch);
        } else {
            out[n++] = (char)ch;
        }
    }
    out[n] = '\0';
    return n;
}

size_t ms_http_error_body(char *out, size_t cap, const char *message, const char *request_id)
{
    char escaped[1024];
    json_escape_into(escaped, sizeof escaped, message);
    int n = snprintf(out, cap, "{\"error\": \"%s\", \"request_id\": \"%s\"}", escaped, request_id);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

void ms_http_respond_error_headers(ms_http_request_t *req, int status, const char *message,
                                   const ms_http_header_t *headers, size_t n_headers)
{
    char body[MS_HTTP_ERROR_BODY_MAX];
    size_t n = ms_http_error_body(body, sizeof body, message, req->request_id);
    ms_http_header_t all[9] = {{"Content-Type", 12, "application/json", 16}};
    if (n_headers > 8)
        n_headers = 8;
    if (n_headers)
        memcpy(all + 1, headers, n_headers * sizeof *headers);
    ms_http_respond(req, status, all, n_headers + 1, body, n);
}

void ms_http_respond_error(ms_http_request_t *req, int status, const char *message)
{
    ms_http_respond_error_headers(req, status, message, NULL, 0);
}

void ms_http_response_start(ms_http_request_t *req, int status, const ms_http_header_t *headers,
                            size_t n_headers)
{
    conn_t *c = conn_of(req);
    c->in_respond = 1;
    c->resp_started = 1;
    if (req->http_minor == 0)
        c->keep_alive = 0; /* HTTP/1.0 has no chunked encoding: the close ends the body */
    else
        c->resp_chunked = 1;
    build_head(c, status, headers, n_headers, -1);
    uv_buf_t b = uv_buf_init(c->out.data, (unsigned)c->out.len);
    conn_write(c, &b, 1);
    c->in_respond = 0;
}

void ms_http_response_chunk(ms_http_request_t *req, const char *data, size_t len)
{
    conn_t *c = conn_of(req);
    if (len == 0 || c->head_only)
        return;
    if (c->resp_length && c->resp_over)
        return;
    c->in_respond = 1;
    if (c->resp_length && len > c->resp_left) {
        len = (size_t)c->resp_left;
        c->resp_over = 1;
    }
    c->resp_left -= len;
    if (c->resp_chunked) {
        char size_line[24];
        int n = snprintf(size_line, sizeof size_line, "%zx\r\n", len);
        uv_buf_t bufs[3] = {uv_buf_init(size_line, (unsigned)n), uv_buf_init((char *)data, len),
                            uv_buf_init("\r\n", 2)};
        conn_write(c, bufs, 3);
    } else {
        uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
        conn_write(c, &b, 1);
    }
    c->in_respond = 0;
}

void ms_http_response_end(ms_http_request_t *req)
{
    conn_t *c = conn_of(req);
    if (c->resp_chunked && !c->head_only) {
        uv_buf_t b = uv_buf_init("0\r\n\r\n", 5);
        c->in_respond = 1;
        conn_write(c, &b, 1);
        c->in_respond = 0;
    }
    if (c->resp_length && !c->head_only && (c->resp_left != 0 || c->resp_over)) {
        ms_debug("http: response length differs from its Content-Length (request %s)",
                 req->request_id);
        c->keep_alive = 0;
        c->close_after_write = 1;
    }
    finish_request(c);
}

void ms_http_response_start_length(ms_http_request_t *req, int status,
                                   const ms_http_header_t *headers, size_t n_headers,
                                   uint64_t content_length)
{
    conn_t *c = conn_of(req);
    c->in_respond = 1;
    c->resp_started = 1;
    c->resp_length = 1;
    c->resp_left = content_length;
    build_head(c, status, headers, n_headers, (long long)content_length);
    uv_buf_t b = uv_buf_init(c->out.data, (unsigned)c->out.len);
    conn_write(c, &b, 1);
    c->in_respond = 0;
}

void ms_http_response_abort(ms_http_request_t *req)
{
    conn_t *c = conn_of(req);
    c->keep_alive = 0;
    c->close_after_write = 1;
    /* Without the terminating chunk the client sees a truncated body, not a complete one. */
    c->resp_chunked = 0;
    finish_request(c);
}

/* Answers a request that could not be parsed (400/413/431) and closes the connection. */
static void fail_connection(conn_t *c, int status, const char *message)
{
    ms_http_server_t *srv = c->srv;
    if (c->req.request_id[0] == '\0')
        ms_random_id(c->req.request_id);
    c->req.http_minor = 1;
    c->req.started_ns = uv_hrtime();
    c->req_active = 1; /* respond's bookkeeping expects an active request */
    srv->inflight++;
    c->keep_alive = 0;
    ms_info("http: %d %s (request %s)", status, message, c->req.request_id);
    ms_http_respond_error(&c->req, status, message);
}

/* ---- parsing ------------------------------------------------------------------------------ */

static conn_t *conn_of_parser(llhttp_t *p)
{
    return (conn_t *)((char *)p - offsetof(conn_t, parser));
}

static int count_head_bytes(conn_t *c, size_t n)
{
    c->head_bytes += n;
    if (c->head_bytes > c->srv->cfg.limits.max_header_bytes) {
        c->error_status = 431;
        return -1;
    }
    return 0;
}

/* Fails the request from inside a parser callback; parse_region answers it. */
static int reject(conn_t *c, int status, const char *reason)
{
    c->error_status = status;
    c->error_reason = reason;
    return -1;
}

/* llhttp 8 accepts obs-fold (a header line starting with SP or HT continues the previous one),
 * which nginx and RFC 9112 reject: peers that unfold differently would read another header
 * set. The parser only shows header names and values, so the bytes between them (the colon,
 * OWS, CRLF and any fold) are checked here, from `from` up to `to`, across reads. Stops at the
 * blank line that ends the head. A CR not followed by LF is refused too: llhttp 8.1 takes
 * "\r" plus any byte as a line end (and can end the head there), where another parser would
 * read on, so the next request would begin at different bytes for each (found by
 * fuzz_http_request: the head's end, and with it what followed, depended on the reads). */
static int scan_head(conn_t *c, const char *from, const char *to)
{
    if (!c->head_scan)
        return 0;
    /* The state lives in locals while the loop runs: every head byte of every request comes
     * through here. */
    int cr = c->scan_cr, lf = c->scan_lf;
    for (const char *q = from; q < to; q++) {
        char ch = *q;
        if (cr && ch != '\n')
            return reject(c, 400, "malformed request: a CR not followed by LF in the head");
        if (lf && (ch == ' ' || ch == '\t'))
            return reject(c, 400,
                          "malformed request: obs-fold (a header line starting with "
                          "a space or tab) is not accepted");
        int blank_line = lf && (ch == '\r' || ch == '\n');
        cr = ch == '\r';
        lf = ch == '\n';
        if (blank_line) {
            c->head_scan = 0;
            break;
        }
    }
    c->scan_cr = cr;
    c->scan_lf = lf;
    return 0;
}

/* Checks the head bytes before a name or value piece at `at`, and its first byte (llhttp keeps
 * the fold's whitespace in the value piece after it). */
static int scan_before_piece(conn_t *c, const char *at, size_t n)
{
    if (!c->head_scan)
        return 0;
    if (scan_head(c, c->scan_from, at + (n > 0)))
        return -1;
    c->scan_from = at + n;
    /* llhttp places an empty value's piece at the start of the next line: the line break just
     * scanned is still the last thing seen, so the blank line after it must still end the scan
     * (found by fuzz_http_request: after a last header with an empty value the scan ran on into
     * a pipelined request, and that one's fold got the valid request before it refused). */
    if (n > 0)
        c->scan_lf = 0;
    return 0;
}

static int on_message_begin(llhttp_t *p)
{
    conn_t *c = conn_of_parser(p);
    c->in_message = 1;
    c->req.request_id[0] = '\0';
    conn_arm_timer(c, c->srv->cfg.limits.header_timeout_s);
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    conn_t *c = conn_of_parser(p);
    if (count_head_bytes(c, n))
        return -1;
    ms_buf_append(&c->target, at, n);
    c->head_scan = 1;
    c->scan_lf = 0;
    c->scan_cr = 0;
    c->scan_from = at + n;
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    conn_t *c = conn_of_parser(p);
    if (scan_before_piece(c, at, n) || count_head_bytes(c, n))
        return -1;
    c->name_len += n;
    if (!c->body_phase) /* trailers after a chunked body are counted but not kept */
        ms__headers_add_name(&c->hc, at, n);
    return 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    conn_t *c = conn_of_parser(p);
    if (c->name_len == 0)
        return reject(c, 400, "malformed request: empty header name");
    /* ": " and CRLF count too, once per header: a name that came in pieces (split reads) must
     * not count them once per piece. */
    if (count_head_bytes(c, 4))
        return -1;
    c->name_len = 0;
    if (!c->body_phase)
        ms__headers_name_done(&c->hc);
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    conn_t *c = conn_of_parser(p);
    if (!c->body_phase)
        ms__headers_value_done(&c->hc);
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    conn_t *c = conn_of_parser(p);
    if (scan_before_piece(c, at, n) || count_head_bytes(c, n))
        return -1;
    if (!c->body_phase)
        ms__headers_add_value(&c->hc, at, n);
    return 0;
}

/* A client-supplied id is kept only if it is short and plain, since it is echoed in headers and
 * embedded in JSON bodies and logs. */
static void take_request_id(conn_t *c)
{
    size_t len = 0;
    const char *v = ms_http_request_header(&c->req, "x-request-id", &len);
    if (v && len > 0 && len < sizeof c->req.request_id) {
        size_t i = 0;
        for (; i < len; i++) {
            unsigned char ch = (unsigned char)v[i];
            if (ch <= 0x20 || ch >= 0x7f || ch == '"' || ch == '\\')
                break;
        }
        if (i == len) {
            memcpy(c->req.request_id, v, len);
            c->req.request_id[len] = '\0';
            return;
        }
    }
    ms_random_id(c->req.request_id);
}

/* Length of "http://" or "https://" at the start of the target, 0 if neither. */
static size_t scheme_len(const char *t, size_t len)
{
    if (len >= 7 && strncasecmp(t, "http://", 7) == 0)
        return 7;
    if (len >= 8 && strncasecmp(t, "https://", 8) == 0)
        return 8;
    return 0;
}

/* Index just past the authority of an absolute-form target. */
static size_t authority_end(const char *t, size_t len)
{
    size_t i = scheme_len(t, len);
    while (i < len && t[i] != '/' && t[i] != '?')
        i++;
    return i;
}

/* The request-target forms of RFC 9112 section 3.2. Origin-form is the usual one; absolute-form
 * (a proxy's form) is resolved to its path; asterisk-form is answered here. CONNECT's
 * authority-form would turn the connection into a tunnel, which moonserve does not offer. */
static int check_target(conn_t *c, llhttp_t *p)
{
    const char *t = c->target.data;
    size_t len = c->target.len;
    if (p->method == HTTP_CONNECT)
        return reject(c, 501, "CONNECT is not supported: moonserve does not tunnel");
    if (len > 0 && t[0] == '/')
        return 0;
    if (len == 1 && t[0] == '*') {
        if (p->method != HTTP_OPTIONS)
            return reject(c, 400, "malformed request: '*' is a target for OPTIONS only");
        c->asterisk = 1;
        return 0;
    }
    size_t s = scheme_len(t, len), end = authority_end(t, len);
    if (s == 0 || end == s || memchr(t + s, '@', end - s))
        return reject(c, 400,
                      "malformed request: the target must be a path, or an http(s) URI "
                      "with a host and no user info");
    c->absolute = 1;
    return 0;
}

/* RFC 9112 section 3.2: a server must answer 400 to an HTTP/1.1 request without Host and to
 * any request with more than one. */
static int check_host(conn_t *c, llhttp_t *p)
{
    size_t hosts = ms_http_request_header_count(&c->req, "host");
    if (hosts > 1)
        return reject(c, 400, "malformed request: more than one Host header");
    if (hosts == 0 && p->http_major == 1 && p->http_minor >= 1)
        return reject(c, 400, "malformed request: an HTTP/1.1 request needs a Host header");
    return 0;
}

static void split_target(conn_t *c);
static void fill_request(conn_t *c, llhttp_t *p);

/* Asks the owner whether this request's body streams; fills the request for the hook. */
static int want_stream(conn_t *c, llhttp_t *p)
{
    ms_http_server_t *srv = c->srv;
    int chunked = (p->flags & F_CHUNKED) != 0;
    int has_body = chunked || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
    if (!srv->cfg.stream_body || !has_body || c->asterisk)
        return 0;
    fill_request(c, p);
    c->req.body_streamed = 0;
    c->req.body_length = chunked ? -1 : (int64_t)p->content_length;
    if (srv->cfg.stream_body(&c->req, srv->cfg.data) != 1)
        return 0;
    c->streamed = 1;
    c->req.body_streamed = 1;
    return 1;
}

static int on_headers_complete(llhttp_t *p)
{
    conn_t *c = conn_of_parser(p);
    /* Whitespace after the last header, up to the blank line, is checked for a fold too. */
    if (scan_head(c, c->scan_from, c->scan_end))
        return -1;
    c->head_scan = 0;
    ms__headers_finish(&c->hc);
    c->req.headers = c->hc.array;
    c->req.n_headers = c->hc.n;
    take_request_id(c);
    if (check_target(c, p) || check_host(c, p))
        return -1;
    split_target(c);
    int streamed = want_stream(c, p);
    if (!streamed && (p->flags & F_CONTENT_LENGTH) &&
        p->content_length > c->srv->cfg.limits.max_body_bytes) {
        c->error_status = 413;
        return -1;
    }
    /* Upgrades (websocket, h2c) are not offered: RFC 9110 section 7.8 lets a server ignore the
     * header, so the request is served as plain HTTP/1.1 and the connection stays HTTP. */
    p->upgrade = 0;
    size_t elen = 0;
    const char *expect = ms_http_request_header(&c->req, "expect", &elen);
    if (expect && elen == 12 && strncasecmp(expect, "100-continue", 12) == 0) {
        uv_buf_t b = uv_buf_init("HTTP/1.1 100 Continue\r\n\r\n", 25);
        conn_write(c, &b, 1);
    }
    /* From here on the timer bounds inactivity while the body arrives. */
    c->body_phase = 1;
    conn_arm_timer(c, c->srv->cfg.limits.header_timeout_s);
    /* A streamed request is handed over now; its body stays unparsed until it is pulled. */
    return streamed ? HPE_PAUSED : 0;
}

/* A chunk declared larger than the room left is refused before its data is read. */
static int on_chunk_header(llhttp_t *p)
{
    conn_t *c = conn_of_parser(p);
    if (c->streamed)
        return 0;
    if (p->content_length > c->srv->cfg.limits.max_body_bytes - c->body.len) {
        c->error_status = 413;
        return -1;
    }
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    conn_t *c = conn_of_parser(p);
    if (c->streamed) {
        c->reader.on_data(c->reader_data, at, n);
        /* Paused, answered or gone inside on_data: the parser stops after this piece. */
        return c->body_reading && c->req_active && !c->closing ? 0 : HPE_PAUSED;
    }
    if (c->body.len + n > c->srv->cfg.limits.max_body_bytes) {
        c->error_status = 413;
        return -1;
    }
    ms_buf_append(&c->body, at, n);
    return 0;
}

/* An absolute-form request names its host in the target, which RFC 9112 section 3.2.2 says
 * replaces the Host header: the header is pointed at the target's authority. */
static void take_authority(conn_t *c, const char *authority, size_t len)
{
    for (size_t i = 0; i < c->hc.n; i++)
        if (ms_http_header_is(&c->hc.array[i], "host")) {
            c->hc.array[i].value = authority;
            c->hc.array[i].value_len = len;
        }
}

static void split_target(conn_t *c)
{
    ms_buf_t *t = &c->target;
    size_t tlen = t->len;
    /* The origin-form target, path and query are copied from the target into the same buffer:
     * make room first so the source does not move under the copies. */
    ms_buf_reserve(t, 3 * tlen + 8);
    ms_buf_append(t, "", 1);
    size_t origin_off = 0, olen = tlen, auth_end = 0;
    if (c->absolute) {
        auth_end = authority_end(t->data, tlen);
        origin_off = t->len;
        if (auth_end == tlen || t->data[auth_end] != '/')
            ms_buf_append(t, "/", 1);
        ms_buf_append(t, t->data + auth_end, tlen - auth_end);
        olen = t->len - origin_off;
        ms_buf_append(t, "", 1);
    }
    const char *origin = t->data + origin_off;
    const char *q = memchr(origin, '?', olen);
    size_t plen = q ? (size_t)(q - origin) : olen;
    size_t path_off = t->len;
    ms_buf_append(t, origin, plen);
    ms_buf_append(t, "", 1);
    size_t query_off = t->len;
    if (q)
        ms_buf_append(t, q + 1, olen - plen - 1);
    ms_buf_append(t, "", 1);
    c->req.target = t->data + origin_off;
    c->req.target_len = olen;
    c->req.path = t->data + path_off;
    c->req.path_len = plen;
    c->req.query = t->data + query_off;
    if (c->absolute) {
        size_t s = scheme_len(t->data, tlen);
        take_authority(c, t->data + s, auth_end - s);
    }
}

/* The request fields known once the head is parsed, and the body read so far. */
static void fill_request(conn_t *c, llhttp_t *p)
{
    ms_http_request_t *r = &c->req;
    if (c->body.len == 0)
        ms_buf_append(&c->body, "", 0);
    r->method = llhttp_method_name((llhttp_method_t)p->method);
    r->headers = c->hc.array;
    r->n_headers = c->hc.n;
    r->body = c->body.data ? c->body.data : "";
    r->body_len = c->body.len;
    r->http_minor = p->http_minor;
    c->keep_alive = llhttp_should_keep_alive(p) ? 1 : 0;
    c->head_only = p->method == HTTP_HEAD;
}

static int on_message_complete(llhttp_t *p)
{
    conn_t *c = conn_of_parser(p);
    c->in_message = 0;
    c->body_phase = 0;
    if (c->streamed) {
        c->body_complete = 1;
        return HPE_PAUSED; /* pipelined bytes behind it stay unparsed */
    }
    fill_request(c, p);
    /* Stop here so pipelined bytes behind this request stay unparsed until it is answered. */
    return HPE_PAUSED;
}

static const llhttp_settings_t *request_settings(void)
{
    static llhttp_settings_t s;
    static int ready;
    if (!ready) {
        llhttp_settings_init(&s);
        s.on_message_begin = on_message_begin;
        s.on_url = on_url;
        s.on_header_field = on_header_field;
        s.on_header_value = on_header_value;
        s.on_header_field_complete = on_header_field_complete;
        s.on_header_value_complete = on_header_value_complete;
        s.on_headers_complete = on_headers_complete;
        s.on_chunk_header = on_chunk_header;
        s.on_body = on_body;
        s.on_message_complete = on_message_complete;
        ready = 1;
    }
    return &s;
}

static void dispatch_request(conn_t *c)
{
    ms_http_server_t *srv = c->srv;
    conn_disarm_timer(c);
    c->req_active = 1;
    c->req.started_ns = uv_hrtime();
    srv->inflight++;
    if (c->asterisk) {
        /* OPTIONS * asks about the server, not a resource: no deployment is involved. */
        static const ms_http_header_t allow = {"Allow", 5,
                                               "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS", 44};
        ms_http_respond(&c->req, 200, &allow, 1, "", 0);
        return;
    }
    srv->cfg.on_request(&c->req, srv->cfg.data);
}

/* llhttp's span callbacks (llhttp/api.c): they tell which piece a parse error interrupted. */
int llhttp__on_url(llhttp_t *s, const char *p, const char *endp);
int llhttp__on_header_field(llhttp_t *s, const char *p, const char *endp);
int llhttp__on_header_value(llhttp_t *s, const char *p, const char *endp);

/* A head both too large and malformed gets the answer of whichever problem comes first in byte
 * order, 431 or 400, so that it does not depend on how the bytes were split across reads (found
 * by fuzz_http_request). The checks run in that order everywhere: the bytes before a piece are
 * scanned before the piece is counted. On a parse error llhttp drops the piece it had begun
 * without handing it over, where a read that ended inside it would have handed its first part
 * over: the bytes before the piece are scanned and the piece counted up to the error here. */
static void check_before_error(conn_t *c)
{
    llhttp_t *p = &c->parser;
    const char *from = p->_span_pos0, *err = llhttp_get_error_pos(p);
    int in_piece = from && err && err >= from &&
                   (p->_span_cb0 == (void *)llhttp__on_url ||
                    p->_span_cb0 == (void *)llhttp__on_header_field ||
                    p->_span_cb0 == (void *)llhttp__on_header_value);
    const char *scan_to = in_piece ? from + (err > from) : err;
    if (c->head_scan && scan_to && scan_to > c->scan_from && scan_head(c, c->scan_from, scan_to))
        return;
    if (in_piece)
        count_head_bytes(c, (size_t)(err - from));
}

/* Parses requests out of data until one is owed a response, the data ends, or the connection
 * fails. Returns the number of bytes consumed. */
static size_t parse_region(conn_t *c, const char *data, size_t len)
{
    size_t off = 0;
    c->parsing++;
    while (off < len && !c->req_active && !c->closing && !c->close_after_write) {
        if (c->paused) {
            llhttp_resume(&c->parser);
            c->paused = 0;
        }
        c->scan_from = data + off;
        c->scan_end = data + len;
        llhttp_errno_t e = llhttp_execute(&c->parser, data + off, len - off);
        if (e == HPE_OK) {
            off = len;
            /* Head bytes after the last name or value of this read are checked now. */
            if (c->head_scan && scan_head(c, c->scan_from, c->scan_end)) {
                fail_connection(c, c->error_status, c->error_reason);
                break;
            }
        } else if (e == HPE_PAUSED) {
            off = (size_t)(llhttp_get_error_pos(&c->parser) - data);
            c->paused = 1;
            dispatch_request(c);
        } else {
            if (!c->error_status)
                check_before_error(c);
            int status = c->error_status ? c->error_status : 400;
            const char *msg = c->error_reason ? c->error_reason
                              : status == 431 ? "request header fields too large"
                              : status == 413 ? "request body too large"
                                              : llhttp_get_error_reason(&c->parser);
            char buf[256];
            snprintf(buf, sizeof buf, "%s%s",
                     status == 400 && !c->error_reason ? "malformed request: " : "",
                     msg ? msg : "parse error");
            fail_connection(c, status, buf);
            off = len;
        }
    }
    c->parsing--;
    return off;
}

/* ---- streamed request bodies --------------------------------------------------------------- */

/* Parses bytes of a streamed body (on_body hands them to the reader); returns how many were
 * taken: fewer when the reader paused, or when the body ended and pipelined bytes follow. */
static size_t feed_body(conn_t *c, const char *data, size_t len)
{
    if (c->paused) {
        llhttp_resume(&c->parser);
        c->paused = 0;
    }
    c->parsing++;
    llhttp_errno_t e = llhttp_execute(&c->parser, data, len);
    c->parsing--;
    if (e == HPE_OK)
        return len;
    if (e == HPE_PAUSED) {
        c->paused = 1;
        return (size_t)(llhttp_get_error_pos(&c->parser) - data);
    }
    /* The request was handed over already: nothing can be answered in its place. */
    ms_info("http: malformed body of streamed request %s: %s", c->req.request_id,
            llhttp_get_error_reason(&c->parser));
    conn_close(c);
    return len;
}

/* Socket reading follows the reader: a streamed body not being read is not read from the socket
 * either, so the kernel's window holds the client back. */
static void body_update_reading(conn_t *c)
{
    if (c->close_after_write || c->closing)
        return;
    if (!c->body_complete && !c->body_reading) {
        uv_read_stop(&c->h.stream);
        c->reading = 0;
    } else
        conn_start_reading(c);
}

/* Delivers the buffered bytes of a streamed body while the reader takes them, then on_end. Runs
 * only outside parse loops, so c->in is not consumed under a parse of it. */
static void body_pump(conn_t *c)
{
    for (;;) {
        if (!c->streamed || !c->body_reading || c->body_complete || !c->req_active || c->closing ||
            c->parsing)
            break;
        /* With nothing buffered, a paused parser may still owe the end of the message. */
        if (c->in.len == 0 && !c->paused)
            break;
        int empty = c->in.len == 0;
        size_t used = feed_body(c, empty ? "" : c->in.data, c->in.len);
        if (c->closing)
            return;
        ms_buf_consume(&c->in, used);
        if (empty)
            break;
    }
    if (!c->streamed || c->closing || c->parsing)
        return;
    body_update_reading(c);
    if (c->body_complete && c->body_reading && !c->end_told) {
        c->end_told = 1;
        c->reader.on_end(c->reader_data);
    }
}

void ms_http_request_body_read(ms_http_request_t *req, const ms_http_body_reader_t *r, void *data)
{
    conn_t *c = conn_of(req);
    if (!c->streamed) {
        /* A body read whole is given as it is, so a relay handles both kinds alike. */
        if (c->end_told)
            return;
        c->end_told = 1;
        if (req->body_len > 0)
            r->on_data(data, req->body, req->body_len);
        r->on_end(data);
        return;
    }
    c->reader = *r;
    c->reader_data = data;
    if (c->body_reading || c->end_told)
        return;
    c->body_reading = 1;
    if (!c->body_complete)
        conn_arm_timer(c, c->srv->cfg.limits.header_timeout_s);
    body_pump(c);
}

void ms_http_request_body_pause(ms_http_request_t *req)
{
    conn_t *c = conn_of(req);
    if (!c->streamed || !c->body_reading)
        return;
    c->body_reading = 0;
    conn_disarm_timer(c); /* the owner is the slow one now */
    if (!c->body_complete && !c->close_after_write && !c->closing) {
        uv_read_stop(&c->h.stream);
        c->reading = 0;
    }
}

static void conn_drain_input(conn_t *c)
{
    while (c->in.len > 0 && !c->req_active && !c->closing && !c->close_after_write) {
        size_t used = parse_region(c, c->in.data, c->in.len);
        ms_buf_consume(&c->in, used);
    }
    body_pump(c);
}

/* A read while a streamed body is owed: parsed in place when nothing is buffered before it. */
static void read_streamed_body(conn_t *c, const char *data, size_t n)
{
    if (c->in.len == 0 && c->body_reading && c->parsing == 0) {
        size_t used = feed_body(c, data, n);
        if (!c->closing && c->streamed && used < n)
            ms_buf_append(&c->in, data + used, n - used);
    } else
        ms_buf_append(&c->in, data, n);
}

static void on_conn_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    if (nread < 0) {
        conn_close(c);
        return;
    }
    if (nread == 0 || c->close_after_write)
        return;
    size_t n = (size_t)nread;
    if (c->req_active && c->streamed && !c->body_complete) {
        read_streamed_body(c, buf->base, n);
    } else if (c->req_active || c->in.len > 0) {
        ms_buf_append(&c->in, buf->base, n);
        if (!c->req_active)
            conn_drain_input(c);
        else if (c->in.len > PIPELINE_BUFFER_LIMIT) {
            uv_read_stop(s);
            c->reading = 0;
        }
    } else {
        size_t used = parse_region(c, buf->base, n);
        if (!c->closing && used < n)
            ms_buf_append(&c->in, buf->base + used, n - used);
        if (!c->req_active && !c->closing)
            conn_drain_input(c);
    }
    body_pump(c);
    if (!c->closing && c->in_message && c->body_phase && (!c->streamed || c->body_reading))
        conn_arm_timer(c, c->srv->cfg.limits.header_timeout_s);
}

static void conn_start_reading(conn_t *c)
{
    if (c->reading || c->closing)
        return;
    if (uv_read_start(&c->h.stream, ms__alloc_read_buffer, on_conn_read) == 0)
        c->reading = 1;
}

/* ---- accepting ---------------------------------------------------------------------------- */

static void on_connection(uv_stream_t *listener, int status)
{
    ms_http_server_t *srv = listener->data;
    if (status < 0) {
        ms_warn("http: accept failed: %s", uv_strerror(status));
        return;
    }
    conn_t *c = ms_calloc(1, sizeof *c);
    c->srv = srv;
    if (listener->type == UV_TCP)
        uv_tcp_init(srv->loop, &c->h.tcp);
    else
        uv_pipe_init(srv->loop, &c->h.pipe, 0);
    c->h.handle.data = c;
    uv_timer_init(srv->loop, &c->timer);
    c->timer.data = c;
    c->open_handles = 2;
    srv->open_handles++;
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    llhttp_init(&c->parser, HTTP_REQUEST, request_settings());
    if (uv_accept(listener, &c->h.stream) != 0 || srv->stopping) {
        conn_close(c);
        return;
    }
    if (listener->type == UV_TCP)
        uv_tcp_nodelay(&c->h.tcp, 1);
    conn_start_reading(c);
    conn_arm_timer(c, srv->cfg.limits.header_timeout_s);
}

static ms_http_server_t *server_new(uv_loop_t *loop, const ms_http_server_config_t *cfg)
{
    ms_http_server_t *srv = ms_calloc(1, sizeof *srv);
    srv->loop = loop;
    srv->cfg = *cfg;
    srv->listener.handle.data = srv;
    srv->open_handles = 1;
    srv->listener_open = 1;
    return srv;
}

static void on_listener_closed(uv_handle_t *h)
{
    server_handle_closed(h->data);
}

static void listener_close(ms_http_server_t *srv)
{
    if (!srv->listener_open)
        return;
    srv->listener_open = 0;
    uv_close(&srv->listener.handle, on_listener_closed);
}

static int server_fail(ms_http_server_t *srv, int r)
{
    srv->closing = 1;
    listener_close(srv);
    return r;
}

int ms_http_server_listen_tcp(uv_loop_t *loop, const char *host, int port,
                              const ms_http_server_config_t *cfg, ms_http_server_t **out)
{
    struct sockaddr_storage addr;
    int r = uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
    if (r != 0)
        r = uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr);
    if (r != 0)
        return r;
    ms_http_server_t *srv = server_new(loop, cfg);
    uv_tcp_init(loop, &srv->listener.tcp);
    if ((r = uv_tcp_bind(&srv->listener.tcp, (struct sockaddr *)&addr, 0)) != 0 ||
        (r = uv_listen(&srv->listener.stream, 1024, on_connection)) != 0)
        return server_fail(srv, r);
    *out = srv;
    return 0;
}

int ms_http_server_listen_unix(uv_loop_t *loop, const char *path,
                               const ms_http_server_config_t *cfg, ms_http_server_t **out)
{
    ms_http_server_t *srv = server_new(loop, cfg);
    uv_pipe_init(loop, &srv->listener.pipe, 0);
    unlink(path);
    int r;
    if ((r = uv_pipe_bind(&srv->listener.pipe, path)) != 0 ||
        (r = uv_listen(&srv->listener.stream, 1024, on_connection)) != 0)
        return server_fail(srv, r);
    srv->unix_path = ms_strdup(path);
    *out = srv;
    return 0;
}

int ms_http_server_port(ms_http_server_t *srv)
{
    struct sockaddr_storage addr;
    int len = sizeof addr;
    if (uv_tcp_getsockname(&srv->listener.tcp, (struct sockaddr *)&addr, &len) != 0)
        return -1;
    if (addr.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&addr)->sin6_port);
    return ntohs(((struct sockaddr_in *)&addr)->sin_port);
}

void ms_http_server_stop_accepting(ms_http_server_t *srv)
{
    srv->stopping = 1;
    listener_close(srv);
    conn_t *next;
    for (conn_t *c = srv->conns; c; c = next) {
        next = c->next;
        if (!c->req_active && !c->in_message && c->pending_writes == 0)
            conn_close(c);
    }
}

size_t ms_http_server_inflight(ms_http_server_t *srv)
{
    return srv->inflight;
}

void ms_http_server_close(ms_http_server_t *srv)
{
    srv->stopping = 1;
    srv->closing = 1;
    srv->open_handles++; /* hold the server while the list is walked */
    listener_close(srv);
    while (srv->conns)
        conn_close(srv->conns);
    server_handle_closed(srv);
}
