/*
 * controller internals shared by its files: the plan (plan.c: what the config and the
 * applications' code ask for), the running controller (controller.c: listeners, signals,
 * shutdown), the control loop (control.c: autoscaling and external scaling), the admin glue
 * (admin_glue.c: status, reload, scale).
 */
#ifndef MS_CONTROLLER_INTERNAL_H
#define MS_CONTROLLER_INTERNAL_H

#include <jansson.h>
#include <uv.h>

#include "admin/admin.h"
#include "autoscale/autoscale.h"
#include "config/config.h"
#include "scale_hooks/scale_hooks.h"
#include "ingress/ingress.h"
#include "deployment/deployment.h"

/* One deployment's settings after merging file, code and defaults. */
typedef struct planned {
    const ms_app_config_t *app;
    char *name;
    int num_replicas;
    int max_ongoing_requests;
    int max_queued_requests;
    char *user_config_json;
    double wait_loop_s;
    double shutdown_timeout_s;
    double health_check_period_s;
    double health_check_timeout_s;
    int is_ingress;
    /* Autoscaling, from the file or from code (then owned), or NULL for a fixed count. */
    ms_autoscaling_config_t *autoscaling;
    int autoscaling_owned;
    const ms_router_config_t *router;         /* from the file; NULL = the built-in router */
    const ms_task_queue_config_t *task_queue; /* from the file; NULL: consumes no tasks */
    ms_process_config_t *process;             /* owned; NULL: a Lua deployment */
    json_t *process_json;        /* owned reference: what it was made from, for redeploys */
    ms_logging_config_t logging; /* the file's: top level, then application, then deployment */
} planned_t;

typedef struct plan {
    planned_t *items;
    size_t n;
} plan_t;

/* Builds the plan for every application; 0, or -1 with errors appended. */
int ms__plan_build(const ms_config_t *cfg, plan_t *plan, ms_config_errors_t *errs);
void ms__plan_free(plan_t *p);

/* The most replicas an external scaler (the API or a hook's tick) may ask for. */
#define MS_MAX_TARGET_REPLICAS 100000

/* A running deployment and what drives its replica count. */
typedef struct dep_entry {
    ms_deployment_t *dep;
    ms_logging_config_t logging; /* in force for its replicas (a change replaces them) */
    const ms_app_config_t *app;
    char *name;
    size_t app_index;
    ms_autoscaler_t *autoscaler; /* NULL: fixed count (num_replicas or the external scaler) */
    ms_task_queue_t *tasks;      /* its task_queue's producer and consumer, or NULL */
    ms_watch_t *watch;           /* its policy's redis_url values (ctx.redis), or NULL */
    double stats_seen;           /* newest replica stats already handed to the autoscaler */
    /* Replica stats polling: request_routing_stats_period_s / _timeout_s, and more often (every
     * STATS_PERIOD_S) for autoscaling deployments, whose custom metrics feed the policy. */
    double stats_period_s;
    double stats_timeout_s;
    json_t *actor_options; /* ray_actor_options in force (owned, may be NULL): a change rolls */
    json_t *process_json;  /* the process block in force (owned, NULL: Lua): a change rolls */
    int limit_logged;      /* a scaling decision was cut at max_replicas_total and logged */
    /* The latest decision put in the autoscaling history: only changes are recorded. */
    int history_have;
    double history_raw;
    char history_reason[340];
} dep_entry_t;

typedef struct app_entry {
    const ms_app_config_t *cfg;
    ms_app_policy_t *policy;     /* application-level autoscaling policy, or NULL */
    ms_scale_hook_t *scale_hook; /* external_scaler hook and tick, or NULL */
    ms_watch_t *watch;           /* external_scaler.redis_url's values (ctx.redis), or NULL */
} app_entry_t;

/* The control loop's own cost (control.c), shown in status: a tick's work grows with the
 * replicas, and it runs on the loop that serves requests. Wall time is what requests wait;
 * CPU time is the controller's own share of it (on a busy machine the rest is other processes,
 * replicas woken by the tick among them). */
#define MS__TICK_RECENT 64
typedef struct ms__tick_time {
    double last_ms, max_ms, total_ms;
    double recent_ms[MS__TICK_RECENT]; /* ring of the latest durations */
} ms__tick_time_t;
typedef struct ms__tick_stats {
    uint64_t ticks;
    ms__tick_time_t wall, cpu;
} ms__tick_stats_t;

