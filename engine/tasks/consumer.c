/*
 * tasks/consumer: taking tasks from the stream and running them (tasks.h). A task is a call to
 * the deployment through the handle socket; its answer is a stream of lines, each a kind and a
 * JSON text: `p` progress (stored as it comes), then one of `r` result, `e` the handler's error,
 * `u` unprocessable (no such handler, undecodable payload). Every command for a task carries the
 * task as its data, counted in `inflight`: a task dropped with commands out is freed by the last
 * answer.
 */
#include "tasks/internal.h"

#include <math.h>

#include "link/link.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LINE_MAX_BYTES (64u << 20) /* a result larger than this fails the task */

static void free_running(running_t *r)
{
    free(r->name);
    free(r->payload);
    free(r->value);
    ms_buf_free(&r->line);
    free(r);
}

static void close_timer_cb(uv_handle_t *h)
{
    free(h);
}

static void stop_timer(running_t *r)
{
    if (r->timer) {
        uv_close((uv_handle_t *)r->timer, close_timer_cb);
        r->timer = NULL;
    }
}

void tq_drop(running_t *r)
{
    ms_task_queue_t *q = r->q;
    if (r->prevp) {
        *r->prevp = r->next;
        if (r->next)
            r->next->prevp = r->prevp;
        r->prevp = NULL;
        q->n_running--;
    }
    stop_timer(r);
    if (r->client) {
        ms_http_client_close(r->client); /* the controller cancels the call downstream */
        r->client = NULL;
    }
    r->dead = 1;
    if (r->inflight == 0)
        free_running(r);
    if (!q->freeing)
        tq_pull(q); /* a slot is free: the reads batch themselves (one at a time, COUNT = room) */
}

running_t *tq_find_running(ms_task_queue_t *q, const char *id)
{
    for (running_t *r = q->running; r; r = r->next)
        if (strcmp(r->id, id) == 0 || strcmp(r->entry, id) == 0)
            return r;
    return NULL;
}

/* A command for r; its callback must start with took(). */
static void send_for(running_t *r, ms_broker_cb cb, int argc, const char **argv)
{
    r->inflight++;
    if (tq_cmd(r->q->cmd, cb, r, argc, argv) != MS_BROKER_OK) {
        /* cb ran already, with MS_BROKER_DOWN */
    }
}

/* Counts an answer for r; 0 when r is gone (then nothing more may be done with it). */
static int took(running_t *r)
{
    r->inflight--;
    if (r->dead) {
        if (r->inflight == 0)
            free_running(r);
        return 0;
    }
    return 1;
}

static void ignore_for(void *data, ms_broker_status_t st, const redisReply *rep, const char *err)
{
    if (took(data))
        tq_ignore(data, st, rep, err);
}

/* ---- the end of a task ------------------------------------------------------------------------
 */

static void on_acked(void *data, ms_broker_status_t st, const redisReply *rep, const char *err)
{
    running_t *r = data;
    (void)rep;
    if (!took(r))
        return;
    if (st != MS_BROKER_OK)
        ms_warn("tasks: task %s: not acknowledged (%s): it will be delivered again", r->id,
                err ? err : ms_broker_status_name(st));
    tq_drop(r);
}

/* XACK then XDEL: the entry is gone once its outcome is stored (the commands before this on the
 * same connection ran first). */
static void ack(running_t *r)
{
    ms_task_queue_t *q = r->q;
    const char *xack[] = {"XACK", q->stream, TQ_GROUP, r->entry};
    const char *xdel[] = {"XDEL", q->stream, r->entry};
    send_for(r, ignore_for, 4, xack);
    send_for(r, on_acked, 3, xdel);
}

