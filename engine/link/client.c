/*
 * link/client: the controller's end of a replica link. See link.h.
 *
 * Streams live in a table of slots reused through a free list; a stream id is the slot's index
 * (plus one) in the low bits and the slot's reuse count above them, so a frame for a stream that
 * already ended can never be mistaken for a newer one in the same slot.
 */
#include <stdlib.h>
#include <string.h>

#include "link/internal.h"

#define INDEX_BITS 20
#define INDEX_MASK ((1u << INDEX_BITS) - 1)
/* A replica's frame is at most a response head plus a window of body. */
#define MAX_REPLICA_FRAME (64u * 1024 * 1024)

typedef enum { SLOT_FREE, SLOT_OPEN, SLOT_CANCELLED } slot_state_t;

typedef struct slot {
    uint32_t id;
    slot_state_t state;
    uint32_t next_free;   /* index + 1 of the next free slot, 0 = none */
    uint64_t request_end; /* the link's queued_end after this stream's REQUEST frame */
    const ms_link_callbacks_t *cb;
    void *data;
    /* A large request body still to be sent in BODY frames, read in place from the caller's
     * request (valid until the stream ends or is cancelled). */
    const char *body;
    size_t body_left;
    uint32_t next_body; /* index + 1 of the next slot with body to send, 0 = none */
} slot_t;

struct ms_link {
    lk_conn_t conn;
    uv_connect_t connect_req;
    const ms_link_events_t *events;
    void *owner;
    slot_t *slots;
    uint32_t n_slots, cap_slots;
    uint32_t free_head;            /* index + 1, 0 = none */
    uint32_t body_head, body_tail; /* FIFO of slots with body left (index + 1, 0 = none) */
    size_t open;
    ms_http_header_t *headers; /* decoding scratch */
    size_t headers_cap;
    unsigned down : 1;
    unsigned closed : 1;
};

static ms_link_t *link_of(lk_conn_t *c)
{
    return (ms_link_t *)((char *)c - offsetof(ms_link_t, conn));
}

/* ---- slots -----------------------------------------------------------------------------------
 */

static slot_t *slot_new(ms_link_t *l)
{
    uint32_t i;
    if (l->free_head) {
        i = l->free_head - 1;
        l->free_head = l->slots[i].next_free;
    } else {
        if (l->n_slots == l->cap_slots) {
            l->cap_slots = l->cap_slots ? l->cap_slots * 2 : 64;
            l->slots = ms_realloc(l->slots, l->cap_slots * sizeof *l->slots);
        }
        i = l->n_slots++;
        l->slots[i].id = i + 1;
    }
    slot_t *s = &l->slots[i];
    s->body = NULL;
    s->body_left = 0;
    s->next_body = 0;
    /* The reuse count moves on by one per use; INDEX_BITS keep the index. */
    s->id = ((s->id & ~INDEX_MASK) + (1u << INDEX_BITS)) | (i + 1);
    l->open++;
    return s;
}

static slot_t *slot_find(ms_link_t *l, uint32_t id)
{
    uint32_t i = (id & INDEX_MASK);
    if (i == 0 || i > l->n_slots)
        return NULL;
    slot_t *s = &l->slots[i - 1];
    return s->state != SLOT_FREE && s->id == id ? s : NULL;
}

/* The slot's body leaves the FIFO (sent, or the stream is over). */
static void drop_body(ms_link_t *l, slot_t *s)
{
    if (!s->body)
        return;
    s->body = NULL;
    s->body_left = 0;
    uint32_t me = (uint32_t)(s - l->slots) + 1, prev = 0;
    for (uint32_t i = l->body_head; i && i != me; i = l->slots[i - 1].next_body)
        prev = i;
    if (prev)
        l->slots[prev - 1].next_body = s->next_body;
    else
        l->body_head = s->next_body;
    if (l->body_tail == me)
        l->body_tail = prev;
    s->next_body = 0;
}

/* Called before each write: BODY frames go out while the unwritten output is small, so a
 * body is copied a piece at a time, never whole. */
