/*
 * link/wire: frames on a Unix socket, for both ends of the link. See internal.h.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "link/internal.h"

/* Buffers that grew past this for one large frame are given back once empty, so a connection
 * that carried a big body once does not keep its size for good. */
#define KEEP_BUFFER_BYTES (1024 * 1024)
#define READ_CHUNK        (64 * 1024)

const char *ms_link_error_text(ms_link_error_t err)
{
    switch (err) {
    case MS_LINK_ERR_CONNECT:
        return "connect failed";
    case MS_LINK_ERR_CLOSED:
        return "the replica closed the connection";
    case MS_LINK_ERR_IO:
        return "connection error";
    case MS_LINK_ERR_PROTOCOL:
        return "malformed frame";
    case MS_LINK_ERR_ABORTED:
        return "the replica ended the response early";
    }
    return "?";
}

int ms_link_deadline(const ms_http_header_t *headers, size_t n, uint64_t *ms)
{
    int found = 0;
    for (size_t i = 0; i < n; i++) {
        const ms_http_header_t *h = &headers[i];
        if (!ms_http_header_is(h, MS_LINK_DEADLINE_HEADER))
            continue;
        if (h->value_len == 0 || h->value_len > 12)
            return -1;
        uint64_t v = 0;
        for (size_t k = 0; k < h->value_len; k++) {
            if (h->value[k] < '0' || h->value[k] > '9')
                return -1;
            v = v * 10 + (uint64_t)(h->value[k] - '0');
        }
        /* Repeats are allowed (a proxy may add one): the strictest wins. */
        if (!found || v < *ms)
            *ms = v;
        found = 1;
    }
    return found;
}

static void shrink(ms_buf_t *b)
{
    if (b->len == 0 && b->cap > KEEP_BUFFER_BYTES)
        ms_buf_free(b);
}

/* ---- encoding --------------------------------------------------------------------------------
 */

void lk_put_u32(ms_buf_t *b, uint32_t v)
{
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    ms_buf_append(b, x, 4);
}

void lk_put_str(ms_buf_t *b, const char *s, size_t n)
{
    lk_put_u32(b, (uint32_t)n);
    ms_buf_append(b, s, n);
}

void lk_put_headers(ms_buf_t *b, const ms_http_header_t *hs, size_t n)
{
    lk_put_u32(b, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        lk_put_str(b, hs[i].name, hs[i].name_len);
        lk_put_str(b, hs[i].value, hs[i].value_len);
    }
}

static uint32_t read_u32(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
}

uint32_t lk_get_u32(lk_reader_t *r)
{
    if (r->bad || r->end - r->p < 4) {
        r->bad = 1;
        return 0;
    }
    uint32_t v = read_u32(r->p);
    r->p += 4;
    return v;
}

const char *lk_get_str(lk_reader_t *r, uint32_t *len)
{
    *len = lk_get_u32(r);
    if (r->bad || (size_t)(r->end - r->p) < *len) {
        r->bad = 1;
        *len = 0;
        return "";
    }
    const char *s = r->p;
    r->p += *len;
    return s;
}

int lk_get_headers(lk_reader_t *r, ms_http_header_t **hs, size_t *cap, size_t *n)
{
    uint32_t count = lk_get_u32(r);
    /* Each header takes at least 8 bytes: a count past that is a lie, not an allocation size. */
    if (r->bad || count > (size_t)(r->end - r->p) / 8)
        return -1;
    if (*cap < count + 1) {
        *cap = count + 1;
        *hs = ms_realloc(*hs, *cap * sizeof **hs);
    }
    for (uint32_t i = 0; i < count; i++) {
        uint32_t nl, vl;
        (*hs)[i].name = lk_get_str(r, &nl);
        (*hs)[i].value = lk_get_str(r, &vl);
        (*hs)[i].name_len = nl;
        (*hs)[i].value_len = vl;
    }
    *n = count;
    return r->bad ? -1 : 0;
}

