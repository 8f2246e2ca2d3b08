/*
 * http: HTTP/1.1 on libuv + llhttp, both directions.
 *
 * Server side (ingress, the controller's internal handle socket, the replica's data socket):
 * a listener accepts TCP or Unix-socket connections, parses requests (keep-alive, pipelining,
 * Content-Length and chunked bodies), enforces header/body limits (431/413), a header-read
 * timeout (slowloris) and an idle keep-alive timeout, answers 400 to malformed input, and hands
 * each complete request to the owner's callback. Requests on one connection are answered in
 * order; the next pipelined request is handed over only once the previous response is finished.
 *
 * Client side (controller -> replica, replica -> controller): a connection that sends one
 * request at a time and parses the response, streaming body pieces to callbacks.
 *
 * Every response written through this module carries `X-Request-ID`; error bodies are JSON
 * `{"error": ..., "request_id": ...}`. Nothing here blocks; all memory for a request is released
 * when its response is finished or the client goes away.
 */
#ifndef MS_HTTP_H
#define MS_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

#include "core/core.h"

typedef struct ms_http_header {
    const char *name; /* not NUL-terminated in parsed requests: use the lengths */
    size_t name_len;
    const char *value;
    size_t value_len;
} ms_http_header_t;

/* ---- server --------------------------------------------------------------------------------- */

typedef struct ms_http_limits {
    size_t max_header_bytes;     /* request line + headers; over it -> 431 */
    size_t max_body_bytes;       /* decoded body; over it -> 413 */
    double header_timeout_s;     /* whole head must arrive within this; else the conn is closed */
    double keep_alive_timeout_s; /* idle time between requests before the conn is closed */
} ms_http_limits_t;

typedef struct ms_http_server ms_http_server_t;
typedef struct ms_http_request ms_http_request_t;

/* A complete request. Strings point into memory owned by the request and stay valid until the
 * response is finished (ms_http_response_end/ms_http_respond*) or the request is aborted. */
struct ms_http_request {
    const char *method; /* NUL-terminated, e.g. "GET" */
    const char *target; /* NUL-terminated request target as sent: path plus optional ?query */
    size_t target_len;
    const char *path; /* NUL-terminated path part of target (no query) */
    size_t path_len;
    const char *query; /* NUL-terminated query string without '?', "" if none */
    ms_http_header_t *headers;
    size_t n_headers;
    const char *body; /* decoded body (chunked framing removed), NUL-terminated */
    size_t body_len;
    char request_id[80]; /* from X-Request-ID when given (truncated), else generated */
    int http_minor;      /* 0 or 1 */
    void *user;          /* free for the owner of the server */
    int body_streamed;   /* 1: the body is not read yet; see ms_http_request_body_read */
    int64_t body_length; /* Content-Length of a streamed body, -1 when chunked */
    void *route;         /* the server owner's too, kept for on_complete (deployments use user) */
    const char *route_prefix; /* the application's route_prefix that matched (ingress), or NULL */
    char served_by[96];       /* the replica that took it ("" when none), for access logs */
    uint64_t started_ns;      /* uv_hrtime() when the request was handed over */
};

/* Called once per complete request. The owner must eventually finish a response on it, unless
 * on_abort is called first. */
typedef void (*ms_http_request_cb)(ms_http_request_t *req, void *data);
/* The client went away (or the server is closing) while a response was still owed. After this
 * returns the request is freed: the owner must drop every pointer to it. */
typedef void (*ms_http_abort_cb)(ms_http_request_t *req, void *data);

typedef struct ms_http_server_config {
    ms_http_limits_t limits;
    ms_http_request_cb on_request;
    ms_http_abort_cb on_abort;
    void *data;
    /* Optional. Called once a request's head is complete and a body follows (Content-Length > 0
     * or chunked), with everything but the body valid. Returning 1 hands the request to
     * on_request at once with its body unread (body_streamed = 1, body "", body_len 0): the
     * owner pulls it with ms_http_request_body_read, and max_body_bytes does not bound it.
     * Returning 0 (or no hook) reads the body whole first, as always. */
    int (*stream_body)(const ms_http_request_t *req, void *data);
    /* Optional. Called once per request that was answered or given up, when it ends: its
     * response fully queued (`status` as sent; requests refused while parsing, 400/413/431,
     * included), or the client gone first (`disconnected`, status MS_HTTP_DISCONNECTED), with
     * the nanoseconds since it was handed over. For metrics and access logs: it must not
     * respond. */
    void (*on_complete)(const ms_http_request_t *req, int status, int disconnected,
                        uint64_t elapsed_ns, void *data);
} ms_http_server_config_t;

/* The status on_complete reports for a request whose client left first (nginx's 499). */
#define MS_HTTP_DISCONNECTED 499

/* Listen on host:port (TCP). port 0 picks a free port; see ms_http_server_port. */
int ms_http_server_listen_tcp(uv_loop_t *loop, const char *host, int port,
                              const ms_http_server_config_t *cfg, ms_http_server_t **out);
