/*
 * ingress: the controller's request entry points. The HTTP ingress maps a request to an
 * application by longest route_prefix and hands it to the application's ingress deployment;
 * `/-/healthz` and `/-/routes` are answered as Ray Serve does; anything else gets a JSON 404.
 * The internal handle socket takes calls from replicas to other deployments, addressed by the
 * `X-Moonserve-Target: APP/DEPLOYMENT` header, through the same deployment queues and routers.
 */
#ifndef MS_INGRESS_H
#define MS_INGRESS_H

#include "http/http.h"
#include "deployment/deployment.h"
#include "tasks/tasks.h"

typedef struct ms_ingress ms_ingress_t;

ms_ingress_t *ms_ingress_new(void);
void ms_ingress_free(ms_ingress_t *p);

/* Registers a deployment as a handle target; if `route_prefix` is non-NULL the deployment is
 * also the application's ingress at that prefix, and `access_log` says whether its requests get
 * access lines (docs/logging.md). Strings are copied. */
void ms_ingress_add_deployment(ms_ingress_t *p, const char *app_name, const char *deployment_name,
                               const char *route_prefix, ms_deployment_t *d, int access_log);
/* Access lines for requests no route took (404s, /-/ paths, refused requests). */
void ms_ingress_set_access_log(ms_ingress_t *p, int on);
/* Forgets every deployment (a redeploy registers the new set). */
void ms_ingress_clear(ms_ingress_t *p);
/* While draining, /-/healthz answers 503 (Ray Serve), so load balancers stop sending. */
void ms_ingress_set_draining(ms_ingress_t *p, int draining);

/* The HTTP ingress's request metrics (docs/metrics.md), in the Prometheus text format: per
 * route, and for requests no route took (route ""). */
void ms_ingress_metrics_text(const ms_ingress_t *p, ms_buf_t *b);

/* The task queue named `name` (len bytes), or NULL: how /-/tasks/QUEUE/... finds its queue
 * (docs/tasks.md, "Endpoints"), on the HTTP ingress and on the handle socket. */
typedef ms_task_queue_t *(*ms_ingress_task_lookup_t)(void *data, const char *name, size_t len);
void ms_ingress_set_task_lookup(ms_ingress_t *p, ms_ingress_task_lookup_t fn, void *data);

/* Server configurations wired to the ingress; limits are filled by the caller. */
ms_http_server_config_t ms_ingress_ingress_config(ms_ingress_t *p);
ms_http_server_config_t ms_ingress_handle_config(ms_ingress_t *p);

#endif
