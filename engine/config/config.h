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

/* Ray Serve's AutoscalingConfig defaults (semantics §2). */
#define MS_DEFAULT_AS_MIN_REPLICAS            1
#define MS_DEFAULT_AS_MAX_REPLICAS            1
#define MS_DEFAULT_AS_MAX_REPLICAS_AUTO       100 /* num_replicas: "auto" */
#define MS_DEFAULT_AS_TARGET_ONGOING_REQUESTS 2.0
#define MS_DEFAULT_AS_METRICS_INTERVAL_S      10.0
#define MS_DEFAULT_AS_LOOK_BACK_PERIOD_S      30.0
#define MS_DEFAULT_AS_SMOOTHING_FACTOR        1.0
#define MS_DEFAULT_AS_DOWNSCALE_DELAY_S       600.0
#define MS_DEFAULT_AS_UPSCALE_DELAY_S         30.0
/* moonserve additions */
#define MS_DEFAULT_CONTROL_LOOP_INTERVAL_S 0.1
#define MS_DEFAULT_ROUTING_STATS_PERIOD_S  10.0
#define MS_DEFAULT_ROUTING_STATS_TIMEOUT_S 30.0
#define MS_DEFAULT_ADMIN_HOST              "127.0.0.1"
#define MS_DEFAULT_ADMIN_PORT              8265
#define MS_DEFAULT_SCALE_TICK_INTERVAL_S   1.0
#define MS_DEFAULT_MAX_REPLICAS_TOTAL      4096
#define MS_MAX_REPLICAS_TOTAL_LIMIT        100000 /* the most max_replicas_total may say */

/* Where a value sat in the file, for errors raised after loading (e.g. a deployment name that
 * the application's code does not declare). */
typedef struct ms_config_mark {
    int line; /* 1-based */
    int col;  /* 1-based */
} ms_config_mark_t;

/* A Lua function or class named by `file.lua:attr` or `module.sub:attr`, resolved like
 * import_path against the config file's folder. */
typedef struct ms_config_lua_ref {
    char *path; /* as written */
    char *file; /* absolute path of the Lua file */
    char *attr;
    ms_config_mark_t mark; /* where the reference was written, for errors found on loading */
} ms_config_lua_ref_t;

/* autoscaling_config (deployment level). Optional numbers are < 0 when unset. */
typedef struct ms_autoscaling_config {
    int min_replicas;
    int initial_replicas; /* -1: start at min_replicas */
    int max_replicas;
    int max_replicas_given; /* max_replicas was written; else it is the default (1, or 100 under
                             * "auto": lets a merge apply code's "auto" to a file's config) */
    double target_ongoing_requests;
    double metrics_interval_s;
    double look_back_period_s;
    double smoothing_factor;
    double upscale_smoothing_factor;   /* < 0 unset */
    double downscale_smoothing_factor; /* < 0 unset */
    double upscaling_factor;           /* < 0 unset */
    double downscaling_factor;         /* < 0 unset */
    double downscale_delay_s;
    double downscale_to_zero_delay_s; /* < 0 unset: falls back to downscale_delay_s */
    double upscale_delay_s;
    char *aggregation_function;  /* "mean", "max" or "min" (lower-cased) */
    ms_config_lua_ref_t *policy; /* policy.policy_function; NULL = the built-in policy */
    json_t *policy_kwargs;       /* policy.policy_kwargs, owned; NULL when unset */
    int dry_run;                 /* policy.dry_run (ours): decide and record, never apply */
    char *redis_url;             /* policy.redis_url (ours): ctx.redis; NULL when unset */
    ms_config_mark_t mark;
} ms_autoscaling_config_t;

/* request_router_config */
typedef struct ms_router_config {
    ms_config_lua_ref_t *router_class; /* request_router_class; NULL = built-in */
    json_t *kwargs;                    /* request_router_kwargs, owned; NULL when unset */
    double stats_period_s;             /* request_routing_stats_period_s */
    double stats_timeout_s;            /* request_routing_stats_timeout_s */
} ms_router_config_t;

/* task_queue (ours): a deployment that consumes async tasks from Redis (docs/tasks.md). */
typedef struct ms_task_queue_config {
    char *queue_name;                    /* required: letters, digits, '_', '-', '.', ':' */
    char *broker_url;                    /* required: redis://... or unix://... */
    int max_retries;                     /* default 3: handler failures retried, then FAILURE */
    double retry_backoff_s;              /* default 1: the first retry's delay, doubling */
    double retry_backoff_max_s;          /* default 10: the longest delay */
    char *failed_task_queue_name;        /* NULL: no dead-letter stream for failures */
    char *unprocessable_task_queue_name; /* NULL: none for unknown names / bad payloads */
    double visibility_timeout_s;         /* default 30: a held task is delivered again after */
    double result_ttl_s;        /* default 86400: how long a finished task's status lives */
    long long max_queue_length; /* 0 (default): unbounded; else submits past it get 503 */
    double task_timeout_s;      /* -1 (default): none; else one attempt's time limit */
} ms_task_queue_config_t;

