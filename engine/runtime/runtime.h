/*
 * runtime: the replica side. A Lua replica is this same binary started as
 * `moonserve __replica` by the controller; it hosts one LuaJIT VM running one deployment's
 * class and its own uv loop, serving requests as coroutines (a handler that yields lets the
 * replica serve up to max_ongoing_requests at once).
 *
 * The module also loads an application module in a throwaway VM to learn its deployment graph
 * (ms_runtime_inspect), which the controller and `moonserve check` use.
 *
 * Protocol with the controller (docs/replica-protocol.md is the full text):
 *  - data plane: HTTP/1.1 over the Unix socket given by --socket; one request at a time per
 *    connection, keep-alive; a closed connection cancels the request running on it.
 *  - control plane: newline-delimited JSON over fd 3 (a socketpair from the controller).
 *    replica -> controller: {"op":"ready"} once constructed and listening, or
 *                           {"op":"failed","error":"..."} then exit(1).
 *    controller -> replica: {"op":"health","id":N}       ->
 * {"op":"reply","id":N,"ok":bool,"error":?}
 *                           {"op":"reconfigure","id":N,"user_config":{...}} -> reply
 *                           {"op":"stats","id":N}        -> reply with "ongoing", "autoscaling",
 *                                                           "routing"
 *  - SIGTERM: stop accepting, wait (graceful_shutdown_wait_loop_s steps) for ongoing requests
 *    to finish, exit 0. The replica asks the kernel to SIGKILL it if the controller dies.
 *  - handles: calls to other deployments go to the controller's Unix socket (--controller)
 *    as HTTP requests carrying `X-Moonserve-Target: APP/DEPLOYMENT`.
 */
#ifndef MS_RUNTIME_H
#define MS_RUNTIME_H

#include <jansson.h>

/* Entry point of replica mode; argv as given after `moonserve __replica`. Returns the exit code.
 * Options: --socket PATH --controller PATH --app NAME --deployment NAME --replica-id ID
 *          --import FILE:ATTR --args-json JSON --user-config-json JSON|null
 *          --max-ongoing N --wait-loop-s SECONDS */
int ms_runtime_main(int argc, char **argv);

/* Loads the application module `file` and resolves `attr` (an application bound with :bind, or
 * a builder function called with `args`) in a fresh VM. On success returns 0 and sets *graph:
 *   {"ingress": "Name",
 *    "deployments": [{"name": "Name", "options": {...code options from serve.deployment{}...},
 *                     "handles": ["OtherName", ...]}, ...]}
 * `options` holds only the keys the code set (num_replicas, max_ongoing_requests,
 * max_queued_requests, user_config, graceful_shutdown_wait_loop_s, graceful_shutdown_timeout_s,
 * health_check_period_s, health_check_timeout_s). On failure returns -1 and sets *err to a
 * malloc'd message `file:line: message` when Lua gave a position. */
int ms_runtime_inspect(const char *file, const char *attr, json_t *args, json_t **graph,
                       char **err);

#endif
