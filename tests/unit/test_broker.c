/*
 * Unit tests of the Redis broker client (engine/broker) against real redis-server processes
 * that the test starts on free ports (and one on a Unix socket), each waited for by connecting
 * to it. Covers URL parsing (pure), the stream-reply views on hand-made replies, SET/GET of
 * binary data, error replies, a long pipeline answered in order, SELECT (redis://host:port/db
 * and unix://...?db=N), AUTH with a password and with user:password (wrong and missing
 * passwords keep the broker down with the reason), a host name (localhost) resolved off the
 * loop, the connect timeout (a listener that never answers), a peer that resets the connection
 * right after the handshake, the reconnect backoff (steps and cap, against a peer that hangs up
 * at once), the command timeout (DEBUG SLEEP) with the pipeline behind it LOST and a reconnect,
 * Redis killed (a command in flight LOST, then DOWN at once and the state callback) and
 * restarted on the same port (the broker comes back by itself), the Redis Streams round trip the
 * task queue uses (XGROUP CREATE, XADD, XREADGROUP new and pending, XACK, XPENDING, XAUTOCLAIM,
 * XRANGE, an entry deleted while held), and ms_broker_free with commands in flight, also from
 * within a callback (CLOSED). Every callback must come exactly once, every handle must be closed
 * (uv_loop_close succeeds), and a 40 s watchdog bounds the run. Without redis-server only the
 * pure cases run (and the test passes, saying so).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "broker/broker.h"
#include "core/core.h"
#include "test.h"

static uv_loop_t loop_storage;
static uv_loop_t *loop = &loop_storage;
static uv_timer_t watchdog;
static int watchdog_fired;
static char tmpdir[] = "/tmp/ms_test_broker_XXXXXX";

/* ---- waiting -------------------------------------------------------------------------------- */

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    watchdog_fired = 1;
    fprintf(stderr, "watchdog: test did not finish within 40 s\n");
    ASSERT_TRUE(!"watchdog fired");
}

static int wait_for(int (*pred)(void *), void *arg)
{
    while (!pred(arg)) {
        if (watchdog_fired)
            return 0;
        uv_run(loop, UV_RUN_ONCE);
    }
    return 1;
}

/* ---- redis-server processes ----------------------------------------------------------------- */

typedef struct redis {
    pid_t pid;
    int port;       /* 0 for the Unix-socket one */
    char sock[100]; /* its socket path, or "" */
} redis_t;

static int have_redis(void)
{
    return system("command -v redis-server >/dev/null 2>&1") == 0;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* Connects to r and sends PING: any answer (+PONG, -NOAUTH) means it is serving. */
static int redis_answers(const redis_t *r)
{
    int fd;
    if (r->sock[0]) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        snprintf(a.sun_path, sizeof a.sun_path, "%s", r->sock);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
            close(fd);
            return 0;
        }
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)r->port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
            close(fd);
            return 0;
        }
    }
    char buf[64];
    int ok = write(fd, "PING\r\n", 6) == 6 && read(fd, buf, sizeof buf) > 0;
    close(fd);
    return ok;
}

/* Starts redis-server on r->port (or r->sock) with `extra` arguments and waits until it answers
 * (connect attempts a few ms apart, giving up if it exits). */
static int redis_start(redis_t *r, const char *const *extra)
{
    char port[16], log[256];
    snprintf(port, sizeof port, "%d", r->port);
    snprintf(log, sizeof log, "%s/redis-%d-%s.log", tmpdir, r->port, r->sock[0] ? "unix" : "tcp");
    const char *argv[32] = {"redis-server",
                            "--port",
                            port,
                            "--bind",
                            "127.0.0.1",
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                            "--dir",
                            tmpdir,
                            "--logfile",
                            log,
                            "--enable-debug-command",
                            "yes"};
    int n = 15;
    if (r->sock[0]) {
        argv[n++] = "--unixsocket";
        argv[n++] = r->sock;
    }
    for (; extra && *extra; extra++)
        argv[n++] = *extra;
    argv[n] = NULL;
    r->pid = fork();
    if (r->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        execvp("redis-server", (char *const *)argv);
        _exit(127);
    }
    for (int i = 0; i < 2000; i++) {
        if (redis_answers(r))
            return 0;
        if (waitpid(r->pid, NULL, WNOHANG) == r->pid) {
            fprintf(stderr, "redis-server exited at start (log: %s)\n", log);
            r->pid = 0;
            return -1;
        }
        poll(NULL, 0, 5);
    }
    fprintf(stderr, "redis-server did not answer within 10 s\n");
    return -1;
}

/* On a port picked by free_port: another process may take it first, so a few tries. */
static int redis_start_free(redis_t *r, const char *const *extra)
{
    for (int i = 0; i < 3; i++) {
        r->port = free_port();
        if (redis_start(r, extra) == 0)
            return 0;
    }
    return -1;
}

static void redis_kill(redis_t *r)
{
    if (r->pid > 0) {
        kill(r->pid, SIGKILL);
        waitpid(r->pid, NULL, 0);
    }
    r->pid = 0;
}

/* ---- broker callbacks ----------------------------------------------------------------------- */

typedef struct call {
    int calls;
    int order; /* when it came, among all calls */
    ms_broker_status_t status;
    int type;
    long long integer;
    size_t elements;
    char str[256];
    size_t len;
    char err[256];
} call_t;

static int n_answered;

static void on_call(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    call_t *c = data;
    c->calls++;
    c->order = ++n_answered;
    c->status = st;
    if (r) {
        c->type = r->type;
        c->integer = r->integer;
        c->elements = r->elements;
        if (r->str) {
            c->len = r->len < sizeof c->str ? r->len : sizeof c->str - 1;
            memcpy(c->str, r->str, c->len);
            c->str[c->len] = '\0';
        }
    }
    if (err)
        snprintf(c->err, sizeof c->err, "%s", err);
}

static int pred_called(void *arg)
{
    return ((call_t *)arg)->calls > 0;
}

static int wait_call(call_t *c)
{
    return wait_for(pred_called, c);
}

