/*
 * controller: run the planned deployments behind the ingress, the handle socket and the admin
 * listener; drain and stop everything on SIGTERM/SIGINT; reload policy scripts on SIGHUP.
 * See controller.h.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "controller/controller.h"
#include "controller/internal.h"
#include "history/history.h"
#include "policy/policy.h"

static double max_shutdown_timeout(const plan_t *plan)
{
    double t = 0;
    for (size_t i = 0; i < plan->n; i++)
        if (plan->items[i].shutdown_timeout_s > t)
            t = plan->items[i].shutdown_timeout_s;
    return t;
}

/* The task queue of that name among the running deployments (the ingress's /-/tasks/...). */
static ms_task_queue_t *find_task_queue(void *data, const char *name, size_t len)
{
    controller_t *c = data;
    for (size_t i = 0; i < c->n_deps; i++) {
        ms_task_queue_t *q = c->deps[i].tasks;
        if (q && strlen(ms_task_queue_name(q)) == len &&
            memcmp(ms_task_queue_name(q), name, len) == 0)
            return q;
    }
    return NULL;
}

static void close_handle(uv_handle_t *h)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void on_deployment_stopped(void *data)
{
    controller_t *c = data;
    if (--c->deps_stopping > 0)
        return;
    for (size_t i = 0; i < c->n_deps; i++)
        ms_deployment_free(c->deps[i].dep);
    ms__control_free(c);
    if (c->handles)
        ms_http_server_close(c->handles);
    if (c->admin)
        ms_admin_close(c->admin);
    close_handle((uv_handle_t *)&c->drain_timer);
    close_handle((uv_handle_t *)&c->sigterm);
    close_handle((uv_handle_t *)&c->sigint);
    close_handle((uv_handle_t *)&c->sighup);
    ms_info("all replicas stopped; bye");
}

static void stop_deployments(controller_t *c)
{
    uv_timer_stop(&c->drain_timer);
    ms__control_stop(c);
    if (c->ingress)
        ms_http_server_close(c->ingress);
    c->ingress = NULL;
    c->deps_stopping = c->n_deps;
    if (c->n_deps == 0) {
        c->deps_stopping = 1;
        on_deployment_stopped(c);
        return;
    }
    for (size_t i = 0; i < c->n_deps; i++)
        ms_deployment_shutdown(c->deps[i].dep, on_deployment_stopped, c);
}

/* Polls until in-flight requests are answered or the graceful deadline passes. */
static void on_drain_tick(uv_timer_t *t)
{
    controller_t *c = t->data;
    size_t inflight = c->ingress ? ms_http_server_inflight(c->ingress) : 0;
    if (inflight == 0 || ms_now_ms() >= c->drain_deadline_ms) {
        if (inflight)
            ms_warn("shutdown: %zu requests still in flight at the deadline", inflight);
        stop_deployments(c);
    }
}

void ms__begin_shutdown(controller_t *c, const char *why)
{
    if (c->shutting_down)
        return;
    c->shutting_down = 1;
    c->drain_deadline_ms = ms_now_ms() + (uint64_t)(c->drain_bound_s * 1000.0);
    ms_info("%s: draining", why);
    ms_ingress_set_draining(c->proxy, 1);
    if (c->ingress)
        ms_http_server_stop_accepting(c->ingress);
    for (size_t i = 0; i < c->n_deps; i++)
        if (c->deps[i].tasks)
            ms_task_queue_drain(c->deps[i].tasks);
    uv_timer_start(&c->drain_timer, on_drain_tick, 0, 20);
}

static void on_signal(uv_signal_t *s, int signum)
{
    controller_t *c = s->data;
    if (signum == SIGHUP) {
        ms__reload_request(c, NULL);
        return;
    }
    if (c->shutting_down) {
        /* A second Ctrl-C means "now"; a repeated SIGTERM (as `timeout` sends to the whole
         * group) changes nothing. */
        if (signum == SIGINT) {
            ms_info("second SIGINT: shutting down now");
            c->drain_deadline_ms = 0;
        }
        return;
    }
    ms__begin_shutdown(c, signum == SIGTERM ? "received SIGTERM" : "received SIGINT");
}

