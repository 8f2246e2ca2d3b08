/*
 * replica: process supervision and connection pooling for one replica. See replica.h.
 */
#include <arpa/inet.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "replica/replica.h"

static void maybe_release(ms_replica_t *r)
{
    if (r->_freed && r->_open_handles == 0) {
        ms_buf_free(&r->_ctl_in);
        ms_buf_free(&r->_out_buf[0]);
        ms_buf_free(&r->_out_buf[1]);
        free(r->_ready_path);
        free(r->_health_path);
        free(r->_socket_path);
        free(r->last_error);
        json_decref(r->autoscaling_stats);
        json_decref(r->routing_stats);
        json_decref(r->batching_stats);
        json_decref(r->custom_metrics);
        json_decref(r->model_ids);
        free(r);
    }
}

static void on_handle_closed(uv_handle_t *h)
{
    ms_replica_t *r = h->data;
    r->_open_handles--;
    maybe_release(r);
}

static void close_probe(ms_replica_t *r)
{
    if (r->_probe)
        ms_http_client_close(r->_probe);
    r->_probe = NULL;
}

static void close_link(ms_replica_t *r)
{
    ms_link_t *l = r->_link;
    ms_upstream_t *u = r->_upstream;
    r->_link = NULL;
    r->_upstream = NULL;
    if (l)
        ms_link_close(l); /* its open streams fail now */
    if (u)
        ms_upstream_close(u);
    close_probe(r);
}

static void on_link_down(void *owner, ms_link_error_t err)
{
    ms_replica_t *r = owner;
    ms_info("replica %s: data link down: %s", r->id, ms_link_error_text(err));
    if (r->_events->on_link_down)
        r->_events->on_link_down(r);
}

static const ms_link_events_t link_events = {.on_down = on_link_down};

static void handle_control_lines(ms_replica_t *r);

/* The exit may be noticed before the last control line was read (a constructor failure is
 * written just before exiting): read what is left before the pipe is closed. The fd is
 * non-blocking, so this never waits. */
static void drain_control_pipe(ms_replica_t *r)
{
    uv_os_fd_t fd;
    if (uv_is_closing((uv_handle_t *)&r->_ctl) || uv_fileno((uv_handle_t *)&r->_ctl, &fd) != 0)
        return;
    for (;;) {
        ms_buf_reserve(&r->_ctl_in, 4096);
        ssize_t n = read(fd, r->_ctl_in.data + r->_ctl_in.len, r->_ctl_in.cap - r->_ctl_in.len - 1);
        if (n <= 0)
            break;
        r->_ctl_in.len += (size_t)n;
        r->_ctl_in.data[r->_ctl_in.len] = '\0';
    }
    handle_control_lines(r);
}

static void close_process_handles(ms_replica_t *r)
{
    if (!r->_is_process)
        return;
    uv_timer_stop(&r->_probe_timer);
    uv_close((uv_handle_t *)&r->_probe_timer, on_handle_closed);
    for (int i = 0; i < 2; i++)
        if (!uv_is_closing((uv_handle_t *)&r->_out[i]))
            uv_close((uv_handle_t *)&r->_out[i], on_handle_closed);
}

/* A process replica that exits before it is ready failed to start, as a Lua constructor that
 * raises: the deployment counts it, and status shows why. */
static void report_early_exit(ms_replica_t *r, int64_t exit_status, int term_signal)
{
    if (!r->_is_process || r->state != MS_REPLICA_STARTING || r->stop_requested || r->last_error)
        return;
    ms_buf_t b = {0};
    if (term_signal)
        ms_buf_appendf(&b, "the command was killed by signal %d before it was ready", term_signal);
    else
        ms_buf_appendf(&b, "the command exited with status %d before it was ready",
                       (int)exit_status);
    if (r->_last_output[0])
        ms_buf_appendf(&b, " (its last output: %s)", r->_last_output);
    r->last_error = b.data;
    r->_events->on_failed(r, r->last_error);
}

static void on_exit_cb(uv_process_t *p, int64_t exit_status, int term_signal)
{
    ms_replica_t *r = p->data;
    drain_control_pipe(r);
    report_early_exit(r, exit_status, term_signal);
    /* A replica that was killed could not remove its own socket. */
    unlink(r->_socket_path);
    r->_exited = 1;
    r->state = MS_REPLICA_DEAD;
    close_link(r);
    uv_timer_stop(&r->_kill_timer);
    uv_close((uv_handle_t *)&r->_proc, on_handle_closed);
    uv_close((uv_handle_t *)&r->_kill_timer, on_handle_closed);
    if (!uv_is_closing((uv_handle_t *)&r->_ctl))
        uv_close((uv_handle_t *)&r->_ctl, on_handle_closed);
    close_process_handles(r);
    r->_events->on_exit(r, exit_status, term_signal);
}