/* Sends a command of C-string arguments (NULL-terminated). */
static ms_broker_status_t cmd(ms_broker_t *b, call_t *c, ...)
{
    const char *argv[16];
    size_t lens[16];
    int argc = 0;
    va_list ap;
    va_start(ap, c);
    for (const char *a; argc < 16 && (a = va_arg(ap, const char *));) {
        argv[argc] = a;
        lens[argc++] = strlen(a);
    }
    va_end(ap);
    memset(c, 0, sizeof *c);
    return ms_broker_command(b, on_call, c, argc, argv, lens);
}

/* Sends and waits; returns the call's status. */
static ms_broker_status_t run_cmd(ms_broker_t *b, call_t *c, ...)
{
    const char *argv[16];
    size_t lens[16];
    int argc = 0;
    va_list ap;
    va_start(ap, c);
    for (const char *a; argc < 16 && (a = va_arg(ap, const char *));) {
        argv[argc] = a;
        lens[argc++] = strlen(a);
    }
    va_end(ap);
    memset(c, 0, sizeof *c);
    ms_broker_command(b, on_call, c, argc, argv, lens);
    wait_call(c);
    ASSERT_INT_EQ(c->calls, 1);
    return c->status;
}

typedef struct state_log {
    int ups, downs;
    char why[256];
} state_log_t;

static void on_state(void *data, int connected, const char *why)
{
    state_log_t *s = data;
    if (connected)
        s->ups++;
    else
        s->downs++;
    snprintf(s->why, sizeof s->why, "%s", why);
}

static int pred_connected(void *arg)
{
    return ms_broker_connected(arg);
}

static int pred_has_error(void *arg)
{
    return ms_broker_last_error(arg)[0] != '\0';
}

static int pred_down(void *arg)
{
    return ((state_log_t *)arg)->downs > 0;
}

static ms_broker_t *new_broker(const char *url, const ms_broker_opts_t *opts)
{
    char *err = NULL;
    ms_broker_t *b = ms_broker_new(loop, url, opts, &err);
    if (!b)
        fprintf(stderr, "ms_broker_new(%s): %s\n", url, err);
    ASSERT_TRUE(b != NULL);
    free(err);
    return b;
}

/* ---- URL parsing ---------------------------------------------------------------------------- */

static void url_ok(const char *url, const char *host, int port, const char *path, const char *user,
                   const char *password, int db)
{
    ms_broker_url_t u;
    char err[256] = "";
    int rc = ms_broker_parse_url(url, &u, err, sizeof err);
    if (rc != 0)
        fprintf(stderr, "parse %s: %s\n", url, err);
    ASSERT_INT_EQ(rc, 0);
    ASSERT_STR_EQ(u.host, host);
    ASSERT_INT_EQ(u.port, port);
    ASSERT_STR_EQ(u.path, path);
    ASSERT_STR_EQ(u.user, user);
    ASSERT_STR_EQ(u.password, password);
    ASSERT_INT_EQ(u.db, db);
}

static void url_bad(const char *url, const char *message)
{
    ms_broker_url_t u;
    char err[256] = "";
    ASSERT_INT_EQ(ms_broker_parse_url(url, &u, err, sizeof err), -1);
    ASSERT_CONTAINS(err, "broker URL: ");
    ASSERT_CONTAINS(err, message);
}

static void test_urls(void)
{
    url_ok("redis://localhost", "localhost", 6379, "", "", "", 0);
    url_ok("redis://10.0.0.5:6380", "10.0.0.5", 6380, "", "", "", 0);
    url_ok("redis://h:7000/", "h", 7000, "", "", "", 0);
    url_ok("redis://h:7000/15", "h", 7000, "", "", "", 15);
    url_ok("REDIS://h/2", "h", 6379, "", "", "", 2);
    url_ok("redis://:s3cret@h:1/0", "h", 1, "", "", "s3cret", 0);
    url_ok("redis://alice:pw@h:65535/3", "h", 65535, "", "alice", "pw", 3);
    url_ok("redis://al%40ice:p%3Aw%2F%25@h", "h", 6379, "", "al@ice", "p:w/%", 0);
    url_ok("redis://u:p@ss@h", "h", 6379, "", "u", "p@ss", 0); /* the last '@' ends it */
    url_ok("redis://[::1]:6390/4", "::1", 6390, "", "", "", 4);
    url_ok("redis://[::1]", "::1", 6379, "", "", "", 0);
    url_ok("redis://redis-0.redis_svc.ns.svc.cluster.local",
           "redis-0.redis_svc.ns.svc.cluster.local", 6379, "", "", "", 0);
    url_ok("redis://[::ffff:10.0.0.1]:7", "::ffff:10.0.0.1", 7, "", "", "", 0);
    url_ok("unix:///run/redis.sock", "", 0, "/run/redis.sock", "", "", 0);
    url_ok("unix:///tmp/my%20redis.sock?db=7", "", 0, "/tmp/my redis.sock", "", "", 7);
    url_ok("unix:///r.sock?password=pw&db=1", "", 0, "/r.sock", "", "pw", 1);
    url_ok("unix:///r.sock?user=bob&password=pw", "", 0, "/r.sock", "bob", "pw", 0);

    url_bad("", "empty");
    url_bad("http://h:6379", "must start with redis:// or unix://");
    url_bad("rediss://h:6379", "TLS");
    url_bad("redis://", "no host");
    url_bad("redis://:6379", "no host");
    url_bad("redis://h:0", "port must be a number from 1 to 65535, got '0'");
    url_bad("redis://h:65536", "got '65536'");
    url_bad("redis://h:63x9", "got '63x9'");
    url_bad("redis://h:", "got ''");
    url_bad("redis://h/abc", "database must be a number from 0, got 'abc'");
    url_bad("redis://h/-1", "got '-1'");
    url_bad("redis://h/1/2", "got '1/2'");
    url_bad("redis://h/1?db=2", "query parameters are for unix:// URLs");
    url_bad("redis://h?x", "query parameters are for unix:// URLs");
    url_bad("redis://[::1", "closing ']'");
    url_bad("redis://[::1]x", "after ']'");
    url_bad("redis://[abc.example]", "brackets are for IPv6");
    url_bad("redis://[::g]", "not allowed there (0x67)");
    url_bad("redis://my host:1", "not allowed there (0x20)");
    url_bad("redis://h%41:1", "not allowed there (0x25)");
    url_bad("redis://secret@h", "user:password or :password");
    url_bad("redis://u:@h", "password is empty");
    url_bad("redis://u:%zz@h", "bad %-escape in the password");
    url_bad("redis://u:%4@h", "bad %-escape in the password");
    url_bad("redis://u:a%00b@h", "%00");
    url_bad("unix://relative.sock", "absolute socket path");
    url_bad("unix:///r.sock?db=x", "database must be a number");
    url_bad("unix:///r.sock?timeout=1", "unknown query parameter 'timeout'");
    url_bad("unix:///r.sock?user=bob", "a user name needs a password");
    char long_path[200];
    memset(long_path, 'a', sizeof long_path);
    memcpy(long_path, "unix:///", 8);
    long_path[sizeof long_path - 1] = '\0';
    url_bad(long_path, "socket path is longer than 107 bytes");

    /* the password never shows in a message */
    ms_broker_url_t u;
    char err[256];
    ASSERT_INT_EQ(ms_broker_parse_url("redis://u:hunter2@h:99999", &u, err, sizeof err), -1);
    ASSERT_TRUE(strstr(err, "hunter2") == NULL);
    ASSERT_INT_EQ(ms_broker_parse_url("redis://u:hunter2%zz@h", &u, err, sizeof err), -1);
    ASSERT_TRUE(strstr(err, "hunter2") == NULL);

    char *e = NULL;
    ASSERT_TRUE(ms_broker_new(loop, "redis://h:0", NULL, &e) == NULL);
    ASSERT_CONTAINS(e, "port must be");
    free(e);
}