static ms_http_limits_t limits_from(const ms_http_options_t *h)
{
    ms_http_limits_t l = {h->max_header_bytes, h->max_body_bytes, h->header_timeout_s,
                          h->keep_alive_timeout_s};
    return l;
}

/* ray_actor_options.num_gpus: the replica's GPU share (0: none). */
static double replica_gpus(const planned_t *p)
{
    const ms_deployment_config_t *file = ms_config_find_deployment(p->app, p->name);
    json_t *n = file ? json_object_get(file->ray_actor_options, "num_gpus") : NULL;
    return json_is_number(n) && json_number_value(n) > 0 ? json_number_value(n) : 0;
}

/* ray_actor_options.memory (bytes, as Ray's) bounds the replica's Lua memory; without it the
 * engine-wide default_replica_memory does (0: no cap). */
static long long replica_memory(const controller_t *c, const planned_t *p)
{
    const ms_deployment_config_t *file = ms_config_find_deployment(p->app, p->name);
    json_t *m = file ? json_object_get(file->ray_actor_options, "memory") : NULL;
    if (json_is_number(m) && json_number_value(m) >= 1)
        return (long long)json_number_value(m);
    return c->cfg->default_replica_memory;
}

void ms__settings_fill(controller_t *c, const planned_t *p, ms__settings_t *out)
{
    memset(out, 0, sizeof *out);
    out->args_json = json_dumps(p->app->args, JSON_COMPACT);
    if (p->app->import_file) /* a config-only application has no code */
        ms_buf_appendf(&out->import, "%s:%s", p->app->import_file, p->app->import_attr);
    const ms_router_config_t *rc = p->router;
    out->router_kwargs = rc && rc->kwargs ? json_dumps(rc->kwargs, JSON_COMPACT) : NULL;
    out->s = (ms_deployment_settings_t){
        .app_name = p->app->name,
        .name = p->name,
        .num_replicas = ms__control_initial_replicas(p),
        .max_ongoing_requests = p->max_ongoing_requests,
        .max_queued_requests = p->max_queued_requests,
        .request_timeout_s = c->cfg->http.request_timeout_s,
        .graceful_shutdown_timeout_s = p->shutdown_timeout_s,
        .health_check_period_s = p->health_check_period_s,
        .health_check_timeout_s = p->health_check_timeout_s,
        .router_file = rc && rc->router_class ? rc->router_class->file : NULL,
        .router_attr = rc && rc->router_class ? rc->router_class->attr : NULL,
        .router_kwargs_json = out->router_kwargs,
        .spec = {.exe_path = c->exe_path,
                 .run_dir = c->run_dir,
                 .controller_socket = c->handle_socket,
                 .import_path = out->import.data ? out->import.data : "",
                 .args_json = out->args_json ? out->args_json : "{}",
                 .user_config_json = p->user_config_json,
                 .max_ongoing_requests = p->max_ongoing_requests,
                 .graceful_shutdown_wait_loop_s = p->wait_loop_s,
                 .memory_bytes = replica_memory(c, p),
                 .num_gpus = replica_gpus(p),
                 .process = p->process,
                 .log_json = p->logging.json,
                 .log_rotation_max_bytes = p->logging.rotation_max_bytes,
                 .log_rotation_backup_count = p->logging.rotation_backup_count},
        .gpus = c->gpus,
        .gpu_pool = c->gpu_pool,
        .on_cold_start = ms__control_on_cold_start,
        .owner_data = c,
    };
    memcpy(out->s.spec.log_level, p->logging.level, sizeof out->s.spec.log_level);
    memcpy(out->s.spec.logs_dir, p->logging.logs_dir, sizeof out->s.spec.logs_dir);
}

void ms__settings_free(ms__settings_t *st)
{
    free(st->args_json);
    free(st->router_kwargs);
    ms_buf_free(&st->import);
}

ms_deployment_t *ms__start_deployment(controller_t *c, const planned_t *p)
{
    ms__settings_t st;
    ms__settings_fill(c, p, &st);
    char *err = NULL;
    ms_deployment_t *d = ms_deployment_new(c->loop, &st.s, &err);
    ms__settings_free(&st);
    if (!d) {
        ms_error("deployment %s: %s", p->name, err ? err : "failed to start");
        free(err);
    }
    return d;
}