static void send_bodies(lk_conn_t *c)
{
    ms_link_t *l = link_of(c);
    while (l->body_head && lk_backlog(c) < LK_BACKLOG) {
        slot_t *s = &l->slots[l->body_head - 1];
        size_t n = s->body_left < LK_BODY_PIECE ? s->body_left : LK_BODY_PIECE;
        size_t at = lk_frame_begin(c, LK_BODY, s->id);
        ms_buf_append(&c->out, s->body, n);
        s->body += n;
        s->body_left -= n;
        if (!s->body_left) {
            lk_frame_flags(c, at, LK_LAST);
            drop_body(l, s);
        }
        lk_frame_end(c, at);
    }
}

static void slot_free(ms_link_t *l, slot_t *s)
{
    drop_body(l, s);
    s->state = SLOT_FREE;
    s->cb = NULL;
    s->data = NULL;
    s->next_free = l->free_head;
    l->free_head = (uint32_t)(s - l->slots) + 1;
    l->open--;
}

/* Ends a stream: its slot is free before the callback runs, so the callback may open another. */
static void end_stream(ms_link_t *l, slot_t *s, ms_link_error_t err)
{
    const ms_link_callbacks_t *cb = s->cb;
    void *data = s->data;
    int cancelled = s->state == SLOT_CANCELLED;
    int never_sent = s->request_end > l->conn.handed_end;
    slot_free(l, s);
    if (cancelled)
        cb->on_released(data);
    else
        cb->on_error(data, err, never_sent);
}

/* ---- frames from the replica ----------------------------------------------------------------
 */

static int head_frame(ms_link_t *l, slot_t *s, int type, const char *p, uint32_t n)
{
    lk_reader_t r = {p, p + n, 0};
    uint32_t status = lk_get_u32(&r);
    size_t nh = 0;
    if (lk_get_headers(&r, &l->headers, &l->headers_cap, &nh) != 0 || status < 200 || status > 599)
        return -1;
    if (s->state == SLOT_CANCELLED) {
        if (type == LK_RESPONSE)
            end_stream(l, s, MS_LINK_ERR_ABORTED);
        return 0;
    }
    const ms_link_callbacks_t *cb = s->cb;
    void *data = s->data;
    if (type == LK_HEAD) {
        cb->on_head(data, (int)status, l->headers, nh);
        return 0;
    }
    slot_free(l, s);
    cb->on_response(data, (int)status, l->headers, nh, r.p, (size_t)(r.end - r.p));
    return 0;
}

static int on_frame(lk_conn_t *c, int type, int flags, uint32_t id, const char *p, uint32_t n)
{
    (void)flags;
    ms_link_t *l = link_of(c);
    slot_t *s = slot_find(l, id);
    if (!s)
        return 0; /* only a stream that ended can be unknown: ignore what is left of it */
    switch (type) {
    case LK_RESPONSE:
    case LK_HEAD:
        return head_frame(l, s, type, p, n);
    case LK_DATA:
        if (s->state == SLOT_OPEN && n)
            s->cb->on_data(s->data, p, n);
        return 0;
    case LK_END:
        if (s->state == SLOT_CANCELLED) {
            end_stream(l, s, MS_LINK_ERR_ABORTED);
        } else {
            const ms_link_callbacks_t *cb = s->cb;
            void *data = s->data;
            slot_free(l, s);
            cb->on_end(data);
        }
        return 0;
    case LK_ABORT:
        end_stream(l, s, MS_LINK_ERR_ABORTED);
        return 0;
    default:
        return -1;
    }
}

/* The owner hears of it first, so it can stop routing to the replica before the open streams
 * fail: a request never written is then routed again to another replica, not to this one. */
static void on_fail(lk_conn_t *c, ms_link_error_t err)
{
    ms_link_t *l = link_of(c);
    l->down = 1;
    if (!l->closed && l->events && l->events->on_down)
        l->events->on_down(l->owner, err);
    for (uint32_t i = 0; i < l->n_slots; i++)
        if (l->slots[i].state != SLOT_FREE)
            end_stream(l, &l->slots[i], err);
}

