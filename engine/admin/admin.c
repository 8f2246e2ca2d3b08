/*
 * admin: the admin REST listener (see admin.h). This file is transport, authentication, routing
 * and request validation only; every decision about serving state is the controller's, through
 * the callbacks. Callbacks answer synchronously, except reload, which answers through an
 * ms_admin_reply_t once its scripts are prepared off the loop: that reply is the only request
 * the listener can still owe when a client goes away.
 *
 * Routes (paths of Ray Serve's dashboard API, so Ray's clients work unchanged):
 *   GET|PUT|DELETE /api/serve/applications/          status, declarative deploy, shutdown
 *   POST /api/v1/applications/{app}/deployments/{deployment}/scale   external scaling
 *   POST /api/v1/reload                               hot reload of policy/router scripts
 *   GET  /api/v1/history                              decisions, reloads, replica lifecycle
 *   GET  /metrics                                     Prometheus text
 *   GET  /dashboard/...                               the web dashboard's files (dashboard.c)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "admin/admin.h"
#include "core/core.h"
#include "http/http.h"

/* Limits of the brief: a config may be large (inline user_config), but nothing needs more. */
#define ADMIN_MAX_HEADER_BYTES   (32 * 1024)
#define ADMIN_MAX_BODY_BYTES     (16 * 1024 * 1024)
#define ADMIN_HEADER_TIMEOUT_S   10.0
#define ADMIN_KEEP_ALIVE_TIMEOUT 30.0

#define APPS_PATH  "/api/serve/applications/"
#define SCALE_BASE "/api/v1/applications/"

/* Ray's body for an accepted scale request, used when the controller leaves the body empty. */
#define SCALE_ACCEPTED_MESSAGE                                                                     \
    "Scaling request received. Deployment will get scaled asynchronously."

struct ms_admin {
    ms_http_server_t *srv;
    char *token; /* NULL: no authentication (loopback only) */
    size_t token_len;
    char *host;     /* as configured, for the Host rule */
    int loopback;   /* host is a loopback name or address */
    int wildcard;   /* host is 0.0.0.0 or ::, whose own names are unknown */
    char port[8];   /* the port listened on, in decimal */
    char **allowed; /* admin.allowed_hosts */
    size_t n_allowed;
    int any_host; /* "*" among them */
    ms_admin_callbacks_t cb;
    void *data;
};

/* ---- host and token ------------------------------------------------------------------------ */

/* True for the names that cannot be reached from another machine: localhost, 127.0.0.0/8, ::1
 * (also written as an IPv4-mapped address). Anything else, including 0.0.0.0 and ::, counts as
 * reachable from outside. */