static void health_result(ms_replica_t *r, int ok, const char *why)
{
    r->_health_id = 0;
    if (ok) {
        r->health_failures = 0;
        return;
    }
    r->health_failures++;
    ms_warn("replica %s: health check failed (%d in a row): %s", r->id, r->health_failures, why);
    if (r->health_failures >= MS_REPLICA_UNHEALTHY_THRESHOLD && r->_events->on_unhealthy)
        r->_events->on_unhealthy(r);
}

static void handle_stats_reply(ms_replica_t *r, json_t *msg)
{
    json_t *id = json_object_get(msg, "id");
    if (json_is_integer(id) && r->_health_id && json_integer_value(id) == r->_health_id) {
        const char *err = json_string_value(json_object_get(msg, "error"));
        health_result(r, json_is_true(json_object_get(msg, "ok")), err ? err : "?");
        return;
    }
    if (!json_is_integer(id) || json_integer_value(id) != r->_stats_id)
        return; /* a late answer to a request that already timed out */
    r->_stats_id = 0;
    if (!json_is_true(json_object_get(msg, "ok"))) {
        const char *err = json_string_value(json_object_get(msg, "error"));
        ms_warn("replica %s: stats failed: %s", r->id, err ? err : "?");
        return;
    }
    json_t *as = json_object_get(msg, "autoscaling"), *rs = json_object_get(msg, "routing");
    json_t *bs = json_object_get(msg, "batching"), *cm = json_object_get(msg, "metrics");
    json_decref(r->autoscaling_stats);
    json_decref(r->routing_stats);
    json_decref(r->batching_stats);
    json_decref(r->custom_metrics);
    r->custom_metrics = json_is_object(cm) ? json_incref(cm) : NULL;
    r->autoscaling_stats = json_is_object(as) ? json_incref(as) : NULL;
    r->routing_stats = json_is_object(rs) ? json_incref(rs) : NULL;
    r->batching_stats = json_is_object(bs) ? json_incref(bs) : NULL;
    r->stats_time = ms_wall_time();
    if (r->_events->on_stats)
        r->_events->on_stats(r);
}

/* One control line from the replica: ready, failed, or a reply to one of our requests. */
static void handle_control_line(ms_replica_t *r, const char *line, size_t len)
{
    json_error_t jerr;
    json_t *msg = json_loadb(line, len, 0, &jerr);
    const char *op = msg ? json_string_value(json_object_get(msg, "op")) : NULL;
    if (!op) {
        ms_warn("replica %s: unreadable control message", r->id);
    } else if (strcmp(op, "ready") == 0 && r->state == MS_REPLICA_STARTING) {
        r->state = MS_REPLICA_RUNNING;
        r->_events->on_ready(r);
    } else if (strcmp(op, "reply") == 0) {
        handle_stats_reply(r, msg);
    } else if (strcmp(op, "models") == 0 && json_is_array(json_object_get(msg, "ids"))) {
        json_decref(r->model_ids);
        r->model_ids = json_incref(json_object_get(msg, "ids"));
        if (r->_events->on_models)
            r->_events->on_models(r);
    } else if (strcmp(op, "failed") == 0) {
        const char *err = json_string_value(json_object_get(msg, "error"));
        free(r->last_error);
        r->last_error = ms_strdup(err ? err : "unknown error");
        r->_events->on_failed(r, r->last_error);
    }
    json_decref(msg);
}

static void ctl_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    ms_replica_t *r = h->data;
    (void)suggested;
    ms_buf_reserve(&r->_ctl_in, 4096);
    *buf = uv_buf_init(r->_ctl_in.data + r->_ctl_in.len,
                       (unsigned)(r->_ctl_in.cap - r->_ctl_in.len - 1));
}

static void on_ctl_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    ms_replica_t *r = s->data;
    (void)buf;
    if (nread < 0) {
        /* The process is exiting; its exit callback does the bookkeeping. */
        uv_close((uv_handle_t *)&r->_ctl, on_handle_closed);
        return;
    }
    r->_ctl_in.len += (size_t)nread;
    r->_ctl_in.data[r->_ctl_in.len] = '\0';
    handle_control_lines(r);
}