static int start_deployments(controller_t *c, const plan_t *plan)
{
    for (size_t i = 0; i < plan->n; i++) {
        const planned_t *p = &plan->items[i];
        ms_deployment_t *d = ms__start_deployment(c, p);
        if (!d)
            return -1;
        dep_entry_t *e = &c->deps[c->n_deps++];
        e->dep = d;
        e->app = p->app;
        e->name = ms_strdup(p->name);
        e->app_index = (size_t)(p->app - c->cfg->apps);
        const ms_deployment_config_t *file = ms_config_find_deployment(p->app, p->name);
        e->actor_options =
            file && file->ray_actor_options ? json_deep_copy(file->ray_actor_options) : NULL;
        e->process_json = p->process_json ? json_deep_copy(p->process_json) : NULL;
        e->logging = p->logging;
        ms_ingress_add_deployment(c->proxy, p->app->name, p->name,
                                  p->is_ingress ? p->app->route_prefix : NULL, d,
                                  p->logging.access_log);
    }
    return 0;
}

static int open_listeners(controller_t *c)
{
    const ms_http_options_t *h = &c->cfg->http;
    ms_http_server_config_t ingress = ms_ingress_ingress_config(c->proxy);
    ingress.limits = limits_from(h);
    int r = ms_http_server_listen_tcp(c->loop, h->host, h->port, &ingress, &c->ingress);
    if (r != 0) {
        ms_error("cannot listen on %s:%d: %s", h->host, h->port, uv_strerror(r));
        return -1;
    }
    ms_http_server_config_t handles = ms_ingress_handle_config(c->proxy);
    handles.limits = limits_from(h);
    /* Replicas are trusted peers that pool their connections: no slowloris guard, and no idle
     * timeout that could close a connection just as a replica reuses it. */
    handles.limits.header_timeout_s = 0;
    handles.limits.keep_alive_timeout_s = 0;
    r = ms_http_server_listen_unix(c->loop, c->handle_socket, &handles, &c->handles);
    if (r != 0) {
        ms_error("cannot listen on %s: %s", c->handle_socket, uv_strerror(r));
        return -1;
    }
    ms_admin_callbacks_t cb = ms__admin_callbacks();
    char *err = NULL;
    if (ms_admin_start(c->loop, c->cfg->admin.host, c->cfg->admin.port, c->cfg->admin.token, &cb, c,
                       &c->admin, &err) != 0) {
        ms_error("admin API: %s", err ? err : "cannot start");
        free(err);
        return -1;
    }
    ms_admin_allow_hosts(c->admin, c->cfg->admin.allowed_hosts, c->cfg->admin.n_allowed_hosts);
    ms_info("serving on http://%s:%d; admin API on http://%s:%d", h->host,
            ms_http_server_port(c->ingress), c->cfg->admin.host, ms_admin_port(c->admin));
    return 0;
}

static void init_signals(controller_t *c)
{
    uv_signal_t *sigs[] = {&c->sigterm, &c->sigint, &c->sighup};
    int nums[] = {SIGTERM, SIGINT, SIGHUP};
    for (int i = 0; i < 3; i++) {
        uv_signal_init(c->loop, sigs[i]);
        sigs[i]->data = c;
        uv_signal_start(sigs[i], on_signal, nums[i]);
    }
}

static void free_entries(controller_t *c)
{
    for (size_t i = 0; i < c->n_deps; i++) {
        free(c->deps[i].name);
        json_decref(c->deps[i].actor_options);
        json_decref(c->deps[i].process_json);
    }
    free(c->deps);
    free(c->apps);
    ms_config_free(c->deployed);
    json_decref(c->reload_before);
    ms_history_release_all();
}

/* Each replica costs the controller a few descriptors (its control pipe, pooled connections, its
 * handle connections), so a thousand of them outgrow the usual soft limit of 1024: raise it to
 * the hard limit, which needs no privilege. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == rl.rlim_max)
        return;
    rlim_t was = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        ms_warn("cannot raise the open-files limit from %llu: %s", (unsigned long long)was,
                strerror(errno));
    else
        ms_debug("open-files limit raised from %llu to %llu", (unsigned long long)was,
                 (unsigned long long)rl.rlim_max);
}

/* ---- run folder ------------------------------------------------------------------------------
 * /tmp/moonserve.XXXXXX holds the handle socket and the replicas' sockets. Its `owner` file names
 * the controller that made it ("PID STARTTIME COMM"), so a later controller can tell a folder
 * left by a killed one (kill -9 runs no cleanup) from one still in use. */