static int host_is_loopback(const char *host)
{
    if (strcasecmp(host, "localhost") == 0)
        return 1;
    struct in_addr a4;
    if (inet_pton(AF_INET, host, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    struct in6_addr a6;
    if (inet_pton(AF_INET6, host, &a6) == 1) {
        if (memcmp(&a6, &in6addr_loopback, sizeof a6) == 0)
            return 1;
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        return memcmp(a6.s6_addr, mapped, 12) == 0 && a6.s6_addr[12] == 127;
    }
    return 0;
}

/* Compares the presented token with ours in time that depends only on the presented length
 * (which the caller already knows), never on where the first differing byte is, so response
 * timing leaks nothing about the secret. */
static int token_equal(const char *given, size_t given_len, const char *token, size_t token_len)
{
    volatile unsigned char diff = (unsigned char)(given_len != token_len);
    for (size_t i = 0; i < given_len; i++)
        diff |= (unsigned char)(given[i] ^ token[i % token_len]);
    return diff == 0;
}

/* 0 when the request may proceed; otherwise answers 400 or 401 and returns -1. */
static int authenticate(ms_admin_t *a, ms_http_request_t *req)
{
    /* Two credentials are ambiguous: a proxy in front may check one and we the other. */
    if (ms_http_request_header_count(req, "authorization") > 1) {
        ms_http_respond_error(req, 400, "more than one Authorization header");
        return -1;
    }
    if (!a->token)
        return 0;
    static const ms_http_header_t challenge = {"WWW-Authenticate", 16, "Bearer", 6};
    size_t len = 0;
    const char *v = ms_http_request_header(req, "authorization", &len);
    if (!v) {
        ms_http_respond_error_headers(req, 401, "missing bearer token (Authorization: Bearer ...)",
                                      &challenge, 1);
        return -1;
    }
    /* The scheme is case-insensitive (RFC 7235); spaces after it are tolerated. */
    if (len < 7 || strncasecmp(v, "Bearer ", 7) != 0) {
        ms_http_respond_error_headers(req, 401, "the Authorization header must be a Bearer token",
                                      &challenge, 1);
        return -1;
    }
    v += 7;
    len -= 7;
    while (len > 0 && (*v == ' ' || *v == '\t')) {
        v++;
        len--;
    }
    while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t'))
        len--;
    if (!token_equal(v, len, a->token, a->token_len)) {
        ms_http_respond_error_headers(req, 401, "invalid bearer token", &challenge, 1);
        return -1;
    }
    return 0;
}

/* ---- Host, Origin and Content-Type ---------------------------------------------------------
 * A web page can make a browser send requests here: a form or a no-cors fetch may POST with
 * Content-Type text/plain, form-urlencoded or multipart without any preflight, and a page served
 * from a name the attacker later points at 127.0.0.1 (DNS rebinding) talks to us as its own
 * origin. Browsers always say where such a request comes from (Origin on every cross-origin
 * POST, and the name they connected to in Host), and cannot send other content types without a
 * preflight we never answer. So: Host must be one of the listener's names, Origin (when sent)
 * must be the origin of that Host, and a state-changing request must carry JSON (or YAML for a
 * deploy). */

static int ieq(const char *a, size_t alen, const char *b)
{
    return alen == strlen(b) && strncasecmp(a, b, alen) == 0;
}

/* Splits a Host value into name (brackets kept for IPv6) and port (len 0 when absent). */
static void split_host(const char *v, size_t len, size_t *name_len, const char **port,
                       size_t *port_len)
{
    const char *colon = NULL;
    if (len > 0 && v[0] == '[') {
        const char *close = memchr(v, ']', len);
        size_t n = close ? (size_t)(close - v) + 1 : len;
        colon = n < len && v[n] == ':' ? v + n : NULL;
        *name_len = n;
    } else {
        colon = memchr(v, ':', len);
        *name_len = colon ? (size_t)(colon - v) : len;
    }
    *port = colon ? colon + 1 : v + len;
    *port_len = colon ? (size_t)(v + len - colon - 1) : 0;
}

/* One of the listener's own names (loopback names when it listens on loopback, and the
 * configured address), on its own port. */
static int own_host(const ms_admin_t *a, const char *name, size_t name_len, const char *port,
                    size_t port_len)
{
    int port_ok = port_len ? ieq(port, port_len, a->port) : strcmp(a->port, "80") == 0;
    if (!port_ok)
        return 0;
    if (a->loopback && (ieq(name, name_len, "localhost") || ieq(name, name_len, "127.0.0.1") ||
                        ieq(name, name_len, "[::1]")))
        return 1;
    if (strchr(a->host, ':')) /* IPv6: written in brackets in a Host */
        return name_len == strlen(a->host) + 2 && name[0] == '[' &&
               strncasecmp(name + 1, a->host, name_len - 2) == 0;
    return ieq(name, name_len, a->host);
}

static int allowed_host(const ms_admin_t *a, const char *v, size_t len)
{
    size_t name_len, port_len;
    const char *port;
    split_host(v, len, &name_len, &port, &port_len);
    if (own_host(a, v, name_len, port, port_len))
        return 1;
    for (size_t i = 0; i < a->n_allowed; i++) {
        const char *e = a->allowed[i];
        size_t e_name, e_port_len;
        const char *e_port;
        split_host(e, strlen(e), &e_name, &e_port, &e_port_len);
        /* An entry with a port names one exact Host; without, that name on any port. */
        if (e_port_len ? ieq(v, len, e) : (name_len == e_name && !strncasecmp(v, e, e_name)))
            return 1;
    }
    return 0;
}

/* 0 when Host and Origin are acceptable; otherwise answers 403 and returns -1. */
static int check_origin(ms_admin_t *a, ms_http_request_t *req)
{
    size_t hlen = 0, olen = 0;
    const char *host = ms_http_request_header(req, "host", &hlen);
    const char *origin = ms_http_request_header(req, "origin", &olen);
    /* Without a Host (HTTP/1.0, or an empty one) the client is no browser; a wildcard listener
     * without allowed_hosts has no names of its own to insist on, and its token is the guard. */
    int check_host = !a->any_host && !(a->wildcard && a->n_allowed == 0);
    if (host && hlen > 0 && check_host && !allowed_host(a, host, hlen)) {
        char msg[400];
        snprintf(msg, sizeof msg,
                 "Host '%.*s' is not a name of this admin listener (expected 127.0.0.1:%s, "
                 "localhost:%s or the configured host; add others to admin.allowed_hosts)",
                 (int)(hlen > 100 ? 100 : hlen), host, a->port, a->port);
        ms_http_respond_error(req, 403, msg);
        return -1;
    }
    if (!origin)
        return 0;
    int same = host && ((olen == hlen + 7 && !strncasecmp(origin, "http://", 7) &&
                         !strncasecmp(origin + 7, host, hlen)) ||
                        (olen == hlen + 8 && !strncasecmp(origin, "https://", 8) &&
                         !strncasecmp(origin + 8, host, hlen)));
    if (!same) {
        char msg[300];
        snprintf(msg, sizeof msg,
                 "cross-origin request refused: Origin '%.*s' is not this listener's origin",
                 (int)(olen > 100 ? 100 : olen), origin);
        ms_http_respond_error(req, 403, msg);
        return -1;
    }
    return 0;
}

/* The media type of Content-Type (before any parameter), trimmed and lower-cased into out;
 * "" when the header is absent. */
static const char *media_type(ms_http_request_t *req, char *out, size_t cap)
{
    size_t len = 0, n = 0;
    const char *v = ms_http_request_header(req, "content-type", &len);
    out[0] = '\0';
    if (!v)
        return out;
    size_t i = 0;
    while (i < len && (v[i] == ' ' || v[i] == '\t'))
        i++;
    for (; i < len && v[i] != ';' && v[i] != ' ' && v[i] != '\t' && n + 1 < cap; i++)
        out[n++] = (char)((v[i] >= 'A' && v[i] <= 'Z') ? v[i] + 32 : v[i]);
    out[n] = '\0';
    return out;
}

static int is_yaml_type(const char *t)
{
    return !strcmp(t, "application/yaml") || !strcmp(t, "application/x-yaml") ||
           !strcmp(t, "text/yaml") || !strcmp(t, "text/x-yaml");
}

/* A state-changing request carries JSON (or, where allow_yaml, YAML: *is_yaml is then set); an
 * empty body may come without a Content-Type. Otherwise answers 415 and returns -1. */
static int check_body_type(ms_http_request_t *req, int allow_yaml, int *is_yaml)
{
    char t[128];
    media_type(req, t, sizeof t);
    if (is_yaml)
        *is_yaml = 0;
    if ((!t[0] && req->body_len == 0) || !strcmp(t, "application/json"))
        return 0;
    if (allow_yaml && is_yaml_type(t)) {
        *is_yaml = 1;
        return 0;
    }
    char msg[300];
    snprintf(msg, sizeof msg, "%s %s needs Content-Type: application/json%s (got %s)", req->method,
             req->path, allow_yaml ? " or application/yaml" : "", t[0] ? t : "none");
    ms_http_respond_error(req, 415, msg);
    return -1;
}

/* ---- responses ----------------------------------------------------------------------------- */

static void respond_json(ms_http_request_t *req, int status, json_t *body)
{
    static const ms_http_header_t type = {"Content-Type", 12, "application/json", 16};
    char *text = json_dumps(body, JSON_ENCODE_ANY);
    if (!text) {
        ms_http_respond_error(req, 500, "cannot encode the response");
        return;
    }
    ms_http_respond(req, status, &type, 1, text, strlen(text));
    free(text); /* the http module copies what it cannot write at once */
}

/* Passes a callback's answer through. Error answers are normalised to an object with "error"
 * and "request_id", so a client can always report what went wrong and quote the id. Takes the
 * reference to body. */
static void respond_result(ms_http_request_t *req, int status, json_t *body)
{
    if (status < 100 || status > 599) {
        ms_error("admin: callback returned invalid status %d for %s %s", status, req->method,
                 req->path);
        json_decref(body);
        ms_http_respond_error(req, 500, "Internal Server Error");
        return;
    }
    if (status >= 400) {
        if (!json_is_object(body)) {
            json_t *obj = json_object();
            if (json_is_string(body))
                json_object_set(obj, "error", body);
            else
                json_object_set_new(obj, "error", json_string(ms_http_status_text(status)));
            json_decref(body);
            body = obj;
        }
        if (!json_object_get(body, "error"))
            json_object_set_new(body, "error", json_string(ms_http_status_text(status)));
        json_object_set_new(body, "request_id", json_string(req->request_id));
    }
    if (!body) {
        /* Ray answers PUT/DELETE with 200 and an empty body; so do we. */
        ms_http_respond(req, status, NULL, 0, "", 0);
        return;
    }
    respond_json(req, status, body);
    json_decref(body);
}

static void respond_not_implemented(ms_http_request_t *req)
{
    ms_http_respond_error(req, 501, "not implemented by this engine");
}

static void respond_method_not_allowed(ms_http_request_t *req, const char *allow)
{
    ms_http_header_t h = {"Allow", 5, allow, strlen(allow)};
    char msg[160];
    snprintf(msg, sizeof msg, "method %s not allowed here; allowed: %s", req->method, allow);
    ms_http_respond_error_headers(req, 405, msg, &h, 1);
}

/* ---- helpers ------------------------------------------------------------------------------- */

/* Percent-decodes s[0..n) into a new string. `plus_is_space` for query strings. Returns NULL on
 * a malformed escape or a decoded NUL (which no C string can carry). */
static char *url_decode(const char *s, size_t n, int plus_is_space)
{
    char *out = ms_malloc(n + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            int hi = i + 2 < n ? ms_hex_digit(s[i + 1]) : -1;
            int lo = i + 2 < n ? ms_hex_digit(s[i + 2]) : -1;
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
                free(out);
                return NULL;
            }
            out[o++] = (char)(hi * 16 + lo);
            i += 2;
        } else if (c == '+' && plus_is_space) {
            out[o++] = ' ';
        } else {
            out[o++] = c;
        }
    }
    out[o] = '\0';
    return out;
}

