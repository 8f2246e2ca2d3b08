/*
 * link/server: the replica's end of the link. See link.h.
 *
 * Each REQUEST frame becomes a stream with its own copy of the request (the input buffer is
 * reused by the next read). Streams are found by the low bits of their id, which the
 * controller keeps small (it reuses the lowest free slots), in a table per connection.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "link/internal.h"

#define INDEX_MASK ((1u << 20) - 1)
/* Request frames carry the client's body; its size was bounded by the controller already. */
#define MAX_CONTROLLER_FRAME 0x7fffffffu

typedef struct sconn sconn_t;

typedef struct stream {
    ms_link_stream_t pub;
    uint32_t id;
    sconn_t *conn;
    char *storage; /* the request's strings and header array */
    int64_t window;
    const char *pend; /* body bytes handed over by reference, not yet queued */
    size_t pend_len;
    ms_link_release_cb release;
    void *release_ctx;
    size_t body_total; /* a body arriving in BODY frames: its announced length */
    char *body;        /* that body, grown as its frames arrive */
    size_t body_cap;
    unsigned receiving : 1; /* BODY frames still to come: not handed to the owner yet */
    unsigned owned : 1;     /* the owner has not ended it yet */
    unsigned end_after : 1; /* END once the pending bytes are queued */
    unsigned has_pend : 1;
} stream_t;

struct sconn {
    lk_conn_t conn;
    ms_link_server_t *srv;
    sconn_t *prev, *next;
    stream_t **table; /* by id & INDEX_MASK */
    size_t table_cap;
    size_t n_streams;
};

struct ms_link_server {
    uv_loop_t *loop;
    uv_pipe_t listener;
    ms_link_server_config_t cfg;
    char *path;
    sconn_t *conns;
    int listening;
    int closing;
    int open_handles; /* listener + connections */
};

static sconn_t *sconn_of(lk_conn_t *c)
{
    return (sconn_t *)((char *)c - offsetof(sconn_t, conn));
}

static void maybe_free_server(ms_link_server_t *srv)
{
    if (srv->closing && srv->open_handles == 0) {
        free(srv->path);
        free(srv);
    }
}

/* ---- streams ---------------------------------------------------------------------------------
 */

static stream_t *stream_find(sconn_t *sc, uint32_t id)
{
    size_t i = id & INDEX_MASK;
    stream_t *s = i < sc->table_cap ? sc->table[i] : NULL;
    return s && s->id == id ? s : NULL;
}

static void stream_free(stream_t *s)
{
    sconn_t *sc = s->conn;
    sc->table[s->id & INDEX_MASK] = NULL;
    sc->n_streams--;
    free(s->storage);
    free(s->body);
    free(s);
}

/* Drops a stream's reference to pending bytes; `notify`: tell the owner they are done with. */
static void drop_pending(stream_t *s, int notify)
{
    if (!s->has_pend)
        return;
    s->has_pend = 0;
    if (notify && s->release)
        s->release(s->release_ctx);
}

/* Queues pending body bytes as far as the window allows. Returns 1 once none is left. */
static int pump(stream_t *s)
{
    lk_conn_t *c = &s->conn->conn;
    while (s->pend_len && s->window > 0) {
        size_t n = s->pend_len;
        if (n > MS_LINK_MAX_DATA)
            n = MS_LINK_MAX_DATA;
        if ((int64_t)n > s->window)
            n = (size_t)s->window;
        size_t at = lk_frame_begin(c, LK_DATA, s->id);
        ms_buf_append(&c->out, s->pend, n);
        lk_frame_end(c, at);
        s->pend += n;
        s->pend_len -= n;
        s->window -= (int64_t)n;
    }
    return s->pend_len == 0;
}

/* The pending bytes are all queued: end the stream if the owner did, and release them. The
 * release may resume the owner, which may write again or end the stream: s is not touched after
 * it. */
static void pending_done(stream_t *s)
{
    ms_link_release_cb release = s->release;
    void *ctx = s->release_ctx;
    s->has_pend = 0;
    if (s->end_after) {
        lk_send_small(&s->conn->conn, LK_END, s->id, 0, 0);
        stream_free(s);
    }
    if (release)
        release(ctx);
}

/* ---- frames from the controller -------------------------------------------------------------
 */

/* Copies the request out of the frame: strings NUL-terminated, the target split at '?'. With
 * `more`, the frame ends with the body's u64 length instead of the body, which comes in BODY
 * frames (body_frame). */
