/*
 * replica: the controller's view of one replica process — spawning `moonserve __replica` with a
 * control socketpair on fd 3, reading its control messages (ready / failed), stopping it
 * (SIGTERM, then SIGKILL after a timeout), noticing its exit, and holding the data link to its
 * socket (engine/link).
 *
 * It knows nothing of queues or routing: the owner (router) decides when to start and stop
 * replicas and what to send them, and hears back through ms_replica_events_t.
 */
#ifndef MS_REPLICA_H
#define MS_REPLICA_H

#include <jansson.h>
#include <uv.h>

#include "config/config.h"
#include "gpu/gpu.h"
#include "http/http.h"
#include "link/link.h"
#include "upstream/upstream.h"

typedef enum {
    MS_REPLICA_STARTING, /* spawned, constructor running */
    MS_REPLICA_RUNNING,  /* ready: takes requests */
    MS_REPLICA_STOPPING, /* SIGTERM sent: draining */
    MS_REPLICA_DEAD,     /* process gone; waiting for the owner to free it */
} ms_replica_state_t;

typedef struct ms_replica ms_replica_t;

typedef struct ms_replica_events {
    void (*on_ready)(ms_replica_t *r);
    /* The data link broke while the process may still run (its streams fail right after this
     * returns). */
    void (*on_link_down)(ms_replica_t *r);
    /* The constructor failed; the process exits right after (on_exit follows). */
    void (*on_failed)(ms_replica_t *r, const char *error);
    /* The process is gone; its link was closed just before (open streams failed). The owner
     * must call ms_replica_free (now or later). */
    void (*on_exit)(ms_replica_t *r, int64_t exit_status, int term_signal);
    /* Fresh stats arrived (autoscaling_stats / routing_stats updated). May be NULL. */
    void (*on_stats)(ms_replica_t *r);
    /* MS_REPLICA_UNHEALTHY_THRESHOLD health checks in a row failed. May be NULL. */
    void (*on_unhealthy)(ms_replica_t *r);
    /* The replica reported the multiplexed models it holds (model_ids updated). May be NULL. */
    void (*on_models)(ms_replica_t *r);
} ms_replica_events_t;

/* Everything a replica process needs to know; strings are copied by ms_replica_spawn. */
typedef struct ms_replica_spec {
    const char *exe_path; /* this binary */
    const char *run_dir;  /* private folder for sockets */
    const char *controller_socket;
    const char *app_name;
    const char *deployment_name;
    const char *import_path; /* FILE:ATTR, FILE absolute */
    const char *args_json;
    const char *user_config_json; /* "null" when unset */
    int max_ongoing_requests;
    double graceful_shutdown_wait_loop_s;
    long long memory_bytes; /* cap on the replica's Lua memory (--memory-bytes); 0 = none */
    double num_gpus;        /* ray_actor_options.num_gpus: the owner places the replica */
    /* Set per spawn by the owner on a host with GPUs: the replica's CUDA_VISIBLE_DEVICES ("" hides
     * every GPU) and MOONSERVE_GPU_IDS (the controller's device indices, "0,1"); NULL leaves the
     * environment as it is. */
    const char *cuda_visible_devices;
    const char *gpu_ids;
    /* The deployment's logging_config for the replica (MOONSERVE_LOG_LEVEL,
     * MOONSERVE_LOG_ENCODING, MOONSERVE_LOGS_DIR, MOONSERVE_LOG_ROTATION_MAX_BYTES and
     * MOONSERVE_LOG_ROTATION_BACKUP_COUNT); log_level "" leaves the environment's. */
    char log_level[8];
    int log_json;
    int log_rotation_backup_count;
    long long log_rotation_max_bytes;
    char logs_dir[MS_LOGS_DIR_MAX]; /* "" = stderr only */
    /* A process replica (docs/process-replicas.md): the user's command, started through
     * `moonserve __exec`, proxied over HTTP; NULL: a Lua replica. Read during the spawn only. */
    const ms_process_config_t *process;
} ms_replica_spec_t;

