/*
 * cli: admin-API client subcommands (see cli.h).
 *
 * The HTTP client here is deliberately a small blocking one (getaddrinfo, a non-blocking connect
 * and poll() against one deadline, `Connection: close`, llhttp for the response) rather than
 * ms_http_client on a private loop: a CLI does one request and exits, it must resolve host
 * names like `localhost`, and it should say exactly why a connection failed (refused, timed
 * out, no such host), which needs the errno that the event-loop client does not surface.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <llhttp.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/core.h"

#define DEFAULT_ADDRESS   "http://127.0.0.1:8265"
#define DEFAULT_TIMEOUT_S 30.0
#define APPS_PATH         "/api/serve/applications/"

static const char usage_text[] =
    "admin API commands (talk to a running `moonserve run`):\n"
    "  status                        summary of applications, deployments and replicas\n"
    "  deploy CONFIG.yaml            apply CONFIG as the goal state (declarative deploy)\n"
    "  scale APP DEPLOYMENT N        set a deployment's replica count (external scaling)\n"
    "  reload                        hot-reload every policy/router script\n"
    "  shutdown                      shut down every application\n"
    "options:\n"
    "  -a, --address URL             admin API (default $MOONSERVE_ADMIN_ADDRESS or\n"
    "                                " DEFAULT_ADDRESS ")\n"
    "  --token TOKEN                 bearer token (default $MOONSERVE_ADMIN_TOKEN)\n"
    "  --timeout SECONDS             request timeout (default 30)\n"
    "exit codes: 0 ok, 1 the server rejected the request, 2 usage error,\n"
    "  3 admin API unreachable or answered garbage, 4 token missing or wrong\n";

const char *ms_cli_usage(void)
{
    return usage_text;
}

int ms_cli_is_command(const char *c)
{
    return c && (strcmp(c, "status") == 0 || strcmp(c, "deploy") == 0 || strcmp(c, "scale") == 0 ||
                 strcmp(c, "reload") == 0 || strcmp(c, "shutdown") == 0);
}

typedef struct cli {
    FILE *out, *err;
    const char *command;
    const char *address; /* as given, for messages */
    const char *token;   /* NULL: none */
    double timeout_s;
    char host[256];
    char port[8];
    char base[512]; /* path prefix of the address, without a trailing slash */
    const char *args[4];
    int n_args;
} cli_t;

/* ---- arguments ----------------------------------------------------------------------------- */

static int usage_error(cli_t *c, const char *fmt, const char *arg)
{
    fprintf(c->err, "moonserve %s: ", c->command);
    fprintf(c->err, fmt, arg);
    fprintf(c->err, "\n\n%s", usage_text);
    return MS_CLI_EXIT_USAGE;
}

/* Splits http://HOST[:PORT][/PREFIX] (scheme optional, IPv6 in brackets). */
static int parse_address(cli_t *c, const char *addr)
{
    const char *p = addr;
    if (strncasecmp(p, "http://", 7) == 0)
        p += 7;
    else if (strncasecmp(p, "https://", 8) == 0)
        return usage_error(c, "https is not supported (address %s); use http://", addr);
    else if (strstr(p, "://"))
        return usage_error(c, "unsupported scheme in address %s", addr);
    const char *host = p, *host_end, *port = NULL;
    if (*p == '[') {
        host = p + 1;
        host_end = strchr(host, ']');
        if (!host_end)
            return usage_error(c, "bad address %s", addr);
        p = host_end + 1;
    } else {
        p += strcspn(p, ":/");
        host_end = p;
    }
    if (*p == ':')
        port = ++p;
    p += strcspn(p, "/");
    size_t host_len = (size_t)(host_end - host);
    size_t port_len = port ? (size_t)(p - port) : 0;
    if (host_len == 0 || host_len >= sizeof c->host || (port && port_len == 0) ||
        port_len >= sizeof c->port)
        return usage_error(c, "bad address %s (expected http://HOST:PORT)", addr);
    memcpy(c->host, host, host_len);
    c->host[host_len] = '\0';
    if (port) {
        memcpy(c->port, port, port_len);
        c->port[port_len] = '\0';
        for (size_t i = 0; i < port_len; i++)
            if (c->port[i] < '0' || c->port[i] > '9')
                return usage_error(c, "bad port in address %s", addr);
    } else {
        strcpy(c->port, "80"); /* an explicit http:// URL without a port means port 80 */
    }
    size_t base_len = strlen(p);
    while (base_len > 0 && p[base_len - 1] == '/')
        base_len--;
    if (base_len >= sizeof c->base)
        return usage_error(c, "address too long: %s", addr);
    memcpy(c->base, p, base_len);
    c->base[base_len] = '\0';
    return 0;
}