/* ---- writing ---------------------------------------------------------------------------------
 */

static void flush(lk_conn_t *c);
static void write_out(lk_conn_t *c);

static void on_written(uv_write_t *w, int status)
{
    lk_conn_t *c = w->data;
    c->writing = 0;
    c->wbuf.len = 0;
    shrink(&c->wbuf);
    if (status < 0) {
        lk_conn_fail(c, MS_LINK_ERR_IO);
        return;
    }
    flush(c);
}

/* One write of everything queued: directly when the socket takes it, else the rest is moved to
 * the in-flight buffer (a swap, no copy when nothing was taken) and written by libuv. The owner
 * tops the output up first (request bodies in pieces), and again as long as the socket takes it
 * all. */
static void flush(lk_conn_t *c)
{
    for (int round = 0;; round++) {
        if (c->writing || !c->connected || c->failed || c->closing)
            return;
        if (c->on_drained)
            c->on_drained(c);
        if (c->out.len == 0 || c->failed || c->closing)
            return;
        size_t before = c->out.len;
        write_out(c);
        /* All taken at once: the socket has room, so more pieces may go in this turn. */
        if (c->writing || c->out.len != 0 || before < LK_BODY_PIECE || round == 16)
            return;
    }
}

static void write_out(lk_conn_t *c)
{
    uv_buf_t b = uv_buf_init(c->out.data, (unsigned)c->out.len);
    int n = uv_try_write((uv_stream_t *)&c->pipe, &b, 1);
    if (n == UV_EAGAIN)
        n = 0;
    if (n < 0) {
        lk_conn_fail(c, MS_LINK_ERR_IO);
        return;
    }
    c->handed_end += (uint64_t)n;
    if ((size_t)n == c->out.len) {
        c->out.len = 0;
        shrink(&c->out);
        return;
    }
    ms_buf_t rest = c->out;
    c->out = c->wbuf;
    c->wbuf = rest;
    c->out.len = 0;
    b = uv_buf_init(c->wbuf.data + n, (unsigned)(c->wbuf.len - (size_t)n));
    c->handed_end += b.len;
    c->writing = 1;
    c->wreq.data = c;
    if (uv_write(&c->wreq, (uv_stream_t *)&c->pipe, &b, 1, on_written) != 0) {
        c->writing = 0;
        lk_conn_fail(c, MS_LINK_ERR_IO);
    }
}

static void on_flush_turn(uv_prepare_t *p)
{
    lk_conn_t *c = p->data;
    uv_prepare_stop(p);
    flush(c);
}

size_t lk_frame_begin(lk_conn_t *c, int type, uint32_t stream)
{
    size_t at = c->out.len;
    unsigned char h[LK_HEADER] = {0};
    h[4] = (unsigned char)stream;
    h[5] = (unsigned char)(stream >> 8);
    h[6] = (unsigned char)(stream >> 16);
    h[7] = (unsigned char)(stream >> 24);
    h[8] = (unsigned char)type;
    ms_buf_append(&c->out, h, sizeof h);
    return at;
}

void lk_frame_end(lk_conn_t *c, size_t at)
{
    uint32_t n = (uint32_t)(c->out.len - at - LK_HEADER);
    unsigned char *h = (unsigned char *)c->out.data + at;
    h[0] = (unsigned char)n;
    h[1] = (unsigned char)(n >> 8);
    h[2] = (unsigned char)(n >> 16);
    h[3] = (unsigned char)(n >> 24);
    c->queued_end += LK_HEADER + (uint64_t)n;
    /* One flush per loop turn gathers every frame queued until then. */
    if (!uv_is_active((uv_handle_t *)&c->flusher) && !c->closing)
        uv_prepare_start(&c->flusher, on_flush_turn);
}

void lk_frame_flags(lk_conn_t *c, size_t at, int flags)
{
    c->out.data[at + 9] = (char)flags;
}

