/*
 * link: the controller <-> Lua replica data link (docs/replica-protocol.md, "Data link").
 *
 * One Unix-socket connection carries many requests at once as length-prefixed binary frames,
 * each tagged with a stream id: the controller opens a stream with a REQUEST frame and the
 * replica answers with RESPONSE (whole), or HEAD, DATA..., END; either side may end a stream
 * early (CANCEL from the controller, ABORT from the replica). Frames are gathered per loop
 * iteration and written with one system call per link, and one read takes in every frame that
 * has arrived, so a busy link costs a few system calls per loop turn instead of a few per request.
 *
 * Flow control: a replica may have at most MS_LINK_WINDOW bytes of DATA in flight per stream
 * beyond what the controller has credited back (WINDOW frames), so a slow client holds up only
 * its own stream and the controller buffers a bounded amount for it.
 *
 * Both ends are here: the client side (ms_link_t, the controller) and the server side
 * (ms_link_server_t, the replica). Nothing blocks; nothing is allocated per frame on the client
 * side once its buffers have grown.
 */
#ifndef MS_LINK_H
#define MS_LINK_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "http/http.h"

/* Per-stream credit for response body bytes (DATA frames) not yet credited back. */
#define MS_LINK_WINDOW (256 * 1024)
/* Largest DATA frame payload a replica sends. */
#define MS_LINK_MAX_DATA (64 * 1024)

/* ---- client side (controller) ------------------------------------------------------------- */

typedef struct ms_link ms_link_t;

/* What the controller sends: strings need not be NUL-terminated; all are copied into the link's
 * output before ms_link_send returns. */
typedef struct ms_link_request {
    const char *method;
    const char *target; /* path plus optional ?query, as the client sent it */
    size_t target_len;
    const char *request_id;
    const ms_http_header_t *headers;
    size_t n_headers;
    const char *body;
    size_t body_len;
} ms_link_request_t;

typedef enum {
    MS_LINK_ERR_CONNECT,  /* the connection could not be made */
    MS_LINK_ERR_CLOSED,   /* the replica closed the connection (it exited) */
    MS_LINK_ERR_IO,       /* a read or write failed */
    MS_LINK_ERR_PROTOCOL, /* the replica sent a frame that does not parse */
    MS_LINK_ERR_ABORTED,  /* the replica ended the stream early (its handler failed midway) */
} ms_link_error_t;

const char *ms_link_error_text(ms_link_error_t err);

/* A request's deadline travels with it, at every hop, as the time it has left in whole
 * milliseconds counted from when the hop received it (docs/replica-protocol.md, "Deadlines"). */
#define MS_LINK_DEADLINE_HEADER "X-Moonserve-Timeout-Ms"
/* The application's route_prefix an ingress request matched (set by the engine only). */
#define MS_ROUTE_PREFIX_HEADER      "X-Moonserve-Route-Prefix"
#define MS_ROUTE_PREFIX_HEADER_LEN  24
#define MS_LINK_DEADLINE_HEADER_LEN 22
/* The value of the deadline header among headers: 1 with the milliseconds in *ms, 0 when there
 * is none, -1 when one is not a whole number of milliseconds (digits only, at most 12). */
int ms_link_deadline(const ms_http_header_t *headers, size_t n, uint64_t *ms);

/* Per-stream callbacks; header and body pointers are valid only during the call. Exactly one of
 * on_response, on_end or on_error ends a stream that was not cancelled. */
typedef struct ms_link_callbacks {
    /* A whole response in one frame. */
    void (*on_response)(void *data, int status, const ms_http_header_t *headers, size_t n,
                        const char *body, size_t body_len);
    /* A streamed response starts; DATA follows. */
    void (*on_head)(void *data, int status, const ms_http_header_t *headers, size_t n);
    /* A piece of a streamed body. The owner credits it back with ms_link_credit once it has
     * passed the bytes on (at once, or when its client drained). */
    void (*on_data)(void *data, const char *p, size_t n);
    void (*on_end)(void *data);
    /* never_sent: no byte of the request left this process, so it may run elsewhere. */
    void (*on_error)(void *data, ms_link_error_t err, int never_sent);
    /* After ms_link_cancel: the replica confirmed the end of the stream (or the link broke);
     * no other callback fires for a cancelled stream. */
    void (*on_released)(void *data);
} ms_link_callbacks_t;

