/*
 * broker: an asynchronous Redis client on the engine's libuv loop, the connection the task
 * queues (docs/tasks.md) are built on. One ms_broker_t is one connection, made from a URL
 * (redis://[user:password@]host[:port][/db] or unix:///path.sock[?db=N]), with AUTH and SELECT
 * sent after every connect, and remade by itself with exponential backoff after it is lost.
 *
 * Commands are pipelined on the connection and answered in order. A command is never queued
 * while the connection is down: it fails at once with MS_BROKER_DOWN, so a caller can answer 503
 * instead of holding a request for an unknown time. A command whose reply does not come within
 * the command timeout fails with MS_BROKER_TIMEOUT and the connection is dropped and remade (a
 * late reply would otherwise be taken for the answer to a later command).
 *
 * Every callback is called exactly once: with a reply, or with an error code and message, also
 * when the broker is freed with commands in flight (MS_BROKER_CLOSED).
 *
 * Built on hiredis's async API (0.14 or later). Nothing here blocks the loop: host names are
 * resolved with uv_getaddrinfo, connects are non-blocking, and per command nothing is allocated
 * beyond what hiredis itself allocates (a callback record and the reply).
 *
 * Not for SUBSCRIBE or MONITOR, nor for blocking commands (XREADGROUP BLOCK, BLPOP) that wait
 * longer than the command timeout: they hold up the pipeline behind them, so give them a broker
 * of their own whose command timeout is above the block time. hiredis writes with write(2): the
 * process must ignore SIGPIPE (the engine's main does).
 */
#ifndef MS_BROKER_H
#define MS_BROKER_H

#include <hiredis/hiredis.h>
#include <stddef.h>
#include <uv.h>

typedef struct ms_broker ms_broker_t;

/* ---- URLs ------------------------------------------------------------------------------------ */

#define MS_BROKER_HOST_MAX   256 /* bytes, NUL included */
#define MS_BROKER_PATH_MAX   108 /* sizeof(sun_path) */
#define MS_BROKER_SECRET_MAX 256 /* user name and password, NUL included */

typedef struct ms_broker_url {
    char host[MS_BROKER_HOST_MAX];       /* TCP: a name or an IP address (IPv6 without brackets) */
    int port;                            /* TCP: 1..65535, 6379 when the URL has none */
    char path[MS_BROKER_PATH_MAX];       /* Unix socket path; empty for TCP */
    char user[MS_BROKER_SECRET_MAX];     /* empty: AUTH with the password only (or no AUTH) */
    char password[MS_BROKER_SECRET_MAX]; /* empty: no AUTH */
    int db;                              /* SELECTed after connect when not 0 */
} ms_broker_url_t;

/* Parses a broker URL (percent-escapes allowed in the user, the password and the socket path).
 * Returns 0, or -1 with a message in err that names the problem but never repeats the password.
 * Pure: touches nothing but its arguments. */
int ms_broker_parse_url(const char *url, ms_broker_url_t *out, char *err, size_t errlen);

/* ---- connections ----------------------------------------------------------------------------- */

typedef enum {
    MS_BROKER_OK = 0,
    MS_BROKER_DOWN,        /* not connected: the command was not sent */
    MS_BROKER_TIMEOUT,     /* sent, no reply within the command timeout; it may have run */
    MS_BROKER_LOST,        /* sent, the connection broke before the reply; it may have run */
    MS_BROKER_REPLY_ERROR, /* Redis answered with an error reply (err holds its text) */
    MS_BROKER_CLOSED,      /* the broker was freed before the reply came */
} ms_broker_status_t;

const char *ms_broker_status_name(ms_broker_status_t s); /* "ok", "down", "timeout", ... */

/* Called with the reply (status MS_BROKER_OK, reply set, err NULL) or with an error: err is a
 * message and reply is NULL, except for MS_BROKER_REPLY_ERROR where reply is the error reply.
 * The reply is hiredis's redisReply (type REDIS_REPLY_STRING, _ARRAY, _INTEGER, _NIL, _STATUS or
 * _ERROR; str/len binary-safe) and, like err, valid only during the call. MS_BROKER_DOWN (and
 * MS_BROKER_CLOSED for a command issued after ms_broker_free) is delivered before
 * ms_broker_command returns; every other status from the loop. The callback may issue commands
 * and may free the broker. */