static void handle_control_lines(ms_replica_t *r)
{
    char *nl;
    while ((nl = memchr(r->_ctl_in.data, '\n', r->_ctl_in.len)) != NULL) {
        size_t line_len = (size_t)(nl - r->_ctl_in.data);
        handle_control_line(r, r->_ctl_in.data, line_len);
        ms_buf_consume(&r->_ctl_in, line_len + 1);
    }
}

extern char **environ;

static int env_overridden(const char *entry, char *const *over, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        size_t len = strcspn(over[i], "=") + 1;
        if (strncmp(entry, over[i], len) == 0)
            return 1;
    }
    return 0;
}

/* The controller's environment with the replica's own variables (GPUs, logging) replaced; NULL
 * when the spec sets none, so the replica inherits it. Freed by free_env. */
static char **replica_env(const ms_replica_spec_t *spec)
{
    char *over[7];
    size_t n_over = 0;
    ms_buf_t b = {0};
    if (spec->cuda_visible_devices) {
        ms_buf_appendf(&b, "CUDA_VISIBLE_DEVICES=%s", spec->cuda_visible_devices);
        over[n_over++] = b.data;
        b = (ms_buf_t){0};
        ms_buf_appendf(&b, "MOONSERVE_GPU_IDS=%s", spec->gpu_ids ? spec->gpu_ids : "");
        over[n_over++] = b.data;
        b = (ms_buf_t){0};
    }
    if (spec->log_level[0]) {
        ms_buf_appendf(&b, "MOONSERVE_LOG_LEVEL=%s", spec->log_level);
        over[n_over++] = b.data;
        b = (ms_buf_t){0};
        ms_buf_appendf(&b, "MOONSERVE_LOG_ENCODING=%s", spec->log_json ? "JSON" : "TEXT");
        over[n_over++] = b.data;
        b = (ms_buf_t){0};
        /* Always set, empty for none, so a folder in the controller's own environment does not
         * leak into replicas whose deployment logs to stderr. */
        ms_buf_appendf(&b, "MOONSERVE_LOGS_DIR=%s", spec->logs_dir);
        over[n_over++] = b.data;
        b = (ms_buf_t){0};
        ms_buf_appendf(&b, "MOONSERVE_LOG_ROTATION_MAX_BYTES=%lld", spec->log_rotation_max_bytes);
        over[n_over++] = b.data;
        b = (ms_buf_t){0};
        ms_buf_appendf(&b, "MOONSERVE_LOG_ROTATION_BACKUP_COUNT=%d",
                       spec->log_rotation_backup_count);
        over[n_over++] = b.data;
    }
    if (n_over == 0)
        return NULL;
    size_t n = 0;
    while (environ[n])
        n++;
    char **env = ms_calloc(n + n_over + 1, sizeof *env);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (!env_overridden(environ[i], over, n_over))
            env[k++] = ms_strdup(environ[i]);
    for (size_t i = 0; i < n_over; i++)
        env[k++] = over[i];
    return env;
}

static void free_env(char **env)
{
    for (size_t i = 0; env && env[i]; i++)
        free(env[i]);
    free(env);
}

/* ---- process replicas: what the command is told, its output, its readiness --------------------
 */

/* A free TCP port on 127.0.0.1 for a `listen: port` replica, or 0. The port is free when asked;
 * the command binds it moments later. */
static int pick_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = 0;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* One argument with {socket}, {port} and {replica_id} replaced. */
static char *substitute(const ms_replica_t *r, const char *arg)
{
    ms_buf_t b = {0};
    ms_buf_append(&b, "", 0);
    for (const char *p = arg; *p;) {
        if (strncmp(p, "{socket}", 8) == 0) {
            ms_buf_append_str(&b, r->_socket_path);
            p += 8;
        } else if (strncmp(p, "{port}", 6) == 0) {
            ms_buf_appendf(&b, "%d", r->_port);
            p += 6;
        } else if (strncmp(p, "{replica_id}", 12) == 0) {
            ms_buf_append_str(&b, r->replica_id);
            p += 12;
        } else {
            ms_buf_append(&b, p++, 1);
        }
    }
    return b.data;
}

static char **process_argv(const ms_replica_t *r, const ms_replica_spec_t *spec)
{
    const ms_process_config_t *pc = spec->process;
    char **argv = ms_calloc(pc->argc + 3, sizeof *argv);
    argv[0] = ms_strdup("moonserve");
    argv[1] = ms_strdup("__exec");
    for (size_t i = 0; i < pc->argc; i++)
        argv[i + 2] = substitute(r, pc->argv[i]);
    return argv;
}