/* Value of `key` in an application/x-www-form-urlencoded query, decoded (caller frees), or NULL
 * when absent. *bad is set when the parameter is present but malformed. */
static char *query_param(const char *query, const char *key, int *bad)
{
    size_t klen = strlen(key);
    *bad = 0;
    const char *p = query;
    while (*p) {
        const char *end = strchr(p, '&');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', n);
        size_t name_len = eq ? (size_t)(eq - p) : n;
        if (name_len == klen && memcmp(p, key, klen) == 0) {
            const char *v = eq ? eq + 1 : p + n;
            char *out = url_decode(v, (size_t)(p + n - v), 1);
            if (!out)
                *bad = 1;
            return out;
        }
        p += n;
        if (*p == '&')
            p++;
    }
    return NULL;
}

/* ---- routes -------------------------------------------------------------------------------- */

/* Ray filters the status document by each application's `source` when api_type is given. An
 * application without a `source` is kept: the controller did not say, so we do not guess. */
static void filter_by_api_type(json_t *doc, const char *api_type)
{
    json_t *apps = json_is_object(doc) ? json_object_get(doc, "applications") : NULL;
    if (!json_is_object(apps))
        return;
    const char *name;
    json_t *app;
    void *tmp;
    json_object_foreach_safe(apps, tmp, name, app)
    {
        json_t *src = json_object_get(app, "source");
        if (json_is_string(src) && strcmp(json_string_value(src), api_type) != 0)
            json_object_del(apps, name);
    }
}