static int decode_request(stream_t *s, const char *p, uint32_t n, int more)
{
    lk_reader_t r = {p, p + n, 0};
    uint32_t ml, rl, tl;
    const char *method = lk_get_str(&r, &ml);
    const char *rid = lk_get_str(&r, &rl);
    const char *target = lk_get_str(&r, &tl);
    ms_http_header_t *hs = NULL;
    size_t hcap = 0, nh = 0;
    if (r.bad || ml == 0 || lk_get_headers(&r, &hs, &hcap, &nh) != 0) {
        free(hs);
        return -1;
    }
    size_t body_len = (size_t)(r.end - r.p);
    if (more) {
        uint64_t lo = lk_get_u32(&r), hi = lk_get_u32(&r);
        s->body_total = (size_t)(lo | hi << 32);
        body_len = 0;
        /* No body in the frame itself; the announced size is bounded like any frame. */
        if (r.bad || r.p != r.end || s->body_total > 0x7fffffffu) {
            free(hs);
            return -1;
        }
    }
    /* One block: header array, then method, target, path, query, header bytes, body. */
    size_t hbytes = 0;
    for (size_t i = 0; i < nh; i++)
        hbytes += hs[i].name_len + hs[i].value_len;
    size_t total = nh * sizeof *hs + ml + 1 + 2 * ((size_t)tl + 1) + 1 + hbytes + body_len + 1;
    char *m = ms_malloc(total);
    s->storage = m;
    ms_http_request_t *req = &s->pub.req;
    req->headers = (ms_http_header_t *)m;
    req->n_headers = nh;
    char *w = m + nh * sizeof *hs;
#define COPY(dst, src, len)                                                                        \
    do {                                                                                           \
        memcpy(w, (src), (len));                                                                   \
        w[(len)] = '\0';                                                                           \
        (dst) = w;                                                                                 \
        w += (len) + 1;                                                                            \
    } while (0)
    COPY(req->method, method, ml);
    COPY(req->target, target, tl);
    req->target_len = tl;
    const char *q = memchr(target, '?', tl);
    size_t path_len = q ? (size_t)(q - target) : tl;
    COPY(req->path, target, path_len);
    req->path_len = path_len;
    size_t qlen = q ? tl - path_len - 1 : 0;
    COPY(req->query, q ? q + 1 : "", qlen);
    for (size_t i = 0; i < nh; i++) {
        memcpy(w, hs[i].name, hs[i].name_len);
        req->headers[i].name = w;
        req->headers[i].name_len = hs[i].name_len;
        w += hs[i].name_len;
        memcpy(w, hs[i].value, hs[i].value_len);
        req->headers[i].value = w;
        req->headers[i].value_len = hs[i].value_len;
        w += hs[i].value_len;
    }
    COPY(req->body, r.p, body_len);
    req->body_len = body_len;
#undef COPY
    free(hs);
    size_t rcap = sizeof req->request_id - 1;
    memcpy(req->request_id, rid, rl < rcap ? rl : rcap);
    req->request_id[rl < rcap ? rl : rcap] = '\0';
    req->http_minor = 1;
    return 0;
}

/* Hands a complete request to the owner. */
static void dispatch(stream_t *s)
{
    ms_link_server_t *srv = s->conn->srv;
    s->receiving = 0;
    s->owned = 1;
    srv->cfg.on_request(&s->pub, srv->cfg.data);
}

/* A piece of a body announced by its REQUEST frame; the last one hands the request over. The
 * buffer grows with what arrived (doubling, up to the announced length) rather than taking the
 * announced length at once: the announcement alone must not cost memory (found by
 * fuzz_link_server: a 2 GiB claim). */
static int body_frame(stream_t *s, int flags, const char *p, uint32_t n)
{
    ms_http_request_t *req = &s->pub.req;
    if (!s->receiving || n > s->body_total - req->body_len)
        return -1;
    size_t need = req->body_len + n + 1;
    if (need > s->body_cap) {
        size_t cap = s->body_cap ? s->body_cap : 4096;
        while (cap < need)
            cap *= 2;
        s->body_cap = cap < s->body_total + 1 ? cap : s->body_total + 1;
        s->body = ms_realloc(s->body, s->body_cap);
        req->body = s->body;
    }
    memcpy((char *)req->body + req->body_len, p, n);
    req->body_len += n;
    if (!(flags & LK_LAST))
        return 0;
    if (req->body_len != s->body_total)
        return -1;
    ((char *)req->body)[req->body_len] = '\0';
    dispatch(s);
    return 0;
}