typedef struct controller {
    uv_loop_t *loop;
    const ms_config_t *cfg; /* the config in force: the file, or the latest deploy */
    ms_config_t *deployed;  /* the latest deploy's config (owned), NULL while the file's is in
                             * force; the one before it is freed once a deploy has applied */
    const char *exe_path;
    ms_ingress_t *proxy;
    ms_http_server_t *ingress;
    ms_http_server_t *handles;
    ms_admin_t *admin;
    dep_entry_t *deps;
    size_t n_deps;
    app_entry_t *apps;
    size_t n_apps;
    size_t deps_stopping;
    uv_signal_t sigterm, sigint, sighup;
    uv_timer_t drain_timer;
    uv_timer_t control_timer;
    uint64_t drain_deadline_ms;
    double drain_bound_s; /* longest graceful_shutdown_timeout_s of any deployment */
    char run_dir[64];
    char handle_socket[128];
    int shutting_down;
    /* Hot reload: one in flight at a time, its waiters, and those for the next one. */
    int reload_in_flight;
    struct reload_waiter *reload_running, *reload_waiting;
    json_t *reload_before; /* the scripts as they were when the running reload began (history) */
    uint64_t reloads;      /* reloads started, numbering their history entries */
    uint64_t deploys;      /* deploys applied: the config's version in the reload history */
    ms__tick_stats_t tick_stats;
    ms_gpu_t *gpus; /* discovered at start (docs/gpu.md) */
    ms_gpu_pool_t *gpu_pool;
} controller_t;

/* control.c: autoscalers and application policies for the planned deployments, the tick. */
int ms__control_setup(controller_t *c, const plan_t *plan);
void ms__control_start(controller_t *c);
void ms__control_stop(controller_t *c);
void ms__control_free(controller_t *c);
/* Frees every autoscaler, application policy and scale hook (a redeploy makes new ones). */
void ms__control_release_policies(controller_t *c);
/* Initial replica count of a planned deployment (autoscaling: initial or min replicas). */
int ms__control_initial_replicas(const planned_t *p);
/* Router callback: a request waits at zero replicas. */
void ms__control_on_cold_start(ms_deployment_t *d, void *data);
dep_entry_t *ms__control_find(controller_t *c, const char *app, const char *deployment);
/* How many replicas deployment e may have under max_replicas_total: the limit less what every
 * other deployment is asked to keep. */
long long ms__control_replica_room(const controller_t *c, const dep_entry_t *e);
/* The control loop's settings and tick durations, for status (new reference). */
json_t *ms__control_status(const controller_t *c);
/* Records an external scaling decision (the scale API, source "api", or a hook's tick, "tick")
 * in the autoscaling history: `requested` asked, `applied` put in force, `previous` before;
 * `why` NULL for "external scale", else what refused or cut it. */
void ms__control_history_external(controller_t *c, const dep_entry_t *e, const char *source,
                                  long long requested, long long applied, int previous,
                                  const char *why);

/* controller.c: settings of a planned deployment, and starting one. */
typedef struct ms__settings {
    ms_deployment_settings_t s;
    char *args_json;
    char *router_kwargs;
    ms_buf_t import;
} ms__settings_t;
void ms__settings_fill(controller_t *c, const planned_t *p, ms__settings_t *out);
void ms__settings_free(ms__settings_t *st);
ms_deployment_t *ms__start_deployment(controller_t *c, const planned_t *p);

/* plan.c: loads every router and policy script a plan names, reporting failures. */
int ms__plan_check_scripts(const ms_config_t *cfg, const plan_t *plan, ms_config_errors_t *errs);

/* deploy.c: PUT /api/serve/applications/ — validate a whole config, then apply it. */
int ms__deploy(controller_t *c, const char *text, size_t len, json_t **body);
/* Records each application file's SHA-256 in its config, so a deploy can tell code changes. */
void ms__remember_code(ms_config_t *cfg);
/* The controller's log file from the top-level logging_config: DIR/controller.log, or stderr
 * only. Returns 0, or -1 with a message in err (the file in use until then stays). */
int ms__apply_log_file(const ms_config_t *cfg, char *err, size_t err_cap);

/* admin_glue.c */
ms_admin_callbacks_t ms__admin_callbacks(void);
/* Asks for a reload of every policy and router script (prepared off the loop; all swapped in
 * only if all pass). `reply` gets the JSON result; NULL (SIGHUP) only logs it. */
void ms__reload_request(controller_t *c, ms_admin_reply_t *reply);
void ms__begin_shutdown(controller_t *c, const char *why);

#endif
