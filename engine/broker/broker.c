/*
 * broker: one Redis connection on the loop (broker.h), with its life cycle
 *
 *   DOWN --(backoff timer)--> CONNECTING --(AUTH, SELECT, PING answered)--> READY
 *     ^                            |                                           |
 *     +---- connect timeout, refused, AUTH error ---+------ lost, timeout -----+
 *
 * The commands in flight live in a FIFO ring, not in hiredis's callback records: Redis answers
 * in order, so the head of the ring is always the command the next reply belongs to, and its
 * deadline is the earliest (every command has the same timeout), so one lazily re-armed timer
 * covers them all. Owning the ring lets a dropped connection be cut loose at once: the context's
 * `data` is cleared, so whatever hiredis still calls back for it is ignored, and the ring is
 * failed here, in order, with the status that fits. That is what makes "every callback exactly
 * once" hold whichever side (timer, hiredis, ms_broker_free) ends the connection.
 */
#include <arpa/inet.h>
#include <hiredis/async.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker/broker.h"
#include "core/core.h"

#define DEFAULT_CONNECT_TIMEOUT_MS 1000
#define DEFAULT_COMMAND_TIMEOUT_MS 1000
#define DEFAULT_BACKOFF_MIN_MS     50
#define DEFAULT_BACKOFF_MAX_MS     5000
#define RING_MIN_CAP               16

typedef enum { PH_DOWN, PH_CONNECTING, PH_READY } phase_t;

/* A command in flight. cb NULL marks one of our handshake commands (AUTH, SELECT, PING); its
 * `data` then names it for error messages. */
typedef struct pending {
    ms_broker_cb cb;
    void *data;
    uint64_t deadline; /* uv_now() ms; UINT64_MAX for the handshake (the connect timer's job) */
    uint32_t seq;      /* also hiredis's privdata: a reply must match the head of the ring */
} pending_t;

struct ms_broker {
    uv_loop_t *loop;
    ms_broker_url_t url;
    ms_broker_opts_t opts;
    phase_t phase;
    int closing;
    redisAsyncContext *ac;     /* NULL while DOWN, and while a host name is being resolved */
    unsigned attempt;          /* failed connects since the last READY: the backoff exponent */
    uint64_t rng;              /* xorshift state for the backoff jitter */
    uv_timer_t phase_timer;    /* DOWN: the backoff delay; CONNECTING: the connect timeout */
    uv_timer_t command_timer;  /* the head command's deadline */
    uv_getaddrinfo_t resolver; /* host names only; numeric addresses skip it */
    int resolving;             /* the resolver's callback is still to come */
    int resolve_wanted;        /* ...and its answer is still of use */
    int open_handles;          /* timers not yet closed: the memory goes at 0 (and !resolving) */
    pending_t *ring;
    size_t ring_cap, ring_head, ring_len;
    uint32_t next_seq;
    char last_error[256];
};

const char *ms_broker_status_name(ms_broker_status_t s)
{
    switch (s) {
    case MS_BROKER_OK:
        return "ok";
    case MS_BROKER_DOWN:
        return "down";
    case MS_BROKER_TIMEOUT:
        return "timeout";
    case MS_BROKER_LOST:
        return "lost";
    case MS_BROKER_REPLY_ERROR:
        return "reply error";
    case MS_BROKER_CLOSED:
        return "closed";
    }
    return "unknown";
}

/* ---- the libuv adapter ------------------------------------------------------------------------
 * hiredis's own adapters/libuv.h, with one fix: in 0.14 it returns early when uv_poll reports an
 * error, which libuv does for POLLERR (a refused connect, a reset connection) after stopping the
 * handle, so hiredis never learns of the error and the connection hangs. Like hiredis 1.x's
 * adapter, this one hands such an event to hiredis as the events it was waiting for, so its
 * read or write fails and the context is disconnected. */