static void free_list(char **list)
{
    for (size_t i = 0; list && list[i]; i++)
        free(list[i]);
    free(list);
}

/* Whether `entry` ("NAME=value") sets one of the names in `set` (each "NAME=..."). */
static int overridden(const char *entry, char *const *set, size_t n)
{
    const char *eq = strchr(entry, '=');
    size_t len = eq ? (size_t)(eq - entry) + 1 : strlen(entry);
    for (size_t i = 0; i < n; i++)
        if (strncmp(entry, set[i], len) == 0)
            return 1;
    return 0;
}

static void env_add(char **env, size_t *n, const char *fmt, const char *value)
{
    ms_buf_t b = {0};
    ms_buf_appendf(&b, fmt, value);
    env[(*n)++] = b.data;
}

/* The engine's environment, then the deployment's env, then what the engine tells the replica
 * (later entries win: earlier ones they name are left out). */
static char **process_env(const ms_replica_t *r, const ms_replica_spec_t *spec, double grace_s)
{
    const ms_process_config_t *pc = spec->process;
    char port[16], grace[32];
    snprintf(port, sizeof port, "%d", r->_port);
    snprintf(grace, sizeof grace, "%g", grace_s);
    char *ours[16];
    size_t n_ours = 0;
    if (r->_port) {
        env_add(ours, &n_ours, "PORT=%s", port);
        env_add(ours, &n_ours, "MOONSERVE_PORT=%s", port);
    } else {
        env_add(ours, &n_ours, "MOONSERVE_SOCKET=%s", r->_socket_path);
    }
    env_add(ours, &n_ours, "MOONSERVE_REPLICA_ID=%s", r->replica_id);
    env_add(ours, &n_ours, "MOONSERVE_APP=%s", spec->app_name);
    env_add(ours, &n_ours, "MOONSERVE_DEPLOYMENT=%s", spec->deployment_name);
    env_add(ours, &n_ours, "MOONSERVE_USER_CONFIG=%s", spec->user_config_json);
    env_add(ours, &n_ours, "MOONSERVE_EXEC_GRACE_S=%s", grace);
    if (spec->cuda_visible_devices) {
        env_add(ours, &n_ours, "CUDA_VISIBLE_DEVICES=%s", spec->cuda_visible_devices);
        env_add(ours, &n_ours, "MOONSERVE_GPU_IDS=%s", spec->gpu_ids ? spec->gpu_ids : "");
    }
    size_t n_environ = 0;
    while (environ[n_environ])
        n_environ++;
    char **env = ms_calloc(n_environ + pc->n_env + n_ours + 1, sizeof *env);
    size_t k = 0;
    for (size_t i = 0; i < n_environ; i++)
        if (!overridden(environ[i], pc->env, pc->n_env) && !overridden(environ[i], ours, n_ours))
            env[k++] = ms_strdup(environ[i]);
    for (size_t i = 0; i < pc->n_env; i++)
        if (!overridden(pc->env[i], ours, n_ours))
            env[k++] = ms_strdup(pc->env[i]);
    for (size_t i = 0; i < n_ours; i++)
        env[k++] = ours[i];
    return env;
}

/* The command's output goes to the engine's log, a line at a time, tagged with the replica. */
static ms_buf_t *out_buf_of(ms_replica_t *r, const uv_handle_t *h)
{
    return &r->_out_buf[h == (const uv_handle_t *)&r->_out[1]];
}

static void out_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    ms_buf_t *b = out_buf_of(h->data, h);
    (void)suggested;
    ms_buf_reserve(b, 4096);
    *buf = uv_buf_init(b->data + b->len, (unsigned)(b->cap - b->len - 1));
}

#define OUTPUT_LINE_MAX 4096

static void log_output_lines(ms_replica_t *r, ms_buf_t *b, int flush)
{
    for (;;) {
        char *nl = memchr(b->data, '\n', b->len);
        size_t n = nl ? (size_t)(nl - b->data) : b->len;
        if (!nl && !flush && b->len < OUTPUT_LINE_MAX)
            return;
        if (n == 0 && !nl)
            return;
        size_t shown = n > OUTPUT_LINE_MAX ? OUTPUT_LINE_MAX : n;
        if (shown && b->data[shown - 1] == '\r')
            shown--;
        ms_info("replica %s: %.*s", r->id, (int)shown, b->data);
        snprintf(r->_last_output, sizeof r->_last_output, "%.*s", (int)shown, b->data);
        ms_buf_consume(b, nl && n < OUTPUT_LINE_MAX ? n + 1 : shown);
    }
}

