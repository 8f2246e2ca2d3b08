/*
 * Broker URL parsing (broker.h): redis://[user:password@]host[:port][/db] and
 * unix:///path/to.sock[?db=N&user=U&password=P]. A pure function: errors go into the caller's
 * buffer and name the part at fault, but never echo the password.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "broker/broker.h"
#include "core/core.h"

#define REDIS_DEFAULT_PORT 6379

static int url_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int url_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (errlen == 0)
        return -1;
    int n = snprintf(err, errlen, "broker URL: ");
    if (n < 0 || (size_t)n >= errlen)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

/* Copies n bytes of src into dst (cap bytes, NUL included), decoding %XX escapes. `what` names
 * the part for the error message; the text itself is never quoted (it may be a secret). */
static int decode(const char *src, size_t n, char *dst, size_t cap, const char *what, char *err,
                  size_t errlen)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = src[i];
        if (c == '%') {
            int hi = i + 2 < n ? ms_hex_digit(src[i + 1]) : -1;
            int lo = i + 2 < n ? ms_hex_digit(src[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                return url_err(err, errlen, "bad %%-escape in the %s (use %%XX, two hex digits)",
                               what);
            c = (char)(hi * 16 + lo);
            if (c == '\0')
                return url_err(err, errlen, "the %s must not contain %%00", what);
            i += 2;
        }
        if (o + 1 >= cap)
            return url_err(err, errlen, "the %s is longer than %zu bytes", what, cap - 1);
        dst[o++] = c;
    }
    dst[o] = '\0';
    return 0;
}

