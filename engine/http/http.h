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
} ms_http_server_config_t;

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

/* Header lookup, case-insensitive. Returns NULL when absent; *len receives the value length. */
const char *ms_http_request_header(const ms_http_request_t *req, const char *name, size_t *len);
/* How many times the header occurs, case-insensitive. */
size_t ms_http_request_header_count(const ms_http_request_t *req, const char *name);

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
int ms_http_client_idle(const ms_http_client_t *c); /* connected-or-connecting, nothing pending */
/* Close the connection; no callback fires afterwards. Frees c once the handle is closed. */
void ms_http_client_close(ms_http_client_t *c);

#endif
