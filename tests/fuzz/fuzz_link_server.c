/*
 * Fuzz harness of the replica's end of the data link (engine/link/server.c on wire.c): a real
 * ms_link_server on a Unix socket in a temporary folder, in this process, fed the input as the
 * byte stream a controller sends (frames: 12-byte header, payload). The input is written once
 * whole and once split at a byte drawn from it; the uv loop is turned (without waiting) until
 * the server has read every byte and written what it had to, then the write side is shut and
 * the loop turned until the server closes the link.
 *
 * The handler answers each request at once and deterministically, by its path: "/hold" keeps
 * the stream until a later "/release" request answers every held one; "/stream?N" streams N
 * bytes in three ms_link_write pieces, each after the last was released (credit from WINDOW
 * frames); "/stream-end?N" writes N bytes at once and ends the stream while they are pending;
 * "/big?N" is ms_link_respond with N bytes (over MS_LINK_WINDOW it becomes HEAD + DATA);
 * "/abort" aborts (after a head when there is a body), "/abort-pending?N" aborts with a write
 * pending; anything else gets a 200 echoing the request's headers, method, target, id and body.
 *
 * Invariants: the handler's log (each request handed over, each cancel and release) and the
 * frames the server wrote back (decoded with lk_get_*) are the same whole or split (frames only
 * when the server did not close the link itself); every frame written back is well formed, a
 * stream answered with RESPONSE, or HEAD, DATA within the stream's credit, then END or ABORT;
 * a stream the handler owns is cancelled at most once and only while owned, and when the
 * controller's side closes every one is ended or cancelled, every body handed over by reference
 * released, and ms_link_server_busy is 0; before that, busy counts every stream still owned or
 * pending. An input with a frame malformed whatever the state (reserved bytes, unknown type,
 * short WINDOW, REQUEST that does not decode, stream index 0) makes the server close the link,
 * and no request after that frame is handed over; an input of only well-formed frames of no
 * such kind does not. Nothing leaks (LSan). Built as a libFuzzer binary with -DMS_FUZZ=ON
 * (clang), else linked with replay.c so ctest runs the corpus (tests/fuzz/corpus/link_server).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <linux/sockios.h>

#include "link/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_MAX_INPUT (32 * 1024) /* well under a Unix socket's buffer: writes never block */
#define MAX_N          600000      /* bytes a response may ask for: past two windows */
#define INDEX_MASK     ((1u << 20) - 1)

static uv_loop_t loop;
static ms_link_server_t *srv;
static char sock_dir[32], sock_path[108];
static ms_buf_t hlog; /* what the handler saw */

typedef struct job {
    struct job *next; /* every job of the run */
    struct job *held; /* the "/hold" queue */
    ms_link_stream_t *s;
    unsigned seq;
    int open;     /* the handler owns the stream */
    int pending;  /* a body handed over by reference, not released yet */
    int streamed; /* "/stream": pieces written one after another */
    char *buf;
    size_t len, off;
} job_t;

static job_t *jobs, *held_first, **held_last = &held_first;
static unsigned seq;

static uint32_t u32_at(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t fnv(const void *p, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ ((const uint8_t *)p)[i]) * 16777619u;
    return h;
}

static size_t query_n(const ms_http_request_t *req)
{
    size_t n = 0;
    for (const char *q = req->query; *q >= '0' && *q <= '9' && n <= MAX_N; q++)
        n = n * 10 + (size_t)(*q - '0');
    return n > MAX_N ? MAX_N : n;
}

static char *fill(job_t *j, size_t n)
{
    j->buf = ms_malloc(n ? n : 1);
    j->len = n;
    for (size_t i = 0; i < n; i++)
        j->buf[i] = (char)(i * 31 + j->seq);
    return j->buf;
}

static void job_done(job_t *j)
{
    j->open = 0;
    free(j->buf);
    j->buf = NULL;
}

static void write_more(job_t *j);

