/*
 * config (tasks): a deployment's task_queue block (ours, docs/tasks.md): the Redis queue it
 * consumes and how failed tasks are retried and parked. Validated by the one walker of
 * config_json.c, so each rule lives in one table.
 */
#include "config/config_internal.h"
#include "core/core.h"

#include <stdlib.h>
#include <string.h>

static int queue_name_ok(const char *s)
{
    if (!s || !*s || strlen(s) > 200)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              strchr("_-.:", *s)))
            return 0;
    return 1;
}

/* A queue name, or null (nullable) for "none". */
static void get_queue(jkv_t *kv, char **out, int nullable)
{
    if (nullable && json_is_null(kv->val)) {
        free(*out);
        *out = NULL;
        return;
    }
    const char *s = json_is_string(kv->val) ? json_string_value(kv->val) : NULL;
    if (!queue_name_ok(s)) {
        jbad(kv, nullable ? "a queue name (letters, digits, '_', '-', '.', ':') or null"
                          : "a queue name (letters, digits, '_', '-', '.', ':')");
        return;
    }
    free(*out);
    *out = ms_strdup(s);
}

static void tq_queue(jkv_t *kv, void *obj)
{
    get_queue(kv, &((ms_task_queue_config_t *)obj)->queue_name, 0);
}

static void tq_failed(jkv_t *kv, void *obj)
{
    get_queue(kv, &((ms_task_queue_config_t *)obj)->failed_task_queue_name, 1);
}

static void tq_unprocessable(jkv_t *kv, void *obj)
{
    get_queue(kv, &((ms_task_queue_config_t *)obj)->unprocessable_task_queue_name, 1);
}

static void tq_broker(jkv_t *kv, void *obj)
{
    jget_redis_url(kv, &((ms_task_queue_config_t *)obj)->broker_url);
}

static void tq_retries(jkv_t *kv, void *obj)
{
    long long n;
    if (jget_int(kv, 0, 1000, "an integer from 0 to 1000", &n))
        ((ms_task_queue_config_t *)obj)->max_retries = (int)n;
}

static void tq_backoff(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((ms_task_queue_config_t *)obj)->retry_backoff_s);
}

static void tq_backoff_max(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((ms_task_queue_config_t *)obj)->retry_backoff_max_s);
}

static void tq_visibility(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((ms_task_queue_config_t *)obj)->visibility_timeout_s);
}

static void tq_ttl(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((ms_task_queue_config_t *)obj)->result_ttl_s);
}

static void tq_timeout(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((ms_task_queue_config_t *)obj)->task_timeout_s);
}

static void tq_max_len(jkv_t *kv, void *obj)
{
    jget_int(kv, 0, 1000000000000LL, "an integer >= 0 (0: unbounded)",
             &((ms_task_queue_config_t *)obj)->max_queue_length);
}

enum { F_QUEUE, F_BROKER };
static const jfield_t task_fields[] = {
    [F_QUEUE] = {"queue_name", tq_queue},
    [F_BROKER] = {"broker_url", tq_broker},
    {"max_retries", tq_retries},
    {"retry_backoff_s", tq_backoff},
    {"retry_backoff_max_s", tq_backoff_max},
    {"failed_task_queue_name", tq_failed},
    {"unprocessable_task_queue_name", tq_unprocessable},
    {"visibility_timeout_s", tq_visibility},
    {"result_ttl_s", tq_ttl},
    {"max_queue_length", tq_max_len},
    {"task_timeout_s", tq_timeout},
};

void ms_cfg_task_queue_free(ms_task_queue_config_t *t)
{
    if (!t)
        return;
    free(t->queue_name);
    free(t->broker_url);
    free(t->failed_task_queue_name);
    free(t->unprocessable_task_queue_name);
    free(t);
}

ms_task_queue_config_t *ms_cfg_task_queue_yaml(ms_cfg_ctx_t *c, yaml_node_t *map)
{
    size_t before = c->n_errors;
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    ms_task_queue_config_t *t = ms_calloc(1, sizeof *t);
    t->max_retries = 3;
    t->retry_backoff_s = 1;
    t->retry_backoff_max_s = 10;
    t->visibility_timeout_s = 30;
    t->result_ttl_s = 86400;
    t->task_timeout_s = -1;
    uint64_t seen =
        jv_walk(&v, NULL, map, "in task_queue", task_fields, MS_N_FIELDS(task_fields), t);
    if (!(seen & (1u << F_QUEUE)))
        jv_error(&v, map, "task_queue needs queue_name");
    if (!(seen & (1u << F_BROKER)))
        jv_error(&v, map, "task_queue needs broker_url");
    if (c->n_errors == before && t->retry_backoff_max_s < t->retry_backoff_s)
        jv_error(&v, map, "task_queue: retry_backoff_max_s (%g) is below retry_backoff_s (%g)",
                 t->retry_backoff_max_s, t->retry_backoff_s);
    if (c->n_errors == before && t->retry_backoff_max_s >= t->visibility_timeout_s)
        jv_error(&v, map,
                 "task_queue: retry_backoff_max_s (%g) must be below visibility_timeout_s (%g), "
                 "or a task waiting for its retry would be delivered again meanwhile",
                 t->retry_backoff_max_s, t->visibility_timeout_s);
    if (c->n_errors != before) {
        ms_cfg_task_queue_free(t);
        return NULL;
    }
    return t;
}
