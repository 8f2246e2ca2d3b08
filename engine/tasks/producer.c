/*
 * tasks/producer: the built-in endpoints (docs/tasks.md, "Endpoints"):
 *   POST /-/tasks/QUEUE             {"name": ..., "args": [...], "kwargs": {...}} -> 202
 *   GET  /-/tasks/QUEUE/ID          -> 200 the task's status, 404 unknown
 *   POST /-/tasks/QUEUE/ID/cancel   -> 200 REVOKED, 409 when it has ended, 404 unknown
 * Redis down answers 503 with the reason; nothing is half written in a way that loses a task:
 * the status hash is written before the stream entry, so a task that can be delivered always
 * has a status.
 */
#include "tasks/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct op op_t;
struct op {
    ms_task_queue_t *q;
    ms_http_request_t *req; /* NULL once its client left */
    op_t *next, **prevp;    /* every op waiting for Redis, for ms_task_queue_abort */
    char id[TQ_ID_MAX];
    char *name, *payload;
};

static op_t *ops;

static op_t *op_new(ms_task_queue_t *q, ms_http_request_t *req)
{
    op_t *o = ms_calloc(1, sizeof *o);
    o->q = q;
    o->req = req;
    o->next = ops;
    if (ops)
        ops->prevp = &o->next;
    o->prevp = &ops;
    ops = o;
    return o;
}

static void op_free(op_t *o)
{
    *o->prevp = o->next;
    if (o->next)
        o->next->prevp = o->prevp;
    free(o->name);
    free(o->payload);
    free(o);
}

void ms_task_queue_abort(ms_http_request_t *req)
{
    for (op_t *o = ops; o; o = o->next)
        if (o->req == req)
            o->req = NULL;
}

static const ms_http_header_t JSON_TYPE = {"Content-Type", 12, "application/json", 16};

static void reply_json(op_t *o, int status, json_t *body)
{
    if (o->req) {
        char *text = json_dumps(body, JSON_COMPACT);
        ms_http_respond(o->req, status, &JSON_TYPE, 1, text, strlen(text));
        free(text);
    }
    json_decref(body);
    op_free(o);
}

static void reply_error(op_t *o, int status, const char *msg)
{
    if (o->req)
        ms_http_respond_error(o->req, status, msg);
    op_free(o);
}

/* A failed command: 503 while Redis is away (the task queue is unavailable, not the engine). */
static void reply_broker(op_t *o, ms_broker_status_t st, const char *err)
{
    char msg[600];
    snprintf(msg, sizeof msg, "task queue %s is unavailable: Redis %s: %s", o->q->cfg.queue_name,
             ms_broker_status_name(st), err ? err : "");
    reply_error(o, st == MS_BROKER_REPLY_ERROR ? 500 : 503, msg);
}

/* ---- submit -----------------------------------------------------------------------------------
 */

static void on_added(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    op_t *o = data;
    (void)r;
    if (st != MS_BROKER_OK) {
        reply_broker(o, st, err);
        return;
    }
    o->q->n_submitted++;
    reply_json(o, 202,
               json_pack("{s:s, s:s, s:s}", "task_id", o->id, "status", "PENDING", "queue",
                         o->q->cfg.queue_name));
}

static void on_status_written(void *data, ms_broker_status_t st, const redisReply *r,
                              const char *err)
{
    op_t *o = data;
    (void)r;
    if (st != MS_BROKER_OK) {
        reply_broker(o, st, err);
        return;
    }
    ms_task_queue_t *q = o->q;
    const char *xadd[] = {"XADD",  q->stream, "*",        "id",      o->id, "name",
                          o->name, "payload", o->payload, "attempt", "0"};
    tq_cmd(q->cmd, on_added, o, 11, xadd);
}

static void write_status(op_t *o)
{
    char key[TQ_KEY_MAX], now[40];
    tq_task_key(key, sizeof key, o->id);
    tq_fmt_time(now, sizeof now, ms_wall_time());
    const char *hset[] = {"HSET",     key,        "status",     "PENDING",
                          "name",     o->name,    "queue",      o->q->cfg.queue_name,
                          "payload",  o->payload, "created_at", now,
                          "attempts", "0"};
    tq_cmd(o->q->cmd, on_status_written, o, 14, hset);
}

static void on_length(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    op_t *o = data;
    if (st != MS_BROKER_OK) {
        reply_broker(o, st, err);
        return;
    }
    long long n = r && r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
    if (n >= o->q->cfg.max_queue_length) {
        char msg[300];
        snprintf(msg, sizeof msg, "task queue %s is full (%lld tasks; max_queue_length %lld)",
                 o->q->cfg.queue_name, n, o->q->cfg.max_queue_length);
        reply_error(o, 503, msg);
        return;
    }
    write_status(o);
}

