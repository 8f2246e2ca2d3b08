/*
 * tasks/queue: a task queue's lifecycle, its control-loop tick and its status (tasks.h).
 */
#include "tasks/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

ms_broker_status_t tq_cmd(ms_broker_t *b, ms_broker_cb cb, void *data, int argc, const char **argv)
{
    size_t lens[32];
    for (int i = 0; i < argc && i < 32; i++)
        lens[i] = strlen(argv[i]);
    return ms_broker_command(b, cb, data, argc, argv, lens);
}

void tq_ignore(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    (void)data;
    (void)r;
    if (st != MS_BROKER_OK && st != MS_BROKER_CLOSED)
        ms_debug("tasks: command failed (%s): %s", ms_broker_status_name(st), err ? err : "");
}

void tq_task_key(char *out, size_t cap, const char *id)
{
    snprintf(out, cap, TQ_PREFIX "task:%s", id);
}

void tq_fmt_time(char *out, size_t cap, double t)
{
    snprintf(out, cap, "%.6f", t);
}

long tq_capacity(const ms_task_queue_t *q)
{
    long room = (long)ms_deployment_running_replicas(q->dep) * q->max_ongoing;
    return room - (long)q->n_running;
}

static void stream_key(char *out, const char *name)
{
    if (name)
        snprintf(out, TQ_KEY_MAX, TQ_PREFIX "queue:%s", name);
    else
        out[0] = 0;
}

static void on_group(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    ms_task_queue_t *q = data;
    q->group_asked = 0;
    if (st == MS_BROKER_OK || (st == MS_BROKER_REPLY_ERROR && err && strstr(err, "BUSYGROUP"))) {
        q->group_ready = 1;
        tq_pull(q);
    } else if (st != MS_BROKER_CLOSED) {
        ms_warn("tasks: queue %s: cannot create its consumer group: %s", q->cfg.queue_name,
                err ? err : ms_broker_status_name(st));
    }
    (void)r;
}

/* The group starts at the stream's beginning ("0"), so tasks submitted before any consumer
 * existed are delivered; MKSTREAM makes the stream if nobody submitted yet. */
static void ensure_group(ms_task_queue_t *q)
{
    if (q->group_ready || q->group_asked || !ms_broker_connected(q->cmd))
        return;
    const char *argv[] = {"XGROUP", "CREATE", q->stream, TQ_GROUP, "0", "MKSTREAM"};
    q->group_asked = 1;
    tq_cmd(q->cmd, on_group, q, 6, argv);
}

static void on_cmd_state(void *data, int connected, const char *why)
{
    ms_task_queue_t *q = data;
    (void)why;
    q->group_ready = 0; /* the stream may have gone with a flushed Redis: ask again */
    if (connected)
        ensure_group(q);
}

static void on_blk_state(void *data, int connected, const char *why)
{
    (void)why;
    if (connected)
        tq_pull(data);
}

static void on_sample(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    ms_task_queue_t *q = data;
    (void)err;
    q->sampling = 0;
    /* XINFO GROUPS: each group's "pending" (delivered, not acknowledged) and, Redis 7, "lag";
     * the backlog is the stream's length less what is pending. */
    if (st != MS_BROKER_OK || !r || r->type != REDIS_REPLY_ARRAY)
        return;
    long long pending = 0;
    for (size_t g = 0; g < r->elements; g++) {
        const redisReply *e = r->element[g];
        if (e->type != REDIS_REPLY_ARRAY)
            continue;
        for (size_t i = 0; i + 1 < e->elements; i += 2)
            if (e->element[i]->type == REDIS_REPLY_STRING &&
                strcmp(e->element[i]->str, "pending") == 0 &&
                e->element[i + 1]->type == REDIS_REPLY_INTEGER)
                pending += e->element[i + 1]->integer;
    }
    q->backlog = q->stream_len > pending ? q->stream_len - pending : 0;
}

static void on_len(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    ms_task_queue_t *q = data;
    (void)err;
    if (st == MS_BROKER_OK && r && r->type == REDIS_REPLY_INTEGER)
        q->stream_len = r->integer;
}

static void sample(ms_task_queue_t *q)
{
    if (q->sampling || !ms_broker_connected(q->cmd))
        return;
    const char *len[] = {"XLEN", q->stream};
    const char *info[] = {"XINFO", "GROUPS", q->stream};
    if (tq_cmd(q->cmd, on_len, q, 2, len) != MS_BROKER_OK)
        return;
    q->sampling = 1;
    tq_cmd(q->cmd, on_sample, q, 3, info);
}

void ms_task_queue_tick(ms_task_queue_t *q)
{
    uint64_t now = uv_now(q->loop);
    ensure_group(q);
    tq_pull(q);
    if (now - q->last_claim_ms >= (uint64_t)(q->cfg.visibility_timeout_s * 500)) {
        q->last_claim_ms = now;
        tq_claim(q);
    }
    if (now - q->last_renew_ms >= (uint64_t)(q->cfg.visibility_timeout_s * 333)) {
        q->last_renew_ms = now;
        tq_renew(q);
    }
    if (now - q->last_sample_ms >= TQ_SAMPLE_MS) {
        q->last_sample_ms = now;
        sample(q);
    }
}

static char *dup_or_null(const char *s)
{
    return s ? ms_strdup(s) : NULL;
}