static void route_applications(ms_admin_t *a, ms_http_request_t *req)
{
    const char *m = req->method;
    json_t *body = NULL;
    int status;
    if (strcmp(m, "GET") == 0) {
        int bad;
        char *api_type = query_param(req->query, "api_type", &bad);
        if (bad || (api_type && strcmp(api_type, "imperative") != 0 &&
                    strcmp(api_type, "declarative") != 0)) {
            char msg[256];
            snprintf(msg, sizeof msg,
                     "Invalid 'api_type' value: %.100s. Must be one of imperative, declarative",
                     api_type ? api_type : "(malformed)");
            free(api_type);
            ms_http_respond_error(req, 400, msg);
            return;
        }
        if (!a->cb.status) {
            free(api_type);
            respond_not_implemented(req);
            return;
        }
        status = a->cb.status(a->data, &body);
        if (api_type && status >= 200 && status < 300)
            filter_by_api_type(body, api_type);
        free(api_type);
    } else if (strcmp(m, "PUT") == 0) {
        if (!a->cb.deploy) {
            respond_not_implemented(req);
            return;
        }
        int is_yaml;
        if (check_body_type(req, 1, &is_yaml) != 0)
            return;
        if (req->body_len == 0) {
            ms_http_respond_error(req, 400, "empty request body: expected a config (JSON or YAML)");
            return;
        }
        status = a->cb.deploy(a->data, req->body, req->body_len, is_yaml, &body);
    } else if (strcmp(m, "DELETE") == 0) {
        if (check_body_type(req, 0, NULL) != 0)
            return;
        if (!a->cb.shutdown) {
            respond_not_implemented(req);
            return;
        }
        status = a->cb.shutdown(a->data, &body);
    } else {
        respond_method_not_allowed(req, "GET, PUT, DELETE");
        return;
    }
    respond_result(req, status, body);
}

