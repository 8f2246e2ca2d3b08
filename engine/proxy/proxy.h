/*
 * proxy: the controller's request entry points. The HTTP ingress maps a request to an
 * application by longest route_prefix and hands it to the application's ingress deployment;
 * `/-/healthz` and `/-/routes` are answered as Ray Serve does; anything else gets a JSON 404.
 * The internal handle socket takes calls from replicas to other deployments, addressed by the
 * `X-Moonserve-Target: APP/DEPLOYMENT` header, through the same deployment queues and routers.
 */
#ifndef MS_PROXY_H
#define MS_PROXY_H

#include "http/http.h"
#include "router/router.h"

typedef struct ms_proxy ms_proxy_t;

ms_proxy_t *ms_proxy_new(void);
void ms_proxy_free(ms_proxy_t *p);

/* Registers a deployment as a handle target; if `route_prefix` is non-NULL the deployment is
 * also the application's ingress at that prefix. Strings are copied. */
void ms_proxy_add_deployment(ms_proxy_t *p, const char *app_name, const char *deployment_name,
                             const char *route_prefix, ms_deployment_t *d);
/* Forgets every deployment (a redeploy registers the new set). */
void ms_proxy_clear(ms_proxy_t *p);
/* While draining, /-/healthz answers 503 (Ray Serve), so load balancers stop sending. */
void ms_proxy_set_draining(ms_proxy_t *p, int draining);

/* Server configurations wired to the proxy; limits are filled by the caller. */
ms_http_server_config_t ms_proxy_ingress_config(ms_proxy_t *p);
ms_http_server_config_t ms_proxy_handle_config(ms_proxy_t *p);

#endif