/* {"name", "args", "kwargs"} of a submit body; NULL with msg set when it is not one. */
static json_t *submit_body(const ms_http_request_t *req, char *msg, size_t cap)
{
    json_error_t je;
    json_t *b = json_loadb(req->body, req->body_len, 0, &je);
    const char *name = json_string_value(json_object_get(b, "name"));
    json_t *args = json_object_get(b, "args"), *kwargs = json_object_get(b, "kwargs");
    const char *k;
    json_t *v;
    if (!b)
        snprintf(msg, cap, "the body is not JSON: %s", je.text);
    else if (!json_is_object(b))
        snprintf(msg, cap, "the body must be a JSON object {\"name\": ..., \"args\": [...]}");
    else if (!name || !*name || strlen(name) > 200)
        snprintf(msg, cap, "\"name\" must be the task handler's name (1 to 200 characters)");
    else if (args && !json_is_array(args))
        snprintf(msg, cap, "\"args\" must be a list");
    else if (kwargs && !json_is_object(kwargs))
        snprintf(msg, cap, "\"kwargs\" must be an object");
    else {
        json_object_foreach(b, k, v)
        {
            if (strcmp(k, "name") != 0 && strcmp(k, "args") != 0 && strcmp(k, "kwargs") != 0) {
                snprintf(msg, cap, "unknown field \"%.100s\" (name, args, kwargs)", k);
                json_decref(b);
                return NULL;
            }
        }
        return b;
    }
    json_decref(b);
    return NULL;
}

static void submit(ms_task_queue_t *q, ms_http_request_t *req)
{
    char msg[400];
    json_t *b = submit_body(req, msg, sizeof msg);
    if (!b) {
        ms_http_respond_error(req, 400, msg);
        return;
    }
    op_t *o = op_new(q, req);
    ms_random_id(o->id);
    o->name = ms_strdup(json_string_value(json_object_get(b, "name")));
    /* "o" takes over a reference: the body's own values get one more, the defaults made here
     * are handed over (with "O" they kept one too many and leaked: LeakSanitizer). */
    json_t *args = json_object_get(b, "args"), *kwargs = json_object_get(b, "kwargs");
    json_t *payload = json_pack("{s:o, s:o}", "args", args ? json_incref(args) : json_array(),
                                "kwargs", kwargs ? json_incref(kwargs) : json_object());
    o->payload = json_dumps(payload, JSON_COMPACT);
    json_decref(payload);
    json_decref(b);
    if (q->cfg.max_queue_length > 0) {
        const char *xlen[] = {"XLEN", q->stream};
        tq_cmd(q->cmd, on_length, o, 2, xlen);
    } else {
        write_status(o);
    }
}

/* ---- status -----------------------------------------------------------------------------------
 */

static json_t *time_or_null(const char *s)
{
    return s ? json_real(strtod(s, NULL)) : json_null();
}

static json_t *json_or_null(const char *s)
{
    json_t *j = s ? json_loads(s, JSON_DECODE_ANY, NULL) : NULL;
    return j ? j : json_null();
}

static void on_hash(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    op_t *o = data;
    if (st != MS_BROKER_OK) {
        reply_broker(o, st, err);
        return;
    }
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        char msg[200];
        snprintf(msg, sizeof msg, "no task %s in queue %s", o->id, o->q->cfg.queue_name);
        reply_error(o, 404, msg);
        return;
    }
    const char *f[16] = {0};
    static const char *const NAMES[] = {"status",     "name",        "queue",    "created_at",
                                        "started_at", "finished_at", "attempts", "result",
                                        "error",      "progress"};
    enum { N = sizeof NAMES / sizeof *NAMES };
    for (size_t i = 0; i + 1 < r->elements; i += 2)
        for (int k = 0; k < N; k++)
            if (r->element[i]->type == REDIS_REPLY_STRING &&
                strcmp(r->element[i]->str, NAMES[k]) == 0)
                f[k] = r->element[i + 1]->str;
    json_t *j =
        json_pack("{s:s, s:s, s:s, s:s}", "task_id", o->id, "status", f[0] ? f[0] : "PENDING",
                  "name", f[1] ? f[1] : "", "queue", f[2] ? f[2] : o->q->cfg.queue_name);
    json_object_set_new(j, "created_at", time_or_null(f[3]));
    json_object_set_new(j, "started_at", time_or_null(f[4]));
    json_object_set_new(j, "finished_at", time_or_null(f[5]));
    json_object_set_new(j, "attempts", json_integer(f[6] ? atoi(f[6]) : 0));
    json_object_set_new(j, "result", json_or_null(f[7]));
    json_object_set_new(j, "error", f[8] ? json_string(f[8]) : json_null());
    json_object_set_new(j, "progress", json_or_null(f[9]));
    reply_json(o, 200, j);
}