/* A body handed over by reference is done with: the link no longer reads it. */
static void on_release(void *ctx)
{
    job_t *j = ctx;
    if (!j->pending)
        abort(); /* released twice, or never handed over */
    j->pending = 0;
    ms_buf_appendf(&hlog, "RELEASE %u\n", j->seq);
    if (j->streamed && j->open) {
        write_more(j);
        return;
    }
    free(j->buf);
    j->buf = NULL;
}

/* "/stream": three pieces, the next once the last is queued, then the end. */
static void write_more(job_t *j)
{
    while (j->off < j->len) {
        size_t n = j->len / 3 + 1;
        if (n > j->len - j->off)
            n = j->len - j->off;
        const char *p = j->buf + j->off;
        j->off += n;
        j->pending = 1;
        if (!ms_link_write(j->s, p, n, on_release, j))
            return; /* on_release resumes */
        j->pending = 0;
    }
    ms_link_end(j->s);
    job_done(j);
}

static void respond_echo(job_t *j, const char *tag)
{
    const ms_http_request_t *r = &j->s->req;
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s %s %s %s ", tag, r->method, r->target, r->request_id);
    ms_buf_append(&b, r->body, r->body_len);
    ms_link_respond(j->s, 200, r->headers, r->n_headers, b.data, b.len, NULL, NULL);
    ms_buf_free(&b);
    job_done(j);
}

static void on_request(ms_link_stream_t *s, void *data)
{
    (void)data;
    const ms_http_request_t *r = &s->req;
    job_t *j = ms_calloc(1, sizeof *j);
    j->s = s;
    j->seq = ++seq;
    j->open = 1;
    j->next = jobs;
    jobs = j;
    s->user = j;
    /* (The method is never empty on the wire, but its bytes may start with a NUL.) */
    if (r->body[r->body_len] || r->target[r->target_len] || r->path[r->path_len] ||
        r->http_minor != 1 || r->path_len > r->target_len)
        abort(); /* strings not NUL-terminated where they end */
    ms_buf_appendf(&hlog, "REQ %u %s %s path=%s query=%s id=%s headers=%zu", j->seq, r->method,
                   r->target, r->path, r->query, r->request_id, r->n_headers);
    for (size_t i = 0; i < r->n_headers; i++)
        ms_buf_appendf(&hlog, " %08x:%08x", fnv(r->headers[i].name, r->headers[i].name_len),
                       fnv(r->headers[i].value, r->headers[i].value_len));
    ms_buf_appendf(&hlog, " body %zu %08x\n", r->body_len, fnv(r->body, r->body_len));

    size_t n = query_n(r);
    if (strcmp(r->path, "/hold") == 0) {
        *held_last = j;
        held_last = &j->held;
    } else if (strcmp(r->path, "/release") == 0) {
        job_t *h = held_first;
        held_first = NULL;
        held_last = &held_first;
        for (job_t *next; h; h = next) {
            next = h->held;
            if (h->open) /* not cancelled meanwhile */
                respond_echo(h, "held");
        }
        respond_echo(j, "release");
    } else if (strcmp(r->path, "/stream") == 0) {
        ms_link_start(s, 200, r->headers, r->n_headers);
        fill(j, n);
        j->streamed = 1;
        write_more(j);
    } else if (strcmp(r->path, "/stream-end") == 0) {
        ms_link_start(s, 201, NULL, 0);
        j->pending = 1;
        if (ms_link_write(s, fill(j, n), n, on_release, j))
            j->pending = 0;
        ms_link_end(s);
        j->open = 0;
        if (!j->pending)
            job_done(j);
    } else if (strcmp(r->path, "/big") == 0) {
        j->pending = 1;
        if (ms_link_respond(s, 202, NULL, 0, fill(j, n), n, on_release, j))
            j->pending = 0;
        j->open = 0;
        if (!j->pending)
            job_done(j);
    } else if (strcmp(r->path, "/abort") == 0) {
        if (r->body_len)
            ms_link_start(s, 203, NULL, 0);
        ms_link_abort(s);
        job_done(j);
    } else if (strcmp(r->path, "/abort-pending") == 0) {
        ms_link_start(s, 204, NULL, 0);
        j->pending = 1;
        if (ms_link_write(s, fill(j, n), n, on_release, j))
            j->pending = 0;
        ms_link_abort(s); /* the pending write is forgotten: no release */
        j->pending = 0;
        job_done(j);
    } else {
        respond_echo(j, "echo");
    }
}

