/*
 * admin: the admin REST listener (default 127.0.0.1:8265). It authenticates (a bearer token,
 * compared in constant time, required whenever the listener is not on loopback), parses and
 * validates requests, and hands them to the controller through callbacks; every answer is JSON
 * except /metrics and the web dashboard's static files (dashboard.c).
 * It also refuses what a web page could make a browser send: a Host that is not the listener's
 * (DNS rebinding), a foreign Origin, and state-changing requests whose Content-Type a form or a
 * plain fetch can send without a CORS preflight. It owns no serving state of its own.
 */
#ifndef MS_ADMIN_H
#define MS_ADMIN_H

#include <jansson.h>
#include <uv.h>

typedef struct ms_admin ms_admin_t;

/* A response owed later: the reload callback answers through it once the work is done. */
typedef struct ms_admin_reply ms_admin_reply_t;
/* Answers the request (status, body: a new reference or NULL) and frees the reply. If the client
 * went away meanwhile the answer is dropped. */
void ms_admin_reply_send(ms_admin_reply_t *r, int status, json_t *body);

/* GET /api/v1/history, validated: which histories (bits MS_ADMIN_HISTORY_*), the filters, and
 * how many of the newest entries of each. */
#define MS_ADMIN_HISTORY_AUTOSCALING 1
#define MS_ADMIN_HISTORY_RELOADS     2
#define MS_ADMIN_HISTORY_LIFECYCLE   4
#define MS_ADMIN_HISTORY_MAX_LIMIT   1000
typedef struct ms_admin_history_query {
    unsigned kinds;
    const char *application; /* NULL: any */
    const char *deployment;  /* NULL: any */
    int has_since;
    double since; /* unix seconds: entries strictly after */
    int limit;    /* 1..MS_ADMIN_HISTORY_MAX_LIMIT */
} ms_admin_history_query_t;

/* Callbacks into the controller. Each returns an HTTP status and sets *body (a new reference,
 * or NULL for an empty body). */
typedef struct ms_admin_callbacks {
    /* GET /api/serve/applications/ */
    int (*status)(void *data, json_t **body);
    /* PUT /api/serve/applications/ with a config (JSON, or YAML by Content-Type) */
    int (*deploy)(void *data, const char *text, size_t len, int is_yaml, json_t **body);
    /* DELETE /api/serve/applications/ */
    int (*shutdown)(void *data, json_t **body);
    /* POST /api/v1/applications/{app}/deployments/{deployment}/scale, target already
     * validated as an integer >= 0 */
    int (*scale)(void *data, const char *app, const char *deployment, long long target,
                 json_t **body);
    /* POST /api/v1/reload: answered later through ms_admin_reply_send (prepare runs off the
     * event loop) */
    void (*reload)(void *data, ms_admin_reply_t *reply);
    /* GET /metrics: Prometheus text appended to *text (malloc'd, caller frees) */
    int (*metrics)(void *data, char **text);
    /* GET /api/v1/history */
    int (*history)(void *data, const ms_admin_history_query_t *q, json_t **body);
} ms_admin_callbacks_t;

/* Listens on host:port. Refuses (returns -1 with *err) a non-loopback host without a token.
 * A NULL callback answers 501. */
int ms_admin_start(uv_loop_t *loop, const char *host, int port, const char *token,
                   const ms_admin_callbacks_t *cb, void *data, ms_admin_t **out, char **err);
int ms_admin_port(ms_admin_t *a);
/* Host header values accepted besides the listener's own names (see admin.c's host rule):
 * HOST (any port) or HOST:PORT, compared case-insensitively; "*" accepts any Host. Copied. */
void ms_admin_allow_hosts(ms_admin_t *a, char *const *hosts, size_t n);
void ms_admin_close(ms_admin_t *a);

/* ---- the web dashboard's files (dashboard.c) ---------------------------------------------- */
struct ms_http_request;
/* Answers GET|HEAD /dashboard and /dashboard/NAME from ms_dashboard_dir(): 308 to /dashboard/,
 * the file with its type, 400 for a name refused, 404 for a missing file or unknown type. */
void ms_admin_serve_dashboard(struct ms_http_request *req);
/* A name under /dashboard/ that may be served: [A-Za-z0-9._-] segments separated by '/', none
 * empty or starting with '.', at most 128 bytes. */
int ms_dashboard_name_ok(const char *name);
/* The Content-Type for a file name by its extension, or NULL for one not served. */
const char *ms_dashboard_content_type(const char *name);

#endif