static void store_final(running_t *r, const char *status, const char *field, const char *value)
{
    ms_task_queue_t *q = r->q;
    char key[TQ_KEY_MAX], now[40], ttl[40];
    tq_task_key(key, sizeof key, r->id);
    tq_fmt_time(now, sizeof now, ms_wall_time());
    snprintf(ttl, sizeof ttl, "%lld", (long long)ceil(q->cfg.result_ttl_s));
    const char *hset[] = {"HSET", key, "status", status, "finished_at", now, field, value};
    const char *expire[] = {"EXPIRE", key, ttl};
    send_for(r, ignore_for, field ? 8 : 6, hset);
    send_for(r, ignore_for, 3, expire);
}

/* Parks a task in a dead-letter stream (with why it is there). */
static void park(running_t *r, const char *stream, const char *why)
{
    if (!stream[0])
        return;
    char attempt[16];
    snprintf(attempt, sizeof attempt, "%d", r->attempt);
    const char *xadd[] = {"XADD",  stream,  "*",       "id",       r->id,
                          "name",  r->name, "payload", r->payload, "attempt",
                          attempt, "error", why,       "queue",    r->q->cfg.queue_name};
    send_for(r, ignore_for, 15, xadd);
}

static void succeed(running_t *r)
{
    r->ending = 1;
    r->q->n_succeeded++;
    store_final(r, "SUCCESS", "result", r->value ? r->value : "null");
    ack(r);
}

static void unprocessable(running_t *r, const char *why)
{
    char msg[1024];
    snprintf(msg, sizeof msg, "unprocessable: %s", why);
    r->ending = 1;
    r->q->n_unprocessable++;
    store_final(r, "FAILURE", "error", msg);
    park(r, r->q->unprocessable_stream, msg);
    ack(r);
}

static void on_retry_due(uv_timer_t *t)
{
    running_t *r = t->data;
    stop_timer(r);
    ms_task_queue_t *q = r->q;
    char attempt[16];
    snprintf(attempt, sizeof attempt, "%d", r->attempt + 1);
    /* The retry's entry goes in before the failed one leaves: at least once, even if the engine
     * dies in between. */
    const char *xadd[] = {"XADD",  q->stream, "*",        "id",      r->id,  "name",
                          r->name, "payload", r->payload, "attempt", attempt};
    send_for(r, ignore_for, 11, xadd);
    ack(r);
}

static void start_timer(running_t *r, double seconds, uv_timer_cb cb)
{
    stop_timer(r);
    r->timer = ms_malloc(sizeof *r->timer);
    uv_timer_init(r->q->loop, r->timer);
    r->timer->data = r;
    uv_timer_start(r->timer, cb, (uint64_t)(seconds * 1000), 0);
}

/* The handler failed: RETRY after a backoff while attempts are left, else FAILURE (and the
 * failed-task queue). */
static void failed(running_t *r, const char *why)
{
    ms_task_queue_t *q = r->q;
    char key[TQ_KEY_MAX];
    tq_task_key(key, sizeof key, r->id);
    r->ending = 1;
    if (r->attempt < q->cfg.max_retries) {
        q->n_retried++;
        const char *hset[] = {"HSET", key, "status", "RETRY", "error", why};
        send_for(r, ignore_for, 6, hset);
        double delay = q->cfg.retry_backoff_s * pow(2, r->attempt);
        if (delay > q->cfg.retry_backoff_max_s)
            delay = q->cfg.retry_backoff_max_s;
        ms_info("tasks: task %s (%s) failed, attempt %d of %d; retrying in %gs: %s", r->id, r->name,
                r->attempt + 1, q->cfg.max_retries + 1, delay, why);
        start_timer(r, delay, on_retry_due);
        return;
    }
    q->n_failed++;
    ms_warn("tasks: task %s (%s) failed after %d attempt(s): %s", r->id, r->name, r->attempt + 1,
            why);
    store_final(r, "FAILURE", "error", why);
    park(r, q->failed_stream, why);
    ack(r);
}

void tq_cancel_running(running_t *r)
{
    if (r->ending)
        return;
    r->ending = 1;
    r->q->n_revoked++;
    stop_timer(r);
    if (r->client) {
        ms_http_client_close(r->client); /* cancels the handler's request at every depth */
        r->client = NULL;
    }
    char key[TQ_KEY_MAX], ttl[40];
    tq_task_key(key, sizeof key, r->id);
    snprintf(ttl, sizeof ttl, "%lld", (long long)ceil(r->q->cfg.result_ttl_s));
    const char *expire[] = {"EXPIRE", key, ttl};
    send_for(r, ignore_for, 3, expire);
    ack(r);
}