static int request_frame(sconn_t *sc, uint32_t id, int flags, const char *p, uint32_t n)
{
    size_t i = id & INDEX_MASK;
    if (i == 0 || (i < sc->table_cap && sc->table[i]))
        return -1; /* an id still in use */
    if (i >= sc->table_cap) {
        size_t cap = sc->table_cap ? sc->table_cap : 64;
        while (cap <= i)
            cap *= 2;
        sc->table = ms_realloc(sc->table, cap * sizeof *sc->table);
        memset(sc->table + sc->table_cap, 0, (cap - sc->table_cap) * sizeof *sc->table);
        sc->table_cap = cap;
    }
    stream_t *s = ms_calloc(1, sizeof *s);
    s->id = id;
    s->conn = sc;
    s->window = MS_LINK_WINDOW;
    if (decode_request(s, p, n, flags & LK_MORE) != 0) {
        free(s->storage);
        free(s);
        return -1;
    }
    sc->table[i] = s;
    sc->n_streams++;
    if (flags & LK_MORE)
        s->receiving = 1;
    else
        dispatch(s);
    return 0;
}

/* The controller gave up the stream (or the connection is going): the owner hears of it while it
 * still owns the stream; the controller gets ABORT as the answer. */
static void cancel_stream(stream_t *s, int answer)
{
    sconn_t *sc = s->conn;
    if (s->owned) {
        drop_pending(s, 0); /* the owner forgets its pending write along with the stream */
        s->owned = 0;
        sc->srv->cfg.on_cancel(&s->pub, sc->srv->cfg.data);
    } else {
        drop_pending(s, 1);
    }
    if (answer)
        lk_send_small(&sc->conn, LK_ABORT, s->id, 0, 0);
    stream_free(s);
}

static int on_frame(lk_conn_t *c, int type, int flags, uint32_t id, const char *p, uint32_t n)
{
    sconn_t *sc = sconn_of(c);
    if (type == LK_REQUEST)
        return request_frame(sc, id, flags, p, n);
    stream_t *s = stream_find(sc, id);
    if (type == LK_BODY)
        return s ? body_frame(s, flags, p, n) : -1;
    if (type == LK_CANCEL) {
        if (s)
            cancel_stream(s, 1);
        return 0;
    }
    if (type == LK_WINDOW) {
        lk_reader_t r = {p, p + n, 0};
        uint32_t credit = lk_get_u32(&r);
        if (r.bad)
            return -1;
        if (s) {
            s->window += credit;
            if (s->has_pend && pump(s))
                pending_done(s);
        }
        return 0;
    }
    return -1;
}

static void on_fail(lk_conn_t *c, ms_link_error_t err)
{
    sconn_t *sc = sconn_of(c);
    (void)err;
    for (size_t i = 0; i < sc->table_cap && sc->n_streams; i++)
        if (sc->table[i])
            cancel_stream(sc->table[i], 0);
    lk_conn_close(c);
}

static void on_closed(lk_conn_t *c)
{
    sconn_t *sc = sconn_of(c);
    ms_link_server_t *srv = sc->srv;
    if (sc->prev)
        sc->prev->next = sc->next;
    else
        srv->conns = sc->next;
    if (sc->next)
        sc->next->prev = sc->prev;
    free(sc->table);
    free(sc);
    srv->open_handles--;
    maybe_free_server(srv);
}

static void on_connection(uv_stream_t *listener, int status)
{
    ms_link_server_t *srv = listener->data;
    if (status < 0)
        return;
    sconn_t *sc = ms_calloc(1, sizeof *sc);
    sc->srv = srv;
    lk_conn_init(&sc->conn, srv->loop);
    sc->conn.max_frame = MAX_CONTROLLER_FRAME;
    sc->conn.on_frame = on_frame;
    sc->conn.on_fail = on_fail;
    sc->conn.on_closed = on_closed;
    srv->open_handles++;
    sc->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = sc;
    srv->conns = sc;
    if (uv_accept(listener, (uv_stream_t *)&sc->conn.pipe) != 0) {
        lk_conn_close(&sc->conn);
        return;
    }
    lk_conn_start(&sc->conn);
}

/* ---- responses -------------------------------------------------------------------------------
 */

static stream_t *stream_of(ms_link_stream_t *pub)
{
    return (stream_t *)pub;
}