/* A decimal number of at most 9 digits (so it fits an int) in [min, max]. */
static int parse_number(const char *s, size_t n, int min, int max, int *out)
{
    if (n == 0 || n > 9)
        return -1;
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static int parse_db(const char *s, size_t n, int *out, char *err, size_t errlen)
{
    if (parse_number(s, n, 0, 999999999, out) == 0)
        return 0;
    return url_err(err, errlen, "the database must be a number from 0, got '%.*s'",
                   (int)(n > 32 ? 32 : n), s);
}

/* user:password or :password, the part before '@'. */
static int parse_userinfo(const char *s, size_t n, ms_broker_url_t *out, char *err, size_t errlen)
{
    const char *colon = memchr(s, ':', n);
    if (!colon)
        return url_err(err, errlen,
                       "the part before '@' must be user:password or :password "
                       "(percent-encode ':', '@' and '/' inside them)");
    size_t ulen = (size_t)(colon - s);
    if (decode(s, ulen, out->user, sizeof out->user, "user name", err, errlen) < 0)
        return -1;
    if (decode(colon + 1, n - ulen - 1, out->password, sizeof out->password, "password", err,
               errlen) < 0)
        return -1;
    if (!out->password[0])
        return url_err(err, errlen, "the password is empty (leave out the '...@' part for none)");
    return 0;
}

/* host, host:port, [v6], [v6]:port */
static int parse_hostport(const char *s, size_t n, ms_broker_url_t *out, char *err, size_t errlen)
{
    const char *host = s, *port = NULL;
    size_t hlen, plen = 0;
    if (n > 0 && s[0] == '[') {
        const char *close = memchr(s, ']', n);
        if (!close)
            return url_err(err, errlen, "an IPv6 address needs a closing ']'");
        host = s + 1;
        hlen = (size_t)(close - host);
        size_t rest = n - (size_t)(close + 1 - s);
        if (rest > 0) {
            if (close[1] != ':')
                return url_err(err, errlen, "unexpected text after ']' (expected ':port')");
            port = close + 2;
            plen = rest - 1;
        }
    } else {
        const char *colon = memchr(s, ':', n);
        hlen = colon ? (size_t)(colon - s) : n;
        if (colon) {
            port = colon + 1;
            plen = n - hlen - 1;
        }
    }
    if (hlen == 0)
        return url_err(err, errlen, "no host (redis://host:port/db)");
    if (host != s && !memchr(host, ':', hlen))
        return url_err(err, errlen, "brackets are for IPv6 addresses ([::1])");
    /* A name, an IPv4 address, or (in brackets) an IPv6 one: anything else could only fail
     * later, at every connect attempt, with a vaguer message. */
    const char *allowed = host == s
                              ? "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"
                              : "0123456789abcdefABCDEF:.";
    for (size_t i = 0; i < hlen; i++)
        if (!strchr(allowed, host[i]))
            return url_err(err, errlen, "the host has a character not allowed there (0x%02x)",
                           (unsigned char)host[i]);
    if (hlen >= sizeof out->host)
        return url_err(err, errlen, "the host is longer than %zu bytes", sizeof out->host - 1);
    memcpy(out->host, host, hlen);
    out->host[hlen] = '\0';
    out->port = REDIS_DEFAULT_PORT;
    if (port && parse_number(port, plen, 1, 65535, &out->port) < 0)
        return url_err(err, errlen, "the port must be a number from 1 to 65535, got '%.*s'",
                       (int)(plen > 32 ? 32 : plen), port);
    return 0;
}

static int parse_tcp(const char *s, ms_broker_url_t *out, char *err, size_t errlen)
{
    size_t alen = strcspn(s, "/?#");
    const char *at = NULL;
    for (size_t i = 0; i < alen; i++)
        if (s[i] == '@')
            at = s + i; /* the last one: an unescaped '@' in a password still parses */
    const char *hp = s;
    if (at) {
        if (parse_userinfo(s, (size_t)(at - s), out, err, errlen) < 0)
            return -1;
        hp = at + 1;
    }
    if (parse_hostport(hp, alen - (size_t)(hp - s), out, err, errlen) < 0)
        return -1;
    const char *path = s + alen;
    if (path[0] == '/') {
        size_t dlen = strcspn(path + 1, "?#");
        if (dlen > 0 && parse_db(path + 1, dlen, &out->db, err, errlen) < 0)
            return -1;
        path += 1 + dlen;
    }
    if (path[0])
        return url_err(err, errlen,
                       "unexpected '%c...' after the database (query parameters are for "
                       "unix:// URLs; the database goes in the path: redis://host:port/db)",
                       path[0]);
    return 0;
}

static int parse_query_param(const char *s, size_t n, ms_broker_url_t *out, char *err,
                             size_t errlen)
{
    const char *eq = memchr(s, '=', n);
    size_t klen = eq ? (size_t)(eq - s) : n;
    const char *v = eq ? eq + 1 : s + n;
    size_t vlen = n - klen - (eq ? 1 : 0);
    if (klen == 2 && memcmp(s, "db", 2) == 0)
        return parse_db(v, vlen, &out->db, err, errlen);
    if (klen == 4 && memcmp(s, "user", 4) == 0)
        return decode(v, vlen, out->user, sizeof out->user, "user name", err, errlen);
    if (klen == 8 && memcmp(s, "password", 8) == 0)
        return decode(v, vlen, out->password, sizeof out->password, "password", err, errlen);
    return url_err(err, errlen, "unknown query parameter '%.*s' (known: db, user, password)",
                   (int)(klen > 32 ? 32 : klen), s);
}

static int parse_unix(const char *s, ms_broker_url_t *out, char *err, size_t errlen)
{
    if (s[0] != '/')
        return url_err(err, errlen,
                       "a unix:// URL needs an absolute socket path "
                       "(unix:///path/to.sock)");
    size_t plen = strcspn(s, "?#");
    if (decode(s, plen, out->path, sizeof out->path, "socket path", err, errlen) < 0)
        return -1;
    const char *q = s + plen;
    if (q[0] == '#')
        return url_err(err, errlen, "unexpected '#' after the socket path");
    if (q[0] == '?') {
        q++;
        while (*q) {
            size_t n = strcspn(q, "&#");
            if (q[n] == '#')
                return url_err(err, errlen, "unexpected '#' in the query");
            if (n > 0 && parse_query_param(q, n, out, err, errlen) < 0)
                return -1;
            q += n + (q[n] == '&');
        }
    }
    if (out->user[0] && !out->password[0])
        return url_err(err, errlen, "a user name needs a password");
    return 0;
}

int ms_broker_parse_url(const char *url, ms_broker_url_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!url || !url[0])
        return url_err(err, errlen, "empty (expected redis://host:port/db or unix:///path)");
    if (strncasecmp(url, "redis://", 8) == 0)
        return parse_tcp(url + 8, out, err, errlen);
    if (strncasecmp(url, "unix://", 7) == 0)
        return parse_unix(url + 7, out, err, errlen);
    if (strncasecmp(url, "rediss://", 9) == 0)
        return url_err(err, errlen, "rediss:// (TLS) is not supported; use redis:// or unix://");
    return url_err(err, errlen, "must start with redis:// or unix:// (redis://host:port/db)");
}