typedef struct uv_events {
    redisAsyncContext *ac; /* NULL once hiredis has cleaned up: the poll handle is closing */
    uv_poll_t handle;
    int events;
} uv_events_t;

static void ev_poll(uv_poll_t *h, int status, int events)
{
    uv_events_t *p = h->data;
    int ev = status < 0 ? p->events : events;
    if (p->ac && (ev & UV_READABLE))
        redisAsyncHandleRead(p->ac);
    if (p->ac && (ev & UV_WRITABLE))
        redisAsyncHandleWrite(p->ac);
}

static void ev_update(uv_events_t *p)
{
    if (p->events)
        uv_poll_start(&p->handle, p->events, ev_poll);
    else
        uv_poll_stop(&p->handle);
}

static void ev_add_read(void *d)
{
    uv_events_t *p = d;
    p->events |= UV_READABLE;
    ev_update(p);
}

static void ev_del_read(void *d)
{
    uv_events_t *p = d;
    p->events &= ~UV_READABLE;
    ev_update(p);
}

static void ev_add_write(void *d)
{
    uv_events_t *p = d;
    p->events |= UV_WRITABLE;
    ev_update(p);
}

static void ev_del_write(void *d)
{
    uv_events_t *p = d;
    p->events &= ~UV_WRITABLE;
    ev_update(p);
}

static void ev_closed(uv_handle_t *h)
{
    free(h->data);
}

static void ev_cleanup(void *d)
{
    uv_events_t *p = d;
    p->ac = NULL;
    uv_close((uv_handle_t *)&p->handle, ev_closed);
}

static int ev_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    uv_events_t *p = ms_calloc(1, sizeof *p);
    if (uv_poll_init(loop, &p->handle, ac->c.fd) != 0) {
        free(p);
        return -1;
    }
    p->handle.data = p;
    p->ac = ac;
    ac->ev.data = p;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return 0;
}

/* ---- the ring of commands in flight ---------------------------------------------------------- */

static pending_t *ring_head(ms_broker_t *b)
{
    return b->ring_len ? &b->ring[b->ring_head] : NULL;
}

/* Grows by doubling, so a steady pipeline allocates nothing per command. */
static void ring_push(ms_broker_t *b, pending_t p)
{
    if (b->ring_len == b->ring_cap) {
        size_t cap = b->ring_cap ? b->ring_cap * 2 : RING_MIN_CAP;
        pending_t *r = ms_malloc(cap * sizeof *r);
        for (size_t i = 0; i < b->ring_len; i++)
            r[i] = b->ring[(b->ring_head + i) % b->ring_cap];
        free(b->ring);
        b->ring = r;
        b->ring_cap = cap;
        b->ring_head = 0;
    }
    b->ring[(b->ring_head + b->ring_len) % b->ring_cap] = p;
    b->ring_len++;
}

static pending_t ring_pop(ms_broker_t *b)
{
    pending_t p = b->ring[b->ring_head];
    b->ring_head = (b->ring_head + 1) % b->ring_cap;
    b->ring_len--;
    return p;
}

/* Fails every command in flight: the head with head_status, the rest (sent behind it, so just
 * as uncertain) with LOST, or all with CLOSED. Each entry leaves the ring before its callback,
 * which may issue commands (they fail DOWN) or free the broker (the rest then fail CLOSED). */
static void fail_all(ms_broker_t *b, ms_broker_status_t head_status, const char *why)
{
    ms_broker_status_t st = head_status;
    while (b->ring_len) {
        pending_t p = ring_pop(b);
        if (p.cb)
            p.cb(p.data, b->closing ? MS_BROKER_CLOSED : st, NULL, why);
        if (st != MS_BROKER_CLOSED)
            st = MS_BROKER_LOST;
    }
}

/* ---- connecting ------------------------------------------------------------------------------ */

static void start_connect(ms_broker_t *b);

static void set_error(ms_broker_t *b, const char *why)
{
    if (why != b->last_error)
        ms_copy_str(b->last_error, sizeof b->last_error, why);
}