static void on_out_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    ms_replica_t *r = s->data;
    ms_buf_t *b = out_buf_of(r, (uv_handle_t *)s);
    (void)buf;
    if (nread < 0) {
        log_output_lines(r, b, 1);
        uv_read_stop(s);
        return;
    }
    b->len += (size_t)nread;
    b->data[b->len] = '\0';
    log_output_lines(r, b, 0);
}

/* ---- process replicas: readiness and health, by GET ------------------------------------------ */

#define READY_POLL_MS 100

static void probe_finished(ms_replica_t *r, int answered)
{
    close_probe(r);
    int ok = answered && r->_probe_status >= 200 && r->_probe_status < 300;
    if (answered && !ok)
        snprintf(r->_probe_error, sizeof r->_probe_error, "answered %d", r->_probe_status);
    if (r->state == MS_REPLICA_STARTING) {
        if (ok) {
            uv_timer_stop(&r->_probe_timer);
            r->state = MS_REPLICA_RUNNING;
            r->_events->on_ready(r);
        }
    } else if (r->state == MS_REPLICA_RUNNING && r->_health_id) {
        char why[200];
        snprintf(why, sizeof why, "GET %s %s", r->_health_path, r->_probe_error);
        health_result(r, ok, why);
    }
}

static void on_probe_head(void *data, int status, const ms_http_header_t *h, size_t n, int chunked,
                          int64_t content_length)
{
    (void)h;
    (void)n;
    (void)chunked;
    (void)content_length;
    ((ms_replica_t *)data)->_probe_status = status;
}

static void on_probe_body(void *data, const char *p, size_t n)
{
    (void)data;
    (void)p;
    (void)n;
}

static void on_probe_done(void *data)
{
    probe_finished(data, 1);
}

static void on_probe_error(void *data, ms_http_client_error_t err)
{
    ms_replica_t *r = data;
    snprintf(r->_probe_error, sizeof r->_probe_error, "failed: %s", ms_http_client_error_text(err));
    probe_finished(r, 0);
}

static const ms_http_client_callbacks_t probe_callbacks = {
    .on_head = on_probe_head,
    .on_body = on_probe_body,
    .on_done = on_probe_done,
    .on_error = on_probe_error,
};

static void probe_start(ms_replica_t *r, const char *path)
{
    close_probe(r);
    r->_probe_status = 0;
    r->_probe = ms_http_client_connect(r->_proc.loop, r->_port ? NULL : r->_socket_path,
                                       "127.0.0.1", r->_port);
    ms_buf_t head = {0};
    ms_buf_appendf(&head, "GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", path);
    if (ms_http_client_send(r->_probe, head.data, head.len, "", 0, &probe_callbacks, r) != 0) {
        snprintf(r->_probe_error, sizeof r->_probe_error, "failed: cannot send");
        close_probe(r);
    }
    ms_buf_free(&head);
}

/* Until the command answers ready_path, or ready_timeout_s passes: then the start failed, and
 * the replica is killed (its exit follows). */
static void on_ready_poll(uv_timer_t *t)
{
    ms_replica_t *r = t->data;
    if (r->state != MS_REPLICA_STARTING)
        return;
    if (ms_wall_time() - r->start_time >= r->_ready_timeout_s) {
        uv_timer_stop(t);
        close_probe(r);
        ms_buf_t b = {0};
        ms_buf_appendf(&b, "not ready within ready_timeout_s (%gs): GET %s %s", r->_ready_timeout_s,
                       r->_ready_path, r->_probe_error[0] ? r->_probe_error : "never answered");
        free(r->last_error);
        r->last_error = b.data;
        r->_events->on_failed(r, r->last_error);
        ms_replica_kill(r);
        return;
    }
    if (!r->_probe)
        probe_start(r, r->_ready_path);
}

/* What to check when spawning fails for want of a resource (docs/operations.md). */
static const char *spawn_hint(int rc)
{
    if (rc == UV_EMFILE || rc == UV_ENFILE)
        return " (the controller is out of file descriptors: raise its hard open-files limit, "
               "ulimit -Hn, or run fewer replicas)";
    if (rc == UV_EAGAIN || rc == UV_ENOMEM)
        return " (out of processes or memory: check ulimit -u, kernel.pid_max and free memory)";
    return "";
}