/* Takes "--name VALUE" or "--name=VALUE" at argv[*i]. Returns 1 when matched (value in *val,
 * NULL when missing), 0 when argv[*i] is not this option. */
static int take_option(int argc, char **argv, int *i, const char *name, const char *alias,
                       const char **val)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) == 0 && a[n] == '=') {
        *val = a + n + 1;
        return 1;
    }
    if (strcmp(a, name) == 0 || (alias && strcmp(a, alias) == 0)) {
        *val = *i + 1 < argc ? argv[++*i] : NULL;
        return 1;
    }
    return 0;
}

static int parse_args(cli_t *c, int argc, char **argv)
{
    const char *address = getenv("MOONSERVE_ADMIN_ADDRESS");
    const char *token = getenv("MOONSERVE_ADMIN_TOKEN");
    const char *timeout = NULL;
    int only_positional = 0;
    for (int i = 0; i < argc; i++) {
        const char *v = NULL;
        if (!only_positional && strcmp(argv[i], "--") == 0) {
            only_positional = 1;
        } else if (!only_positional && take_option(argc, argv, &i, "--address", "-a", &v)) {
            if (!v)
                return usage_error(c, "%s needs a URL", "--address");
            address = v;
        } else if (!only_positional && take_option(argc, argv, &i, "--token", NULL, &v)) {
            if (!v)
                return usage_error(c, "%s needs a value", "--token");
            token = v;
        } else if (!only_positional && take_option(argc, argv, &i, "--timeout", NULL, &v)) {
            if (!v)
                return usage_error(c, "%s needs a number of seconds", "--timeout");
            timeout = v;
        } else if (!only_positional && argv[i][0] == '-' && argv[i][1] != '\0') {
            return usage_error(c, "unknown option %s", argv[i]);
        } else {
            if (c->n_args == (int)(sizeof c->args / sizeof c->args[0]))
                return usage_error(c, "too many arguments (%s)", argv[i]);
            c->args[c->n_args++] = argv[i];
        }
    }
    c->address = address && *address ? address : DEFAULT_ADDRESS;
    c->token = token && *token ? token : NULL;
    if (c->token && strpbrk(c->token, "\r\n"))
        return usage_error(c, "%s must not contain line breaks", "the token");
    c->timeout_s = DEFAULT_TIMEOUT_S;
    if (timeout) {
        char *end;
        c->timeout_s = strtod(timeout, &end);
        if (*end || !(c->timeout_s > 0))
            return usage_error(c, "bad --timeout %s (seconds, > 0)", timeout);
    }
    return parse_address(c, c->address);
}

/* ---- HTTP ---------------------------------------------------------------------------------- */

typedef struct response {
    int status;
    ms_buf_t body;
    int complete;
} response_t;

static int on_resp_body(llhttp_t *p, const char *at, size_t n)
{
    ms_buf_append(&((response_t *)p->data)->body, at, n);
    return 0;
}

static int on_resp_complete(llhttp_t *p)
{
    ((response_t *)p->data)->complete = 1;
    return HPE_PAUSED; /* one response is all we asked for */
}

static int remaining_ms(uint64_t deadline)
{
    uint64_t now = ms_now_ms();
    return now >= deadline ? 0 : (int)(deadline - now);
}

/* Waits for `events` on fd until the deadline: 0 ready, -1 timeout or error (errno set). */
static int wait_fd(int fd, short events, uint64_t deadline)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        int ms = remaining_ms(deadline);
        if (ms == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        int r = poll(&p, 1, ms);
        if (r > 0)
            return 0;
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (errno != EINTR)
            return -1;
    }
}