static void on_cancel(ms_link_stream_t *s, void *data)
{
    (void)data;
    job_t *j = s->user;
    if (!j || !j->open)
        abort(); /* a cancel for a stream the handler no longer owns */
    ms_buf_appendf(&hlog, "CANCEL %u\n", j->seq);
    j->pending = 0; /* the owner forgets its pending write along with the stream */
    job_done(j);
}

static void cleanup(void)
{
    unlink(sock_path);
    rmdir(sock_dir);
}

static void setup(void)
{
    snprintf(sock_dir, sizeof sock_dir, "/tmp/fuzz_link_XXXXXX");
    if (!mkdtemp(sock_dir))
        abort();
    snprintf(sock_path, sizeof sock_path, "%s/s", sock_dir);
    atexit(cleanup);
    uv_loop_init(&loop);
    ms_link_server_config_t cfg = {.on_request = on_request, .on_cancel = on_cancel};
    if (ms_link_listen_unix(&loop, sock_path, &cfg, &srv) != 0)
        abort();
}

/* Turns the loop, taking what the server writes into *got, until it has read all the client
 * sent and written nothing for a few turns (wait_eof: until it closed). Returns 1 when the
 * server closed the connection. */
static int pump(int fd, int wait_eof, ms_buf_t *got)
{
    char buf[65536];
    int idle = 0;
    for (int i = 0; i < 200000; i++) {
        uv_run(&loop, UV_RUN_NOWAIT);
        ssize_t n;
        idle++;
        while ((n = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
            ms_buf_append(got, buf, (size_t)n);
            idle = 0;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
            return 1;
        int unread = 0;
        if (!wait_eof && ioctl(fd, SIOCOUTQ, &unread) == 0 && unread == 0 && idle > 3)
            return 0;
    }
    abort(); /* the server neither took the input nor closed the connection */
}

/* What the input should do, read without the server's code: `bad` is the index of the first
 * frame malformed in any state (or -1), `requests_before` the REQUEST frames before it, `clean`
 * whether every frame is one that no state refuses (a decodable REQUEST without LK_MORE on a
 * stream index not used before in the input, a CANCEL, a WINDOW with its u32) and none is left
 * incomplete. credit[] adds up the WINDOW credit per stream index. */
typedef struct model {
    long bad;
    size_t requests_before;
    int clean, has_more;
} model_t;

static uint64_t *credit; /* by stream index */
static uint8_t *used;    /* stream indexes opened by the input */

static int request_decodes(const uint8_t *p, uint32_t n, int more)
{
    size_t off = 0;
    uint32_t ml = 0;
    for (int k = 0; k < 3; k++) { /* method, request id, target */
        if (n - off < 4 || n - off - 4 < u32_at(p + off))
            return 0;
        if (k == 0)
            ml = u32_at(p + off);
        off += 4 + (size_t)u32_at(p + off);
    }
    if (ml == 0 || n - off < 4)
        return 0;
    uint32_t count = u32_at(p + off);
    off += 4;
    for (uint64_t i = 0; i < 2 * (uint64_t)count; i++) {
        if (n - off < 4 || n - off - 4 < u32_at(p + off))
            return 0;
        off += 4 + (size_t)u32_at(p + off);
    }
    if (!more)
        return 1;
    return n - off == 8 && u32_at(p + off + 4) == 0 && u32_at(p + off) <= 0x7fffffffu;
}

static model_t read_model(const uint8_t *d, size_t size)
{
    model_t m = {-1, 0, 1, 0};
    memset(credit, 0, (INDEX_MASK + 1) * sizeof *credit);
    memset(used, 0, INDEX_MASK + 1);
    size_t off = 0;
    for (long k = 0; size - off >= LK_HEADER; k++) {
        const uint8_t *h = d + off;
        uint32_t n = u32_at(h), id = u32_at(h + 4) & INDEX_MASK;
        int type = h[8], flags = h[9];
        int reserved = h[10] || h[11] || n > 0x7fffffffu;
        int whole = !reserved && n <= size - off - LK_HEADER;
        int bad = reserved;
        if (whole) {
            const uint8_t *p = h + LK_HEADER;
            if (type == LK_REQUEST)
                bad = id == 0 || !request_decodes(p, n, flags & LK_MORE);
            else if (type == LK_WINDOW)
                bad = n < 4;
            else
                bad = type != LK_CANCEL && type != LK_BODY;
            if (!bad && type == LK_WINDOW)
                credit[id] += u32_at(p);
            if (!bad && type == LK_REQUEST) {
                m.has_more |= flags & LK_MORE;
                if ((flags & LK_MORE) || used[id])
                    m.clean = 0;
                used[id] = 1;
            }
            if (type == LK_BODY)
                m.clean = 0;
        }
        if (bad) {
            m.bad = k;
            m.clean = 0;
            return m;
        }
        if (!whole) {
            m.clean = 0;
            return m;
        }
        if (type == LK_REQUEST)
            m.requests_before++;
        off += LK_HEADER + (size_t)n;
    }
    if (off != size)
        m.clean = 0;
    return m;
}

/* Checks the frames the server wrote and logs them into out. */
static void read_frames(const ms_buf_t *got, ms_buf_t *out)
{
    /* Per stream index: open after HEAD until END or ABORT, with its DATA bytes. */
    static uint8_t open[INDEX_MASK + 1];
    static uint64_t sent[INDEX_MASK + 1];
    memset(open, 0, sizeof open);
    size_t off = 0;
    const uint8_t *d = (const uint8_t *)got->data;
    while (got->len - off >= LK_HEADER) {
        const uint8_t *h = d + off;
        uint32_t n = u32_at(h), stream = u32_at(h + 4), id = stream & INDEX_MASK;
        if (h[9] || h[10] || h[11] || n > got->len - off - LK_HEADER)
            abort(); /* a frame the server wrote is malformed, or cut short */
        const char *p = (const char *)h + LK_HEADER;
        int type = h[8];
        ms_buf_appendf(out, "%d %u %u", type, stream, n);
        if (type == LK_RESPONSE || type == LK_HEAD) {
            lk_reader_t r = {p, p + n, 0};
            ms_http_header_t *hs = NULL;
            size_t cap = 0, nh = 0;
            uint32_t status = lk_get_u32(&r);
            if (lk_get_headers(&r, &hs, &cap, &nh) != 0 || open[id] ||
                (type == LK_HEAD && r.p != r.end))
                abort(); /* undecodable, a second answer, or a head with a body */
            ms_buf_appendf(out, " %u %zu %08x", status, nh, fnv(r.p, (size_t)(r.end - r.p)));
            for (size_t i = 0; i < nh; i++)
                ms_buf_appendf(out, " %08x:%08x", fnv(hs[i].name, hs[i].name_len),
                               fnv(hs[i].value, hs[i].value_len));
            free(hs);
            if (type == LK_HEAD) {
                open[id] = 1;
                sent[id] = 0;
            }
        } else if (type == LK_DATA) {
            sent[id] += n;
            if (!open[id] || n == 0 || n > MS_LINK_MAX_DATA ||
                sent[id] > MS_LINK_WINDOW + credit[id])
                abort(); /* DATA outside a streamed response, empty, too large, past credit */
        } else if (type == LK_END) {
            if (!open[id] || n)
                abort();
            open[id] = 0;
        } else if (type == LK_ABORT) {
            if (n)
                abort();
            open[id] = 0; /* also the answer to a CANCEL, or an abort before any head */
        } else {
            abort(); /* a type the replica never sends */
        }
        ms_buf_append(out, "\n", 1);
        off += LK_HEADER + (size_t)n;
    }
    if (off != got->len)
        abort(); /* a frame cut short */
}

static size_t count_open(void)
{
    size_t n = 0;
    for (job_t *j = jobs; j; j = j->next)
        n += j->open || j->pending;
    return n;
}

/* One connection fed data (split at `split`); returns whether the server closed it first. */
static int run(const uint8_t *data, size_t size, size_t split, const model_t *m, ms_buf_t *wlog)
{
    hlog.len = 0;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, sock_path, strlen(sock_path) + 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        abort();
    ms_buf_t got = {0};
    int closed = 0;
    if (split > 0) {
        if (send(fd, data, split, MSG_NOSIGNAL) != (ssize_t)split)
            abort();
        closed = pump(fd, 0, &got);
    }
    if (size > split && !closed)
        (void)send(fd, data + split, size - split, MSG_NOSIGNAL);
    if (!closed)
        closed = pump(fd, 0, &got);
    if (!closed) {
        /* Everything read and written: the server owes only the streams still open. */
        size_t busy = ms_link_server_busy(srv), owed = count_open();
        if (busy < owed || (!m->has_more && busy != owed)) {
            fprintf(stderr, "busy %zu, open or pending %zu\n", busy, owed);
            abort();
        }
    }
    ms_buf_appendf(&hlog, "%s\n", closed ? "SERVER CLOSED" : "CLIENT CLOSES");
    shutdown(fd, SHUT_WR);
    if (!closed)
        pump(fd, 1, &got);
    close(fd);
    for (int i = 0; i < 4; i++)
        uv_run(&loop, UV_RUN_NOWAIT); /* the server's side of the connection is closed, freed */
    read_frames(&got, wlog);
    ms_buf_free(&got);

    /* The controller is gone: nothing may be left owed. */
    if (ms_link_server_busy(srv) != 0)
        abort();
    for (job_t *j = jobs, *next; j; j = next) {
        next = j->next;
        if (j->open || j->pending || j->buf)
            abort(); /* a stream neither ended nor cancelled, or a body never released */
        free(j);
    }
    jobs = NULL;
    held_first = NULL;
    held_last = &held_first;
    seq = 0;

    /* The malformed-frame rule. */
    if (m->bad >= 0 && !closed)
        abort(); /* a frame no state accepts did not close the link */
    if (m->clean && closed)
        abort(); /* well-formed frames only, yet the link was closed */
    size_t reqs = 0;
    for (size_t i = 0; i + 4 <= hlog.len; i++)
        reqs += memcmp(hlog.data + i, "REQ ", 4) == 0 && (i == 0 || hlog.data[i - 1] == '\n');
    if (m->bad >= 0 && reqs > m->requests_before)
        abort(); /* a request after the malformed frame was handed over */
    return closed;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!srv) {
        setup();
        credit = ms_calloc(INDEX_MASK + 1, sizeof *credit);
        used = ms_calloc(INDEX_MASK + 1, 1);
    }
    if (size > FUZZ_MAX_INPUT)
        return 0;
    model_t m = read_model(data, size);
    size_t split = size ? fnv(data, size) % (size + 1) : 0;
    ms_buf_t w1 = {0}, w2 = {0};
    int c1 = run(data, size, 0, &m, &w1);
    ms_buf_t whole = hlog;
    hlog = (ms_buf_t){0};
    int c2 = run(data, size, split, &m, &w2);
    int same_h = whole.len == hlog.len && (!whole.len || !memcmp(whole.data, hlog.data, whole.len));
    /* A server closing the link drops what it had not written yet, which depends on reads. */
    int same_w = c1 || c2 || (w1.len == w2.len && (!w1.len || !memcmp(w1.data, w2.data, w1.len)));
    if (getenv("FUZZ_LINK_LOG"))
        fprintf(stderr, "%.*s%.*s", (int)whole.len, whole.data, (int)w1.len, w1.data);
    if (!same_h || !same_w) {
        fprintf(stderr, "whole:\n%.*s%.*s\nsplit at %zu:\n%.*s%.*s\n", (int)whole.len, whole.data,
                (int)w1.len, w1.data, split, (int)hlog.len, hlog.data, (int)w2.len, w2.data);
        abort(); /* the bytes' arrival in pieces changed what the server did */
    }
    ms_buf_free(&whole);
    ms_buf_free(&w1);
    ms_buf_free(&w2);
    return 0;
}