/* A process replica's own state: where it listens, how it is probed, its output pipes. */
static void prepare_process(uv_loop_t *loop, ms_replica_t *r, const ms_replica_spec_t *spec,
                            char ***args)
{
    const ms_process_config_t *pc = spec->process;
    r->_is_process = 1;
    r->_port = pc->listen_port ? pick_port() : 0;
    r->_ready_path = ms_strdup(pc->ready_path);
    r->_ready_timeout_s = pc->ready_timeout_s;
    r->_health_path = pc->health_path ? ms_strdup(pc->health_path) : NULL;
    *args = process_argv(r, spec);
    uv_timer_init(loop, &r->_probe_timer);
    r->_probe_timer.data = r;
    for (int i = 0; i < 2; i++) {
        uv_pipe_init(loop, &r->_out[i], 0);
        r->_out[i].data = r;
    }
    r->_open_handles += 3;
}

ms_replica_t *ms_replica_spawn(uv_loop_t *loop, const ms_replica_spec_t *spec,
                               const ms_replica_events_t *events, void *owner, char *err,
                               size_t err_cap)
{
    ms_replica_t *r = ms_calloc(1, sizeof *r);
    /* One counter for every deployment: ids, tags and socket names never repeat. */
    static int replica_seq;
    int seq = ++replica_seq;
    snprintf(r->id, sizeof r->id, "%s#%d", spec->deployment_name, seq);
    snprintf(r->replica_id, sizeof r->replica_id, "%d", seq);
    r->owner = owner;
    r->_events = events;
    r->max_ongoing_requests = spec->max_ongoing_requests;
    r->state = MS_REPLICA_STARTING;
    ms_buf_t path = {0};
    ms_buf_appendf(&path, "%s/r%d.sock", spec->run_dir, seq);
    r->_socket_path = path.data;

    char max_ongoing[16], wait_loop[32], memory[24];
    snprintf(max_ongoing, sizeof max_ongoing, "%d", spec->max_ongoing_requests);
    snprintf(wait_loop, sizeof wait_loop, "%g", spec->graceful_shutdown_wait_loop_s);
    snprintf(memory, sizeof memory, "%lld", spec->memory_bytes);
    char *lua_args[] = {(char *)"moonserve",
                        (char *)"__replica",
                        (char *)"--socket",
                        r->_socket_path,
                        (char *)"--controller",
                        (char *)spec->controller_socket,
                        (char *)"--app",
                        (char *)spec->app_name,
                        (char *)"--deployment",
                        (char *)spec->deployment_name,
                        (char *)"--replica-id",
                        r->replica_id,
                        (char *)"--import",
                        (char *)spec->import_path,
                        (char *)"--args-json",
                        (char *)spec->args_json,
                        (char *)"--user-config-json",
                        (char *)spec->user_config_json,
                        (char *)"--max-ongoing",
                        max_ongoing,
                        (char *)"--wait-loop-s",
                        wait_loop,
                        (char *)"--memory-bytes",
                        memory,
                        NULL};
    char **proc_args = NULL;
    if (spec->process)
        prepare_process(loop, r, spec, &proc_args);

    uv_pipe_init(loop, &r->_ctl, 0);
    r->_ctl.data = r;
    uv_timer_init(loop, &r->_kill_timer);
    r->_kill_timer.data = r;
    r->_open_handles += 2; /* the process handles (prepare_process) may be counted already */

    uv_stdio_container_t stdio[4];
    stdio[0].flags = UV_IGNORE;
    stdio[1].flags = UV_INHERIT_FD;
    stdio[1].data.fd = 1;
    stdio[2].flags = UV_INHERIT_FD;
    stdio[2].data.fd = 2;
    stdio[3].flags = UV_CREATE_PIPE | UV_READABLE_PIPE | UV_WRITABLE_PIPE;
    stdio[3].data.stream = (uv_stream_t *)&r->_ctl;
    if (r->_is_process)
        for (int i = 0; i < 2; i++) {
            stdio[1 + i].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
            stdio[1 + i].data.stream = (uv_stream_t *)&r->_out[i];
        }

    uv_process_options_t opts = {0};
    opts.file = spec->exe_path;
    opts.args = r->_is_process ? proc_args : lua_args;
    opts.cwd = r->_is_process ? spec->process->cwd : NULL;
    opts.exit_cb = on_exit_cb;
    opts.stdio = stdio;
    opts.stdio_count = 4;
    /* A session of its own keeps a terminal's Ctrl-C away from replicas: the controller alone
     * decides how they stop, so in-flight requests can drain. */
    opts.flags = UV_PROCESS_DETACHED;
    char **env = r->_is_process ? process_env(r, spec, spec->graceful_shutdown_wait_loop_s + 5.0)
                                : replica_env(spec);
    opts.env = env;
    r->_proc.data = r;
    int rc = uv_spawn(loop, &r->_proc, &opts);
    free_env(env);
    free_list(proc_args);
    if (rc != 0) {
        ms_error("replica %s: spawn failed: %s%s", r->id, uv_strerror(rc), spawn_hint(rc));
        if (err && err_cap)
            snprintf(err, err_cap, "%s%s", uv_strerror(rc), spawn_hint(rc));
        r->_exited = 1;
        r->state = MS_REPLICA_DEAD;
        r->_freed = 1;
        r->_open_handles++; /* uv_spawn failure still needs the process handle closed */
        uv_close((uv_handle_t *)&r->_proc, on_handle_closed);
        uv_close((uv_handle_t *)&r->_ctl, on_handle_closed);
        uv_close((uv_handle_t *)&r->_kill_timer, on_handle_closed);
        close_process_handles(r);
        return NULL;
    }
    r->_open_handles++;
    r->pid = r->_proc.pid;
    r->start_time = ms_wall_time();
    uv_read_start((uv_stream_t *)&r->_ctl, ctl_alloc, on_ctl_read);
    if (r->_is_process) {
        for (int i = 0; i < 2; i++)
            uv_read_start((uv_stream_t *)&r->_out[i], out_alloc, on_out_read);
        uv_timer_start(&r->_probe_timer, on_ready_poll, READY_POLL_MS / 2, READY_POLL_MS);
    }
    ms_info("replica %s: started, pid %d", r->id, r->pid);
    return r;
}

