/*
 * tasks: async tasks through Redis (docs/tasks.md). One ms_task_queue_t per deployment with a
 * task_queue block: it is the queue's producer (submit, status, cancel: the built-in HTTP
 * endpoints /-/tasks/QUEUE/...) and its consumer (it pulls tasks for the deployment and calls
 * the deployment's task handlers through the handle socket, like any handle call, so routers,
 * admission and max_ongoing_requests apply).
 *
 * Delivery is at least once, on Redis Streams with one consumer group per queue: a task is
 * acknowledged (XACK, then XDEL) only after its final status and result are stored; a task held
 * by an engine that died is claimed again once it has been idle for visibility_timeout_s, while
 * each engine renews the tasks it runs. Handler failures are retried with backoff up to
 * max_retries, then parked in the failed-task stream; unknown task names and undecodable
 * payloads go to the unprocessable stream. A replica lost mid-task, or a deployment with no
 * room, delivers the task again without counting a retry.
 *
 * Redis keys (PREFIX is "moonserve:"): PREFIX "queue:" NAME is the stream (entries: id, name,
 * args, attempt), with the consumer group "moonserve"; PREFIX "task:" ID is a task's status hash.
 */
#ifndef MS_TASKS_H
#define MS_TASKS_H

#include <jansson.h>
#include <uv.h>

#include "config/config.h"
#include "deployment/deployment.h"
#include "http/http.h"

typedef struct ms_task_queue ms_task_queue_t;

typedef struct ms_task_queue_spec {
    const ms_task_queue_config_t *cfg;
    const char *application, *deployment; /* the consumer deployment */
    const char *handle_socket;            /* the controller's handle socket: tasks go through it */
    ms_deployment_t *dep;
    int max_ongoing_requests; /* per replica: with the running replicas, what may be pulled */
} ms_task_queue_spec_t;

/* Starts connecting (Redis down is not an error: it retries). NULL with *err on a bad spec. */
ms_task_queue_t *ms_task_queue_new(uv_loop_t *loop, const ms_task_queue_spec_t *spec, char **err);
/* Cancels the tasks it runs (they are delivered again after the visibility timeout) and closes
 * its connections. */
void ms_task_queue_free(ms_task_queue_t *q);
const char *ms_task_queue_name(const ms_task_queue_t *q);
/* Whether the queue was made from a task_queue block equal to cfg (a redeploy keeps it then). */
int ms_task_queue_same(const ms_task_queue_t *q, const ms_task_queue_config_t *cfg);
/* The deployment's max_ongoing_requests changed (a redeploy in place). */
void ms_task_queue_set_max_ongoing(ms_task_queue_t *q, int n);

/* Called every control-loop tick: pulls when there is room, claims tasks other consumers left
 * idle, renews the tasks it runs, and samples the backlog. */
void ms_task_queue_tick(ms_task_queue_t *q);
/* The engine is shutting down: take no more tasks; those running finish (and are acknowledged)
 * while the deployment drains, or are delivered again later. */
void ms_task_queue_drain(ms_task_queue_t *q);
/* Tasks waiting in the queue (not yet taken), from the latest sample; -1 before the first. */
long long ms_task_queue_backlog(const ms_task_queue_t *q);
/* {queue, connected, backlog, running, submitted, succeeded, failed, retried, ...} for status. */
json_t *ms_task_queue_info(const ms_task_queue_t *q);

/* Answers a request to /-/tasks/QUEUE/REST, where rest is "" (POST: submit), "ID" (GET:
 * status) or "ID/cancel" (POST). The answer may come later (from Redis); a client that leaves
 * first must be reported with ms_task_queue_abort. */
void ms_task_queue_http(ms_task_queue_t *q, ms_http_request_t *req, const char *rest,
                        size_t rest_len);
/* The client of req went away: an answer still to come is dropped. */
void ms_task_queue_abort(ms_http_request_t *req);

#endif
