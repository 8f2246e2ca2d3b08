/* tasks internals shared by queue.c (lifecycle, tick), producer.c (HTTP endpoints) and
 * consumer.c (pulling and running tasks). */
#ifndef MS_TASKS_INTERNAL_H
#define MS_TASKS_INTERNAL_H

#include "broker/broker.h"
#include "core/core.h"
#include "tasks/tasks.h"

#define TQ_PREFIX      "moonserve:"
#define TQ_GROUP       "moonserve"
#define TQ_KEY_MAX     256
#define TQ_ID_MAX      64
#define TQ_BLOCK_MS    1000 /* XREADGROUP BLOCK: how long one pull waits in Redis */
#define TQ_SAMPLE_MS   500  /* backlog sampling period */
#define TQ_REDELIVER_S 0.25 /* first delay before a task whose replica was lost runs again */
#define TQ_POOL_MAX    64   /* idle handle-socket connections kept */

typedef struct running running_t;

struct ms_task_queue {
    uv_loop_t *loop;
    ms_task_queue_config_t cfg; /* strings owned */
    char *app, *dep_name, *handle_socket;
    char target[512];                      /* APP/DEPLOYMENT */
    char stream[TQ_KEY_MAX];               /* the queue's stream key */
    char failed_stream[TQ_KEY_MAX];        /* "" when no failed-task queue */
    char unprocessable_stream[TQ_KEY_MAX]; /* "" when no unprocessable queue */
    ms_deployment_t *dep;
    int max_ongoing;
    ms_broker_t *cmd; /* everything but the blocking read */
    ms_broker_t *blk; /* XREADGROUP ... BLOCK, alone: it holds its connection while it waits */
    char consumer[128];
    int group_ready, group_asked; /* XGROUP CREATE answered / sent on the current connection */
    int reading, claiming, sampling;
    uint64_t last_claim_ms, last_renew_ms, last_sample_ms;
    long long backlog, stream_len;
    running_t *running;
    size_t n_running;
    ms_http_client_t *pool[TQ_POOL_MAX]; /* idle handle-socket connections, for the next calls */
    int n_pool;
    int freeing;
    int draining; /* shutting down: nothing more is pulled or claimed */
    uint64_t n_submitted, n_started, n_succeeded, n_failed, n_retried, n_redelivered,
        n_unprocessable, n_revoked;
};

/* A task this engine took from the stream and has not acknowledged yet. */
struct running {
    ms_task_queue_t *q;
    running_t *next, **prevp;
    char entry[TQ_ID_MAX]; /* its stream entry id */
    char id[TQ_ID_MAX];    /* the task id */
    char *name, *payload;
    int attempt; /* handler failures so far (the entry's attempt field) */
    int redeliveries;
    ms_http_client_t *client;
    int status;        /* HTTP status of the call's answer */
    ms_buf_t line;     /* the answer's line being read */
    char outcome;      /* 'r', 'e', 'u' once the answer said; 0 before */
    char *value;       /* the result (JSON) or the error message */
    uv_timer_t *timer; /* a retry's backoff or a redelivery's delay */
    int ending;        /* its final commands are out: only their answer is awaited */
    int inflight;      /* commands sent for it whose answer has not come */
    uint64_t sent_ms;  /* loop time the current call went out */
    int dead;          /* dropped: freed by the last answer */
};

/* One command of NUL-terminated strings; ms_broker_command's status. */
ms_broker_status_t tq_cmd(ms_broker_t *b, ms_broker_cb cb, void *data, int argc, const char **argv);
/* A callback for commands whose answer nobody needs. */
void tq_ignore(void *data, ms_broker_status_t st, const redisReply *r, const char *err);
/* PREFIX "task:" id */
void tq_task_key(char *out, size_t cap, const char *id);
/* running replicas x max_ongoing_requests - tasks running: how many more may be pulled */
long tq_capacity(const ms_task_queue_t *q);
void tq_fmt_time(char *out, size_t cap, double t);

/* consumer.c */
void tq_pull(ms_task_queue_t *q);
void tq_claim(ms_task_queue_t *q);
void tq_renew(ms_task_queue_t *q);
void tq_start_entry(ms_task_queue_t *q, const ms_broker_entry_t *e, int redelivered);
/* The task runs here: ends it as cancelled (its status is REVOKED already). */
void tq_cancel_running(running_t *r);
running_t *tq_find_running(ms_task_queue_t *q, const char *id);
void tq_drop(running_t *r);

#endif