static void on_kill_timer(uv_timer_t *t)
{
    ms_replica_t *r = t->data;
    ms_warn("replica %s: still running after the graceful shutdown timeout; killing it", r->id);
    ms_replica_kill(r);
}

void ms_replica_stop(ms_replica_t *r, double timeout_s)
{
    if (r->_exited)
        return;
    r->state = MS_REPLICA_STOPPING;
    r->stop_requested = 1; /* its link stays up: the requests on it drain */
    uv_process_kill(&r->_proc, SIGTERM);
    uv_timer_start(&r->_kill_timer, on_kill_timer, (uint64_t)(timeout_s * 1000.0), 0);
}

void ms_replica_kill(ms_replica_t *r)
{
    if (r->_exited)
        return;
    /* A process replica's command may have started workers of its own: the whole group goes. */
    if (r->_is_process)
        kill(-r->pid, SIGKILL);
    uv_process_kill(&r->_proc, SIGKILL);
}

typedef struct ctl_write {
    uv_write_t req;
    char bytes[];
} ctl_write_t;

static void on_ctl_written(uv_write_t *req, int status)
{
    (void)status; /* a failed write means the replica is exiting; its exit is handled there */
    free(req);
}

static void ctl_send(ms_replica_t *r, json_t *msg)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    json_decref(msg);
    if (!text)
        return;
    size_t n = strlen(text);
    ctl_write_t *w = ms_malloc(sizeof *w + n + 1);
    memcpy(w->bytes, text, n);
    w->bytes[n] = '\n';
    free(text);
    uv_buf_t b = uv_buf_init(w->bytes, (unsigned)n + 1);
    if (uv_write(&w->req, (uv_stream_t *)&r->_ctl, &b, 1, on_ctl_written) != 0)
        free(w);
}

void ms_replica_poll_stats(ms_replica_t *r, double timeout_s)
{
    /* A process replica has no record_*_stats(): it is scaled and routed on its request counts. */
    if (r->_is_process || r->state != MS_REPLICA_RUNNING || uv_is_closing((uv_handle_t *)&r->_ctl))
        return;
    uint64_t now = ms_now_ms();
    if (r->_stats_id && now - r->_stats_sent_ms < (uint64_t)(timeout_s * 1000.0))
        return;
    r->_stats_id = ++r->_ctl_seq;
    r->_stats_sent_ms = now;
    ctl_send(r, json_pack("{s:s, s:I}", "op", "stats", "id", (json_int_t)r->_stats_id));
}