/* Connects to the first address of host:port that accepts. Returns the fd or -1 with a reason
 * in why. */
static int connect_to(cli_t *c, uint64_t deadline, char *why, size_t cap)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int gai = getaddrinfo(c->host, c->port, &hints, &res);
    if (gai != 0) {
        snprintf(why, cap, "cannot resolve %s: %s", c->host, gai_strerror(gai));
        return -1;
    }
    int fd = -1, last_errno = ECONNREFUSED;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
        if (r != 0 && errno == EINPROGRESS) {
            if (wait_fd(fd, POLLOUT, deadline) == 0) {
                int soerr = 0;
                socklen_t len = sizeof soerr;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
                r = soerr ? -1 : 0;
                errno = soerr;
            } else {
                r = -1;
            }
        }
        if (r != 0) {
            last_errno = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        ms_copy_str(why, cap, strerror(last_errno));
    return fd;
}

static int send_all(int fd, const char *p, size_t n, uint64_t deadline)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wait_fd(fd, POLLOUT, deadline) != 0)
                return -1;
        } else if (w < 0 && errno != EINTR) {
            return -1;
        }
    }
    return 0;
}

/* One request. Returns MS_CLI_EXIT_OK with *resp filled (any status), or
 * MS_CLI_EXIT_UNREACHABLE after printing why. */
static int http_call(cli_t *c, const char *method, const char *path, const char *content_type,
                     const char *body, size_t body_len, response_t *resp)
{
    uint64_t deadline = ms_now_ms() + (uint64_t)(c->timeout_s * 1000.0);
    char why[512];
    memset(resp, 0, sizeof *resp);
    int fd = connect_to(c, deadline, why, sizeof why);
    if (fd < 0) {
        fprintf(c->err,
                "moonserve: cannot reach the admin API at %s: %s (is `moonserve run` "
                "running, and is --address right?)\n",
                c->address, why);
        return MS_CLI_EXIT_UNREACHABLE;
    }
    ms_buf_t req = {0};
    int ipv6 = strchr(c->host, ':') != NULL;
    ms_buf_appendf(&req, "%s %s%s HTTP/1.1\r\nHost: %s%s%s:%s\r\n", method, c->base, path,
                   ipv6 ? "[" : "", c->host, ipv6 ? "]" : "", c->port);
    ms_buf_appendf(&req,
                   "User-Agent: moonserve-cli/%s\r\nAccept: application/json\r\n"
                   "Connection: close\r\n",
                   MS_VERSION);
    if (c->token)
        ms_buf_appendf(&req, "Authorization: Bearer %s\r\n", c->token);
    if (content_type)
        ms_buf_appendf(&req, "Content-Type: %s\r\n", content_type);
    if (body || strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0)
        ms_buf_appendf(&req, "Content-Length: %zu\r\n", body_len);
    ms_buf_append(&req, "\r\n", 2);
    int rc = MS_CLI_EXIT_OK;
    if (send_all(fd, req.data, req.len, deadline) != 0 ||
        (body_len && send_all(fd, body, body_len, deadline) != 0)) {
        snprintf(why, sizeof why, "sending the request failed: %s", strerror(errno));
        rc = MS_CLI_EXIT_UNREACHABLE;
    }
    ms_buf_free(&req);

    llhttp_settings_t settings;
    llhttp_settings_init(&settings);
    settings.on_body = on_resp_body;
    settings.on_message_complete = on_resp_complete;
    llhttp_t parser;
    llhttp_init(&parser, HTTP_RESPONSE, &settings);
    parser.data = resp;
    char buf[16384];
    while (rc == MS_CLI_EXIT_OK && !resp->complete) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n > 0) {
            llhttp_errno_t e = llhttp_execute(&parser, buf, (size_t)n);
            if (e != HPE_OK && e != HPE_PAUSED) {
                snprintf(why, sizeof why, "malformed HTTP response (%s)", llhttp_errno_name(e));
                rc = MS_CLI_EXIT_UNREACHABLE;
            }
        } else if (n == 0) {
            /* EOF completes a close-delimited body; anything else is a truncated answer. */
            if (llhttp_finish(&parser) != HPE_OK || !resp->complete) {
                snprintf(why, sizeof why, "the connection closed before a complete response");
                rc = MS_CLI_EXIT_UNREACHABLE;
            }
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (wait_fd(fd, POLLIN, deadline) != 0) {
                snprintf(why, sizeof why, "no response within %g s", c->timeout_s);
                rc = MS_CLI_EXIT_UNREACHABLE;
            }
        } else if (errno != EINTR) {
            snprintf(why, sizeof why, "reading the response failed: %s", strerror(errno));
            rc = MS_CLI_EXIT_UNREACHABLE;
        }
    }
    close(fd);
    resp->status = parser.status_code;
    if (rc != MS_CLI_EXIT_OK) {
        fprintf(c->err, "moonserve: cannot reach the admin API at %s: %s\n", c->address, why);
        ms_buf_free(&resp->body);
    }
    return rc;
}