/* ---- the call ---------------------------------------------------------------------------------
 */

static void send_call(running_t *r);

static void on_redeliver_due(uv_timer_t *t)
{
    running_t *r = t->data;
    stop_timer(r);
    send_call(r);
}

/* The task did not run to an answer (its replica was lost, the deployment had no room): run it
 * again, without counting a retry, after a delay that grows. */
static void redeliver(running_t *r, const char *why)
{
    r->redeliveries++;
    r->q->n_redelivered++;
    double delay = TQ_REDELIVER_S * pow(2, r->redeliveries > 5 ? 5 : r->redeliveries - 1);
    ms_info("tasks: task %s (%s) runs again in %gs: %s", r->id, r->name, delay, why);
    start_timer(r, delay, on_redeliver_due);
}

/* The message of an error answer: its JSON "error", else the body. */
static void answer_message(running_t *r, char *out, size_t cap)
{
    json_t *j = json_loadb(r->line.data ? r->line.data : "", r->line.len, 0, NULL);
    const char *e = json_string_value(json_object_get(j, "error"));
    snprintf(out, cap, "status %d: %.*s", r->status, e ? (int)strlen(e) : (int)r->line.len,
             e ? e : (r->line.data ? r->line.data : ""));
    json_decref(j);
}

static void on_progress(running_t *r, const char *json)
{
    char key[TQ_KEY_MAX];
    tq_task_key(key, sizeof key, r->id);
    const char *hset[] = {"HSET", key, "progress", json};
    send_for(r, ignore_for, 4, hset);
}

static void take_line(running_t *r)
{
    ms_buf_append(&r->line, "", 1); /* NUL-terminates */
    const char *s = r->line.data;
    char kind = s[0];
    if (kind == 'p') {
        on_progress(r, s + 1);
    } else if (kind == 'r' || kind == 'e' || kind == 'u') {
        free(r->value);
        r->value = NULL;
        r->outcome = kind;
        if (kind == 'r') {
            r->value = ms_strdup(s + 1);
        } else {
            json_t *j = json_loads(s + 1, JSON_DECODE_ANY, NULL);
            r->value = ms_strdup(json_is_string(j) ? json_string_value(j) : s + 1);
            json_decref(j);
        }
    }
    ms_buf_reset(&r->line);
}

static void on_call_head(void *data, int status, const ms_http_header_t *h, size_t n, int chunked,
                         int64_t len)
{
    (void)h;
    (void)n;
    (void)chunked;
    (void)len;
    running_t *r = data;
    r->status = status;
    ms_buf_reset(&r->line);
}

static void on_call_body(void *data, const char *p, size_t n)
{
    running_t *r = data;
    if (r->status != 200) {
        if (r->line.len < 4096)
            ms_buf_append(&r->line, p, n < 4096 ? n : 4096);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        const char *nl = memchr(p + i, '\n', n - i);
        size_t k = nl ? (size_t)(nl - (p + i)) : n - i;
        if (r->line.len + k > LINE_MAX_BYTES) {
            r->outcome = 'e';
            free(r->value);
            r->value = ms_strdup("the result is larger than 64 MiB");
            return;
        }
        ms_buf_append(&r->line, p + i, k);
        i += k;
        if (nl)
            take_line(r);
    }
}

/* A call cut off without its last line: the attempt timed out when task_timeout_s had passed
 * (the controller ends an answer already under way that way), else it did not run to an end. */
static void cut_off(running_t *r, const char *why)
{
    ms_task_queue_t *q = r->q;
    if (q->cfg.task_timeout_s >= 0 &&
        uv_now(q->loop) - r->sent_ms >= (uint64_t)(q->cfg.task_timeout_s * 1000.0)) {
        char msg[160];
        snprintf(msg, sizeof msg, "timed out after %gs (task_timeout_s)", q->cfg.task_timeout_s);
        failed(r, msg);
    } else {
        redeliver(r, why);
    }
}

