/*
 * link internals: the frame format and the connection layer both sides share (wire.c): a Unix
 * socket with an input buffer parsed frame by frame and an output buffer flushed once per loop
 * iteration (from a prepare handle, so frames queued by I/O callbacks and timers alike go out
 * before the loop next waits).
 */
#ifndef MS_LINK_INTERNAL_H
#define MS_LINK_INTERNAL_H

#include "link/link.h"

/* Frame header: u32 payload length, u32 stream id, u8 type, u8 flags, u16 reserved (0); all
 * little-endian. */
#define LK_HEADER 12

enum {
    LK_REQUEST = 1,  /* c -> r: opens a stream */
    LK_RESPONSE = 2, /* r -> c: a whole response; ends the stream */
    LK_HEAD = 3,     /* r -> c: a streamed response's head */
    LK_DATA = 4,     /* r -> c: a piece of its body */
    LK_END = 5,      /* r -> c: the streamed response is complete */
    LK_ABORT = 6,    /* r -> c: the stream ended early (also the answer to CANCEL) */
    LK_CANCEL = 7,   /* c -> r: the controller gave the stream up */
    LK_WINDOW = 8,   /* c -> r: u32 credit for the stream's DATA */
    LK_BODY = 9,     /* c -> r: a piece of a request body too large for its REQUEST frame */
};

/* Frame flags. */
enum {
    LK_MORE = 1, /* REQUEST: the body follows in BODY frames (its u64 total length is given) */
    LK_LAST = 2, /* BODY: the request body's last piece */
};
/* A request body larger than this goes in BODY frames of this size, written only while the
 * link's unwritten output stays under LK_BACKLOG: the controller never holds a second copy of a
 * large body, however slowly the replica reads. */
#define LK_BODY_PIECE (64 * 1024)
#define LK_BACKLOG    (256 * 1024)

typedef struct lk_conn lk_conn_t;

/* One frame; payload valid during the call. Returns -1 when the frame is malformed. */
typedef int (*lk_frame_cb)(lk_conn_t *c, int type, int flags, uint32_t stream, const char *p,
                           uint32_t n);
/* The connection failed (EOF, read or write error, malformed frame); called once. */
typedef void (*lk_fail_cb)(lk_conn_t *c, ms_link_error_t err);

struct lk_conn {
    uv_pipe_t pipe;
    uv_prepare_t flusher;
    uv_write_t wreq;
    ms_buf_t in;
    ms_buf_t out;        /* frames queued, not yet written */
    ms_buf_t wbuf;       /* bytes of the uv_write in flight */
    uint64_t queued_end; /* bytes ever queued */
    uint64_t handed_end; /* bytes ever handed to the kernel (or to a uv_write) */
    uint32_t max_frame;  /* larger payloads are a protocol error */
    lk_frame_cb on_frame;
    lk_fail_cb on_fail;
    void (*on_closed)(lk_conn_t *c);  /* both handles closed: free the owner */
    void (*on_drained)(lk_conn_t *c); /* before each write: the owner may queue more (or NULL) */
    unsigned connected : 1;
    unsigned writing : 1;
    unsigned failed : 1;
    unsigned closing : 1;
    int open_handles;
};

/* Sets up the handles (the pipe is initialised, not connected) and buffers. */
void lk_conn_init(lk_conn_t *c, uv_loop_t *loop);
/* The pipe is connected: start reading, flush what was queued. */
void lk_conn_start(lk_conn_t *c);
/* Closes both handles; on_closed runs when they are. Idempotent. */
void lk_conn_close(lk_conn_t *c);
/* Reports a failure once (on_fail), unless closing. */
void lk_conn_fail(lk_conn_t *c, ms_link_error_t err);

/* Frame building into c->out: begin returns the header's offset, end fills in the length and
 * schedules the flush. */
size_t lk_frame_begin(lk_conn_t *c, int type, uint32_t stream);
void lk_frame_end(lk_conn_t *c, size_t at);
void lk_frame_flags(lk_conn_t *c, size_t at, int flags);
/* Output queued in this process and not yet taken by the kernel. */
size_t lk_backlog(const lk_conn_t *c);
void lk_put_u32(ms_buf_t *b, uint32_t v);
void lk_put_str(ms_buf_t *b, const char *s, size_t n); /* u32 length, bytes */
/* A frame with a single u32 payload (CANCEL has none: pass has_value 0). */
void lk_send_small(lk_conn_t *c, int type, uint32_t stream, int has_value, uint32_t value);

/* Payload decoding: a cursor that refuses to read past the end. */
typedef struct lk_reader {
    const char *p, *end;
    int bad;
} lk_reader_t;
uint32_t lk_get_u32(lk_reader_t *r);
const char *lk_get_str(lk_reader_t *r, uint32_t *len);

/* Headers: u32 count, then name and value strings. Decodes into *hs (grown as needed). */
int lk_get_headers(lk_reader_t *r, ms_http_header_t **hs, size_t *cap, size_t *n);
void lk_put_headers(ms_buf_t *b, const ms_http_header_t *hs, size_t n);

#endif
