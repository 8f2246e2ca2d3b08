/*
 * Fuzz harness of the HTTP server's request parsing (engine/http/server.c: llhttp with the
 * server's settings, its head scanning, limits and pipelining). There is no parse-only entry
 * point, so the harness runs a real ms_http_server on a Unix socket in a temporary folder, in
 * this process, with a uv loop turned without waiting: the input is written to a client socket
 * in two parts (split at a place drawn from the input), the loop runs until the server has
 * read the first part, then the rest follows with the write side shut. Every request handed
 * over is answered at once, and the server's view of the connection is logged: each request's
 * method, target, path, query, headers and body, and each outcome on_complete reports (200, or
 * the status of a refusal: 400, 413, 431...).
 * Invariants: the log is the same whether the bytes came whole or split (no desync between
 * pipelined requests, no state lost across reads, the same status for every refusal); a request
 * handed over stays within the limits (head bytes under max_header_bytes, body under
 * max_body_bytes); the server closes the connection after the client's end of input. Built as a
 * libFuzzer binary with -DMS_FUZZ=ON (clang), else linked with replay.c so ctest runs the corpus
 * (tests/fuzz/corpus/http_request).
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

#include "core/core.h"
#include "http/http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_HEADER_BYTES 512
#define MAX_BODY_BYTES   1024
#define FUZZ_MAX_INPUT   (32 * 1024) /* well under a Unix socket's buffer: writes never block */

static uv_loop_t loop;
static ms_http_server_t *srv;
static char sock_path[108];
static ms_buf_t log_buf;

static void on_request(ms_http_request_t *req, void *data)
{
    (void)data;
    size_t head = req->target_len;
    ms_buf_appendf(&log_buf, "REQ %s %s path=%s query=%s minor=%d headers=%zu\n", req->method,
                   req->target, req->path, req->query, req->http_minor, req->n_headers);
    for (size_t i = 0; i < req->n_headers; i++) {
        const ms_http_header_t *h = &req->headers[i];
        head += h->name_len + h->value_len;
        ms_buf_append(&log_buf, h->name, h->name_len);
        ms_buf_append(&log_buf, ": ", 2);
        ms_buf_append(&log_buf, h->value, h->value_len);
        ms_buf_append(&log_buf, "\n", 1);
    }
    ms_buf_appendf(&log_buf, "body %zu\n", req->body_len);
    ms_buf_append(&log_buf, req->body, req->body_len);
    if (head > MAX_HEADER_BYTES || req->body_len > MAX_BODY_BYTES || req->body[req->body_len])
        abort(); /* the limits were not applied, or the body is not NUL-terminated */
    ms_http_respond(req, 200, NULL, 0, "ok", 2);
}

static void on_abort(ms_http_request_t *req, void *data)
{
    (void)req;
    (void)data;
    abort(); /* every request is answered at once: nothing can be left owed */
}

static void on_complete(const ms_http_request_t *req, int status, int disconnected,
                        uint64_t elapsed_ns, void *data)
{
    (void)req;
    (void)elapsed_ns;
    (void)data;
    ms_buf_appendf(&log_buf, "DONE %d%s\n", status, disconnected ? " disconnected" : "");
}

static char sock_dir[32];

/* The socket and its folder go at exit, so replays leave nothing in /tmp. */
static void cleanup(void)
{
    unlink(sock_path);
    rmdir(sock_dir);
}

static void setup(void)
{
    snprintf(sock_dir, sizeof sock_dir, "/tmp/fuzz_http_XXXXXX");
    if (!mkdtemp(sock_dir))
        abort();
    snprintf(sock_path, sizeof sock_path, "%s/s", sock_dir);
    atexit(cleanup);
    if (!getenv("FUZZ_HTTP_LOG"))
        ms_log_min_level = MS_LOG_ERROR; /* a refusal is logged at INFO: keep the run quiet */
    uv_loop_init(&loop);
    ms_http_server_config_t cfg = {
        .limits = {MAX_HEADER_BYTES, MAX_BODY_BYTES, 3600, 3600},
        .on_request = on_request,
        .on_abort = on_abort,
        .on_complete = on_complete,
    };
    if (ms_http_server_listen_unix(&loop, sock_path, &cfg, &srv) != 0)
        abort();
}

/* Turns the loop and takes what the server wrote, until the server has read everything the
 * client sent (and, with wait_eof, until it closed the connection). */
static void pump(int fd, int wait_eof)
{
    char buf[4096];
    for (int i = 0; i < 100000; i++) {
        uv_run(&loop, UV_RUN_NOWAIT);
        ssize_t n;
        while ((n = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0)
            ;
        if (n == 0)
            return; /* the server closed the connection */
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return; /* reset: closed as well */
        int unread = 0;
        if (!wait_eof && ioctl(fd, SIOCOUTQ, &unread) == 0 && unread == 0 && i > 2)
            return;
    }
    abort(); /* the server neither read the input nor closed the connection */
}

static void run(const uint8_t *data, size_t size, size_t split)
{
    log_buf.len = 0;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, sock_path, strlen(sock_path) + 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        abort();
    if (split > 0) {
        if (send(fd, data, split, MSG_NOSIGNAL) != (ssize_t)split)
            abort();
        pump(fd, 0);
    }
    /* The server may have closed already (a refusal): the rest then goes nowhere. */
    if (size > split)
        (void)send(fd, data + split, size - split, MSG_NOSIGNAL);
    shutdown(fd, SHUT_WR);
    pump(fd, 1);
    close(fd);
    for (int i = 0; i < 4; i++)
        uv_run(&loop, UV_RUN_NOWAIT); /* the server's side of the connection is closed, freed */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!srv)
        setup();
    if (size > FUZZ_MAX_INPUT)
        return 0;
    uint32_t h = 2166136261u; /* FNV-1a of the input picks the split */
    for (size_t i = 0; i < size; i++)
        h = (h ^ data[i]) * 16777619u;
    run(data, size, 0);
    ms_buf_t whole = log_buf;
    log_buf = (ms_buf_t){0};
    run(data, size, size ? h % (size + 1) : 0);
    if (whole.len != log_buf.len ||
        (whole.len && memcmp(whole.data, log_buf.data, whole.len) != 0)) {
        fprintf(stderr, "whole:\n%.*s\nsplit at %zu:\n%.*s\n", (int)whole.len, whole.data,
                size ? (size_t)(h % (size + 1)) : 0, (int)log_buf.len, log_buf.data);
        abort(); /* the bytes' arrival in pieces changed what the server saw */
    }
    ms_buf_free(&whole);
    return 0;
}