/* process (ours): a deployment whose replicas are a user command speaking HTTP
 * (docs/process-replicas.md). Strings owned. */
#define MS_DEFAULT_PROCESS_READY_TIMEOUT_S 60.0
/* Request bodies longer than this (or chunked) stream to a process replica as they arrive. */
#define MS_DEFAULT_PROCESS_STREAM_BODY_BYTES (1024 * 1024)
/* Ray Serve's @serve.batch defaults, for process.batch. */
#define MS_DEFAULT_MAX_BATCH_SIZE       10
#define MS_DEFAULT_BATCH_WAIT_TIMEOUT_S 0.01
typedef struct ms_process_config {
    char **argv; /* NULL-terminated; placeholders ({socket}, {port}, {replica_id}) kept */
    size_t argc;
    char **env; /* "NAME=value", NULL-terminated */
    size_t n_env;
    char *cwd;       /* absolute */
    int listen_port; /* 0: a Unix socket (MOONSERVE_SOCKET); 1: a TCP port (PORT) */
    char *ready_path;
    double ready_timeout_s;
    char *health_path; /* NULL: none */
    long long stream_body_bytes;
    /* process.batch: requests sent together as one (docs/process-replicas.md#batching) */
    int batch_max_size; /* 0: no batching */
    double batch_wait_timeout_s;
    char *batch_path;
    ms_config_mark_t mark;
} ms_process_config_t;

/* logging_config at one level (docs/logging.md). The application and deployment levels override
 * the level above field by field: `set` says which fields this one gave. */
/* logs_dir is held in place (not a pointer) so the struct copies and compares as a value: a
 * deploy tells a changed logging_config with memcmp. Unused bytes stay zero. */
#define MS_LOGS_DIR_MAX 1024
typedef struct ms_logging_config {
    unsigned set; /* MS_LOG_SET_* */
    /* Log files (docs/logging.md): their rotation (rotation_max_bytes 0 = never;
     * rotation_backup_count rotated files kept) and the folder, absolute ("" = stderr only).
     * The fields are ordered so the struct has no padding for memcmp to trip over. */
    int rotation_backup_count;
    long long rotation_max_bytes;
    char level[8];  /* DEBUG, INFO, WARNING or ERROR (Ray's names mapped to ours) */
    int json;       /* encoding: JSON (1) or TEXT (0) */
    int access_log; /* enable_access_log */
    char logs_dir[MS_LOGS_DIR_MAX];
} ms_logging_config_t;
_Static_assert(sizeof(ms_logging_config_t) == 4 + 4 + 8 + 8 + 4 + 4 + MS_LOGS_DIR_MAX,
               "ms_logging_config_t must have no padding (it is compared with memcmp)");
enum {
    MS_LOG_SET_LEVEL = 1 << 0,
    MS_LOG_SET_ENCODING = 1 << 1,
    MS_LOG_SET_ACCESS = 1 << 2,
    MS_LOG_SET_DIR = 1 << 3,
    MS_LOG_SET_MAX_BYTES = 1 << 4,
    MS_LOG_SET_BACKUPS = 1 << 5,
};
#define MS_LOG_SET_ALL 0x3fu
/* Ray's defaults (RAY_ROTATION_MAX_BYTES, RAY_ROTATION_BACKUP_COUNT). */
#define MS_DEFAULT_ROTATION_MAX_BYTES    (512LL * 1024 * 1024)
#define MS_DEFAULT_ROTATION_BACKUP_COUNT 5
/* `over`'s fields where it set them, `base`'s elsewhere. */
ms_logging_config_t ms_config_logging_merge(ms_logging_config_t base, ms_logging_config_t over);

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
    MS_SET_AUTOSCALING_CONFIG = 1 << 8,
    MS_SET_REQUEST_ROUTER_CONFIG = 1 << 9,
    MS_SET_PROCESS = 1 << 10,
};

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
    int num_replicas_auto;     /* num_replicas: "auto" */
    json_t *ray_actor_options; /* owned; NULL when not set (kept; no effect on placement yet) */
    ms_autoscaling_config_t *autoscaling; /* owned; NULL when not set */
    ms_router_config_t *router;           /* owned; NULL when not set */
    ms_process_config_t *process;         /* owned; NULL when not set */
    json_t *process_json;                 /* the same as written, to compare on redeploy */
    ms_task_queue_config_t *task_queue;   /* owned; NULL when not set (ours) */
    ms_logging_config_t logging;          /* its logging_config (fields it set) */
    ms_config_mark_t mark;                /* position of this entry */
} ms_deployment_config_t;