static void put_head(lk_conn_t *c, int status, const ms_http_header_t *hs, size_t n)
{
    lk_put_u32(&c->out, (uint32_t)status);
    lk_put_headers(&c->out, hs, n);
}

static int write_body(stream_t *s, const char *p, size_t n, ms_link_release_cb release, void *ctx)
{
    s->pend = p;
    s->pend_len = n;
    if (pump(s))
        return 1;
    s->has_pend = 1;
    s->release = release;
    s->release_ctx = ctx;
    return 0;
}

int ms_link_respond(ms_link_stream_t *pub, int status, const ms_http_header_t *headers, size_t n,
                    const char *body, size_t body_len, ms_link_release_cb release, void *ctx)
{
    stream_t *s = stream_of(pub);
    lk_conn_t *c = &s->conn->conn;
    s->owned = 0;
    if (body_len <= MS_LINK_WINDOW) {
        size_t at = lk_frame_begin(c, LK_RESPONSE, s->id);
        put_head(c, status, headers, n);
        ms_buf_append(&c->out, body, body_len);
        lk_frame_end(c, at);
        stream_free(s);
        return 1;
    }
    ms_link_start(pub, status, headers, n);
    s->owned = 0;
    s->end_after = 1;
    if (write_body(s, body, body_len, release, ctx)) {
        lk_send_small(c, LK_END, s->id, 0, 0);
        stream_free(s);
        return 1;
    }
    return 0;
}

void ms_link_start(ms_link_stream_t *pub, int status, const ms_http_header_t *headers, size_t n)
{
    stream_t *s = stream_of(pub);
    lk_conn_t *c = &s->conn->conn;
    size_t at = lk_frame_begin(c, LK_HEAD, s->id);
    put_head(c, status, headers, n);
    lk_frame_end(c, at);
}

int ms_link_write(ms_link_stream_t *pub, const char *p, size_t n, ms_link_release_cb release,
                  void *ctx)
{
    return write_body(stream_of(pub), p, n, release, ctx);
}

void ms_link_end(ms_link_stream_t *pub)
{
    stream_t *s = stream_of(pub);
    s->owned = 0;
    if (s->has_pend) {
        s->end_after = 1;
        return;
    }
    lk_send_small(&s->conn->conn, LK_END, s->id, 0, 0);
    stream_free(s);
}

void ms_link_abort(ms_link_stream_t *pub)
{
    stream_t *s = stream_of(pub);
    s->owned = 0;
    drop_pending(s, 0);
    lk_send_small(&s->conn->conn, LK_ABORT, s->id, 0, 0);
    stream_free(s);
}

/* ---- server lifetime ------------------------------------------------------------------------
 */

static void on_listener_closed(uv_handle_t *h)
{
    ms_link_server_t *srv = h->data;
    srv->open_handles--;
    maybe_free_server(srv);
}

int ms_link_listen_unix(uv_loop_t *loop, const char *path, const ms_link_server_config_t *cfg,
                        ms_link_server_t **out)
{
    ms_link_server_t *srv = ms_calloc(1, sizeof *srv);
    srv->loop = loop;
    srv->cfg = *cfg;
    srv->path = ms_strdup(path);
    uv_pipe_init(loop, &srv->listener, 0);
    srv->listener.data = srv;
    srv->open_handles = 1;
    unlink(path);
    int r = uv_pipe_bind(&srv->listener, path);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&srv->listener, 128, on_connection);
    if (r != 0) {
        srv->closing = 1;
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
        return r;
    }
    srv->listening = 1;
    *out = srv;
    return 0;
}

void ms_link_server_stop_accepting(ms_link_server_t *srv)
{
    if (!srv->listening)
        return;
    srv->listening = 0;
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    unlink(srv->path);
}

size_t ms_link_server_busy(const ms_link_server_t *srv)
{
    size_t n = 0;
    for (const sconn_t *sc = srv->conns; sc; sc = sc->next)
        if (!sc->conn.closing && !sc->conn.failed)
            n += sc->n_streams + (sc->conn.out.len > 0 || sc->conn.writing);
    return n;
}

void ms_link_server_close(ms_link_server_t *srv)
{
    srv->closing = 1;
    ms_link_server_stop_accepting(srv);
    for (sconn_t *sc = srv->conns; sc; sc = sc->next)
        if (!sc->conn.closing)
            on_fail(&sc->conn, MS_LINK_ERR_CLOSED);
    maybe_free_server(srv);
}