static void on_call_done(void *data)
{
    running_t *r = data;
    ms_task_queue_t *q = r->q;
    if (q->n_pool < TQ_POOL_MAX && ms_http_client_idle(r->client))
        q->pool[q->n_pool++] = r->client; /* kept for the next task */
    else
        ms_http_client_close(r->client);
    r->client = NULL;
    char msg[1200];
    if (r->status == 200 && r->outcome == 'r')
        succeed(r);
    else if (r->status == 200 && r->outcome == 'e')
        failed(r, r->value);
    else if (r->status == 200 && r->outcome == 'u')
        unprocessable(r, r->value);
    else if (r->status == 200)
        cut_off(r, "the answer ended before its result");
    else if (answer_message(r, msg, sizeof msg), r->status == 408 || r->status == 500)
        failed(r, msg);
    else
        redeliver(r, msg);
}

static void on_call_error(void *data, ms_http_client_error_t err)
{
    running_t *r = data;
    ms_http_client_close(r->client);
    r->client = NULL;
    cut_off(r, ms_http_client_error_text(err));
}

static const ms_http_client_callbacks_t call_cbs = {on_call_head, on_call_body, on_call_done,
                                                    on_call_error};

static void send_call(running_t *r)
{
    ms_task_queue_t *q = r->q;
    ms_buf_t head = {0};
    ms_buf_appendf(&head,
                   "POST / HTTP/1.1\r\nHost: moonserve\r\nX-Moonserve-Target: %s\r\n"
                   "X-Request-ID: %s\r\nX-Moonserve-Task: %s\r\nX-Moonserve-Task-Id: %s\r\n"
                   "X-Moonserve-Task-Attempt: %d\r\nContent-Type: application/json\r\n"
                   "Content-Length: %zu\r\n",
                   q->target, r->id, r->name, r->id, r->attempt + 1, strlen(r->payload));
    if (q->cfg.task_timeout_s >= 0) /* the only limit a task call has (not request_timeout_s) */
        ms_buf_appendf(&head, MS_LINK_DEADLINE_HEADER ": %llu\r\n",
                       (unsigned long long)(q->cfg.task_timeout_s * 1000.0 + 0.5));
    ms_buf_append(&head, "\r\n", 2);
    r->status = 0;
    r->outcome = 0;
    r->client = NULL;
    r->sent_ms = uv_now(q->loop);
    while (q->n_pool > 0 && !r->client) { /* one the peer closed meanwhile is not idle */
        ms_http_client_t *c = q->pool[--q->n_pool];
        if (ms_http_client_idle(c))
            r->client = c;
        else
            ms_http_client_close(c);
    }
    if (!r->client)
        r->client = ms_http_client_connect(q->loop, q->handle_socket, NULL, 0);
    if (ms_http_client_send(r->client, head.data, head.len, r->payload, strlen(r->payload),
                            &call_cbs, r) != 0) {
        ms_http_client_close(r->client);
        r->client = NULL;
        redeliver(r, "cannot send to the handle socket");
    }
    ms_buf_free(&head);
}

/* ---- starting ---------------------------------------------------------------------------------
 */