static uint64_t next_random(ms_broker_t *b)
{
    b->rng ^= b->rng << 13;
    b->rng ^= b->rng >> 7;
    b->rng ^= b->rng << 17;
    return b->rng;
}

/* The memory goes once ms_broker_free has been called and the loop is done with every handle
 * and request of ours. */
static void release(ms_broker_t *b)
{
    if (b->closing && b->open_handles == 0 && !b->resolving) {
        free(b->ring);
        free(b);
    }
}

static void on_retry_timer(uv_timer_t *t)
{
    start_connect(t->data);
}

/* Exponential backoff with "equal jitter": half the delay fixed, half random, so engines that
 * lost the same Redis do not all come back in the same millisecond. */
static void schedule_retry(ms_broker_t *b)
{
    uint64_t d = (uint64_t)b->opts.backoff_min_ms << (b->attempt < 20 ? b->attempt : 20);
    if (d > (uint64_t)b->opts.backoff_max_ms)
        d = (uint64_t)b->opts.backoff_max_ms;
    d = d / 2 + next_random(b) % (d / 2 + 1);
    b->attempt++;
    uv_timer_start(&b->phase_timer, on_retry_timer, d, 0);
}

/* Ends the current connection or attempt. free_ctx is 0 when hiredis is already tearing the
 * context down (we are inside its disconnect path) and must not be asked to free it again. */
static void drop_connection(ms_broker_t *b, int free_ctx, ms_broker_status_t head_status,
                            const char *why)
{
    set_error(b, why); /* first: `why` may live in the context about to be freed */
    int was_ready = b->phase == PH_READY;
    redisAsyncContext *ac = b->ac;
    b->ac = NULL;
    b->phase = PH_DOWN;
    b->resolve_wanted = 0;
    uv_timer_stop(&b->phase_timer);
    uv_timer_stop(&b->command_timer);
    if (ac) {
        ac->data = NULL; /* what hiredis still calls back for this context is ignored */
        if (free_ctx)
            redisAsyncFree(ac); /* deferred by hiredis when inside one of its callbacks */
    }
    /* one warning per outage; the retries every few seconds after it only at debug level */
    if (b->closing)
        ms_debug("broker: closed");
    else if (was_ready)
        ms_warn("broker: connection to Redis lost: %s", b->last_error);
    else if (b->attempt == 0)
        ms_warn("broker: cannot connect to Redis: %s", b->last_error);
    else
        ms_debug("broker: connect attempt %u failed: %s", b->attempt + 1, b->last_error);
    fail_all(b, head_status, b->last_error);
    if (b->closing)
        return;
    if (was_ready && b->opts.on_state)
        b->opts.on_state(b->opts.state_data, 0, b->last_error);
    if (!b->closing)
        schedule_retry(b);
}

static void on_connect_timeout(uv_timer_t *t)
{
    ms_broker_t *b = t->data;
    char why[96];
    snprintf(why, sizeof why, "not connected within the %d ms connect timeout",
             b->opts.connect_timeout_ms);
    drop_connection(b, 1, MS_BROKER_LOST, why);
}

static void on_reply(redisAsyncContext *ac, void *r, void *privdata);

/* Queues one of the handshake commands; hiredis sends them once the socket connects. */
static int send_handshake(ms_broker_t *b, const char *name, int argc, const char **argv)
{
    size_t lens[3];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    uint32_t seq = b->next_seq++;
    if (redisAsyncCommandArgv(b->ac, on_reply, (void *)(uintptr_t)seq, argc, argv, lens) !=
        REDIS_OK)
        return -1;
    ring_push(b, (pending_t){NULL, (void *)name, UINT64_MAX, seq});
    return 0;
}

/* hiredis's own message: the context's errstr (ac->errstr is only copied from it later). */
static const char *ctx_error(const redisAsyncContext *ac, const char *fallback)
{
    return ac->c.errstr[0] ? ac->c.errstr : fallback;
}