/* Validates a ScaleDeploymentRequest the way Ray's pydantic model does, but strictly typed:
 * target_num_replicas must be a JSON integer >= 0 (not a bool, float or string). Unknown keys
 * are ignored, as pydantic's default does. On error writes a message into msg. */
static int parse_scale_body(const char *text, size_t len, long long *target, char *msg, size_t cap)
{
    json_error_t jerr;
    json_t *doc = len ? json_loadb(text, len, 0, &jerr) : NULL;
    int rc = -1;
    if (!doc) {
        snprintf(msg, cap, "Invalid request body: not valid JSON%s%s", len ? ": " : " (empty)",
                 len ? jerr.text : "");
    } else if (!json_is_object(doc)) {
        snprintf(msg, cap, "Invalid request body: expected a JSON object");
    } else {
        json_t *t = json_object_get(doc, "target_num_replicas");
        if (!t)
            snprintf(msg, cap, "Invalid request body: target_num_replicas: field required");
        else if (!json_is_integer(t))
            snprintf(msg, cap,
                     "Invalid request body: target_num_replicas: value is not a valid integer");
        else if (json_integer_value(t) < 0)
            snprintf(msg, cap,
                     "Invalid request body: target_num_replicas: ensure this value is greater "
                     "than or equal to 0");
        else {
            *target = json_integer_value(t);
            rc = 0;
        }
    }
    json_decref(doc);
    return rc;
}

/* Splits "{app}/deployments/{deployment}/scale" (what follows SCALE_BASE). Returns 1 when the
 * path has that shape (names still encoded, possibly empty), 0 otherwise. */
static int split_scale_path(const char *rest, const char **app, size_t *app_len, const char **dep,
                            size_t *dep_len)
{
    const char *s1 = strchr(rest, '/');
    if (!s1 || strncmp(s1, "/deployments/", 13) != 0)
        return 0;
    const char *d = s1 + 13;
    const char *s2 = strchr(d, '/');
    if (!s2 || strcmp(s2, "/scale") != 0)
        return 0;
    *app = rest;
    *app_len = (size_t)(s1 - rest);
    *dep = d;
    *dep_len = (size_t)(s2 - d);
    return 1;
}