static void on_task_status(void *data, ms_broker_status_t st, const redisReply *rep,
                           const char *err)
{
    running_t *r = data;
    if (!took(r))
        return;
    if (st != MS_BROKER_OK) {
        ms_debug("tasks: task %s: status unknown (%s); left for later", r->id,
                 err ? err : ms_broker_status_name(st));
        tq_drop(r); /* unacknowledged: claimed again after the visibility timeout */
        return;
    }
    const char *s = rep && rep->type == REDIS_REPLY_STRING ? rep->str : "";
    if (strcmp(s, "SUCCESS") == 0 || strcmp(s, "FAILURE") == 0 || strcmp(s, "REVOKED") == 0) {
        /* ended already (cancelled before it ran, or stored before a crash let it be acked) */
        r->ending = 1;
        r->q->n_revoked += strcmp(s, "REVOKED") == 0;
        ack(r);
        return;
    }
    char key[TQ_KEY_MAX], now[40], attempts[16];
    tq_task_key(key, sizeof key, r->id);
    tq_fmt_time(now, sizeof now, ms_wall_time());
    snprintf(attempts, sizeof attempts, "%d", r->attempt + 1);
    const char *hset[] = {"HSET", key,        "status", "STARTED", "started_at",
                          now,    "attempts", attempts, "queue",   r->q->cfg.queue_name,
                          "name", r->name};
    send_for(r, ignore_for, 12, hset);
    r->q->n_started++;
    send_call(r);
}

static char *field_string(const ms_broker_entry_t *e, const char *name)
{
    const redisReply *v = ms_broker_entry_field(e, name, strlen(name));
    if (!v || v->type != REDIS_REPLY_STRING || memchr(v->str, 0, v->len))
        return NULL;
    return ms_strndup(v->str, v->len);
}

static int id_ok(const char *s)
{
    if (!s || !*s || strlen(s) >= TQ_ID_MAX)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '-' || *s == '_'))
            return 0;
    return 1;
}

void tq_start_entry(ms_task_queue_t *q, const ms_broker_entry_t *e, int redelivered)
{
    char entry[TQ_ID_MAX];
    snprintf(entry, sizeof entry, "%.*s", (int)(e->id_len < TQ_ID_MAX - 1 ? e->id_len : 0), e->id);
    if (!entry[0] || tq_find_running(q, entry))
        return; /* running here already (a claim raced the renewal) */
    running_t *r = ms_calloc(1, sizeof *r);
    r->q = q;
    ms_copy_str(r->entry, sizeof r->entry, entry);
    char *id = field_string(e, "id"), *attempt = field_string(e, "attempt");
    r->name = field_string(e, "name");
    r->payload = field_string(e, "payload");
    r->attempt = attempt ? atoi(attempt) : 0;
    ms_copy_str(r->id, sizeof r->id, id_ok(id) ? id : "");
    free(id);
    free(attempt);
    r->next = q->running;
    if (r->next)
        r->next->prevp = &r->next;
    r->prevp = &q->running;
    q->running = r;
    q->n_running++;
    if (redelivered)
        q->n_redelivered++;
    if (!e->fields) { /* deleted from the stream after it was delivered: nothing to run */
        r->ending = 1;
        ack(r);
    } else if (!r->id[0] || !r->name || !r->payload || r->attempt < 0) {
        ms_warn("tasks: queue %s: entry %s is not a task (id, name and payload needed)",
                q->cfg.queue_name, r->entry);
        if (!r->id[0])
            snprintf(r->id, sizeof r->id, "e%.60s", r->entry);
        if (!r->name)
            r->name = ms_strdup("");
        if (!r->payload)
            r->payload = ms_strdup("");
        unprocessable(r, "the entry lacks an id, a name or a payload");
    } else {
        char key[TQ_KEY_MAX];
        tq_task_key(key, sizeof key, r->id);
        const char *hget[] = {"HGET", key, "status"};
        send_for(r, on_task_status, 3, hget);
    }
}

/* ---- pulling, claiming, renewing --------------------------------------------------------------
 */

static void start_all(ms_task_queue_t *q, const redisReply *list, long n, int redelivered)
{
    for (long i = 0; i < n; i++) {
        ms_broker_entry_t e;
        if (ms_broker_entry(list, (size_t)i, &e) == 0)
            tq_start_entry(q, &e, redelivered);
    }
}