static void on_connected(const redisAsyncContext *ac, int status)
{
    ms_broker_t *b = ac->data;
    if (!b || status == REDIS_OK)
        return; /* READY waits for the handshake's PING */
    /* hiredis frees the context right after this returns */
    drop_connection(b, 0, MS_BROKER_LOST, ctx_error(ac, "connect failed"));
}

static void on_disconnected(const redisAsyncContext *ac, int status)
{
    (void)status;
    ms_broker_t *b = ac->data;
    if (b)
        drop_connection(b, 0, MS_BROKER_LOST, ctx_error(ac, "Redis closed the connection"));
}

static void connect_to(ms_broker_t *b, const char *ip)
{
    redisAsyncContext *ac =
        b->url.path[0] ? redisAsyncConnectUnix(b->url.path) : redisAsyncConnect(ip, b->url.port);
    if (!ac) {
        drop_connection(b, 0, MS_BROKER_LOST, "out of memory creating the Redis context");
        return;
    }
    if (ac->err) { /* a refused connect or a missing socket can fail right away */
        char why[160];
        ms_copy_str(why, sizeof why, ctx_error(ac, "connect failed"));
        redisAsyncFree(ac);
        drop_connection(b, 0, MS_BROKER_LOST, why);
        return;
    }
    if (ev_attach(ac, b->loop) < 0) {
        redisAsyncFree(ac);
        drop_connection(b, 0, MS_BROKER_LOST, "cannot poll the Redis socket");
        return;
    }
    /* TCP keepalive (15 s in hiredis): an idle connection to a Redis that vanished without a
     * FIN or RST (a dead host, a partition) is found out even when no command times out. */
    if (!b->url.path[0])
        redisEnableKeepAlive(&ac->c);
    b->ac = ac;
    ac->data = b;
    redisAsyncSetConnectCallback(ac, on_connected);
    redisAsyncSetDisconnectCallback(ac, on_disconnected);
    int rc = 0;
    if (b->url.password[0]) {
        const char *auth_user[] = {"AUTH", b->url.user, b->url.password};
        const char *auth[] = {"AUTH", b->url.password};
        rc |= b->url.user[0] ? send_handshake(b, "AUTH", 3, auth_user)
                             : send_handshake(b, "AUTH", 2, auth);
    }
    if (b->url.db != 0) {
        char db[16];
        snprintf(db, sizeof db, "%d", b->url.db);
        const char *select[] = {"SELECT", db};
        rc |= send_handshake(b, "SELECT", 2, select);
    }
    const char *ping[] = {"PING"};
    rc |= send_handshake(b, "PING", 1, ping);
    if (rc)
        drop_connection(b, 1, MS_BROKER_LOST, "cannot queue the connect handshake");
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    ms_broker_t *b = req->data;
    b->resolving = 0;
    int wanted = b->resolve_wanted && !b->closing;
    b->resolve_wanted = 0;
    char ip[64] = "";
    if (wanted && status == 0 && res) {
        /* Successive attempts walk the addresses: "localhost" may give ::1 first to a Redis
         * that listens on 127.0.0.1 only. */
        unsigned n = 0;
        for (struct addrinfo *a = res; a; a = a->ai_next)
            n++;
        struct addrinfo *a = res;
        for (unsigned i = b->attempt % n; i > 0; i--)
            a = a->ai_next;
        if (a->ai_family == AF_INET6)
            uv_ip6_name((struct sockaddr_in6 *)a->ai_addr, ip, sizeof ip);
        else
            uv_ip4_name((struct sockaddr_in *)a->ai_addr, ip, sizeof ip);
    }
    uv_freeaddrinfo(res);
    if (b->closing) {
        release(b);
        return;
    }
    if (!wanted)
        return;
    if (!ip[0]) {
        char why[MS_BROKER_HOST_MAX + 64];
        snprintf(why, sizeof why, "cannot resolve %s: %s", b->url.host,
                 status ? uv_strerror(status) : "no address");
        drop_connection(b, 0, MS_BROKER_LOST, why);
        return;
    }
    connect_to(b, ip);
}