/* Parses a JSON body; NULL when empty or not JSON. */
static json_t *body_json(const response_t *r)
{
    if (r->body.len == 0)
        return NULL;
    return json_loadb(r->body.data, r->body.len, 0, NULL);
}

/* The server's "error" text, or the raw body, or the status text. Caller frees. */
static char *error_text(const response_t *r)
{
    json_t *doc = body_json(r);
    const char *e = json_string_value(json_object_get(doc, "error"));
    char *out;
    if (e)
        out = ms_strdup(e);
    else if (r->body.len)
        out = ms_strndup(r->body.data, r->body.len > 500 ? 500 : r->body.len);
    else
        out = ms_strdup("(no details)");
    json_decref(doc);
    /* Keep it one line. */
    for (char *p = out; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    return out;
}

/* An invalid deploy lists every error (`file:line:col: message`) under "errors". */
static void print_error_list(cli_t *c, const response_t *r)
{
    json_t *doc = body_json(r);
    size_t i;
    json_t *item;
    json_array_foreach(json_object_get(doc, "errors"), i, item)
    {
        if (json_is_string(item))
            fprintf(c->err, "  %s\n", json_string_value(item));
    }
    json_decref(doc);
}

/* Maps a non-2xx answer to a message and an exit code. */
static int report_failure(cli_t *c, const response_t *r)
{
    char *e = error_text(r);
    int rc;
    if (r->status == 403) {
        /* Not the token: the listener refused the Host or Origin (admin.allowed_hosts). */
        fprintf(c->err, "moonserve: the admin API at %s refused the request (HTTP 403: %s)\n",
                c->address, e);
        rc = MS_CLI_EXIT_AUTH;
    } else if (r->status == 401) {
        if (c->token)
            fprintf(c->err,
                    "moonserve: the admin API at %s rejected the token (HTTP %d: %s); check "
                    "--token or MOONSERVE_ADMIN_TOKEN\n",
                    c->address, r->status, e);
        else
            fprintf(c->err,
                    "moonserve: the admin API at %s requires a token (HTTP %d: %s); pass "
                    "--token or set MOONSERVE_ADMIN_TOKEN\n",
                    c->address, r->status, e);
        rc = MS_CLI_EXIT_AUTH;
    } else {
        fprintf(c->err, "moonserve %s: failed (HTTP %d): %s\n", c->command, r->status, e);
        print_error_list(c, r);
        rc = MS_CLI_EXIT_REJECTED;
    }
    free(e);
    return rc;
}

static int is_2xx(const response_t *r)
{
    return r->status >= 200 && r->status < 300;
}

/* ---- status -------------------------------------------------------------------------------- */

/* Prints a value on one YAML-ish line; multi-line strings continue indented. */
static void print_field(FILE *out, int indent, const char *key, json_t *v)
{
    fprintf(out, "%*s%s: ", indent, "", key);
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        if (!*s) {
            fputs("''\n", out);
            return;
        }
        for (; *s; s++) {
            fputc(*s, out);
            if (*s == '\n' && s[1])
                fprintf(out, "%*s", indent + 2, "");
        }
        fputc('\n', out);
    } else if (json_is_null(v) || !v) {
        fputs("null\n", out);
    } else {
        char *t = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
        fprintf(out, "%s\n", t ? t : "?");
        free(t);
    }
}