static int ctl_usable(ms_replica_t *r)
{
    return (r->state == MS_REPLICA_RUNNING || r->state == MS_REPLICA_STARTING) &&
           !uv_is_closing((uv_handle_t *)&r->_ctl);
}

void ms_replica_check_health(ms_replica_t *r, double period_s, double timeout_s)
{
    if (r->state != MS_REPLICA_RUNNING || uv_is_closing((uv_handle_t *)&r->_ctl))
        return;
    if (r->_is_process && !r->_health_path)
        return; /* without health_path a process is healthy while it runs */
    uint64_t now = ms_now_ms();
    if (r->_health_id) {
        if (now - r->_health_sent_ms >= (uint64_t)(timeout_s * 1000.0)) {
            if (r->_is_process)
                close_probe(r);
            health_result(r, 0, "no answer within health_check_timeout_s");
        }
        return;
    }
    if (now < r->_next_health_ms)
        return;
    /* Spread checks over ±10 % of the period, as Ray Serve does, so replicas started together
     * are not all probed at once. */
    double jitter = 0.9 + 0.2 * (double)(ms_now_us() % 1000) / 1000.0;
    r->_next_health_ms = now + (uint64_t)(period_s * 1000.0 * jitter);
    r->_health_id = ++r->_ctl_seq;
    r->_health_sent_ms = now;
    if (r->_is_process)
        probe_start(r, r->_health_path);
    else
        ctl_send(r, json_pack("{s:s, s:I}", "op", "health", "id", (json_int_t)r->_health_id));
}

void ms_replica_reconfigure(ms_replica_t *r, const char *user_config_json)
{
    json_error_t jerr;
    if (r->_is_process)
        return; /* a command reads MOONSERVE_USER_CONFIG when it starts */
    json_t *uc = json_loads(user_config_json, JSON_DECODE_ANY, &jerr);
    if (!uc || !ctl_usable(r)) {
        json_decref(uc);
        return;
    }
    ctl_send(r, json_pack("{s:s, s:I, s:o}", "op", "reconfigure", "id", (json_int_t)++r->_ctl_seq,
                          "user_config", uc));
}

void ms_replica_configure(ms_replica_t *r, int max_ongoing_requests, double wait_loop_s)
{
    r->max_ongoing_requests = max_ongoing_requests;
    if (ctl_usable(r) && !r->_is_process)
        ctl_send(r, json_pack("{s:s, s:I, s:i, s:f}", "op", "configure", "id",
                              (json_int_t)++r->_ctl_seq, "max_ongoing_requests",
                              max_ongoing_requests, "graceful_shutdown_wait_loop_s", wait_loop_s));
}

void ms_replica_free(ms_replica_t *r)
{
    r->_freed = 1;
    maybe_release(r);
}

/* Connected on first use: an idle replica holds no link. A link that broke is not replaced (the
 * replica is being replaced instead). */
static ms_link_t *replica_link(ms_replica_t *r)
{
    if (!r->_link && r->state == MS_REPLICA_RUNNING)
        r->_link = ms_link_connect(r->_proc.loop, r->_socket_path, &link_events, r);
    return r->_link && ms_link_is_up(r->_link) ? r->_link : NULL;
}

uint32_t ms_replica_send(ms_replica_t *r, const ms_link_request_t *lr,
                         ms_http_request_t *body_source, const ms_link_callbacks_t *cb, void *data)
{
    if (!r->_is_process) {
        ms_link_t *l = replica_link(r);
        return l ? ms_link_send(l, lr, cb, data) : 0;
    }
    if (r->state != MS_REPLICA_RUNNING && r->state != MS_REPLICA_STOPPING)
        return 0;
    if (!r->_upstream)
        r->_upstream = ms_upstream_new(r->_proc.loop, r->_port ? NULL : r->_socket_path, r->_port);
    return ms_upstream_send(r->_upstream, lr, body_source, cb, data);
}

void ms_replica_cancel(ms_replica_t *r, uint32_t stream)
{
    if (r->_is_process) {
        if (r->_upstream)
            ms_upstream_cancel(r->_upstream, stream);
    } else if (r->_link) {
        ms_link_cancel(r->_link, stream);
    }
}

void ms_replica_credit(ms_replica_t *r, uint32_t stream, size_t n)
{
    if (r->_is_process) {
        if (r->_upstream)
            ms_upstream_credit(r->_upstream, stream, n);
    } else if (r->_link) {
        ms_link_credit(r->_link, stream, n);
    }
}

int ms_replica_is_process(const ms_replica_t *r)
{
    return r->_is_process;
}