static int is_numeric_host(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* One attempt: the connect timeout covers resolving, connecting and the handshake. hiredis
 * resolves names with a blocking getaddrinfo, so names are resolved here first, off the loop. */
static void start_connect(ms_broker_t *b)
{
    b->phase = PH_CONNECTING;
    uv_timer_start(&b->phase_timer, on_connect_timeout, (uint64_t)b->opts.connect_timeout_ms, 0);
    if (b->url.path[0] || is_numeric_host(b->url.host)) {
        connect_to(b, b->url.host);
        return;
    }
    if (b->resolving) { /* a slow lookup outlived its attempt: this one takes its answer */
        b->resolve_wanted = 1;
        return;
    }
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    b->resolver.data = b;
    if (uv_getaddrinfo(b->loop, &b->resolver, on_resolved, b->url.host, NULL, &hints) != 0) {
        drop_connection(b, 0, MS_BROKER_LOST, "cannot start resolving the Redis host");
        return;
    }
    b->resolving = 1;
    b->resolve_wanted = 1;
}

/* ---- replies --------------------------------------------------------------------------------- */

static void handshake_reply(ms_broker_t *b, const pending_t *p, const redisReply *reply)
{
    const char *name = p->data;
    if (reply->type == REDIS_REPLY_ERROR) {
        char why[224];
        snprintf(why, sizeof why, "%s failed: %.*s", name, (int)reply->len, reply->str);
        drop_connection(b, 1, MS_BROKER_LOST, why);
        return;
    }
    if (strcmp(name, "PING") != 0)
        return;
    b->phase = PH_READY;
    b->attempt = 0;
    uv_timer_stop(&b->phase_timer);
    ms_info("broker: connected to Redis");
    if (b->opts.on_state)
        b->opts.on_state(b->opts.state_data, 1, "connected");
}

static void on_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    ms_broker_t *b = ac->data;
    if (!b)
        return; /* a connection already dropped: its commands were failed then */
    redisReply *reply = r;
    if (!reply) { /* hiredis is tearing the connection down */
        drop_connection(b, 0, MS_BROKER_LOST, ctx_error(ac, "connection to Redis lost"));
        return;
    }
    pending_t *head = ring_head(b);
    if (!head || head->seq != (uint32_t)(uintptr_t)privdata) {
        drop_connection(b, 1, MS_BROKER_LOST, "reply out of step with the commands sent");
        return;
    }
    pending_t p = ring_pop(b);
    if (!p.cb)
        handshake_reply(b, &p, reply);
    else if (reply->type == REDIS_REPLY_ERROR)
        p.cb(p.data, MS_BROKER_REPLY_ERROR, reply, reply->str);
    else
        p.cb(p.data, MS_BROKER_OK, reply, NULL);
}

/* Lazy: armed for the head's deadline; when it fires early (that command was answered) it
 * re-arms for the new head, so replies cost no timer operation. */
static void on_command_timer(uv_timer_t *t)
{
    ms_broker_t *b = t->data;
    pending_t *head = ring_head(b);
    if (!head || b->phase != PH_READY)
        return;
    uint64_t now = uv_now(b->loop);
    if (head->deadline > now) {
        uv_timer_start(&b->command_timer, on_command_timer, head->deadline - now, 0);
        return;
    }
    char why[128];
    snprintf(why, sizeof why, "no reply within the %d ms command timeout; reconnecting",
             b->opts.command_timeout_ms);
    drop_connection(b, 1, MS_BROKER_TIMEOUT, why);
}

/* ---- the public side ------------------------------------------------------------------------- */