/* Link-wide events for the link's owner. */
typedef struct ms_link_events {
    /* The link broke. Called before the open streams get their on_error / on_released, so the
     * owner can stop routing to the replica first; it closes the link later (ms_link_close). */
    void (*on_down)(void *owner, ms_link_error_t err);
} ms_link_events_t;

/* Connects to the replica's socket. Streams opened before the connection completes are queued. */
ms_link_t *ms_link_connect(uv_loop_t *loop, const char *path, const ms_link_events_t *events,
                           void *owner);
/* Opens a stream: queues the REQUEST frame. Returns the stream id (never 0), or 0 when the link
 * is down (nothing queued, no callback fires). */
uint32_t ms_link_send(ms_link_t *l, const ms_link_request_t *req, const ms_link_callbacks_t *cb,
                      void *data);
/* Gives up a stream: a CANCEL frame is queued; on_released follows. */
void ms_link_cancel(ms_link_t *l, uint32_t id);
/* Returns n body bytes of a stream to the replica's window. */
void ms_link_credit(ms_link_t *l, uint32_t id, size_t n);
/* Open streams (sent, not yet ended or released). */
size_t ms_link_open_streams(const ms_link_t *l);
int ms_link_is_up(const ms_link_t *l);
/* Closes the connection. Open streams get on_error (or on_released when cancelled) before this
 * returns; the memory goes once the handle is closed. */
void ms_link_close(ms_link_t *l);

/* ---- server side (replica) ---------------------------------------------------------------- */

typedef struct ms_link_server ms_link_server_t;
typedef struct ms_link_stream ms_link_stream_t;

/* One stream on the replica's side. `req` holds the request (strings NUL-terminated, valid until
 * the stream ends); http_minor is 1 and request_id is the controller's. */
struct ms_link_stream {
    ms_http_request_t req;
    void *user; /* free for the owner */
};

typedef struct ms_link_server_config {
    /* A request arrived. The owner must end the stream with ms_link_respond, or ms_link_start
     * ... ms_link_end, or ms_link_abort, unless on_cancel comes first. */
    void (*on_request)(ms_link_stream_t *s, void *data);
    /* The controller cancelled the stream, or its connection went away. After this returns the
     * stream is gone: the owner must drop every pointer to it. */
    void (*on_cancel)(ms_link_stream_t *s, void *data);
    void *data;
} ms_link_server_config_t;

/* A body handed to the link by reference: it must stay valid until release(ctx) is called
 * (release may be NULL when the bytes outlive the stream anyway). */
typedef void (*ms_link_release_cb)(void *ctx);

int ms_link_listen_unix(uv_loop_t *loop, const char *path, const ms_link_server_config_t *cfg,
                        ms_link_server_t **out);
/* Stops accepting new connections; open links keep serving their streams. */
void ms_link_server_stop_accepting(ms_link_server_t *srv);
/* Streams not yet finished plus connections with output not yet written: a draining replica
 * exits once this is 0. */
size_t ms_link_server_busy(const ms_link_server_t *srv);
/* Closes every connection (open streams get on_cancel) and frees the server. */
void ms_link_server_close(ms_link_server_t *srv);

/* A whole response; ends the stream. A body the stream's window cannot take at once is sent as
 * HEAD + DATA as credit comes back, read from `body` in place: returns 1 when every byte was
 * queued (release is not called), or 0 when `body` is still referenced (release(ctx) runs once
 * the last byte is queued or the stream is gone). */
int ms_link_respond(ms_link_stream_t *s, int status, const ms_http_header_t *headers, size_t n,
                    const char *body, size_t body_len, ms_link_release_cb release, void *ctx);
/* A streamed response: the head now, then ms_link_write pieces, then ms_link_end. */
void ms_link_start(ms_link_stream_t *s, int status, const ms_http_header_t *headers, size_t n);
/* Same contract as ms_link_respond's body: 1 = all queued, 0 = release(ctx) comes later (the
 * stream's window is full). At most one write may be pending per stream. */
int ms_link_write(ms_link_stream_t *s, const char *p, size_t n, ms_link_release_cb release,
                  void *ctx);
/* Ends a streamed response. */
void ms_link_end(ms_link_stream_t *s);
/* Ends the stream early: the client sees a truncated response (or a 502 when nothing was sent). */
void ms_link_abort(ms_link_stream_t *s);

#endif
