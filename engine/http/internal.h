/*
 * http internals shared by server.c and client.c: header collection across split reads and
 * stream writes that try a direct write before queueing a copy.
 */
#ifndef MS_HTTP_INTERNAL_H
#define MS_HTTP_INTERNAL_H

#include <llhttp.h>

#include "http/http.h"

/* Collects header names and values arriving in pieces. Everything lands in one buffer; the
 * array of ms_http_header_t is built from offsets once the head is complete, because the
 * buffer may move while it grows. */
typedef struct ms__header_collector {
    ms_buf_t text;   /* all header bytes, each name and value NUL-terminated */
    size_t *offsets; /* name_off, name_len, value_off, value_len per header */
    size_t n, cap;   /* headers collected, capacity in headers */
    int in_name;     /* the last piece was part of a name still open */
    ms_http_header_t *array;
    size_t array_cap;
} ms__header_collector_t;

/* llhttp delivers names and values in pieces and calls no piece callback for an empty value, so
 * the *_complete callbacks delimit them. */
void ms__headers_reset(ms__header_collector_t *hc);
void ms__headers_free(ms__header_collector_t *hc);
void ms__headers_add_name(ms__header_collector_t *hc, const char *p, size_t n);
void ms__headers_name_done(ms__header_collector_t *hc);
void ms__headers_add_value(ms__header_collector_t *hc, const char *p, size_t n);
void ms__headers_value_done(ms__header_collector_t *hc);
/* Builds hc->array (valid until the next reset). */
void ms__headers_finish(ms__header_collector_t *hc);

/* uv alloc callback for every HTTP stream of a thread. Each read is parsed (or copied into its
 * connection's own buffer) before the next read happens, so one buffer per thread serves every
 * connection, server and client side alike. */
void ms__alloc_read_buffer(uv_handle_t *h, size_t suggested, uv_buf_t *buf);

/* Writes bufs to the stream: tries uv_try_write first (no allocation when the socket takes it
 * all) and queues a single copy of the rest otherwise. `pending` is incremented per queued
 * write and decremented when it completes; done_cb runs then with `data` (may be NULL). */
typedef void (*ms__write_done_cb)(void *data, int status);
int ms__stream_write(uv_stream_t *stream, const uv_buf_t *bufs, unsigned nbufs, int *pending,
                     ms__write_done_cb done_cb, void *data);

#endif