/* A policy/router script description: {path, version, sha256, kind, ...}. */
static void print_script(FILE *out, int indent, const char *label, json_t *s)
{
    if (!json_is_object(s))
        return;
    json_t *version = json_object_get(s, "version");
    json_t *path = json_object_get(s, "path");
    if (!version && !path)
        return;
    const char *sha = json_string_value(json_object_get(s, "sha256"));
    fprintf(out, "%*s%s: %s", indent, "", label,
            json_is_string(path) ? json_string_value(path) : "(built-in)");
    if (json_is_integer(version))
        fprintf(out, " v%lld", (long long)json_integer_value(version));
    if (sha)
        fprintf(out, " (sha256 %.12s)", sha);
    fputc('\n', out);
}

/* Ray's `serve status` condenses the replica list into counts per state. */
static void print_replica_states(FILE *out, int indent, json_t *replicas)
{
    fprintf(out, "%*sreplica_states:", indent, "");
    if (!json_is_array(replicas) || json_array_size(replicas) == 0) {
        fputs(" {}\n", out);
        return;
    }
    fputc('\n', out);
    json_t *counts = json_object();
    size_t i;
    json_t *r;
    json_array_foreach(replicas, i, r)
    {
        const char *st = json_string_value(json_object_get(r, "state"));
        if (!st)
            st = "UNKNOWN";
        json_t *n = json_object_get(counts, st);
        json_object_set_new(counts, st, json_integer(n ? json_integer_value(n) + 1 : 1));
    }
    const char *k;
    json_t *v;
    json_object_foreach(counts, k, v)
    {
        fprintf(out, "%*s%s: %lld\n", indent + 2, "", k, (long long)json_integer_value(v));
    }
    json_decref(counts);
}

static void print_deployment(FILE *out, const char *name, json_t *d)
{
    fprintf(out, "      %s:\n", name);
    print_field(out, 8, "status", json_object_get(d, "status"));
    if (json_object_get(d, "status_trigger"))
        print_field(out, 8, "status_trigger", json_object_get(d, "status_trigger"));
    if (json_object_get(d, "target_num_replicas"))
        print_field(out, 8, "target_num_replicas", json_object_get(d, "target_num_replicas"));
    print_replica_states(out, 8, json_object_get(d, "replicas"));
    print_field(out, 8, "message", json_object_get(d, "message"));
    json_t *as = json_object_get(d, "autoscaling");
    print_script(out, 8, "autoscaling_policy", json_object_get(as, "policy"));
    print_script(out, 8, "request_router", json_object_get(d, "router"));
}

static void print_status(FILE *out, json_t *doc)
{
    json_t *apps = json_object_get(doc, "applications");
    if (!json_is_object(apps) || json_object_size(apps) == 0) {
        fputs("applications: {}\n(no applications are running)\n", out);
        return;
    }
    fputs("applications:\n", out);
    const char *name;
    json_t *app;
    json_object_foreach(apps, name, app)
    {
        fprintf(out, "  %s:\n", name);
        print_field(out, 4, "status", json_object_get(app, "status"));
        print_field(out, 4, "route_prefix", json_object_get(app, "route_prefix"));
        print_field(out, 4, "message", json_object_get(app, "message"));
        if (json_is_true(json_object_get(app, "external_scaler_enabled")))
            fputs("    external_scaler_enabled: true\n", out);
        /* Application-level scripts, when the engine reports them. */
        print_script(out, 4, "autoscaling_policy", json_object_get(app, "autoscaling_policy"));
        print_script(out, 4, "external_scaler_hook", json_object_get(app, "external_scaler_hook"));
        json_t *deps = json_object_get(app, "deployments");
        if (!json_is_object(deps) || json_object_size(deps) == 0) {
            fputs("    deployments: {}\n", out);
            continue;
        }
        fputs("    deployments:\n", out);
        const char *dname;
        json_t *d;
        json_object_foreach(deps, dname, d)
        {
            print_deployment(out, dname, d);
        }
    }
}

