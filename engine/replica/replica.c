/*
 * replica: process supervision and connection pooling for one replica. See replica.h.
 */
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "replica/replica.h"

static void maybe_release(ms_replica_t *r)
{
    if (r->_freed && r->_open_handles == 0) {
        ms_buf_free(&r->_ctl_in);
        free(r->_socket_path);
        free(r->last_error);
        json_decref(r->autoscaling_stats);
        json_decref(r->routing_stats);
        json_decref(r->batching_stats);
        free(r);
    }
}

static void on_handle_closed(uv_handle_t *h)
{
    ms_replica_t *r = h->data;
    r->_open_handles--;
    maybe_release(r);
}

static void close_link(ms_replica_t *r)
{
    ms_link_t *l = r->_link;
    r->_link = NULL;
    if (l)
        ms_link_close(l); /* its open streams fail now */
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

static void on_exit_cb(uv_process_t *p, int64_t exit_status, int term_signal)
{
    ms_replica_t *r = p->data;
    drain_control_pipe(r);
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
    json_t *bs = json_object_get(msg, "batching");
    json_decref(r->autoscaling_stats);
    json_decref(r->routing_stats);
    json_decref(r->batching_stats);
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

/* The controller's environment with the replica's GPU variables replaced (NULL when the spec sets
 * none, so the replica inherits it). Freed by free_env. */
static char **replica_env(const ms_replica_spec_t *spec)
{
    if (!spec->cuda_visible_devices)
        return NULL;
    size_t n = 0;
    while (environ[n])
        n++;
    char **env = ms_calloc(n + 3, sizeof *env);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "CUDA_VISIBLE_DEVICES=", 21) != 0 &&
            strncmp(environ[i], "MOONSERVE_GPU_IDS=", 18) != 0)
            env[k++] = ms_strdup(environ[i]);
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "CUDA_VISIBLE_DEVICES=%s", spec->cuda_visible_devices);
    env[k++] = b.data;
    ms_buf_t ids = {0};
    ms_buf_appendf(&ids, "MOONSERVE_GPU_IDS=%s", spec->gpu_ids ? spec->gpu_ids : "");
    env[k++] = ids.data;
    return env;
}

static void free_env(char **env)
{
    for (size_t i = 0; env && env[i]; i++)
        free(env[i]);
    free(env);
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
    char *args[] = {(char *)"moonserve",
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

    uv_pipe_init(loop, &r->_ctl, 0);
    r->_ctl.data = r;
    uv_timer_init(loop, &r->_kill_timer);
    r->_kill_timer.data = r;
    r->_open_handles = 2;

    uv_stdio_container_t stdio[4];
    stdio[0].flags = UV_IGNORE;
    stdio[1].flags = UV_INHERIT_FD;
    stdio[1].data.fd = 1;
    stdio[2].flags = UV_INHERIT_FD;
    stdio[2].data.fd = 2;
    stdio[3].flags = UV_CREATE_PIPE | UV_READABLE_PIPE | UV_WRITABLE_PIPE;
    stdio[3].data.stream = (uv_stream_t *)&r->_ctl;

    uv_process_options_t opts = {0};
    opts.file = spec->exe_path;
    opts.args = args;
    opts.exit_cb = on_exit_cb;
    opts.stdio = stdio;
    opts.stdio_count = 4;
    /* A session of its own keeps a terminal's Ctrl-C away from replicas: the controller alone
     * decides how they stop, so in-flight requests can drain. */
    opts.flags = UV_PROCESS_DETACHED;
    char **env = replica_env(spec);
    opts.env = env;
    r->_proc.data = r;
    int rc = uv_spawn(loop, &r->_proc, &opts);
    free_env(env);
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
        return NULL;
    }
    r->_open_handles++;
    r->pid = r->_proc.pid;
    r->start_time = ms_wall_time();
    uv_read_start((uv_stream_t *)&r->_ctl, ctl_alloc, on_ctl_read);
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
    if (!r->_exited)
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
    if (r->state != MS_REPLICA_RUNNING || uv_is_closing((uv_handle_t *)&r->_ctl))
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
    uint64_t now = ms_now_ms();
    if (r->_health_id) {
        if (now - r->_health_sent_ms >= (uint64_t)(timeout_s * 1000.0))
            health_result(r, 0, "no answer within health_check_timeout_s");
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
    ctl_send(r, json_pack("{s:s, s:I}", "op", "health", "id", (json_int_t)r->_health_id));
}

void ms_replica_reconfigure(ms_replica_t *r, const char *user_config_json)
{
    json_error_t jerr;
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
    if (ctl_usable(r))
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
ms_link_t *ms_replica_link(ms_replica_t *r)
{
    if (!r->_link && r->state == MS_REPLICA_RUNNING)
        r->_link = ms_link_connect(r->_proc.loop, r->_socket_path, &link_events, r);
    return r->_link && ms_link_is_up(r->_link) ? r->_link : NULL;
}