/* Listen on a Unix socket path (unlinked first). */
int ms_http_server_listen_unix(uv_loop_t *loop, const char *path,
                               const ms_http_server_config_t *cfg, ms_http_server_t **out);
int ms_http_server_port(ms_http_server_t *srv);
/* Stop accepting new connections; idle keep-alive connections are closed, connections with a
 * request in flight stay open until their response is finished, then close. */
void ms_http_server_stop_accepting(ms_http_server_t *srv);
/* Number of requests currently owed a response. */
size_t ms_http_server_inflight(ms_http_server_t *srv);
/* Close everything now; in-flight requests are aborted (on_abort is called). Frees srv once
 * all handles are closed. */
void ms_http_server_close(ms_http_server_t *srv);

/* Whether h is the header called name, case-insensitive. */
static inline int ms_http_header_is(const ms_http_header_t *h, const char *name)
{
    size_t n = strlen(name);
    return h->name_len == n && strncasecmp(h->name, name, n) == 0;
}
/* Header lookup, case-insensitive. Returns NULL when absent; *len receives the value length.
 * Inline so that a literal name's length is known at compile time: a request meets several of
 * these lookups on its way through the controller. */
static inline const char *ms_http_request_header(const ms_http_request_t *req, const char *name,
                                                 size_t *len)
{
    for (size_t i = 0; i < req->n_headers; i++) {
        const ms_http_header_t *h = &req->headers[i];
        if (ms_http_header_is(h, name)) {
            if (len)
                *len = h->value_len;
            return h->value;
        }
    }
    return NULL;
}
/* How many times the header occurs, case-insensitive. */
static inline size_t ms_http_request_header_count(const ms_http_request_t *req, const char *name)
{
    size_t count = 0;
    for (size_t i = 0; i < req->n_headers; i++)
        count += ms_http_header_is(&req->headers[i], name);
    return count;
}

/* Streamed request bodies (body_streamed = 1). Pieces are decoded (chunk framing removed) and
 * valid only during on_data; on_end follows the last one. Until a reader is set, and while it is
 * paused, the connection does not read from its socket (the body's inactivity timeout does not
 * run then either: the owner is the slow one). Bytes that arrived before the reader was set
 * come first, possibly from inside ms_http_request_body_read. For a request whose body was read
 * whole, the body is delivered as one piece and on_end. If the response finishes before the
 * body was all read, the connection closes after the response. */
typedef struct ms_http_body_reader {
    void (*on_data)(void *data, const char *p, size_t n);
    void (*on_end)(void *data);
} ms_http_body_reader_t;
/* Starts or resumes delivery to r (copied) with `data`. */
void ms_http_request_body_read(ms_http_request_t *req, const ms_http_body_reader_t *r, void *data);
/* Stops delivery (and socket reading) until the next ms_http_request_body_read. May be called
 * from inside on_data. */
void ms_http_request_body_pause(ms_http_request_t *req);

/* Whole response with Content-Length. `headers` may be NULL. Finishes the request. */
void ms_http_respond(ms_http_request_t *req, int status, const ms_http_header_t *headers,
                     size_t n_headers, const char *body, size_t body_len);
/* JSON error `{"error": message, "request_id": id}` with the given status. Finishes the request. */
void ms_http_respond_error(ms_http_request_t *req, int status, const char *message);
/* The JSON error body those send, written into out (cap >= MS_HTTP_ERROR_BODY_MAX holds any);
 * returns its length. The message is made valid UTF-8 and cut to fit. */
#define MS_HTTP_ERROR_BODY_MAX 1280
size_t ms_http_error_body(char *out, size_t cap, const char *message, const char *request_id);
/* The same with extra headers (at most 8), e.g. Retry-After. */
void ms_http_respond_error_headers(ms_http_request_t *req, int status, const char *message,
                                   const ms_http_header_t *headers, size_t n_headers);
/* Streaming response: head with Transfer-Encoding: chunked (HTTP/1.1) or close-delimited
 * (HTTP/1.0), then chunks, then end. */
void ms_http_response_start(ms_http_request_t *req, int status, const ms_http_header_t *headers,
                            size_t n_headers);
void ms_http_response_chunk(ms_http_request_t *req, const char *data, size_t len);
void ms_http_response_end(ms_http_request_t *req);
/* Streaming response with a known length (a relay passing an upstream's Content-Length on): the
 * head carries Content-Length, then ms_http_response_chunk writes bytes unframed and
 * ms_http_response_end finishes. If the bytes written differ from content_length, the
 * connection is closed after them, so the client sees a truncated (or cut) body. HEAD: head
 * only. */
void ms_http_response_start_length(ms_http_request_t *req, int status,
                                   const ms_http_header_t *headers, size_t n_headers,
                                   uint64_t content_length);
/* Abandon a response midway (e.g. upstream died after bytes were sent): the connection is
 * closed so the client sees a truncated body rather than a hang. Finishes the request. */