#define RUN_DIR_PREFIX "moonserve."
#define OWNER_FILE     "owner"

/* Start time (clock ticks since boot, field 22 of /proc/PID/stat) and command name of pid; -1
 * when it is gone. Together with the pid they name one process, even after the pid is reused. */
static int proc_identity(pid_t pid, unsigned long long *start, char *comm, size_t comm_len)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *open = strchr(buf, '('), *close = strrchr(buf, ')');
    if (!open || !close || close < open)
        return -1;
    snprintf(comm, comm_len, "%.*s", (int)(close - open - 1), open + 1);
    /* After ") " come field 3 (state) .. field 22 (starttime). */
    char *p = close + 1;
    for (int field = 3; field < 22 && p; field++)
        p = strchr(p + 1, ' ');
    if (!p || sscanf(p, " %llu", start) != 1)
        return -1;
    return 0;
}

/* A folder is stale when its owner file names a process that is gone, or a pid now used by
 * another process (another start time or command). A folder without a readable owner file is
 * left alone: it may be one a controller is just creating, or not ours at all. */
static int run_dir_is_stale(int dirfd)
{
    int fd = openat(dirfd, OWNER_FILE, O_RDONLY | O_NOFOLLOW);
    if (fd < 0)
        return 0;
    char buf[128];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    int pid;
    unsigned long long start, now_start;
    char comm[64], now_comm[64];
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    if (sscanf(buf, "%d %llu %63s", &pid, &start, comm) != 3 || pid <= 0)
        return 0;
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 1;
    if (proc_identity(pid, &now_start, now_comm, sizeof now_comm) != 0)
        return 1;
    return now_start != start || strcmp(now_comm, comm) != 0;
}