static int cmd_status(cli_t *c)
{
    if (c->n_args != 0)
        return usage_error(c, "takes no arguments (got %s)", c->args[0]);
    response_t r;
    int rc = http_call(c, "GET", APPS_PATH, NULL, NULL, 0, &r);
    if (rc != MS_CLI_EXIT_OK)
        return rc;
    if (!is_2xx(&r)) {
        rc = report_failure(c, &r);
    } else {
        json_t *doc = body_json(&r);
        if (!json_is_object(doc)) {
            fprintf(c->err,
                    "moonserve: the admin API at %s answered something other than a "
                    "status document\n",
                    c->address);
            rc = MS_CLI_EXIT_UNREACHABLE;
        } else {
            print_status(c->out, doc);
        }
        json_decref(doc);
    }
    ms_buf_free(&r.body);
    return rc;
}

/* ---- deploy, scale, reload, shutdown ------------------------------------------------------- */

static int read_file(const char *path, ms_buf_t *out, char *why, size_t cap)
{
    if (ms_read_file(path, out) == 0)
        return 0;
    ms_copy_str(why, cap, strerror(errno));
    return -1;
}

static int cmd_deploy(cli_t *c)
{
    if (c->n_args != 1)
        return usage_error(c, "%s", "expects one argument: CONFIG.yaml");
    const char *path = c->args[0];
    ms_buf_t text = {0};
    char why[256];
    if (read_file(path, &text, why, sizeof why) != 0) {
        fprintf(c->err, "moonserve deploy: cannot read %s: %s\n", path, why);
        ms_buf_free(&text);
        return MS_CLI_EXIT_USAGE;
    }
    if (text.len == 0) {
        fprintf(c->err, "moonserve deploy: %s is empty\n", path);
        ms_buf_free(&text);
        return MS_CLI_EXIT_USAGE;
    }
    size_t plen = strlen(path);
    int is_json = plen > 5 && strcasecmp(path + plen - 5, ".json") == 0;
    response_t r;
    int rc = http_call(c, "PUT", APPS_PATH, is_json ? "application/json" : "application/yaml",
                       text.data, text.len, &r);
    ms_buf_free(&text);
    if (rc != MS_CLI_EXIT_OK)
        return rc;
    if (is_2xx(&r))
        fprintf(c->out, "Sent deploy request successfully.\n"
                        " * Use `moonserve status` to check applications' statuses.\n");
    else
        rc = report_failure(c, &r);
    ms_buf_free(&r.body);
    return rc;
}

/* Percent-encodes a path segment so any application or deployment name survives the URL. */
static void append_segment(ms_buf_t *b, const char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
            ch == '-' || ch == '_' || ch == '.' || ch == '~')
            ms_buf_append(b, s, 1);
        else
            ms_buf_appendf(b, "%%%02X", ch);
    }
}

static int cmd_scale(cli_t *c)
{
    if (c->n_args != 3)
        return usage_error(c, "%s", "expects three arguments: APP DEPLOYMENT N");
    const char *app = c->args[0], *dep = c->args[1], *n = c->args[2];
    if (!*app || !*dep)
        return usage_error(c, "%s", "APP and DEPLOYMENT must not be empty");
    char *end;
    errno = 0;
    long long target = strtoll(n, &end, 10);
    if (!*n || *end || errno || target < 0 || n[0] == '+' || n[0] == ' ')
        return usage_error(c, "N must be an integer >= 0 (got %s)", n);
    ms_buf_t path = {0};
    ms_buf_append_str(&path, "/api/v1/applications/");
    append_segment(&path, app);
    ms_buf_append_str(&path, "/deployments/");
    append_segment(&path, dep);
    ms_buf_append_str(&path, "/scale");
    char body[64];
    int blen = snprintf(body, sizeof body, "{\"target_num_replicas\": %lld}", target);
    response_t r;
    int rc = http_call(c, "POST", path.data, "application/json", body, (size_t)blen, &r);
    ms_buf_free(&path);
    if (rc != MS_CLI_EXIT_OK)
        return rc;
    if (is_2xx(&r)) {
        json_t *doc = body_json(&r);
        const char *m = json_string_value(json_object_get(doc, "message"));
        fprintf(c->out, "%s/%s: target_num_replicas %lld requested%s%s\n", app, dep, target,
                m ? ": " : "", m ? m : "");
        json_decref(doc);
    } else {
        rc = report_failure(c, &r);
    }
    ms_buf_free(&r.body);
    return rc;
}

