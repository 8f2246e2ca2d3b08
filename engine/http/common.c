/*
 * http/common: pieces used by both the server and the client side.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http/internal.h"

const char *ms_http_status_text(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 304:
        return "Not Modified";
    case 307:
        return "Temporary Redirect";
    case 308:
        return "Permanent Redirect";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 412:
        return "Precondition Failed";
    case 413:
        return "Content Too Large";
    case 422:
        return "Unprocessable Content";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "Unknown";
    }
}

void ms__alloc_read_buffer(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static _Thread_local char read_buffer[64 * 1024];
    (void)h;
    (void)suggested;
    *buf = uv_buf_init(read_buffer, sizeof read_buffer);
}

void ms__headers_reset(ms__header_collector_t *hc)
{
    ms_buf_reset(&hc->text);
    hc->n = 0;
    hc->in_name = 0;
}

void ms__headers_free(ms__header_collector_t *hc)
{
    ms_buf_free(&hc->text);
    free(hc->offsets);
    free(hc->array);
    memset(hc, 0, sizeof *hc);
}

void ms__headers_add_name(ms__header_collector_t *hc, const char *p, size_t n)
{
    if (!hc->in_name) {
        if (hc->n == hc->cap) {
            hc->cap = hc->cap ? hc->cap * 2 : 16;
            hc->offsets = ms_realloc(hc->offsets, hc->cap * 4 * sizeof(size_t));
        }
        size_t *o = hc->offsets + hc->n * 4;
        o[0] = hc->text.len;
        o[1] = o[2] = o[3] = 0;
        hc->n++;
        hc->in_name = 1;
    }
    ms_buf_append(&hc->text, p, n);
    hc->offsets[(hc->n - 1) * 4 + 1] += n;
}

void ms__headers_name_done(ms__header_collector_t *hc)
{
    if (!hc->in_name)
        return;
    hc->in_name = 0;
    ms_buf_append(&hc->text, "", 1);
    hc->offsets[(hc->n - 1) * 4 + 2] = hc->text.len;
}

void ms__headers_add_value(ms__header_collector_t *hc, const char *p, size_t n)
{
    if (hc->n == 0)
        return;
    ms_buf_append(&hc->text, p, n);
    hc->offsets[(hc->n - 1) * 4 + 3] += n;
}

void ms__headers_value_done(ms__header_collector_t *hc)
{
    if (hc->n)
        ms_buf_append(&hc->text, "", 1);
}

void ms__headers_finish(ms__header_collector_t *hc)
{
    ms_buf_append(&hc->text, "", 1); /* text.data exists even with no headers */
    if (hc->array_cap < hc->n) {
        hc->array_cap = hc->n;
        hc->array = ms_realloc(hc->array, hc->array_cap * sizeof *hc->array);
    }
    for (size_t i = 0; i < hc->n; i++) {
        const size_t *o = hc->offsets + i * 4;
        hc->array[i].name = hc->text.data + o[0];
        hc->array[i].name_len = o[1];
        hc->array[i].value = hc->text.data + o[2];
        hc->array[i].value_len = o[3];
    }
}

typedef struct queued_write {
    uv_write_t req;
    int *pending;
    ms__write_done_cb done_cb;
    void *data;
    size_t len;
    char bytes[];
} queued_write_t;

static void on_queued_write(uv_write_t *req, int status)
{
    queued_write_t *w = (queued_write_t *)req;
    (*w->pending)--;
    if (w->done_cb)
        w->done_cb(w->data, status);
    free(w);
}

int ms__stream_write(uv_stream_t *stream, const uv_buf_t *bufs, unsigned nbufs, int *pending,
                     ms__write_done_cb done_cb, void *data)
{
    size_t total = 0;
    for (unsigned i = 0; i < nbufs; i++)
        total += bufs[i].len;
    size_t written = 0;
    /* A direct write is only allowed when nothing is queued, or bytes would be reordered. */
    if (*pending == 0) {
        int r = uv_try_write(stream, bufs, nbufs);
        if (r > 0)
            written = (size_t)r;
        else if (r != UV_EAGAIN && r != UV_ENOSYS)
            return r;
    }
    if (written == total) {
        if (done_cb)
            done_cb(data, 0);
        return 0;
    }
    queued_write_t *w = ms_malloc(sizeof *w + (total - written));
    w->pending = pending;
    w->done_cb = done_cb;
    w->data = data;
    w->len = 0;
    size_t skip = written;
    for (unsigned i = 0; i < nbufs; i++) {
        size_t n = bufs[i].len;
        if (skip >= n) {
            skip -= n;
            continue;
        }
        memcpy(w->bytes + w->len, bufs[i].base + skip, n - skip);
        w->len += n - skip;
        skip = 0;
    }
    uv_buf_t b = uv_buf_init(w->bytes, (unsigned)w->len);
    int r = uv_write(&w->req, stream, &b, 1, on_queued_write);
    if (r < 0) {
        free(w);
        return r;
    }
    (*pending)++;
    return 0;
}