static void on_read(void *data, ms_broker_status_t st, const redisReply *rep, const char *err)
{
    ms_task_queue_t *q = data;
    q->reading = 0;
    if (st == MS_BROKER_CLOSED || q->freeing)
        return;
    if (st != MS_BROKER_OK) {
        if (err && strstr(err, "NOGROUP"))
            q->group_ready = 0; /* the stream went (FLUSHALL, DEL): made again on the tick */
        return;                 /* the tick pulls again */
    }
    const redisReply *list;
    long n = ms_broker_stream_entries(rep, &list);
    start_all(q, list, n, 0);
    tq_pull(q);
}

void tq_pull(ms_task_queue_t *q)
{
    long room = tq_capacity(q);
    if (q->draining || q->reading || !q->group_ready || room <= 0 || !ms_broker_connected(q->blk))
        return;
    char count[24], block[24];
    snprintf(count, sizeof count, "%ld", room);
    snprintf(block, sizeof block, "%d", TQ_BLOCK_MS);
    const char *argv[] = {"XREADGROUP", "GROUP", TQ_GROUP,  q->consumer, "COUNT", count,
                          "BLOCK",      block,   "STREAMS", q->stream,   ">"};
    q->reading = 1;
    tq_cmd(q->blk, on_read, q, 11, argv);
}

static void on_claimed(void *data, ms_broker_status_t st, const redisReply *rep, const char *err)
{
    ms_task_queue_t *q = data;
    (void)err;
    q->claiming = 0;
    if (st != MS_BROKER_OK || q->freeing)
        return;
    const redisReply *list;
    const char *cursor;
    size_t cursor_len;
    long n = ms_broker_autoclaim_entries(rep, &list, &cursor, &cursor_len);
    start_all(q, list, n, 1);
}

/* Tasks idle for the visibility timeout (their consumer died or stalled) come to this one. */
void tq_claim(ms_task_queue_t *q)
{
    long room = tq_capacity(q);
    if (q->draining || q->claiming || !q->group_ready || room <= 0 || !ms_broker_connected(q->cmd))
        return;
    char idle[24], count[24];
    snprintf(idle, sizeof idle, "%lld", (long long)(q->cfg.visibility_timeout_s * 1000));
    snprintf(count, sizeof count, "%ld", room);
    const char *argv[] = {"XAUTOCLAIM", q->stream, TQ_GROUP, q->consumer,
                          idle,         "0-0",     "COUNT",  count};
    q->claiming = 1;
    tq_cmd(q->cmd, on_claimed, q, 8, argv);
}

static void on_renew_status(void *data, ms_broker_status_t st, const redisReply *rep,
                            const char *err)
{
    running_t *r = data;
    (void)err;
    if (!took(r))
        return;
    if (st == MS_BROKER_OK && rep && rep->type == REDIS_REPLY_STRING &&
        strcmp(rep->str, "REVOKED") == 0)
        tq_cancel_running(r); /* cancelled through another engine */
}

/* Resets the idle time of every task running here (XCLAIM to itself), so no other consumer
 * claims them, and looks for cancels made elsewhere. */
void tq_renew(ms_task_queue_t *q)
{
    if (!q->running || !ms_broker_connected(q->cmd))
        return;
    size_t n = 0;
    for (running_t *r = q->running; r; r = r->next)
        n++;
    const char **argv = ms_calloc(n + 7, sizeof *argv);
    size_t *lens = ms_calloc(n + 7, sizeof *lens);
    int argc = 0;
    argv[argc++] = "XCLAIM";
    argv[argc++] = q->stream;
    argv[argc++] = TQ_GROUP;
    argv[argc++] = q->consumer;
    argv[argc++] = "0";
    for (running_t *r = q->running; r; r = r->next)
        argv[argc++] = r->entry;
    argv[argc++] = "JUSTID";
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    ms_broker_command(q->cmd, tq_ignore, NULL, argc, argv, lens);
    free(argv);
    free(lens);
    for (running_t *r = q->running, *next; r; r = next) {
        next = r->next;
        if (r->ending)
            continue;
        char key[TQ_KEY_MAX];
        tq_task_key(key, sizeof key, r->id);
        const char *hget[] = {"HGET", key, "status"};
        send_for(r, on_renew_status, 3, hget);
    }
}