/* One line per script: "ok   policy path v2 (sha256 ...)" or "FAIL ... : error". */
static void print_reload_scripts(FILE *out, json_t *doc)
{
    json_t *scripts = json_object_get(doc, "scripts");
    if (!json_is_array(scripts))
        return;
    size_t i;
    json_t *s;
    json_array_foreach(scripts, i, s)
    {
        int ok = json_is_true(json_object_get(s, "ok"));
        const char *kind = json_string_value(json_object_get(s, "kind"));
        const char *path = json_string_value(json_object_get(s, "path"));
        const char *sha = json_string_value(json_object_get(s, "sha256"));
        const char *err = json_string_value(json_object_get(s, "error"));
        json_t *version = json_object_get(s, "version");
        fprintf(out, "%-4s %s%s%s", ok ? "ok" : "FAIL", kind ? kind : "", kind ? " " : "",
                path ? path : "(unnamed script)");
        if (json_is_integer(version))
            fprintf(out, " v%lld", (long long)json_integer_value(version));
        if (sha)
            fprintf(out, " (sha256 %.12s)", sha);
        if (err && *err)
            fprintf(out, ": %s", err);
        fputc('\n', out);
    }
}

static int cmd_reload(cli_t *c)
{
    if (c->n_args != 0)
        return usage_error(c, "takes no arguments (got %s)", c->args[0]);
    response_t r;
    int rc = http_call(c, "POST", "/api/v1/reload", NULL, NULL, 0, &r);
    if (rc != MS_CLI_EXIT_OK)
        return rc;
    json_t *doc = body_json(&r);
    /* Per-script results are printed on failure too: they say which script broke and where. */
    print_reload_scripts(is_2xx(&r) ? c->out : c->err, doc);
    json_decref(doc);
    if (is_2xx(&r))
        fprintf(c->out, "Reloaded.\n");
    else
        rc = report_failure(c, &r);
    ms_buf_free(&r.body);
    return rc;
}

static int cmd_shutdown(cli_t *c)
{
    if (c->n_args != 0)
        return usage_error(c, "takes no arguments (got %s)", c->args[0]);
    response_t r;
    int rc = http_call(c, "DELETE", APPS_PATH, NULL, NULL, 0, &r);
    if (rc != MS_CLI_EXIT_OK)
        return rc;
    if (is_2xx(&r))
        fprintf(c->out, "Sent shutdown request; applications will be shut down shortly.\n");
    else
        rc = report_failure(c, &r);
    ms_buf_free(&r.body);
    return rc;
}

/* ---- entry points -------------------------------------------------------------------------- */

int ms_cli_run(const char *command, int argc, char **argv, FILE *out, FILE *err)
{
    cli_t c = {.out = out, .err = err, .command = command};
    if (!ms_cli_is_command(command)) {
        fprintf(err, "moonserve: unknown admin command %s\n\n%s", command ? command : "(none)",
                usage_text);
        return MS_CLI_EXIT_USAGE;
    }
    for (int i = 0; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(usage_text, out);
            return MS_CLI_EXIT_OK;
        }
    int rc = parse_args(&c, argc, argv);
    if (rc != 0)
        return rc;
    if (strcmp(command, "status") == 0)
        rc = cmd_status(&c);
    else if (strcmp(command, "deploy") == 0)
        rc = cmd_deploy(&c);
    else if (strcmp(command, "scale") == 0)
        rc = cmd_scale(&c);
    else if (strcmp(command, "reload") == 0)
        rc = cmd_reload(&c);
    else
        rc = cmd_shutdown(&c);
    fflush(out);
    fflush(err);
    return rc;
}

int ms_cli_main(const char *command, int argc, char **argv)
{
    return ms_cli_run(command, argc, argv, stdout, stderr);
}