ms_task_queue_t *ms_task_queue_new(uv_loop_t *loop, const ms_task_queue_spec_t *spec, char **err)
{
    ms_task_queue_t *q = ms_calloc(1, sizeof *q);
    q->loop = loop;
    q->cfg = *spec->cfg;
    q->cfg.queue_name = ms_strdup(spec->cfg->queue_name);
    q->cfg.broker_url = ms_strdup(spec->cfg->broker_url);
    q->cfg.failed_task_queue_name = dup_or_null(spec->cfg->failed_task_queue_name);
    q->cfg.unprocessable_task_queue_name = dup_or_null(spec->cfg->unprocessable_task_queue_name);
    q->app = ms_strdup(spec->application);
    q->dep_name = ms_strdup(spec->deployment);
    q->handle_socket = ms_strdup(spec->handle_socket);
    q->dep = spec->dep;
    q->max_ongoing = spec->max_ongoing_requests;
    q->backlog = -1;
    snprintf(q->target, sizeof q->target, "%s/%s", q->app, q->dep_name);
    stream_key(q->stream, q->cfg.queue_name);
    stream_key(q->failed_stream, q->cfg.failed_task_queue_name);
    stream_key(q->unprocessable_stream, q->cfg.unprocessable_task_queue_name);
    char host[64] = "host", rid[33];
    gethostname(host, sizeof host - 1);
    ms_random_id(rid);
    snprintf(q->consumer, sizeof q->consumer, "%s-%d-%.8s", host, (int)getpid(), rid);
    ms_broker_opts_t o = {.on_state = on_cmd_state, .state_data = q};
    q->cmd = ms_broker_new(loop, q->cfg.broker_url, &o, err);
    ms_broker_opts_t ob = {
        .command_timeout_ms = TQ_BLOCK_MS + 2000, .on_state = on_blk_state, .state_data = q};
    q->blk = q->cmd ? ms_broker_new(loop, q->cfg.broker_url, &ob, err) : NULL;
    if (!q->blk) {
        ms_task_queue_free(q);
        return NULL;
    }
    return q;
}

void ms_task_queue_free(ms_task_queue_t *q)
{
    if (!q)
        return;
    q->freeing = 1;
    while (q->running)
        tq_drop(q->running); /* unacknowledged: delivered again after the visibility timeout */
    while (q->n_pool > 0)
        ms_http_client_close(q->pool[--q->n_pool]);
    if (q->cmd)
        ms_broker_free(q->cmd); /* callbacks in flight get MS_BROKER_CLOSED now */
    if (q->blk)
        ms_broker_free(q->blk);
    free(q->cfg.queue_name);
    free(q->cfg.broker_url);
    free(q->cfg.failed_task_queue_name);
    free(q->cfg.unprocessable_task_queue_name);
    free(q->app);
    free(q->dep_name);
    free(q->handle_socket);
    free(q);
}

static int same_str(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

int ms_task_queue_same(const ms_task_queue_t *q, const ms_task_queue_config_t *c)
{
    const ms_task_queue_config_t *m = &q->cfg;
    return same_str(m->queue_name, c->queue_name) && same_str(m->broker_url, c->broker_url) &&
           m->max_retries == c->max_retries && m->retry_backoff_s == c->retry_backoff_s &&
           m->retry_backoff_max_s == c->retry_backoff_max_s &&
           same_str(m->failed_task_queue_name, c->failed_task_queue_name) &&
           same_str(m->unprocessable_task_queue_name, c->unprocessable_task_queue_name) &&
           m->visibility_timeout_s == c->visibility_timeout_s &&
           m->result_ttl_s == c->result_ttl_s && m->max_queue_length == c->max_queue_length &&
           m->task_timeout_s == c->task_timeout_s;
}

void ms_task_queue_set_max_ongoing(ms_task_queue_t *q, int n)
{
    q->max_ongoing = n;
}

void ms_task_queue_drain(ms_task_queue_t *q)
{
    q->draining = 1;
}

const char *ms_task_queue_name(const ms_task_queue_t *q)
{
    return q->cfg.queue_name;
}

long long ms_task_queue_backlog(const ms_task_queue_t *q)
{
    return q->backlog;
}

json_t *ms_task_queue_info(const ms_task_queue_t *q)
{
    json_t *j = json_pack("{s:s, s:b, s:I, s:I}", "queue", q->cfg.queue_name, "connected",
                          ms_broker_connected(q->cmd), "backlog", (json_int_t)q->backlog, "running",
                          (json_int_t)q->n_running);
    json_object_set_new(j, "submitted", json_integer((json_int_t)q->n_submitted));
    json_object_set_new(j, "started", json_integer((json_int_t)q->n_started));
    json_object_set_new(j, "succeeded", json_integer((json_int_t)q->n_succeeded));
    json_object_set_new(j, "failed", json_integer((json_int_t)q->n_failed));
    json_object_set_new(j, "retried", json_integer((json_int_t)q->n_retried));
    json_object_set_new(j, "redelivered", json_integer((json_int_t)q->n_redelivered));
    json_object_set_new(j, "unprocessable", json_integer((json_int_t)q->n_unprocessable));
    json_object_set_new(j, "revoked", json_integer((json_int_t)q->n_revoked));
    if (!ms_broker_connected(q->cmd))
        json_object_set_new(j, "broker_error", json_string(ms_broker_last_error(q->cmd)));
    return j;
}