static void status(ms_task_queue_t *q, ms_http_request_t *req, const char *id)
{
    op_t *o = op_new(q, req);
    ms_copy_str(o->id, sizeof o->id, id);
    char key[TQ_KEY_MAX];
    tq_task_key(key, sizeof key, id);
    const char *argv[] = {"HGETALL", key};
    tq_cmd(q->cmd, on_hash, o, 2, argv);
}

/* ---- cancel -----------------------------------------------------------------------------------
 */

static void on_revoked(void *data, ms_broker_status_t st, const redisReply *r, const char *err)
{
    op_t *o = data;
    (void)r;
    if (st != MS_BROKER_OK) {
        reply_broker(o, st, err);
        return;
    }
    running_t *run = tq_find_running(o->q, o->id);
    if (run)
        tq_cancel_running(run); /* elsewhere, the engine running it sees REVOKED on renewal */
    reply_json(o, 200, json_pack("{s:s, s:s}", "task_id", o->id, "status", "REVOKED"));
}

static void on_cancel_status(void *data, ms_broker_status_t st, const redisReply *r,
                             const char *err)
{
    op_t *o = data;
    if (st != MS_BROKER_OK) {
        reply_broker(o, st, err);
        return;
    }
    const char *s = r && r->type == REDIS_REPLY_STRING ? r->str : NULL;
    char msg[300];
    if (!s) {
        snprintf(msg, sizeof msg, "no task %s in queue %s", o->id, o->q->cfg.queue_name);
        reply_error(o, 404, msg);
        return;
    }
    if (strcmp(s, "SUCCESS") == 0 || strcmp(s, "FAILURE") == 0 || strcmp(s, "REVOKED") == 0) {
        snprintf(msg, sizeof msg, "task %s has ended already (%s)", o->id, s);
        reply_error(o, 409, msg);
        return;
    }
    char key[TQ_KEY_MAX], now[40];
    tq_task_key(key, sizeof key, o->id);
    tq_fmt_time(now, sizeof now, ms_wall_time());
    const char *hset[] = {"HSET", key, "status", "REVOKED", "finished_at", now};
    tq_cmd(o->q->cmd, on_revoked, o, 6, hset);
}

static void cancel(ms_task_queue_t *q, ms_http_request_t *req, const char *id)
{
    op_t *o = op_new(q, req);
    ms_copy_str(o->id, sizeof o->id, id);
    char key[TQ_KEY_MAX];
    tq_task_key(key, sizeof key, id);
    const char *argv[] = {"HGET", key, "status"};
    tq_cmd(q->cmd, on_cancel_status, o, 3, argv);
}

/* ---- routing ----------------------------------------------------------------------------------
 */

static int task_id_ok(const char *s, size_t n)
{
    if (n == 0 || n >= TQ_ID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
              (s[i] >= '0' && s[i] <= '9') || s[i] == '-' || s[i] == '_'))
            return 0;
    return 1;
}

void ms_task_queue_http(ms_task_queue_t *q, ms_http_request_t *req, const char *rest,
                        size_t rest_len)
{
    int post = strcmp(req->method, "POST") == 0, get = strcmp(req->method, "GET") == 0;
    if (rest_len == 0) {
        if (post)
            submit(q, req);
        else
            ms_http_respond_error(req, 405, "submit a task with POST");
        return;
    }
    const char *slash = memchr(rest, '/', rest_len);
    size_t id_len = slash ? (size_t)(slash - rest) : rest_len;
    char id[TQ_ID_MAX];
    if (!task_id_ok(rest, id_len)) {
        ms_http_respond_error(req, 404, "no such task (a task id is letters, digits, '-', '_')");
        return;
    }
    snprintf(id, sizeof id, "%.*s", (int)id_len, rest);
    if (!slash) {
        if (get)
            status(q, req, id);
        else
            ms_http_respond_error(req, 405, "read a task's status with GET");
    } else if (rest_len - id_len == 7 && memcmp(slash, "/cancel", 7) == 0) {
        if (post)
            cancel(q, req, id);
        else
            ms_http_respond_error(req, 405, "cancel a task with POST");
    } else {
        ms_http_respond_error(req, 404, "no such task endpoint (ID, or ID/cancel)");
    }
}