typedef void (*ms_broker_cb)(void *data, ms_broker_status_t status, const redisReply *reply,
                             const char *err);

/* Called when the connection comes up (connected 1: AUTH, SELECT and a PING have succeeded) and
 * when it goes down (connected 0, why says what happened); never from ms_broker_free. */
typedef void (*ms_broker_state_cb)(void *data, int connected, const char *why);

typedef struct ms_broker_opts {
    int connect_timeout_ms; /* resolve + connect + AUTH/SELECT/PING; default 1000 */
    int command_timeout_ms; /* per command, from when it is sent; default 1000 */
    int backoff_min_ms;     /* first reconnect delay; default 50 */
    int backoff_max_ms;     /* the delay doubles up to this; default 5000 */
    ms_broker_state_cb on_state;
    void *state_data;
} ms_broker_opts_t;

/* Parses url and starts connecting (the result comes through on_state). opts may be NULL for
 * the defaults; zero fields take their default. Returns NULL with *err (malloc'd) set when the
 * URL is bad. */
ms_broker_t *ms_broker_new(uv_loop_t *loop, const char *url, const ms_broker_opts_t *opts,
                           char **err);

/* 1 once AUTH, SELECT and PING have succeeded on the current connection, 0 otherwise. */
int ms_broker_connected(const ms_broker_t *b);
/* Why the last connect attempt failed or the connection was lost ("" if never); for logs and
 * 503 bodies. Never holds the password. */
const char *ms_broker_last_error(const ms_broker_t *b);

/* Sends one command (argc >= 1), argv[i] being argvlen[i] bytes (binary-safe; copied before
 * this returns).
 * Returns MS_BROKER_OK when the command went out and cb will follow from the loop; otherwise
 * cb has already been called with the returned status (MS_BROKER_DOWN). */
ms_broker_status_t ms_broker_command(ms_broker_t *b, ms_broker_cb cb, void *data, int argc,
                                     const char **argv, const size_t *argvlen);

/* Closes the connection: commands in flight get MS_BROKER_CLOSED before this returns (also when
 * it is called from a callback). on_state is not called. The memory goes once the loop has
 * closed the handles. */
void ms_broker_free(ms_broker_t *b);

/* ---- Redis Streams replies ---------------------------------------------------------------------
 * Views into the replies of the stream commands the task queues use, so their callers need not
 * walk nested arrays by hand. Nothing is copied or allocated: every pointer points into the
 * reply and is valid as long as it is (during the command's callback). */

typedef struct ms_broker_entry {
    const char *id; /* "1700000000000-0" */
    size_t id_len;
    /* field, value, field, value, ... (2 * n_fields elements); NULL when the entry was deleted
     * from the stream after it was delivered (XREADGROUP of pending ids, XCLAIM, Redis 6.2's
     * XAUTOCLAIM) */
    const redisReply *fields;
    size_t n_fields;
} ms_broker_entry_t;

/* The entry list of an XREADGROUP or XREAD reply (its first stream's: the task queues read one
 * stream per command): returns its length and sets *list, 0 for a nil reply (nothing new), -1
 * when the reply has another shape. XRANGE and XCLAIM replies are entry lists already. */
long ms_broker_stream_entries(const redisReply *r, const redisReply **list);
/* The same for XAUTOCLAIM's [cursor, entries, deleted ids]: *cursor (and *cursor_len) get the id
 * to continue from ("0-0" once the whole pending list has been scanned). */
long ms_broker_autoclaim_entries(const redisReply *r, const redisReply **list, const char **cursor,
                                 size_t *cursor_len);
/* Entry i of such a list: 0, or -1 when it is not an entry. */
int ms_broker_entry(const redisReply *list, size_t i, ms_broker_entry_t *out);
/* The value of field `name` (binary-safe) in an entry, NULL when it has none. */
const redisReply *ms_broker_entry_field(const ms_broker_entry_t *e, const char *name,
                                        size_t name_len);

#endif
