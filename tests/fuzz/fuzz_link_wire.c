/*
 * Fuzz harness of the data link's frame codec (engine/link/wire.c, the decoders of server.c and
 * client.c): the input is read as a stream of frames, a 12-byte header (u32 length, u32 stream,
 * u8 type, u8 flags, u16 reserved) and a payload, which is decoded the way each end decodes it:
 * REQUEST as method, request id, target, headers and a body (or with LK_MORE the body's u64
 * length), RESPONSE and HEAD as status and headers and a body, WINDOW as a u32 credit. Every
 * payload lies in a buffer of its exact size, so a read past its end is caught (ASan).
 * Invariants: a payload that decodes re-encodes, with the encoders the sending end uses, to the
 * same bytes, header included (round-trip), and the reader's cursor never leaves the payload.
 * The headers decoded from each frame also
 * go to ms_link_deadline, whose answer is checked against a plain reading of the documented
 * rule: 0 without the header, -1 when a value is not 1 to 12 digits, else 1 with the smallest.
 * Built as a libFuzzer binary with -DMS_FUZZ=ON (clang), else linked with replay.c so ctest
 * runs the corpus (tests/fuzz/corpus/link_wire).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "link/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint32_t u32_at(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The deadline rule of link.h, read independently of wire.c. */
static void check_deadline(const ms_http_header_t *hs, size_t n)
{
    int want = 0;
    uint64_t min = 0;
    for (size_t i = 0; i < n && want >= 0; i++) {
        if (hs[i].name_len != strlen(MS_LINK_DEADLINE_HEADER) ||
            strncasecmp(hs[i].name, MS_LINK_DEADLINE_HEADER, hs[i].name_len) != 0)
            continue;
        int digits = hs[i].value_len >= 1 && hs[i].value_len <= 12;
        uint64_t v = 0;
        for (size_t k = 0; digits && k < hs[i].value_len; k++) {
            digits = hs[i].value[k] >= '0' && hs[i].value[k] <= '9';
            v = v * 10 + (uint64_t)(hs[i].value[k] - '0');
        }
        if (!digits)
            want = -1;
        else if (!want || v < min)
            min = v, want = 1;
    }
    uint64_t ms = 12345;
    int rc = ms_link_deadline(hs, n, &ms);
    if (rc != want || (rc == 1 && (ms != min || ms > 999999999999ull)) || (rc == 0 && ms != 12345))
        abort();
}

/* Decodes one payload as the receiving end does and re-encodes it into out; returns 0 when it
 * decoded (out then holds the re-encoding), -1 when it was refused. */
static int decode_encode(int type, int flags, const char *p, uint32_t n, ms_buf_t *out)
{
    lk_reader_t r = {p, p + n, 0};
    ms_http_header_t *hs = NULL;
    size_t cap = 0, nh = 0;
    int rc = -1;
    if (type == LK_REQUEST) {
        uint32_t ml, rl, tl;
        const char *method = lk_get_str(&r, &ml);
        const char *rid = lk_get_str(&r, &rl);
        const char *target = lk_get_str(&r, &tl);
        if (r.bad || ml == 0 || lk_get_headers(&r, &hs, &cap, &nh) != 0)
            goto done;
        check_deadline(hs, nh);
        lk_put_str(out, method, ml);
        lk_put_str(out, rid, rl);
        lk_put_str(out, target, tl);
        lk_put_headers(out, hs, nh);
        if (flags & LK_MORE) {
            uint32_t lo = lk_get_u32(&r), hi = lk_get_u32(&r);
            if (r.bad || r.p != r.end)
                goto done;
            lk_put_u32(out, lo);
            lk_put_u32(out, hi);
        } else {
            ms_buf_append(out, r.p, (size_t)(r.end - r.p));
        }
        rc = 0;
    } else if (type == LK_RESPONSE || type == LK_HEAD) {
        uint32_t status = lk_get_u32(&r);
        if (lk_get_headers(&r, &hs, &cap, &nh) != 0)
            goto done;
        check_deadline(hs, nh);
        lk_put_u32(out, status);
        lk_put_headers(out, hs, nh);
        ms_buf_append(out, r.p, (size_t)(r.end - r.p));
        rc = 0;
    } else if (type == LK_WINDOW) {
        uint32_t credit = lk_get_u32(&r);
        if (r.bad)
            goto done;
        lk_put_u32(out, credit);
        ms_buf_append(out, r.p, (size_t)(r.end - r.p));
        rc = 0;
    } else {
        ms_buf_append(out, p, n); /* DATA, BODY and the rest: opaque bytes */
        rc = 0;
    }
done:
    if (r.p < p || r.p > p + n)
        abort();
    free(hs);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A zeroed connection that is closing: lk_frame_begin/end build frames into c.out without
     * scheduling a flush, so no loop is needed. */
    lk_conn_t c;
    memset(&c, 0, sizeof c);
    c.closing = 1;
    size_t off = 0;
    while (size - off >= LK_HEADER) {
        const uint8_t *h = data + off;
        uint32_t n = u32_at(h);
        if (h[10] || h[11] || n > size - off - LK_HEADER)
            break; /* what parse_frames refuses, or a frame still incomplete */
        char *payload = malloc(n ? n : 1);
        memcpy(payload, h + LK_HEADER, n);
        ms_buf_t body = {0};
        if (decode_encode(h[8], h[9], payload, n, &body) == 0) {
            c.out.len = 0;
            size_t at = lk_frame_begin(&c, h[8], u32_at(h + 4));
            if (h[9])
                lk_frame_flags(&c, at, h[9]);
            ms_buf_append(&c.out, body.data ? body.data : "", body.len);
            lk_frame_end(&c, at);
            if (c.out.len != LK_HEADER + (size_t)n || memcmp(c.out.data, h, LK_HEADER + n) != 0)
                abort(); /* decode then encode must give the frame back */
        }
        ms_buf_free(&body);
        free(payload);
        off += LK_HEADER + (size_t)n;
    }
    ms_buf_free(&c.out);
    return 0;
}