void ms_http_response_abort(ms_http_request_t *req);
/* Response bytes queued in this process that the client has not taken yet (a slow reader). */
size_t ms_http_response_queued(ms_http_request_t *req);
/* Calls cb once those bytes are all written (one watcher per request, replaced by a new call;
 * forgotten when the request finishes or is aborted). A relay uses it to pause its source. */
typedef void (*ms_http_drain_cb)(ms_http_request_t *req, void *data);
void ms_http_response_on_drain(ms_http_request_t *req, ms_http_drain_cb cb, void *data);
/* True once response bytes have been queued for this request. */
int ms_http_response_started(const ms_http_request_t *req);

const char *ms_http_status_text(int status);

/* ---- client --------------------------------------------------------------------------------- */

typedef struct ms_http_client ms_http_client_t;

/* Why a request on a client connection failed. Only MS_HTTP_CLIENT_CONNECT_FAILED means the
 * request surely never reached the peer (so it may be sent elsewhere without running twice). */
typedef enum {
    MS_HTTP_CLIENT_CONNECT_FAILED,
    MS_HTTP_CLIENT_PEER_CLOSED, /* EOF before the response was complete */
    MS_HTTP_CLIENT_RESET,       /* any other read error */
    MS_HTTP_CLIENT_UNEXPECTED,  /* bytes while no response was owed */
    MS_HTTP_CLIENT_MALFORMED,   /* the response did not parse */
    MS_HTTP_CLIENT_WRITE_FAILED,
} ms_http_client_error_t;

/* A short text for logs and error bodies, e.g. "connect failed". */
const char *ms_http_client_error_text(ms_http_client_error_t err);

typedef struct ms_http_client_callbacks {
    /* Response head arrived. Header strings are valid only during the call. */
    void (*on_head)(void *data, int status, const ms_http_header_t *headers, size_t n_headers,
                    int chunked, int64_t content_length);
    /* A piece of the decoded body; valid only during the call. */
    void (*on_body)(void *data, const char *p, size_t n);
    /* The response is complete; the connection is idle again and may be reused. */
    void (*on_done)(void *data);
    /* Connect failure, reset, EOF or parse error before on_done. The connection is unusable:
     * the owner must call ms_http_client_close. */
    void (*on_error)(void *data, ms_http_client_error_t err);
} ms_http_client_callbacks_t;

/* Connect to a Unix socket (`path`) or, when path is NULL, to host:port over TCP. The connect
 * runs asynchronously; requests sent before it completes are queued. */
ms_http_client_t *ms_http_client_connect(uv_loop_t *loop, const char *path, const char *host,
                                         int port);
/* Send one request; the client must be idle (no response pending). `head` is the complete
 * request head including the final CRLF CRLF; `body` is sent as is (the caller framed it with
 * Content-Length in the head). Callbacks fire with `data`. Returns 0 or -1 if busy/broken. */
int ms_http_client_send(ms_http_client_t *c, const char *head, size_t head_len, const char *body,
                        size_t body_len, const ms_http_client_callbacks_t *cb, void *data);
/* Send a request head only; the body follows through ms_http_client_write and ends with
 * ms_http_client_finish. `head` ends with CRLF CRLF and frames the body: with chunked = 1 it
 * must say Transfer-Encoding: chunked and each write (n > 0) becomes one chunk; otherwise it
 * carries Content-Length and writes go out as they are. Returns 0 or -1 if busy/broken.
 * The response may arrive, even completely (on_done), before finish: that is allowed, but the
 * connection is then not reused (ms_http_client_idle says 0; further writes are dropped), as
 * for any answer that came before the whole request was written. */
int ms_http_client_send_head(ms_http_client_t *c, const char *head, size_t head_len, int chunked,
                             const ms_http_client_callbacks_t *cb, void *data);
/* Body bytes, copied only if the socket does not take them at once. A write failure calls
 * on_error (possibly from inside this call). */
void ms_http_client_write(ms_http_client_t *c, const char *p, size_t n);
/* The body is complete (chunked: writes the last chunk). */
void ms_http_client_finish(ms_http_client_t *c);
/* Request bytes queued in this process, not yet taken by the socket. */
size_t ms_http_client_queued(const ms_http_client_t *c);
/* Calls cb once when that queue empties (replaced by a new call). A relay resumes its source
 * from here. */
void ms_http_client_on_drain(ms_http_client_t *c, void (*cb)(void *data), void *data);
/* Response backpressure: while paused no on_body or on_done fires and the socket is not read;
 * bytes already read are kept and parsed on resume. Both may be called from inside on_body. */
void ms_http_client_pause(ms_http_client_t *c);
void ms_http_client_resume(ms_http_client_t *c);
int ms_http_client_idle(const ms_http_client_t *c); /* connected-or-connecting, nothing pending */
/* Close the connection; no callback fires afterwards. Frees c once the handle is closed. */
void ms_http_client_close(ms_http_client_t *c);

#endif
