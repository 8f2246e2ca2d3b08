/*
 * config: loads a Ray Serve config file (ServeConfigV2 YAML) with libyaml into plain structs,
 * applies Ray Serve's defaults and validation rules, and reports every problem as
 * `file:line:col: message` (unknown keys get a did-you-mean). Runtime code never sees YAML nodes.
 *
 * Deployment entries in the file are *overrides* of the options declared in code: each field has
 * a bit in `set` telling whether the file gave it, so the merge with code options (done by the
 * caller) can follow Ray Serve: file beats code beats default.
 */
#ifndef MS_CONFIG_H
#define MS_CONFIG_H

#include <jansson.h>
#include <stddef.h>

/* Ray Serve defaults (../shared/reference/ray-serve-semantics.md §5). */
#define MS_DEFAULT_NUM_REPLICAS                  1
#define MS_DEFAULT_MAX_ONGOING_REQUESTS          5
#define MS_DEFAULT_MAX_QUEUED_REQUESTS           (-1)
#define MS_DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S 2.0
#define MS_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S   20.0
#define MS_DEFAULT_HEALTH_CHECK_PERIOD_S         10.0
#define MS_DEFAULT_HEALTH_CHECK_TIMEOUT_S        30.0
/* moonserve's own http_options additions. */
#define MS_DEFAULT_KEEP_ALIVE_TIMEOUT_S 90.0
#define MS_DEFAULT_MAX_HEADER_BYTES     (32 * 1024)
#define MS_DEFAULT_MAX_BODY_BYTES       (64 * 1024 * 1024)
#define MS_DEFAULT_HEADER_TIMEOUT_S     10.0

/* Bits of ms_deployment_config.set */
enum {
    MS_SET_NUM_REPLICAS = 1 << 0,
    MS_SET_MAX_ONGOING_REQUESTS = 1 << 1,
    MS_SET_MAX_QUEUED_REQUESTS = 1 << 2,
    MS_SET_USER_CONFIG = 1 << 3,
    MS_SET_GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 1 << 4,
    MS_SET_GRACEFUL_SHUTDOWN_TIMEOUT_S = 1 << 5,
    MS_SET_HEALTH_CHECK_PERIOD_S = 1 << 6,
    MS_SET_HEALTH_CHECK_TIMEOUT_S = 1 << 7,
};

/* Where a value sat in the file, for errors raised after loading (e.g. a deployment name that
 * the application's code does not declare). */
typedef struct ms_config_mark {
    int line; /* 1-based */
    int col;  /* 1-based */
} ms_config_mark_t;

typedef struct ms_deployment_config {
    char *name;
    unsigned set; /* MS_SET_* bits for fields given in the file */
    int num_replicas;
    int max_ongoing_requests;
    int max_queued_requests; /* -1 = unlimited */
    json_t *user_config;     /* owned; NULL when not set */
    double graceful_shutdown_wait_loop_s;
    double graceful_shutdown_timeout_s;
    double health_check_period_s;
    double health_check_timeout_s;
    ms_config_mark_t mark; /* position of this entry */
} ms_deployment_config_t;

typedef struct ms_app_config {
    char *name;         /* default "default" */
    char *route_prefix; /* default "/"; NULL when the file says null (not exposed over HTTP) */
    char *import_path;  /* as written */
    char *import_file;  /* resolved absolute path of the Lua file */
    char *import_attr;  /* attribute after ':' */
    json_t *args;       /* owned; {} when not set */
    ms_deployment_config_t *deployments;
    size_t n_deployments;
    ms_config_mark_t mark;             /* position of this application entry */
    ms_config_mark_t import_path_mark; /* position of the import_path value */
} ms_app_config_t;

typedef struct ms_http_options {
    char *host;                  /* default "0.0.0.0" as Ray Serve's schema */
    int port;                    /* default 8000 */
    double request_timeout_s;    /* 0 = no timeout (Ray Serve's None) */
    double keep_alive_timeout_s; /* default 90 */
    size_t max_header_bytes;     /* ours: over it -> 431 */
    size_t max_body_bytes;       /* ours: over it -> 413 */
    double header_timeout_s;     /* ours: slowloris cut-off */
} ms_http_options_t;

typedef struct ms_config {
    char *path; /* as given */
    char *dir;  /* absolute folder of the file; import paths resolve against it */
    ms_http_options_t http;
    char *log_level; /* logging_config.log_level, default "INFO" */
    ms_app_config_t *apps;
    size_t n_apps;
} ms_config_t;

/* A list of formatted error messages, each `file:line:col: message`. */
typedef struct ms_config_errors {
    char **items;
    size_t n;
} ms_config_errors_t;

/* Parses and validates `path`. On success returns 0 and sets *out (free with ms_config_free).
 * On failure returns -1, *out is NULL, and `errs` holds every error found (free with
 * ms_config_errors_free). Also reports unreadable files and YAML syntax errors the same way. */
int ms_config_load(const char *path, ms_config_t **out, ms_config_errors_t *errs);
/* Same as ms_config_load but from a string; `name` is used in messages and `dir` for imports. */
int ms_config_load_string(const char *text, size_t len, const char *name, const char *dir,
                          ms_config_t **out, ms_config_errors_t *errs);
void ms_config_free(ms_config_t *cfg);

/* Appends `file:line:col: message` to errs (printf-style message). */
void ms_config_errors_add(ms_config_errors_t *errs, const char *file, ms_config_mark_t mark,
                          const char *fmt, ...) __attribute__((format(printf, 4, 5)));
void ms_config_errors_free(ms_config_errors_t *errs);

/* Finds the file override for a deployment by name, or NULL. */
const ms_deployment_config_t *ms_config_find_deployment(const ms_app_config_t *app,
                                                        const char *name);

#endif