/* ---- against a real Redis ------------------------------------------------------------------- */

static void test_basics(ms_broker_t *b)
{
    call_t c;
    static const char value[] = "a\0b\r\n\xff\x00z"; /* NULs, CRLF, a high byte */
    const char *set[] = {"SET", "bin\0key", value};
    size_t set_len[] = {3, 7, sizeof value};
    memset(&c, 0, sizeof c);
    ASSERT_INT_EQ(ms_broker_command(b, on_call, &c, 3, set, set_len), MS_BROKER_OK);
    ASSERT_INT_EQ(c.calls, 0); /* answered from the loop, not from within the call */
    wait_call(&c);
    ASSERT_INT_EQ(c.status, MS_BROKER_OK);
    ASSERT_INT_EQ(c.type, REDIS_REPLY_STATUS);
    ASSERT_STR_EQ(c.str, "OK");

    const char *get[] = {"GET", "bin\0key"};
    size_t get_len[] = {3, 7};
    memset(&c, 0, sizeof c);
    ms_broker_command(b, on_call, &c, 2, get, get_len);
    wait_call(&c);
    ASSERT_INT_EQ(c.status, MS_BROKER_OK);
    ASSERT_INT_EQ(c.type, REDIS_REPLY_STRING);
    ASSERT_INT_EQ(c.len, sizeof value);
    ASSERT_TRUE(memcmp(c.str, value, sizeof value) == 0);

    ASSERT_INT_EQ(run_cmd(b, &c, "GET", "missing", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.type, REDIS_REPLY_NIL);

    /* Redis error replies come as errors, with the reply */
    ASSERT_INT_EQ(run_cmd(b, &c, "SET", "text", "abc", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(run_cmd(b, &c, "INCR", "text", NULL), MS_BROKER_REPLY_ERROR);
    ASSERT_INT_EQ(c.type, REDIS_REPLY_ERROR);
    ASSERT_CONTAINS(c.err, "not an integer");
    ASSERT_INT_EQ(run_cmd(b, &c, "NOSUCHCOMMAND", NULL), MS_BROKER_REPLY_ERROR);
    ASSERT_CONTAINS(c.err, "unknown command");
    ASSERT_TRUE(ms_broker_connected(b)); /* an error reply does not break the connection */

    /* a pipeline longer than the ring's first size, answered in order */
    enum { N = 100 };
    static call_t many[N];
    int first = n_answered;
    ASSERT_INT_EQ(run_cmd(b, &c, "DEL", "counter", NULL), MS_BROKER_OK);
    first = n_answered;
    for (int i = 0; i < N; i++)
        cmd(b, &many[i], "INCR", "counter", NULL);
    wait_call(&many[N - 1]);
    for (int i = 0; i < N; i++) {
        ASSERT_INT_EQ(many[i].calls, 1);
        ASSERT_INT_EQ(many[i].status, MS_BROKER_OK);
        ASSERT_INT_EQ(many[i].integer, i + 1);
        ASSERT_INT_EQ(many[i].order, first + i + 1);
    }
}

static void test_select(int port, redis_t *unix_redis)
{
    char url[300];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/3", port);
    ms_broker_t *b3 = new_broker(url, NULL);
    snprintf(url, sizeof url, "redis://localhost:%d", port); /* a name, resolved off the loop */
    ms_broker_t *b0 = new_broker(url, NULL);
    snprintf(url, sizeof url, "unix://%s?db=3", unix_redis->sock);
    ms_broker_t *u3 = new_broker(url, NULL);
    snprintf(url, sizeof url, "unix://%s", unix_redis->sock);
    ms_broker_t *u0 = new_broker(url, NULL);
    wait_for(pred_connected, b3);
    wait_for(pred_connected, b0);
    wait_for(pred_connected, u3);
    wait_for(pred_connected, u0);
    call_t c;
    ASSERT_INT_EQ(run_cmd(b3, &c, "SET", "where", "db3", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(run_cmd(b3, &c, "GET", "where", NULL), MS_BROKER_OK);
    ASSERT_STR_EQ(c.str, "db3");
    ASSERT_INT_EQ(run_cmd(b0, &c, "GET", "where", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.type, REDIS_REPLY_NIL);
    ASSERT_INT_EQ(run_cmd(b0, &c, "SELECT", "3", NULL), MS_BROKER_OK); /* so it was db 0 */
    ASSERT_INT_EQ(run_cmd(b0, &c, "GET", "where", NULL), MS_BROKER_OK);
    ASSERT_STR_EQ(c.str, "db3");

    ASSERT_INT_EQ(run_cmd(u3, &c, "SET", "where", "unix3", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(run_cmd(u0, &c, "GET", "where", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.type, REDIS_REPLY_NIL);
    ASSERT_INT_EQ(run_cmd(u0, &c, "SELECT", "3", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(run_cmd(u0, &c, "GET", "where", NULL), MS_BROKER_OK);
    ASSERT_STR_EQ(c.str, "unix3");
    ms_broker_free(b3);
    ms_broker_free(b0);
    ms_broker_free(u3);
    ms_broker_free(u0);
}

static void test_auth(void)
{
    redis_t r = {0};
    const char *extra[] = {"--requirepass", "s3cret", NULL};
    if (redis_start_free(&r, extra) < 0) {
        ASSERT_TRUE(!"redis-server with --requirepass did not start");
        return;
    }
    char url[300];
    snprintf(url, sizeof url, "redis://:s3cret@127.0.0.1:%d", r.port);
    ms_broker_t *pw = new_broker(url, NULL);
    snprintf(url, sizeof url, "redis://default:s3cret@127.0.0.1:%d/1", r.port);
    ms_broker_t *user = new_broker(url, NULL);
    snprintf(url, sizeof url, "redis://:wrong@127.0.0.1:%d", r.port);
    ms_broker_t *wrong = new_broker(url, NULL);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", r.port);
    ms_broker_t *none = new_broker(url, NULL);
    wait_for(pred_connected, pw);
    wait_for(pred_connected, user);
    wait_for(pred_has_error, wrong);
    wait_for(pred_has_error, none);
    call_t c;
    ASSERT_INT_EQ(run_cmd(pw, &c, "SET", "k", "v", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(run_cmd(user, &c, "GET", "k", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.type, REDIS_REPLY_NIL); /* db 1 */
    ASSERT_TRUE(!ms_broker_connected(wrong));
    ASSERT_CONTAINS(ms_broker_last_error(wrong), "AUTH failed: WRONGPASS");
    ASSERT_TRUE(strstr(ms_broker_last_error(wrong), "wrong") == NULL);
    ASSERT_TRUE(!ms_broker_connected(none));
    ASSERT_CONTAINS(ms_broker_last_error(none), "PING failed: NOAUTH");
    ASSERT_INT_EQ(cmd(none, &c, "GET", "k", NULL), MS_BROKER_DOWN);
    ASSERT_INT_EQ(c.calls, 1);
    ASSERT_CONTAINS(c.err, "NOAUTH");
    ms_broker_free(pw);
    ms_broker_free(user);
    ms_broker_free(wrong);
    ms_broker_free(none);
    redis_kill(&r);
}

/* ---- a peer that resets the connection ------------------------------------------------------
 * A fake Redis on the loop answers the handshake's PING, then resets the connection (RST).
 * libuv reports that as a poll error; the broker must take it as a lost connection at once,
 * not keep an idle connection it believes is up (hiredis 0.14's stock libuv adapter drops
 * that event). */

static uv_tcp_t fake_server;
static uv_tcp_t fake_conn;
static char fake_buf[256];

static void fake_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    (void)hint;
    *buf = uv_buf_init(fake_buf, sizeof fake_buf);
}

/* The PONG and the RST leave in one go, so the broker finds the reply and the reset in one
 * poll event: the reply must be read and the reset still noticed. */
static void fake_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    (void)buf;
    if (n <= 0)
        return;
    uv_read_stop(s);
    static char pong[] = "+PONG\r\n";
    uv_buf_t out = uv_buf_init(pong, sizeof pong - 1);
    ASSERT_INT_EQ(uv_try_write(s, &out, 1), (int)sizeof pong - 1);
    uv_tcp_close_reset((uv_tcp_t *)s, NULL);
}

static void fake_accept(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    uv_tcp_init(loop, &fake_conn);
    uv_accept(server, (uv_stream_t *)&fake_conn);
    uv_read_start((uv_stream_t *)&fake_conn, fake_alloc, fake_read);
}

static void test_reset_by_peer(void)
{
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(loop, &fake_server);
    uv_tcp_bind(&fake_server, (struct sockaddr *)&a, 0);
    uv_listen((uv_stream_t *)&fake_server, 4, fake_accept);
    int len = sizeof a;
    uv_tcp_getsockname(&fake_server, (struct sockaddr *)&a, &len);
    char url[300];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", ntohs(a.sin_port));
    state_log_t st = {0};
    /* backoff far beyond the test, so it sees exactly one connection */
    ms_broker_opts_t o = {
        .on_state = on_state, .state_data = &st, .backoff_min_ms = 60000, .backoff_max_ms = 60000};
    ms_broker_t *b = new_broker(url, &o);
    wait_for(pred_connected, b);
    wait_for(pred_down, &st);
    ASSERT_INT_EQ(st.ups, 1);
    ASSERT_INT_EQ(st.downs, 1);
    ASSERT_CONTAINS(st.why, "reset");
    ASSERT_TRUE(!ms_broker_connected(b));
    ms_broker_free(b);
    uv_close((uv_handle_t *)&fake_server, NULL);
}

/* ---- reconnect backoff ----------------------------------------------------------------------
 * A fake Redis that accepts and hangs up at once: every attempt fails, and the gaps between
 * attempts must follow the backoff (each at least half its step, none past the cap). */

#define BACKOFF_ATTEMPTS 6
static uv_tcp_t hangup_server;
static uv_tcp_t hangup_conns[BACKOFF_ATTEMPTS];
static uint64_t accepted_at[BACKOFF_ATTEMPTS];
static int n_accepted;

static void hangup_accept(uv_stream_t *server, int status)
{
    if (status < 0 || n_accepted == BACKOFF_ATTEMPTS)
        return;
    uv_tcp_t *c = &hangup_conns[n_accepted];
    accepted_at[n_accepted++] = ms_now_ms();
    uv_tcp_init(loop, c);
    uv_accept(server, (uv_stream_t *)c);
    uv_close((uv_handle_t *)c, NULL);
}

static int pred_all_accepted(void *arg)
{
    (void)arg;
    return n_accepted == BACKOFF_ATTEMPTS;
}

static void test_backoff(void)
{
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(loop, &hangup_server);
    uv_tcp_bind(&hangup_server, (struct sockaddr *)&a, 0);
    uv_listen((uv_stream_t *)&hangup_server, 8, hangup_accept);
    int len = sizeof a;
    uv_tcp_getsockname(&hangup_server, (struct sockaddr *)&a, &len);
    char url[300];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", ntohs(a.sin_port));
    ms_broker_opts_t o = {.backoff_min_ms = 100, .backoff_max_ms = 400};
    ms_broker_t *b = new_broker(url, &o);
    ASSERT_TRUE(wait_for(pred_all_accepted, NULL));
    ASSERT_CONTAINS(ms_broker_last_error(b), "closed the connection");
    ASSERT_TRUE(!ms_broker_connected(b));
    ms_broker_free(b);
    uv_close((uv_handle_t *)&hangup_server, NULL);
    /* steps 100, 200, 400, 400, 400 ms, each drawn from [step/2, step] (5 ms for the loop's
     * cached clock); an uncapped step would reach 800 */
    static const int step[BACKOFF_ATTEMPTS - 1] = {100, 200, 400, 400, 400};
    for (int i = 0; i + 1 < BACKOFF_ATTEMPTS; i++) {
        long long gap = (long long)(accepted_at[i + 1] - accepted_at[i]);
        if (gap < step[i] / 2 - 5 || gap > step[i] + 300)
            fprintf(stderr, "backoff gap %d: %lld ms for a %d ms step\n", i, gap, step[i]);
        ASSERT_TRUE(gap >= step[i] / 2 - 5);
        ASSERT_TRUE(gap <= step[i] + 300);
    }
}

/* A listener that never accepts: the kernel completes the handshake, the PING is never
 * answered, so only the connect timeout ends the attempt. */
static void test_connect_timeout(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    bind(fd, (struct sockaddr *)&a, sizeof a);
    listen(fd, 16);
    getsockname(fd, (struct sockaddr *)&a, &len);
    char url[300];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", ntohs(a.sin_port));
    ms_broker_opts_t o = {.connect_timeout_ms = 150};
    uint64_t t0 = ms_now_ms();
    ms_broker_t *b = new_broker(url, &o);
    wait_for(pred_has_error, b);
    uint64_t took = ms_now_ms() - t0;
    ASSERT_CONTAINS(ms_broker_last_error(b), "150 ms connect timeout");
    ASSERT_TRUE(took < 2000); /* the message says which timer ended it; loop time is coarse */
    ASSERT_TRUE(!ms_broker_connected(b));
    ms_broker_free(b);
    close(fd);
}

static void test_command_timeout(int port)
{
    char url[300];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    state_log_t st = {0};
    ms_broker_opts_t o = {.command_timeout_ms = 100,
                          .connect_timeout_ms = 3000,
                          .on_state = on_state,
                          .state_data = &st};
    ms_broker_t *b = new_broker(url, &o);
    wait_for(pred_connected, b);
    ASSERT_INT_EQ(st.ups, 1);
    call_t sleep, behind;
    uint64_t t0 = ms_now_ms();
    cmd(b, &sleep, "DEBUG", "SLEEP", "1", NULL);
    cmd(b, &behind, "PING", NULL);
    wait_call(&sleep);
    uint64_t took = ms_now_ms() - t0;
    ASSERT_INT_EQ(sleep.status, MS_BROKER_TIMEOUT);
    ASSERT_CONTAINS(sleep.err, "100 ms command timeout");
    ASSERT_TRUE(took >= 90 && took < 800); /* the timeout, not the reply after 1 s */
    ASSERT_INT_EQ(behind.calls, 1);        /* failed with it, in order */
    ASSERT_INT_EQ(behind.status, MS_BROKER_LOST);
    ASSERT_TRUE(behind.order > sleep.order);
    ASSERT_INT_EQ(st.downs, 1);
    ASSERT_TRUE(!ms_broker_connected(b));
    /* it reconnects once Redis is awake, and the late reply is not taken for a new command */
    wait_for(pred_connected, b);
    ASSERT_INT_EQ(st.ups, 2);
    call_t c;
    ASSERT_INT_EQ(run_cmd(b, &c, "ECHO", "after", NULL), MS_BROKER_OK);
    ASSERT_STR_EQ(c.str, "after");
    ASSERT_INT_EQ(sleep.calls, 1);
    ASSERT_INT_EQ(behind.calls, 1);
    ms_broker_free(b);
}

typedef struct restart_wait {
    ms_broker_t *b;
    state_log_t *st;
} restart_wait_t;

static int pred_back(void *arg)
{
    restart_wait_t *w = arg;
    return ms_broker_connected(w->b) && w->st->ups >= 2;
}

static void test_kill_restart(redis_t *r)
{
    char url[300];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", r->port);
    state_log_t st = {0};
    ms_broker_opts_t o = {.on_state = on_state, .state_data = &st};
    ms_broker_t *b = new_broker(url, &o);
    wait_for(pred_connected, b);
    call_t inflight, c;
    cmd(b, &inflight, "DEBUG", "SLEEP", "0.5", NULL);
    redis_kill(r);
    wait_for(pred_down, &st);
    ASSERT_INT_EQ(inflight.calls, 1);
    ASSERT_INT_EQ(inflight.status, MS_BROKER_LOST);
    ASSERT_TRUE(!ms_broker_connected(b));
    ASSERT_TRUE(st.why[0] != '\0');
    /* while down: DOWN at once, before ms_broker_command returns, with the reason */
    for (int i = 0; i < 3; i++) {
        ASSERT_INT_EQ(cmd(b, &c, "GET", "k", NULL), MS_BROKER_DOWN);
        ASSERT_INT_EQ(c.calls, 1);
        ASSERT_INT_EQ(c.status, MS_BROKER_DOWN);
        ASSERT_CONTAINS(c.err, "Redis is not connected");
        uv_run(loop, UV_RUN_NOWAIT); /* let a few reconnect attempts fail */
    }
    if (redis_start(r, NULL) < 0) {
        ASSERT_TRUE(!"redis-server did not restart");
        ms_broker_free(b);
        return;
    }
    restart_wait_t w = {b, &st};
    ASSERT_TRUE(wait_for(pred_back, &w));
    ASSERT_INT_EQ(st.ups, 2);
    ASSERT_INT_EQ(st.downs, 1);
    ASSERT_INT_EQ(run_cmd(b, &c, "SET", "k", "back", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(run_cmd(b, &c, "GET", "k", NULL), MS_BROKER_OK);
    ASSERT_STR_EQ(c.str, "back");
    ms_broker_free(b);
}

/* ---- Redis Streams, as the task queue will use them -----------------------------------------
 * Replies are read through the broker's stream views (ms_broker_stream_entries & co). */

typedef struct entry {
    int calls;
    ms_broker_status_t status;
    long n_entries;   /* -1: the reply had another shape */
    char id[64];      /* the first entry's id */
    int deleted;      /* the first entry has nil fields */
    char payload[64]; /* its "payload" field */
    size_t payload_len;
    char next[64]; /* XAUTOCLAIM's cursor */
} entry_t;

static void first_entry(entry_t *e, const redisReply *list)
{
    ms_broker_entry_t ent;
    if (e->n_entries <= 0 || ms_broker_entry(list, 0, &ent) < 0)
        return;
    snprintf(e->id, sizeof e->id, "%.*s", (int)ent.id_len, ent.id);
    e->deleted = ent.fields == NULL;
    const redisReply *v = ms_broker_entry_field(&ent, "payload", 7);
    if (v) {
        e->payload_len = v->len;
        memcpy(e->payload, v->str, v->len < sizeof e->payload ? v->len : sizeof e->payload);
    }
}

static void on_xread(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    (void)err;
    entry_t *e = data;
    e->calls++;
    e->status = st;
    const redisReply *list;
    e->n_entries = ms_broker_stream_entries(r, &list);
    first_entry(e, list);
}

static void on_xautoclaim(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    (void)err;
    entry_t *e = data;
    e->calls++;
    e->status = st;
    const redisReply *list;
    const char *cursor = "";
    size_t cursor_len = 0;
    e->n_entries = ms_broker_autoclaim_entries(r, &list, &cursor, &cursor_len);
    snprintf(e->next, sizeof e->next, "%.*s", (int)cursor_len, cursor);
    first_entry(e, list);
}

/* XRANGE and XCLAIM answer with an entry list */
static void on_xrange(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    (void)err;
    entry_t *e = data;
    e->calls++;
    e->status = st;
    e->n_entries = r && r->type == REDIS_REPLY_ARRAY ? (long)r->elements : -1;
    first_entry(e, r);
}

static int pred_entry(void *arg)
{
    return ((entry_t *)arg)->calls > 0;
}

static void stream_cmd(ms_broker_t *b, entry_t *e, ms_broker_cb cb, int argc, const char **argv)
{
    size_t lens[16];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    memset(e, 0, sizeof *e);
    ms_broker_command(b, cb, e, argc, argv, lens);
    wait_for(pred_entry, e);
    ASSERT_INT_EQ(e->calls, 1);
}

static void xread(ms_broker_t *b, entry_t *e, const char *consumer, const char *from)
{
    const char *argv[] = {"XREADGROUP", "GROUP",   "workers", consumer, "COUNT",
                          "10",         "STREAMS", "tasks",   from};
    stream_cmd(b, e, on_xread, 9, argv);
}

static void test_streams(ms_broker_t *b)
{
    call_t c;
    ASSERT_INT_EQ(run_cmd(b, &c, "XGROUP", "CREATE", "tasks", "workers", "$", "MKSTREAM", NULL),
                  MS_BROKER_OK);
    ASSERT_STR_EQ(c.str, "OK");
    ASSERT_INT_EQ(run_cmd(b, &c, "XGROUP", "CREATE", "tasks", "workers", "$", NULL),
                  MS_BROKER_REPLY_ERROR);
    ASSERT_CONTAINS(c.err, "BUSYGROUP");

    static const char payload[] = "{\"x\":1}\0\xfe";
    const char *add[] = {"XADD", "tasks", "*", "attempt", "1", "payload", payload};
    size_t add_len[] = {4, 5, 1, 7, 1, 7, sizeof payload};
    memset(&c, 0, sizeof c);
    ms_broker_command(b, on_call, &c, 7, add, add_len);
    wait_call(&c);
    ASSERT_INT_EQ(c.status, MS_BROKER_OK);
    ASSERT_INT_EQ(c.type, REDIS_REPLY_STRING);
    char id[64];
    snprintf(id, sizeof id, "%.60s", c.str);

    entry_t e;
    xread(b, &e, "c1", ">");
    ASSERT_INT_EQ(e.status, MS_BROKER_OK);
    ASSERT_INT_EQ(e.n_entries, 1);
    ASSERT_STR_EQ(e.id, id);
    ASSERT_INT_EQ(e.deleted, 0);
    ASSERT_INT_EQ(e.payload_len, sizeof payload);
    ASSERT_TRUE(memcmp(e.payload, payload, sizeof payload) == 0);
    xread(b, &e, "c1", ">"); /* nothing new: nil */
    ASSERT_INT_EQ(e.status, MS_BROKER_OK);
    ASSERT_INT_EQ(e.n_entries, 0);
    xread(b, &e, "c1", "0"); /* c1's pending entries: the one it holds */
    ASSERT_INT_EQ(e.n_entries, 1);
    ASSERT_STR_EQ(e.id, id);

    ASSERT_INT_EQ(run_cmd(b, &c, "XPENDING", "tasks", "workers", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.elements, 4);
    ASSERT_INT_EQ(run_cmd(b, &c, "XACK", "tasks", "workers", id, NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.integer, 1);
    ASSERT_INT_EQ(run_cmd(b, &c, "XACK", "tasks", "workers", id, NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.integer, 0); /* acknowledged once only */
    xread(b, &e, "c1", "0");
    ASSERT_INT_EQ(e.n_entries, 0); /* [[tasks, []]]: nothing pending any more */

    /* a task read by c1 and never acknowledged (c1 died) is claimed by c2 */
    ASSERT_INT_EQ(run_cmd(b, &c, "XADD", "tasks", "*", "payload", "second", NULL), MS_BROKER_OK);
    snprintf(id, sizeof id, "%.60s", c.str);
    xread(b, &e, "c1", ">");
    ASSERT_STR_EQ(e.id, id);
    const char *claim[] = {"XAUTOCLAIM", "tasks", "workers", "c2", "0", "0-0", "COUNT", "10"};
    stream_cmd(b, &e, on_xautoclaim, 8, claim);
    ASSERT_INT_EQ(e.status, MS_BROKER_OK);
    ASSERT_INT_EQ(e.n_entries, 1);
    ASSERT_STR_EQ(e.id, id);
    ASSERT_STR_EQ(e.payload, "second");
    ASSERT_STR_EQ(e.next, "0-0");
    ASSERT_INT_EQ(run_cmd(b, &c, "XPENDING", "tasks", "workers", "-", "+", "10", "c2", NULL),
                  MS_BROKER_OK);
    ASSERT_INT_EQ(c.elements, 1);
    const char *range[] = {"XRANGE", "tasks", id, id};
    stream_cmd(b, &e, on_xrange, 4, range);
    ASSERT_INT_EQ(e.n_entries, 1);
    ASSERT_STR_EQ(e.payload, "second");
    ASSERT_INT_EQ(run_cmd(b, &c, "XACK", "tasks", "workers", id, NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.integer, 1);
    ASSERT_INT_EQ(run_cmd(b, &c, "XPENDING", "tasks", "workers", NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.elements, 4);

    /* an entry deleted while a consumer holds it: nil fields in the pending history */
    ASSERT_INT_EQ(run_cmd(b, &c, "XADD", "tasks", "*", "payload", "third", NULL), MS_BROKER_OK);
    snprintf(id, sizeof id, "%.60s", c.str);
    xread(b, &e, "c3", ">");
    ASSERT_INT_EQ(run_cmd(b, &c, "XDEL", "tasks", id, NULL), MS_BROKER_OK);
    xread(b, &e, "c3", "0");
    ASSERT_INT_EQ(e.n_entries, 1);
    ASSERT_STR_EQ(e.id, id);
    ASSERT_INT_EQ(e.deleted, 1);
    ASSERT_INT_EQ(e.payload_len, 0);
    ASSERT_INT_EQ(run_cmd(b, &c, "XACK", "tasks", "workers", id, NULL), MS_BROKER_OK);
    ASSERT_INT_EQ(c.integer, 1);

    /* other shapes are refused, not misread */
    ASSERT_INT_EQ(run_cmd(b, &c, "SET", "plain", "x", NULL), MS_BROKER_OK);
    const char *get[] = {"GET", "plain"};
    stream_cmd(b, &e, on_xread, 2, get);
    ASSERT_INT_EQ(e.n_entries, -1);
    stream_cmd(b, &e, on_xautoclaim, 2, get);
    ASSERT_INT_EQ(e.n_entries, -1);
    const char *xlen[] = {"XRANGE", "tasks", "-", "+"}; /* an entry list is not an XREAD reply */
    stream_cmd(b, &e, on_xread, 4, xlen);
    ASSERT_INT_EQ(e.n_entries, -1);
}

/* The views on hand-made replies: shapes Redis does not send must not be misread. */
static void test_stream_views(void)
{
    redisReply id = {.type = REDIS_REPLY_STRING, .str = "1-0", .len = 3};
    redisReply k = {.type = REDIS_REPLY_STRING, .str = "payload", .len = 7};
    redisReply v = {.type = REDIS_REPLY_STRING, .str = "p\0q", .len = 3};
    redisReply *kv[] = {&k, &v};
    redisReply fields = {.type = REDIS_REPLY_ARRAY, .elements = 2, .element = kv};
    redisReply odd = {.type = REDIS_REPLY_ARRAY, .elements = 1, .element = kv};
    redisReply *ent_el[] = {&id, &fields};
    redisReply ent = {.type = REDIS_REPLY_ARRAY, .elements = 2, .element = ent_el};
    redisReply *bad_el[] = {&id, &odd};
    redisReply bad = {.type = REDIS_REPLY_ARRAY, .elements = 2, .element = bad_el};
    redisReply *list_el[] = {&ent, &bad, &id};
    redisReply list = {.type = REDIS_REPLY_ARRAY, .elements = 3, .element = list_el};
    ms_broker_entry_t e;
    ASSERT_INT_EQ(ms_broker_entry(&list, 0, &e), 0);
    ASSERT_INT_EQ(e.id_len, 3);
    ASSERT_INT_EQ(e.n_fields, 1);
    const redisReply *got = ms_broker_entry_field(&e, "payload", 7);
    ASSERT_TRUE(got == &v);
    ASSERT_TRUE(ms_broker_entry_field(&e, "pay", 3) == NULL);
    ASSERT_INT_EQ(ms_broker_entry(&list, 1, &e), -1); /* odd field count */
    ASSERT_INT_EQ(ms_broker_entry(&list, 2, &e), -1); /* not an entry */
    ASSERT_INT_EQ(ms_broker_entry(&list, 3, &e), -1); /* past the end */
    ASSERT_INT_EQ(ms_broker_entry(&id, 0, &e), -1);   /* not a list */

    const redisReply *out;
    redisReply nil = {.type = REDIS_REPLY_NIL};
    ASSERT_INT_EQ(ms_broker_stream_entries(&nil, &out), 0);
    ASSERT_INT_EQ(ms_broker_stream_entries(NULL, &out), -1);
    redisReply empty = {.type = REDIS_REPLY_ARRAY};
    ASSERT_INT_EQ(ms_broker_stream_entries(&empty, &out), -1);
    redisReply name = {.type = REDIS_REPLY_STRING, .str = "tasks", .len = 5};
    redisReply *st_el[] = {&name, &list};
    redisReply st = {.type = REDIS_REPLY_ARRAY, .elements = 2, .element = st_el};
    redisReply *top_el[] = {&st};
    redisReply top = {.type = REDIS_REPLY_ARRAY, .elements = 1, .element = top_el};
    ASSERT_INT_EQ(ms_broker_stream_entries(&top, &out), 3);
    ASSERT_TRUE(out == &list);
    redisReply *st_bad_el[] = {&name, &id};
    redisReply st_bad = {.type = REDIS_REPLY_ARRAY, .elements = 2, .element = st_bad_el};
    redisReply *top_bad_el[] = {&st_bad};
    redisReply top_bad = {.type = REDIS_REPLY_ARRAY, .elements = 1, .element = top_bad_el};
    ASSERT_INT_EQ(ms_broker_stream_entries(&top_bad, &out), -1);
    ASSERT_INT_EQ(ms_broker_stream_entries(&list, &out), -1); /* an XRANGE-style entry list */

    /* XAUTOCLAIM: Redis 7's three elements and Redis 6.2's two */
    redisReply cur = {.type = REDIS_REPLY_STRING, .str = "5-0", .len = 3};
    redisReply *ac7_el[] = {&cur, &list, &empty};
    redisReply ac7 = {.type = REDIS_REPLY_ARRAY, .elements = 3, .element = ac7_el};
    const char *cursor = NULL;
    size_t cursor_len = 0;
    ASSERT_INT_EQ(ms_broker_autoclaim_entries(&ac7, &out, &cursor, &cursor_len), 3);
    ASSERT_INT_EQ(cursor_len, 3);
    ASSERT_TRUE(cursor && memcmp(cursor, "5-0", 3) == 0);
    redisReply ac62 = {.type = REDIS_REPLY_ARRAY, .elements = 2, .element = ac7_el};
    ASSERT_INT_EQ(ms_broker_autoclaim_entries(&ac62, &out, &cursor, &cursor_len), 3);
    redisReply *acbad_el[] = {&list, &list};
    redisReply acbad = {.type = REDIS_REPLY_ARRAY, .elements = 2, .element = acbad_el};
    ASSERT_INT_EQ(ms_broker_autoclaim_entries(&acbad, &out, &cursor, &cursor_len), -1);
    ASSERT_INT_EQ(ms_broker_autoclaim_entries(&nil, &out, &cursor, &cursor_len), -1);
}

/* ---- freeing with commands in flight -------------------------------------------------------- */

static ms_broker_t *to_free;
static call_t freeing_call;

static void on_call_then_free(void *data, ms_broker_status_t st, const redisReply *r,
                              const char *err)
{
    on_call(data, st, r, err);
    ms_broker_free(to_free);
}

static void test_free_in_flight(int port)
{
    char url[300];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    ms_broker_t *b = new_broker(url, NULL);
    wait_for(pred_connected, b);
    call_t slow, queued[3];
    cmd(b, &slow, "DEBUG", "SLEEP", "0.2", NULL);
    for (int i = 0; i < 3; i++)
        cmd(b, &queued[i], "PING", NULL);
    ms_broker_free(b);
    ASSERT_INT_EQ(slow.calls, 1); /* all before ms_broker_free returned */
    ASSERT_INT_EQ(slow.status, MS_BROKER_CLOSED);
    for (int i = 0; i < 3; i++) {
        ASSERT_INT_EQ(queued[i].calls, 1);
        ASSERT_INT_EQ(queued[i].status, MS_BROKER_CLOSED);
        ASSERT_TRUE(queued[i].order > slow.order);
    }

    /* freed from within a reply callback: the commands behind it get CLOSED */
    b = to_free = new_broker(url, NULL);
    wait_for(pred_connected, b);
    call_t after[3];
    const char *ping[] = {"PING"};
    size_t ping_len[] = {4};
    memset(&freeing_call, 0, sizeof freeing_call);
    ms_broker_command(b, on_call_then_free, &freeing_call, 1, ping, ping_len);
    for (int i = 0; i < 3; i++)
        cmd(b, &after[i], "DEBUG", "SLEEP", "0.05", NULL);
    wait_call(&freeing_call);
    ASSERT_INT_EQ(freeing_call.status, MS_BROKER_OK);
    for (int i = 0; i < 3; i++) {
        ASSERT_INT_EQ(after[i].calls, 1);
        ASSERT_INT_EQ(after[i].status, MS_BROKER_CLOSED);
    }

    /* freed while still connecting */
    b = new_broker(url, NULL);
    ms_broker_free(b);
    /* and while resolving a name */
    snprintf(url, sizeof url, "redis://localhost:%d", port);
    b = new_broker(url, NULL);
    ms_broker_free(b);
}

/* ---- main ----------------------------------------------------------------------------------- */

static int run_redis_tests(void)
{
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return -1;
    }
    redis_t tcp = {0};
    redis_t unix_r = {0};
    snprintf(unix_r.sock, sizeof unix_r.sock, "%s/redis.sock", tmpdir);
    const char *no_tcp[] = {"--port", "0", NULL}; /* the later --port wins */
    if (redis_start_free(&tcp, NULL) < 0 || redis_start(&unix_r, no_tcp) < 0) {
        ASSERT_TRUE(!"redis-server did not start");
        redis_kill(&tcp);
        redis_kill(&unix_r);
        return -1;
    }
    char url[300];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", tcp.port);
    ms_broker_t *b = new_broker(url, NULL);
    ASSERT_TRUE(!ms_broker_connected(b)); /* connecting happens on the loop */
    wait_for(pred_connected, b);
    test_basics(b);
    test_streams(b);
    ms_broker_free(b);
    test_select(tcp.port, &unix_r);
    test_auth();
    test_connect_timeout();
    test_reset_by_peer();
    test_backoff();
    test_command_timeout(tcp.port);
    test_free_in_flight(tcp.port);
    test_kill_restart(&tcp);
    redis_kill(&tcp);
    redis_kill(&unix_r);
    char rm[128];
    snprintf(rm, sizeof rm, "rm -rf %s", tmpdir);
    if (system(rm) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return 0;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as the engine's main does: hiredis writes with write(2) */
    uv_loop_init(loop);
    uv_timer_init(loop, &watchdog);
    uv_timer_start(&watchdog, on_watchdog, 40000, 0);

    test_urls();
    test_stream_views();
    if (have_redis())
        run_redis_tests();
    else
        printf("redis-server not found: skipping the tests against Redis\n");

    uv_close((uv_handle_t *)&watchdog, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    ASSERT_INT_EQ(uv_loop_close(loop), 0);
    return TEST_DONE();
}