typedef struct ms_app_config {
    char *name;         /* default "default" */
    char *route_prefix; /* default "/"; NULL when the file says null (not exposed over HTTP) */
    char *import_path;  /* as written; NULL for a config-only application (one process
                         * deployment, its ingress) */
    char *import_file;  /* resolved absolute path of the Lua file */
    char *import_attr;  /* attribute after ':' */
    json_t *args;       /* owned; {} when not set */
    ms_deployment_config_t *deployments;
    size_t n_deployments;
    ms_config_lua_ref_t *autoscaling_policy; /* autoscaling_policy.policy_function, or NULL */
    json_t *autoscaling_policy_kwargs;       /* owned; NULL when unset */
    int autoscaling_policy_dry_run;          /* autoscaling_policy.dry_run (ours) */
    int external_scaler_enabled;
    /* external_scaler (ours): Lua hooks of the external scaling API; allowed only with
     * external_scaler_enabled. Both refs NULL when the key is absent. */
    ms_config_lua_ref_t *scale_hook;   /* external_scaler.hook: judges each POST .../scale */
    ms_config_lua_ref_t *scale_tick;   /* external_scaler.tick: sets targets on a schedule */
    double scale_tick_interval_s;      /* external_scaler.tick_interval_s, > 0, default 1 */
    json_t *scale_hook_kwargs;         /* external_scaler.kwargs, owned; NULL when unset */
    char *scale_redis_url;             /* external_scaler.redis_url: ctx.redis; NULL when unset */
    ms_logging_config_t logging;       /* its logging_config (fields it set) */
    ms_config_mark_t mark;             /* position of this application entry */
    ms_config_mark_t import_path_mark; /* position of the import_path value */
    char code_sha[65]; /* SHA-256 of import_file when deployed; filled by the controller */
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
    ms_logging_config_t logging;    /* the top-level logging_config, every field set */
    double control_loop_interval_s; /* control_loop.interval_s (ours), default 0.1 */
    int max_replicas_total;         /* max_replicas_total (ours): replicas of all deployments */
    ms_config_mark_t max_replicas_total_mark; /* where it was written; line 0 = the default */
    /* default_replica_memory (ours): the memory cap in bytes of a Lua replica whose
     * ray_actor_options has no memory; 0 (the default) = none */
    long long default_replica_memory;
    struct {
        char *host;           /* default 127.0.0.1 */
        int port;             /* default 8265 */
        char *token;          /* bearer token, NULL when unset */
        char **allowed_hosts; /* extra Host header values accepted; "*" = any */
        size_t n_allowed_hosts;
    } admin; /* admin (ours) */
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

/* Parses an autoscaling_config given as JSON (from code: serve.deployment{autoscaling_config=})
 * with the same defaults and validation as the file; `what` prefixes error messages (e.g.
 * "deployment 'Model'"). Returns NULL and appends to errs (with `file` and `mark`) when invalid.
 * `num_replicas_auto` selects the "auto" defaults (max_replicas 100). A relative
 * policy.policy_function resolves against the folder of `file`. */
ms_autoscaling_config_t *ms_config_autoscaling_from_json(json_t *obj, int num_replicas_auto,
                                                         const char *file, ms_config_mark_t mark,
                                                         const char *what,
                                                         ms_config_errors_t *errs);
/* Parses a process block given as JSON (from code: serve.deployment{process=}) with the same
 * rules as the file's; relative paths resolve against `dir` (the config file's folder). Returns
 * NULL and appends to errs when invalid. */
ms_process_config_t *ms_config_process_from_json(json_t *obj, const char *file, const char *dir,
                                                 ms_config_mark_t mark, const char *what,
                                                 ms_config_errors_t *errs);
ms_process_config_t *ms_config_process_copy(const ms_process_config_t *p);
void ms_config_process_free(ms_process_config_t *p);

/* Defaults of num_replicas: "auto" without an autoscaling_config. */
ms_autoscaling_config_t *ms_config_autoscaling_default(int num_replicas_auto);
void ms_config_autoscaling_free(ms_autoscaling_config_t *a);

/* Deep copy and free of a Lua reference (NULL-safe), for modules that keep one past the config. */
ms_config_lua_ref_t *ms_config_lua_ref_copy(const ms_config_lua_ref_t *r);
void ms_config_lua_ref_free(ms_config_lua_ref_t *r);

/* Application and deployment names: what ms_cfg_name_problem accepts. */
#define MS_CFG_NAME_MAX 255
/* The rule, as error messages state it. */
#define MS_CFG_NAME_RULE "a name must not contain '/', be '.' or '..', or exceed 255 bytes"
/* NULL when `s` is a usable application or deployment name, else why not (a constant text).
 * A name must work as one path component and one URL path segment: no '/', not "." or "..",
 * at most MS_CFG_NAME_MAX bytes. Other characters (quotes, backslashes, spaces, newlines) are
 * escaped wherever a name is printed (JSON, metrics labels). The file's names and names that
 * come only from code (serve.deployment{name = ...}) follow the same rule. */
const char *ms_cfg_name_problem(const char *s);

/* Finds the file override for a deployment by name, or NULL. */
const ms_deployment_config_t *ms_config_find_deployment(const ms_app_config_t *app,
                                                        const char *name);

#endif