ms_broker_status_t ms_broker_command(ms_broker_t *b, ms_broker_cb cb, void *data, int argc,
                                     const char **argv, const size_t *argvlen)
{
    char why[320];
    ms_broker_status_t st = MS_BROKER_DOWN;
    if (argc < 1) /* Redis answers nothing to an empty command: the replies would shift */
        ms_fatal("ms_broker_command: no arguments");
    if (b->closing) {
        st = MS_BROKER_CLOSED;
        snprintf(why, sizeof why, "the broker is closed");
    } else if (b->phase == PH_READY) {
        uint32_t seq = b->next_seq++;
        if (redisAsyncCommandArgv(b->ac, on_reply, (void *)(uintptr_t)seq, argc, argv, argvlen) ==
            REDIS_OK) {
            uint64_t deadline = uv_now(b->loop) + (uint64_t)b->opts.command_timeout_ms;
            ring_push(b, (pending_t){cb, data, deadline, seq});
            if (!uv_is_active((uv_handle_t *)&b->command_timer))
                uv_timer_start(&b->command_timer, on_command_timer,
                               (uint64_t)b->opts.command_timeout_ms, 0);
            return MS_BROKER_OK;
        }
        snprintf(why, sizeof why, "Redis is not connected: the command could not be queued");
    } else {
        snprintf(why, sizeof why, "Redis is not connected%s%s", b->last_error[0] ? ": " : "",
                 b->last_error);
    }
    cb(data, st, NULL, why);
    return st;
}

int ms_broker_connected(const ms_broker_t *b)
{
    return b->phase == PH_READY;
}

const char *ms_broker_last_error(const ms_broker_t *b)
{
    return b->last_error;
}

ms_broker_t *ms_broker_new(uv_loop_t *loop, const char *url, const ms_broker_opts_t *opts,
                           char **err)
{
    ms_broker_url_t u;
    char msg[256];
    if (ms_broker_parse_url(url, &u, msg, sizeof msg) < 0) {
        if (err)
            *err = ms_strndup(msg, strlen(msg));
        return NULL;
    }
    ms_broker_t *b = ms_calloc(1, sizeof *b);
    b->loop = loop;
    b->url = u;
    if (opts)
        b->opts = *opts;
    if (b->opts.connect_timeout_ms <= 0)
        b->opts.connect_timeout_ms = DEFAULT_CONNECT_TIMEOUT_MS;
    if (b->opts.command_timeout_ms <= 0)
        b->opts.command_timeout_ms = DEFAULT_COMMAND_TIMEOUT_MS;
    if (b->opts.backoff_min_ms <= 0)
        b->opts.backoff_min_ms = DEFAULT_BACKOFF_MIN_MS;
    if (b->opts.backoff_max_ms <= 0)
        b->opts.backoff_max_ms = DEFAULT_BACKOFF_MAX_MS;
    if (b->opts.backoff_max_ms < b->opts.backoff_min_ms)
        b->opts.backoff_max_ms = b->opts.backoff_min_ms;
    b->rng = ms_now_us() ^ (uint64_t)(uintptr_t)b ^ 0x9e3779b97f4a7c15ull;
    uv_timer_init(loop, &b->phase_timer);
    uv_timer_init(loop, &b->command_timer);
    b->phase_timer.data = b;
    b->command_timer.data = b;
    b->open_handles = 2;
    start_connect(b);
    return b;
}

static void on_timer_closed(uv_handle_t *h)
{
    ms_broker_t *b = h->data;
    b->open_handles--;
    release(b);
}

void ms_broker_free(ms_broker_t *b)
{
    if (!b || b->closing)
        return;
    b->closing = 1;
    if (b->resolving)
        uv_cancel((uv_req_t *)&b->resolver);
    drop_connection(b, 1, MS_BROKER_CLOSED, "the broker was closed");
    uv_close((uv_handle_t *)&b->phase_timer, on_timer_closed);
    uv_close((uv_handle_t *)&b->command_timer, on_timer_closed);
}