static void route_scale(ms_admin_t *a, ms_http_request_t *req, const char *app_enc, size_t app_len,
                        const char *dep_enc, size_t dep_len)
{
    if (strcmp(req->method, "POST") != 0) {
        respond_method_not_allowed(req, "POST");
        return;
    }
    if (check_body_type(req, 0, NULL) != 0)
        return;
    char *app = url_decode(app_enc, app_len, 0);
    char *dep = url_decode(dep_enc, dep_len, 0);
    if (!app || !dep || !*app || !*dep) {
        free(app);
        free(dep);
        ms_http_respond_error(
            req, 400, "Invalid request: application and deployment names must be non-empty");
        return;
    }
    char msg[512];
    long long target = 0;
    if (parse_scale_body(req->body, req->body_len, &target, msg, sizeof msg) != 0) {
        free(app);
        free(dep);
        ms_http_respond_error(req, 400, msg);
        return;
    }
    if (!a->cb.scale) {
        free(app);
        free(dep);
        respond_not_implemented(req);
        return;
    }
    json_t *body = NULL;
    int status = a->cb.scale(a->data, app, dep, target, &body);
    free(app);
    free(dep);
    if (status == 200 && !body)
        body = json_pack("{s:s}", "message", SCALE_ACCEPTED_MESSAGE);
    respond_result(req, status, body);
}

struct ms_admin_reply {
    ms_http_request_t *req; /* NULL once the client went away */
};

void ms_admin_reply_send(ms_admin_reply_t *r, int status, json_t *body)
{
    if (r->req) {
        r->req->user = NULL;
        respond_result(r->req, status, body);
    } else {
        json_decref(body);
    }
    free(r);
}

static void route_reload(ms_admin_t *a, ms_http_request_t *req)
{
    if (strcmp(req->method, "POST") != 0) {
        respond_method_not_allowed(req, "POST");
        return;
    }
    if (check_body_type(req, 0, NULL) != 0)
        return;
    if (!a->cb.reload) {
        respond_not_implemented(req);
        return;
    }
    ms_admin_reply_t *r = ms_calloc(1, sizeof *r);
    r->req = req;
    req->user = r;
    a->cb.reload(a->data, r);
}

/* ---- GET /api/v1/history ---------------------------------------------------------------------
 * Parameters: kind (a comma-separated list of autoscaling, reloads, lifecycle; default all),
 * app, deployment, since (unix seconds, a finite number), limit (1..1000, default 100). Anything
 * else in a known parameter is a 400 naming it; unknown parameters are ignored, as elsewhere. */

static int parse_kinds(const char *v, unsigned *out)
{
    static const struct {
        const char *name;
        unsigned bit;
    } kinds[] = {{"autoscaling", MS_ADMIN_HISTORY_AUTOSCALING},
                 {"reloads", MS_ADMIN_HISTORY_RELOADS},
                 {"lifecycle", MS_ADMIN_HISTORY_LIFECYCLE}};
    *out = 0;
    const char *p = v;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        unsigned bit = 0;
        for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++)
            if (n == strlen(kinds[k].name) && memcmp(p, kinds[k].name, n) == 0)
                bit = kinds[k].bit;
        if (!bit)
            return -1;
        *out |= bit;
        if (!end)
            return 0;
        p = end + 1;
    }
}

/* A query parameter that must be non-empty text when present: NULL (absent) or the value.
 * A malformed or empty one sets *msg (the 400's message). */
static char *text_param(ms_http_request_t *req, const char *key, char *msg, size_t cap)
{
    if (msg[0])
        return NULL;
    int bad;
    char *v = query_param(req->query, key, &bad);
    if (bad || (v && !*v)) {
        snprintf(msg, cap, "Invalid '%s' value: %s", key,
                 bad ? "malformed percent-encoding" : "empty");
        free(v);
        return NULL;
    }
    return v;
}

