/*
 * upstream: the controller's HTTP/1.1 side of one process replica (docs/process-replicas.md) —
 * a pool of keep-alive connections to the server the replica's command runs, on a Unix socket or
 * a TCP port, one request per connection at a time.
 *
 * It speaks the same stream interface as the Lua replicas' data link (link/link.h): a request
 * goes in as an ms_link_request_t, its answer comes back through ms_link_callbacks_t, the owner
 * credits body bytes back (past MS_LINK_WINDOW unacknowledged bytes the connection stops reading,
 * so a slow client holds up only its own replica connection), and a cancelled stream is released
 * after its connection is closed (the only way HTTP/1.1 tells a server to stop). So the
 * deployment relays both kinds of replica with one set of callbacks.
 *
 * A request body either travels whole (ms_link_request_t.body) or is streamed from the client's
 * request as it arrives (body_source), with backpressure both ways: the client's reading pauses
 * while more than UPSTREAM_WRITE_LIMIT bytes wait for the replica.
 */
#ifndef MS_UPSTREAM_H
#define MS_UPSTREAM_H

#include <stdint.h>
#include <uv.h>

#include "http/http.h"
#include "link/link.h"

typedef struct ms_upstream ms_upstream_t;

/* A pool for the server at `path` (a Unix socket), or at 127.0.0.1:port when path is NULL.
 * Connections are made on demand. */
ms_upstream_t *ms_upstream_new(uv_loop_t *loop, const char *path, int port);

/* Sends a request on an idle pooled connection or a new one. `body_source`, when not NULL, is
 * the client's request whose body streams through (it must have body_streamed set; lr->body is
 * then ignored). Returns the stream id (never 0). */
uint32_t ms_upstream_send(ms_upstream_t *u, const ms_link_request_t *lr,
                          ms_http_request_t *body_source, const ms_link_callbacks_t *cb,
                          void *data);
/* Gives up a stream: its connection is closed (the server sees the client leave); on_released
 * follows from the loop, never from within this call. */
void ms_upstream_cancel(ms_upstream_t *u, uint32_t id);
/* Returns n response body bytes of a stream: reading resumes once it is under the window. */
void ms_upstream_credit(ms_upstream_t *u, uint32_t id, size_t n);
/* Streams open (sent, not yet ended or released). */
size_t ms_upstream_open_streams(const ms_upstream_t *u);
/* Closes every connection; open streams get on_error (on_released when cancelled) before this
 * returns. The memory goes once the handles are closed. */
void ms_upstream_close(ms_upstream_t *u);

#endif