static void on_closed(lk_conn_t *c)
{
    ms_link_t *l = link_of(c);
    free(l->slots);
    free(l->headers);
    free(l);
}

static void on_connect(uv_connect_t *req, int status)
{
    ms_link_t *l = req->data;
    if (l->conn.closing)
        return;
    if (status < 0) {
        lk_conn_fail(&l->conn, MS_LINK_ERR_CONNECT);
        return;
    }
    lk_conn_start(&l->conn);
}

/* ---- public API ------------------------------------------------------------------------------
 */

ms_link_t *ms_link_connect(uv_loop_t *loop, const char *path, const ms_link_events_t *events,
                           void *owner)
{
    ms_link_t *l = ms_calloc(1, sizeof *l);
    lk_conn_init(&l->conn, loop);
    l->conn.max_frame = MAX_REPLICA_FRAME;
    l->conn.on_frame = on_frame;
    l->conn.on_fail = on_fail;
    l->conn.on_closed = on_closed;
    l->conn.on_drained = send_bodies;
    l->events = events;
    l->owner = owner;
    l->connect_req.data = l;
    uv_pipe_connect(&l->connect_req, &l->conn.pipe, path, on_connect);
    return l;
}

uint32_t ms_link_send(ms_link_t *l, const ms_link_request_t *req, const ms_link_callbacks_t *cb,
                      void *data)
{
    if (l->down || l->closed)
        return 0;
    slot_t *s = slot_new(l);
    s->state = SLOT_OPEN;
    s->cb = cb;
    s->data = data;
    lk_conn_t *c = &l->conn;
    size_t at = lk_frame_begin(c, LK_REQUEST, s->id);
    ms_buf_t *b = &c->out;
    lk_put_str(b, req->method, strlen(req->method));
    lk_put_str(b, req->request_id, strlen(req->request_id));
    lk_put_str(b, req->target, req->target_len);
    lk_put_headers(b, req->headers, req->n_headers);
    if (req->body_len <= LK_BODY_PIECE) {
        ms_buf_append(b, req->body, req->body_len);
    } else {
        /* The body's total length, then its pieces in BODY frames (send_bodies). */
        lk_put_u32(b, (uint32_t)req->body_len);
        lk_put_u32(b, (uint32_t)((uint64_t)req->body_len >> 32));
        lk_frame_flags(c, at, LK_MORE);
        s->body = req->body;
        s->body_left = req->body_len;
        s->next_body = 0;
        if (l->body_tail)
            l->slots[l->body_tail - 1].next_body = (uint32_t)(s - l->slots) + 1;
        else
            l->body_head = (uint32_t)(s - l->slots) + 1;
        l->body_tail = (uint32_t)(s - l->slots) + 1;
    }
    lk_frame_end(c, at);
    s->request_end = c->queued_end;
    return s->id;
}

void ms_link_cancel(ms_link_t *l, uint32_t id)
{
    slot_t *s = slot_find(l, id);
    if (!s || s->state == SLOT_CANCELLED)
        return;
    s->state = SLOT_CANCELLED;
    drop_body(l, s); /* the caller's request may go now: nothing refers to its body any more */
    lk_send_small(&l->conn, LK_CANCEL, id, 0, 0);
}

void ms_link_credit(ms_link_t *l, uint32_t id, size_t n)
{
    slot_t *s = slot_find(l, id);
    if (s && s->state == SLOT_OPEN && n && !l->down)
        lk_send_small(&l->conn, LK_WINDOW, id, 1, (uint32_t)n);
}

size_t ms_link_open_streams(const ms_link_t *l)
{
    return l->open;
}

int ms_link_is_up(const ms_link_t *l)
{
    return !l->down && !l->closed;
}

void ms_link_close(ms_link_t *l)
{
    if (l->closed)
        return;
    l->closed = 1;
    if (!l->down)
        on_fail(&l->conn, MS_LINK_ERR_CLOSED);
    lk_conn_close(&l->conn);
}