static void parse_history_query(ms_http_request_t *req, ms_admin_history_query_t *q,
                                char *strings[5], char *msg, size_t cap)
{
    char *kind = strings[0] = text_param(req, "kind", msg, cap);
    q->application = strings[1] = text_param(req, "app", msg, cap);
    q->deployment = strings[2] = text_param(req, "deployment", msg, cap);
    char *since = strings[3] = text_param(req, "since", msg, cap);
    char *limit = strings[4] = text_param(req, "limit", msg, cap);
    if (msg[0])
        return;
    if (kind && parse_kinds(kind, &q->kinds) != 0) {
        snprintf(msg, cap,
                 "Invalid 'kind' value: %.100s. Must be a comma-separated list of autoscaling, "
                 "reloads, lifecycle",
                 kind);
        return;
    }
    char *end;
    if (since) {
        errno = 0;
        q->since = strtod(since, &end);
        q->has_since = 1;
        if (*end != '\0' || errno == ERANGE || !isfinite(q->since)) {
            snprintf(msg, cap, "Invalid 'since' value: %.100s. Must be unix seconds (a number)",
                     since);
            return;
        }
    }
    if (limit) {
        errno = 0;
        long v = strtol(limit, &end, 10);
        if (*end != '\0' || errno == ERANGE || v < 1 || v > MS_ADMIN_HISTORY_MAX_LIMIT) {
            snprintf(msg, cap, "Invalid 'limit' value: %.100s. Must be an integer from 1 to %d",
                     limit, MS_ADMIN_HISTORY_MAX_LIMIT);
            return;
        }
        q->limit = (int)v;
    }
}

static void route_history(ms_admin_t *a, ms_http_request_t *req)
{
    if (strcmp(req->method, "GET") != 0) {
        respond_method_not_allowed(req, "GET");
        return;
    }
    ms_admin_history_query_t q = {
        .kinds =
            MS_ADMIN_HISTORY_AUTOSCALING | MS_ADMIN_HISTORY_RELOADS | MS_ADMIN_HISTORY_LIFECYCLE,
        .limit = 100,
    };
    char *strings[5] = {NULL};
    char msg[256] = "";
    parse_history_query(req, &q, strings, msg, sizeof msg);
    if (msg[0]) {
        ms_http_respond_error(req, 400, msg);
    } else if (!a->cb.history) {
        respond_not_implemented(req);
    } else {
        json_t *body = NULL;
        int status = a->cb.history(a->data, &q, &body);
        respond_result(req, status, body);
    }
    for (int i = 0; i < 5; i++)
        free(strings[i]);
}

static void route_metrics(ms_admin_t *a, ms_http_request_t *req)
{
    if (strcmp(req->method, "GET") != 0) {
        respond_method_not_allowed(req, "GET");
        return;
    }
    if (!a->cb.metrics) {
        respond_not_implemented(req);
        return;
    }
    char *text = NULL;
    int status = a->cb.metrics(a->data, &text);
    if (status < 200 || status >= 300) {
        /* An error is still reported as JSON, like everywhere else. */
        json_t *body = json_pack("{s:s}", "error", text && *text ? text : "metrics unavailable");
        free(text);
        respond_result(req, status, body);
        return;
    }
    static const ms_http_header_t type = {"Content-Type", 12,
                                          "text/plain; version=0.0.4; charset=utf-8", 40};
    ms_http_respond(req, status, &type, 1, text ? text : "", text ? strlen(text) : 0);
    free(text);
}

static void on_request(ms_http_request_t *req, void *data)
{
    ms_admin_t *a = data;
    const char *path = req->path;
    if (check_origin(a, req) != 0)
        return;
    /* The dashboard's files are public so the page can load and ask for the token; what it
     * shows comes from the API below, which needs the token as ever. Host and Origin still
     * apply: a rebound name must not get even the page. */
    if (strcmp(path, "/dashboard") == 0 || strncmp(path, "/dashboard/", 11) == 0) {
        if (ms_http_request_header_count(req, "authorization") > 1) {
            ms_http_respond_error(req, 400, "more than one Authorization header");
            return;
        }
        ms_admin_serve_dashboard(req);
        return;
    }
    if (authenticate(a, req) != 0)
        return;
    /* Ray's route has the trailing slash; accept it without one too, as curl users type it. */
    if (strcmp(path, APPS_PATH) == 0 || strcmp(path, "/api/serve/applications") == 0) {
        route_applications(a, req);
        return;
    }
    if (strcmp(path, "/api/v1/reload") == 0) {
        route_reload(a, req);
        return;
    }
    if (strcmp(path, "/api/v1/history") == 0) {
        route_history(a, req);
        return;
    }
    if (strcmp(path, "/metrics") == 0) {
        route_metrics(a, req);
        return;
    }
    if (strncmp(path, SCALE_BASE, strlen(SCALE_BASE)) == 0) {
        const char *app, *dep;
        size_t app_len, dep_len;
        if (split_scale_path(path + strlen(SCALE_BASE), &app, &app_len, &dep, &dep_len)) {
            route_scale(a, req, app, app_len, dep, dep_len);
            return;
        }
    }
    char msg[256];
    snprintf(msg, sizeof msg, "no such endpoint: %.200s", path);
    ms_http_respond_error(req, 404, msg);
}