struct ms_replica {
    ms_replica_state_t state;
    char id[96];         /* replica tag "DEPLOYMENT#N", for logs */
    char replica_id[24]; /* "N", unique within the controller's lifetime: also the replica's own
                          * serve.get_replica_context().replica_id */
    int pid;
    double start_time; /* wall clock */
    int ongoing;       /* requests sent and not yet answered: kept by the owner */
    int max_ongoing_requests;
    int slot;                  /* owner's index for this replica (router slot) */
    void *owner;               /* free for the owner */
    char *last_error;          /* constructor error, if any */
    int stop_requested;        /* ms_replica_stop was called: its exit is no failure */
    json_t *autoscaling_stats; /* latest record_autoscaling_stats() result, or NULL */
    json_t *routing_stats;     /* latest record_routing_stats() result, or NULL */
    json_t *batching_stats;    /* latest serve.batch stats by method name, or NULL */
    json_t *custom_metrics;    /* latest serve.metrics snapshot by metric name, or NULL */
    json_t *model_ids;      /* multiplexed models it holds or loads (array of strings), or NULL */
    double stats_time;      /* wall clock of the latest stats, 0 = never */
    unsigned generation;    /* owner's code generation this replica runs (rolling updates) */
    unsigned settings_seq;  /* owner's settings version it was started or configured with */
    int health_failures;    /* consecutive failed health checks */
    ms_gpu_placement_t gpu; /* the GPU share it holds (kept by the owner) */
    /* private */
    uv_process_t _proc;
    uv_pipe_t _ctl;
    uv_timer_t _kill_timer;
    ms_buf_t _ctl_in;
    char *_socket_path;
    ms_link_t *_link;
    /* process replicas */
    int _is_process;
    ms_upstream_t *_upstream;
    int _port;         /* listen: port; else 0 */
    char *_ready_path; /* GET until 2xx before the replica counts as ready */
    double _ready_timeout_s;
    char *_health_path; /* NULL: no health checks beyond the process being alive */
    uv_timer_t _probe_timer;
    ms_http_client_t *_probe; /* the readiness or health GET in flight */
    int _probe_status;
    char _probe_error[160]; /* what the latest readiness probe got */
    uv_pipe_t _out[2];      /* the command's stdout and stderr, logged line by line */
    ms_buf_t _out_buf[2];
    char _last_output[200]; /* its latest line, for a start failure's message */
    const ms_replica_events_t *_events;
    int _open_handles;
    unsigned _exited : 1;
    unsigned _freed : 1;
    long long _ctl_seq;  /* id of the last control request sent */
    long long _stats_id; /* id of the stats request awaiting its reply, 0 = none */
    uint64_t _stats_sent_ms;
    long long _health_id; /* id of the health check awaiting its reply, 0 = none */
    uint64_t _health_sent_ms;
    uint64_t _next_health_ms;
};

/* Starts a replica process. Returns NULL when spawning fails, with the reason (and what to check
 * when it is a resource limit) logged and written to err (may be NULL). */
ms_replica_t *ms_replica_spawn(uv_loop_t *loop, const ms_replica_spec_t *spec,
                               const ms_replica_events_t *events, void *owner, char *err,
                               size_t err_cap);
/* Graceful stop: SIGTERM now, SIGKILL once timeout_s has passed. */
void ms_replica_stop(ms_replica_t *r, double timeout_s);
/* Immediate SIGKILL. */
void ms_replica_kill(ms_replica_t *r);
/* Default bound on a stats request (Ray's request_routing_stats_timeout_s). */
#define MS_REPLICA_STATS_TIMEOUT_S 30.0

/* Asks a RUNNING replica for its stats (record_autoscaling_stats / record_routing_stats) unless
 * a request is already outstanding for less than timeout_s; the reply lands in
 * autoscaling_stats / routing_stats and fires on_stats. */
void ms_replica_poll_stats(ms_replica_t *r, double timeout_s);

/* Ray Serve: this many consecutive failed health checks make a replica unhealthy. */
#define MS_REPLICA_UNHEALTHY_THRESHOLD 3

/* Runs the health-check schedule of a RUNNING replica (call it often, e.g. every control tick):
 * a check (the replica's check_health()) starts when none is outstanding and about period_s
 * (randomised by ±10 %) has passed since the last one started; no answer within timeout_s, or an
 * error, is a failure; a success resets the count. */
void ms_replica_check_health(ms_replica_t *r, double period_s, double timeout_s);

/* Changes settings of a running replica in place: calls its reconfigure(user_config)
 * (`user_config_json` NULL: unchanged), and sets its max_ongoing_requests and drain step. The
 * replica applies them asynchronously; answers are not awaited. */
void ms_replica_reconfigure(ms_replica_t *r, const char *user_config_json);
void ms_replica_configure(ms_replica_t *r, int max_ongoing_requests, double wait_loop_s);

/* Releases the replica once its process is gone (state DEAD). Safe to call from on_exit. */
void ms_replica_free(ms_replica_t *r);

/* ---- the data path, whichever kind of replica ------------------------------------------------
 * A Lua replica's requests go over its data link (connected on first use); a process replica's
 * over pooled HTTP/1.1 connections (engine/upstream). Both speak ms_link_callbacks_t. */

/* Sends a request to a RUNNING replica; `body_source` as ms_upstream_send (process replicas; NULL
 * otherwise). Returns the stream id, or 0 when the replica cannot be reached (no callback
 * fires). */
uint32_t ms_replica_send(ms_replica_t *r, const ms_link_request_t *lr,
                         ms_http_request_t *body_source, const ms_link_callbacks_t *cb, void *data);
void ms_replica_cancel(ms_replica_t *r, uint32_t stream);
void ms_replica_credit(ms_replica_t *r, uint32_t stream, size_t n);
int ms_replica_is_process(const ms_replica_t *r);

/* `moonserve __exec PROGRAM ARGS...`: the first process of a process replica (exec_shim.c). */
int ms_replica_exec_main(int argc, char **argv);

#endif