/* Removes the files of a stale folder (sockets and the owner file; never a subfolder), then it. */
static void remove_run_dir(int tmpfd, const char *name, int dirfd)
{
    DIR *d = fdopendir(dirfd);
    if (!d) {
        close(dirfd);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            unlinkat(dirfd, e->d_name, 0);
    closedir(d);
    if (unlinkat(tmpfd, name, AT_REMOVEDIR) == 0)
        ms_info("removed the stale run folder /tmp/%s", name);
}

/* Only folders of this user, real folders (not links), named as ours, are looked at. */
static void clean_stale_run_dirs(void)
{
    DIR *tmp = opendir("/tmp");
    if (!tmp)
        return;
    struct dirent *e;
    while ((e = readdir(tmp)) != NULL) {
        if (strncmp(e->d_name, RUN_DIR_PREFIX, strlen(RUN_DIR_PREFIX)) != 0)
            continue;
        int fd = openat(dirfd(tmp), e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
        struct stat st;
        if (fd < 0)
            continue;
        if (fstat(fd, &st) != 0 || st.st_uid != getuid() || !run_dir_is_stale(fd))
            close(fd);
        else
            remove_run_dir(dirfd(tmp), e->d_name, fd); /* takes fd */
    }
    closedir(tmp);
}

/* Creates this controller's run folder and its owner file. */
static int make_run_dir(controller_t *c)
{
    clean_stale_run_dirs();
    snprintf(c->run_dir, sizeof c->run_dir, "/tmp/" RUN_DIR_PREFIX "XXXXXX");
    if (!mkdtemp(c->run_dir)) {
        ms_error("cannot create a run folder under /tmp: %s", strerror(errno));
        return -1;
    }
    unsigned long long start;
    char comm[64], path[128];
    snprintf(path, sizeof path, "%s/" OWNER_FILE, c->run_dir);
    FILE *f = NULL;
    if (proc_identity(getpid(), &start, comm, sizeof comm) == 0 && (f = fopen(path, "w")))
        fprintf(f, "%d %llu %s\n", (int)getpid(), start, comm);
    if (!f || fclose(f) != 0) {
        ms_error("cannot write %s", path);
        unlink(path);
        rmdir(c->run_dir);
        return -1;
    }
    return 0;
}

static void remove_own_run_dir(controller_t *c)
{
    char path[128];
    snprintf(path, sizeof path, "%s/" OWNER_FILE, c->run_dir);
    unlink(path);
    rmdir(c->run_dir);
}

int ms_controller_run(const ms_config_t *cfg, const char *exe_path)
{
    raise_fd_limit();
    ms_config_errors_t errs = {0};
    plan_t plan = {0};
    ms_policy_set_module_dir(cfg->dir); /* policies `require` from the config's folder */
    char log_err[1600];
    if (ms__apply_log_file(cfg, log_err, sizeof log_err) != 0) {
        fprintf(stderr, "moonserve: %s\n", log_err);
        return 1;
    }
    /* Every script loads once before anything opens, as `moonserve check` loads them: a broken
     * one stops the start with its error instead of failing a deployment after the ingress
     * opened (and a deploy through the admin API refuses it the same way). */
    if (ms__plan_build(cfg, &plan, &errs) != 0 || ms__plan_check_scripts(cfg, &plan, &errs) != 0) {
        for (size_t i = 0; i < errs.n; i++)
            fprintf(stderr, "%s\n", errs.items[i]);
        ms_config_errors_free(&errs);
        ms__plan_free(&plan);
        return 1;
    }
    /* Discovery may block (driver start-up): once, before the loop. A malformed fake spec stops
     * the start; no GPU is no error. */
    char *gpu_err = NULL;
    ms_gpu_t *gpus = ms_gpu_discover(NULL, &gpu_err);
    if (!gpus) {
        fprintf(stderr, "moonserve: %s\n", gpu_err ? gpu_err : "GPU discovery failed");
        free(gpu_err);
        ms__plan_free(&plan);
        return 1;
    }
    controller_t c = {0};
    c.loop = uv_default_loop();
    /* For /metrics: the time the loop spends waiting for events gives its utilization. */
    uv_loop_configure(c.loop, UV_METRICS_IDLE_TIME);
    c.cfg = cfg;
    c.gpus = gpus;
    c.gpu_pool = ms_gpu_pool_new(gpus);
    c.exe_path = exe_path;
    /* The controller owns the config while it runs; the hashes let a later deploy tell code
     * changes from setting changes. */
    ms__remember_code((ms_config_t *)cfg);
    c.proxy = ms_ingress_new();
    ms_ingress_set_access_log(c.proxy, cfg->logging.access_log);
    ms_ingress_set_task_lookup(c.proxy, find_task_queue, &c);
    c.deps = ms_calloc(plan.n ? plan.n : 1, sizeof *c.deps);
    if (make_run_dir(&c) != 0) {
        ms__plan_free(&plan);
        ms_ingress_free(c.proxy);
        free_entries(&c);
        ms_gpu_pool_free(c.gpu_pool);
        ms_gpu_free(c.gpus);
        return 1;
    }
    snprintf(c.handle_socket, sizeof c.handle_socket, "%s/controller.sock", c.run_dir);
    uv_timer_init(c.loop, &c.drain_timer);
    c.drain_timer.data = &c;
    uv_timer_init(c.loop, &c.control_timer);
    c.control_timer.data = &c;
    /* Signals are handled before anything starts, so a SIGTERM during start-up drains too. */
    init_signals(&c);
    c.drain_bound_s = max_shutdown_timeout(&plan);
    int rc = 0;
    if (open_listeners(&c) != 0 || start_deployments(&c, &plan) != 0 ||
        ms__control_setup(&c, &plan) != 0) {
        rc = 1;
        if (c.ingress)
            ms_http_server_stop_accepting(c.ingress);
        c.shutting_down = 1;
        stop_deployments(&c);
    } else {
        ms__control_start(&c);
    }
    ms__plan_free(&plan);
    uv_run(c.loop, UV_RUN_DEFAULT);
    ms_log_flush();
    ms_ingress_free(c.proxy);
    free_entries(&c);
    remove_own_run_dir(&c);
    uv_loop_close(c.loop);
    ms_gpu_pool_free(c.gpu_pool);
    ms_gpu_free(c.gpus);
    return rc;
}