/* Only a reload can still be owed: its reply then drops the answer when it comes. */
static void on_abort(ms_http_request_t *req, void *data)
{
    (void)data;
    ms_admin_reply_t *r = req->user;
    if (r)
        r->req = NULL;
}

/* ---- lifecycle ----------------------------------------------------------------------------- */

int ms_admin_start(uv_loop_t *loop, const char *host, int port, const char *token,
                   const ms_admin_callbacks_t *cb, void *data, ms_admin_t **out, char **err)
{
    *out = NULL;
    if (err)
        *err = NULL;
    if (!host || !*host)
        host = "127.0.0.1";
    if (token && !*token)
        token = NULL; /* an empty token would accept "Bearer " from anyone */
    if (!token && !host_is_loopback(host)) {
        if (err) {
            ms_buf_t b = {0};
            ms_buf_appendf(&b,
                           "admin listener on %s:%d would be reachable beyond loopback without "
                           "authentication: set admin.token (a bearer token) or listen on "
                           "127.0.0.1",
                           host, port);
            *err = b.data;
        }
        return -1;
    }
    /* The http module takes numeric addresses only. */
    const char *bind_host = strcasecmp(host, "localhost") == 0 ? "127.0.0.1" : host;
    ms_admin_t *a = ms_calloc(1, sizeof *a);
    if (cb)
        a->cb = *cb;
    a->data = data;
    if (token) {
        a->token = ms_strdup(token);
        a->token_len = strlen(token);
    }
    a->host = ms_strdup(host);
    a->loopback = host_is_loopback(host);
    a->wildcard = !strcmp(host, "0.0.0.0") || !strcmp(host, "::");
    ms_http_server_config_t cfg = {
        .limits = {.max_header_bytes = ADMIN_MAX_HEADER_BYTES,
                   .max_body_bytes = ADMIN_MAX_BODY_BYTES,
                   .header_timeout_s = ADMIN_HEADER_TIMEOUT_S,
                   .keep_alive_timeout_s = ADMIN_KEEP_ALIVE_TIMEOUT},
        .on_request = on_request,
        .on_abort = on_abort,
        .data = a,
    };
    int r = ms_http_server_listen_tcp(loop, bind_host, port, &cfg, &a->srv);
    if (r != 0) {
        if (err) {
            ms_buf_t b = {0};
            ms_buf_appendf(&b, "admin listener cannot listen on %s:%d: %s", host, port,
                           uv_strerror(r));
            *err = b.data;
        }
        free(a->token);
        free(a->host);
        free(a);
        return -1;
    }
    snprintf(a->port, sizeof a->port, "%d", ms_http_server_port(a->srv));
    *out = a;
    return 0;
}

int ms_admin_port(ms_admin_t *a)
{
    return a && a->srv ? ms_http_server_port(a->srv) : -1;
}

void ms_admin_close(ms_admin_t *a)
{
    if (!a)
        return;
    ms_http_server_close(a->srv);
    if (a->token) {
        /* Wipe the secret before the memory is reused. */
        volatile char *p = a->token;
        for (size_t i = 0; i < a->token_len; i++)
            p[i] = 0;
        free(a->token);
    }
    for (size_t i = 0; i < a->n_allowed; i++)
        free(a->allowed[i]);
    free(a->allowed);
    free(a->host);
    free(a);
}

void ms_admin_allow_hosts(ms_admin_t *a, char *const *hosts, size_t n)
{
    a->allowed = ms_realloc(a->allowed, (a->n_allowed + n + 1) * sizeof *a->allowed);
    for (size_t i = 0; i < n; i++) {
        a->any_host |= strcmp(hosts[i], "*") == 0;
        a->allowed[a->n_allowed++] = ms_strdup(hosts[i]);
    }
}