size_t lk_backlog(const lk_conn_t *c)
{
    return c->out.len + (c->writing ? c->wbuf.len : 0);
}

void lk_send_small(lk_conn_t *c, int type, uint32_t stream, int has_value, uint32_t value)
{
    size_t at = lk_frame_begin(c, type, stream);
    if (has_value)
        lk_put_u32(&c->out, value);
    lk_frame_end(c, at);
}

/* ---- reading ---------------------------------------------------------------------------------
 */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    lk_conn_t *c = h->data;
    (void)suggested;
    size_t want = READ_CHUNK;
    /* Room for the whole frame being received, so a large one takes few reads; but at most as
     * much again as has arrived: a length in a header is not memory until its bytes come (a
     * peer announcing 2 GiB and sending 12 bytes made this allocate 2 GiB at once; found by
     * tests/fuzz/fuzz_link_server.c). The buffer still doubles, so a large frame takes
     * O(log n) reallocations. */
    if (c->in.len >= LK_HEADER) {
        size_t total = LK_HEADER + (size_t)read_u32(c->in.data);
        size_t most = c->in.len > READ_CHUNK ? c->in.len : READ_CHUNK;
        if (total > c->in.len + want)
            want = total - c->in.len;
        if (want > most)
            want = most;
    }
    ms_buf_reserve(&c->in, want);
    *buf = uv_buf_init(c->in.data + c->in.len, (unsigned)(c->in.cap - c->in.len - 1));
}

/* Hands every complete frame over, then drops them from the buffer in one move. */
static void parse_frames(lk_conn_t *c)
{
    size_t off = 0;
    while (!c->failed && !c->closing && c->in.len - off >= LK_HEADER) {
        const char *h = c->in.data + off;
        uint32_t n = read_u32(h);
        if (n > c->max_frame || h[10] || h[11]) {
            lk_conn_fail(c, MS_LINK_ERR_PROTOCOL);
            return;
        }
        if (c->in.len - off - LK_HEADER < n)
            break;
        off += LK_HEADER + (size_t)n;
        if (c->on_frame(c, (unsigned char)h[8], (unsigned char)h[9], read_u32(h + 4), h + LK_HEADER,
                        n) != 0) {
            lk_conn_fail(c, MS_LINK_ERR_PROTOCOL);
            return;
        }
    }
    if (!c->closing) {
        ms_buf_consume(&c->in, off);
        shrink(&c->in);
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    lk_conn_t *c = s->data;
    (void)buf;
    if (nread < 0) {
        lk_conn_fail(c, nread == UV_EOF ? MS_LINK_ERR_CLOSED : MS_LINK_ERR_IO);
        return;
    }
    c->in.len += (size_t)nread;
    parse_frames(c);
}

/* ---- lifetime --------------------------------------------------------------------------------
 */

void lk_conn_init(lk_conn_t *c, uv_loop_t *loop)
{
    uv_pipe_init(loop, &c->pipe, 0);
    uv_prepare_init(loop, &c->flusher);
    c->pipe.data = c;
    c->flusher.data = c;
    c->open_handles = 2;
}

void lk_conn_start(lk_conn_t *c)
{
    c->connected = 1;
    uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read);
    flush(c);
}

void lk_conn_fail(lk_conn_t *c, ms_link_error_t err)
{
    if (c->failed || c->closing)
        return;
    c->failed = 1;
    uv_read_stop((uv_stream_t *)&c->pipe);
    c->on_fail(c, err);
}

static void on_handle_closed(uv_handle_t *h)
{
    lk_conn_t *c = h->data;
    if (--c->open_handles == 0) {
        ms_buf_free(&c->in);
        ms_buf_free(&c->out);
        ms_buf_free(&c->wbuf);
        c->on_closed(c);
    }
}

void lk_conn_close(lk_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    uv_close((uv_handle_t *)&c->pipe, on_handle_closed);
    uv_close((uv_handle_t *)&c->flusher, on_handle_closed);
}
