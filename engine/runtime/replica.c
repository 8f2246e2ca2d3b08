/*
 * runtime/replica: ms_runtime_main, the process a Lua replica is. It parses the spawn options,
 * builds the deployment instance in a LuaJIT VM, serves HTTP requests on its Unix socket (one
 * coroutine per request, at most --max-ongoing at once), answers the controller's control
 * messages on fd 3, and drains on SIGTERM. docs/replica-protocol.md is the protocol's text.
 */
#include "runtime/internal.h"
#include "runtime/runtime.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/core.h"
#include "link/link.h"

#define CTL_FD 3

typedef struct options {
    const char *socket, *controller, *app, *deployment, *replica_id, *import;
    const char *args_json, *user_config_json;
    long max_ongoing;
    double wait_loop_s;
    long long memory_bytes; /* 0 = no cap */
} options_t;

typedef struct replica {
    rt_t rt;
    options_t opt;
    ms_link_server_t *server;
    uv_pipe_t ctl;
    ms_buf_t ctl_in;
    uv_signal_t sigterm;
    uv_timer_t drain_timer;
    long ongoing; /* request tasks alive */
    int ready, draining, exit_code;
} replica_t;

/* Static so that everything the replica allocates stays reachable until the process exits. */
static replica_t R;

static void finish(int code)
{
    R.exit_code = code;
    uv_stop(R.rt.loop);
}

/* ---- options ----------------------------------------------------------------------------------
 */

static const char **option_slot(options_t *o, const char *name)
{
    static const struct {
        const char *name;
        size_t off;
    } table[] = {
        {"socket", offsetof(options_t, socket)},
        {"controller", offsetof(options_t, controller)},
        {"app", offsetof(options_t, app)},
        {"deployment", offsetof(options_t, deployment)},
        {"replica-id", offsetof(options_t, replica_id)},
        {"import", offsetof(options_t, import)},
        {"args-json", offsetof(options_t, args_json)},
        {"user-config-json", offsetof(options_t, user_config_json)},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(name, table[i].name) == 0)
            return (const char **)((char *)o + table[i].off);
    return NULL;
}

/* Accepts `--name value` and `--name=value`; a leading "__replica" is skipped. */
static int parse_options(int argc, char **argv, options_t *o)
{
    const char *max_ongoing = "100", *wait_loop = "2", *memory = "0";
    int i = argc > 0 && strcmp(argv[0], "__replica") == 0 ? 1 : 0;
    for (; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) != 0) {
            fprintf(stderr, "replica: unexpected argument '%s'\n", argv[i]);
            return -1;
        }
        char name[64];
        const char *eq = strchr(argv[i], '='), *value;
        size_t n = eq ? (size_t)(eq - argv[i] - 2) : strlen(argv[i] + 2);
        snprintf(name, sizeof name, "%.*s", (int)n, argv[i] + 2);
        if (eq)
            value = eq + 1;
        else if (i + 1 < argc)
            value = argv[++i];
        else {
            fprintf(stderr, "replica: option --%s needs a value\n", name);
            return -1;
        }
        const char **slot = option_slot(o, name);
        if (slot)
            *slot = value;
        else if (strcmp(name, "max-ongoing") == 0)
            max_ongoing = value;
        else if (strcmp(name, "wait-loop-s") == 0)
            wait_loop = value;
        else if (strcmp(name, "memory-bytes") == 0)
            memory = value;
        else {
            fprintf(stderr, "replica: unknown option --%s\n", name);
            return -1;
        }
    }
    o->max_ongoing = strtol(max_ongoing, NULL, 10);
    o->wait_loop_s = strtod(wait_loop, NULL);
    o->memory_bytes = strtoll(memory, NULL, 10);
    if (!o->socket || !o->app || !o->deployment || !o->import || o->max_ongoing < 1 ||
        o->wait_loop_s < 0 || o->memory_bytes < 0) {
        fprintf(stderr, "replica: --socket, --app, --deployment and --import are required; "
                        "--max-ongoing must be >= 1, --wait-loop-s and --memory-bytes >= 0\n");
        return -1;
    }
    if (!o->replica_id)
        o->replica_id = "0";
    return 0;
}

/* ---- control channel (fd 3) -------------------------------------------------------------------
 */

typedef struct ctl_write {
    uv_write_t req;
    int exit_after; /* exit code + 1 to exit with once written, or 0 */
    char bytes[];
} ctl_write_t;

static void on_ctl_written(uv_write_t *req, int status)
{
    ctl_write_t *w = (ctl_write_t *)req;
    if (status < 0)
        ms_warn("control channel write failed: %s", uv_strerror(status));
    if (w->exit_after)
        finish(w->exit_after - 1);
    free(w);
}

/* Script text (an error message) as a JSON string: jansson takes only UTF-8, and a Lua error
 * may hold any bytes, so those that are not become '?'. */
static json_t *json_text(const char *text)
{
    size_t n = strlen(text);
    char *clean = ms_malloc(n + 1);
    size_t len = ms_utf8_copy(clean, n + 1, text, n);
    json_t *j = json_stringn(clean, len);
    free(clean);
    return j;
}

/* Sends one message (consumed) as a JSON line; exit_code >= 0 exits once it is written. */
static void ctl_send(json_t *msg, int exit_code)
{
    char *s = msg ? json_dumps(msg, JSON_COMPACT) : NULL;
    json_decref(msg);
    if (!s) {
        ms_error("control message could not be encoded");
        if (exit_code >= 0)
            finish(exit_code);
        return;
    }
    size_t n = strlen(s);
    ctl_write_t *w = ms_malloc(sizeof *w + n + 1);
    memcpy(w->bytes, s, n);
    w->bytes[n] = '\n';
    w->exit_after = exit_code + 1;
    free(s);
    uv_buf_t buf = uv_buf_init(w->bytes, (unsigned)n + 1);
    int r = uv_write(&w->req, (uv_stream_t *)&R.ctl, &buf, 1, on_ctl_written);
    if (r < 0) {
        ms_warn("control channel write failed: %s", uv_strerror(r));
        free(w);
        if (exit_code >= 0)
            finish(exit_code);
    }
}

static void ctl_reply(json_int_t id, json_t *reply, const char *error)
{
    json_object_set_new(reply, "op", json_string("reply"));
    json_object_set_new(reply, "id", json_integer(id));
    json_object_set_new(reply, "ok", json_boolean(error == NULL));
    if (error)
        json_object_set_new(reply, "error", json_text(error));
    ctl_send(reply, -1);
}

/* report_models(ids): tells the controller which multiplexed models this replica holds or is
 * loading (a list of strings), so routers send it those models' requests at once rather than
 * a stats period later. */
int rt_l_report_models(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    json_t *ids = json_array();
    for (int i = 1; i <= (int)lua_objlen(L, 1); i++) {
        lua_rawgeti(L, 1, i);
        size_t n;
        const char *id = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
        if (id)
            json_array_append_new(ids, json_stringn(id, n));
        lua_pop(L, 1);
    }
    ctl_send(json_pack("{s:s, s:o}", "op", "models", "ids", ids), -1);
    return 0;
}

static void fail_startup(const char *error)
{
    ms_error("replica failed to start: %s", error);
    ctl_send(json_pack("{s:s, s:o}", "op", "failed", "error", json_text(error)), 1);
}

/* ---- Lua calls into the instance --------------------------------------------------------------
 */

static void push_instance(lua_State *co)
{
    lua_rawgeti(co, LUA_REGISTRYINDEX, R.rt.instance_ref);
}

static void on_control_done(rt_task_t *t, int ok)
{
    ctl_reply(t->ctl_id, json_object(), ok ? NULL : rt_vm_error_text(t->co, -1));
    rt_task_free(t);
}

static void on_stats_done(rt_task_t *t, int ok)
{
    static const char *const KEYS[] = {"autoscaling", "routing", "batching", "metrics"};
    enum { N = sizeof KEYS / sizeof *KEYS };
    char err[160] = "";
    json_t *reply = json_object();
    int got = 0;
    for (; ok && got < N; got++) {
        json_t *v = rt_json_from_lua(t->co, got - N, err, sizeof err);
        if (!v)
            break;
        json_object_set_new(reply, KEYS[got], v);
    }
    if (got == N) {
        json_object_set_new(reply, "ongoing", json_integer(R.ongoing));
        ctl_reply(t->ctl_id, reply, NULL);
    } else {
        json_object_clear(reply);
        ctl_reply(t->ctl_id, reply, ok ? err : rt_vm_error_text(t->co, -1));
    }
    rt_task_free(t);
}

/* Starts a control task: fn(instance, method, [user_config]). */
static void control_task(json_int_t id, const char *fn, const char *method, json_t *arg,
                         rt_task_done_cb done)
{
    rt_task_t *t = rt_task_new(&R.rt, fn, done);
    t->ctl_id = id;
    ms_random_id(t->request_id);
    push_instance(t->co);
    int nargs = 1;
    if (method) {
        lua_pushstring(t->co, method);
        nargs++;
    }
    if (arg) {
        rt_json_push(t->co, arg);
        nargs++;
    }
    rt_task_start(t, nargs);
}

/* Settings the controller changes in place on a redeploy: the cap on concurrent requests and
 * the drain step. */
static void configure(json_int_t id, json_t *msg)
{
    json_t *cap = json_object_get(msg, "max_ongoing_requests");
    json_t *step = json_object_get(msg, "graceful_shutdown_wait_loop_s");
    if ((cap && (!json_is_integer(cap) || json_integer_value(cap) < 1)) ||
        (step && (!json_is_number(step) || json_number_value(step) < 0))) {
        ctl_reply(id, json_object(), "configure: invalid values");
        return;
    }
    if (cap)
        R.opt.max_ongoing = R.rt.max_ongoing = (long)json_integer_value(cap);
    if (step)
        R.opt.wait_loop_s = json_number_value(step);
    ctl_reply(id, json_object(), NULL);
}

static void handle_control(json_t *msg)
{
    const char *op = json_string_value(json_object_get(msg, "op"));
    json_int_t id = json_integer_value(json_object_get(msg, "id"));
    if (!op) {
        ms_warn("control message without op ignored");
    } else if (!R.ready) {
        ctl_reply(id, json_object(), "replica is not ready");
    } else if (strcmp(op, "health") == 0) {
        control_task(id, "_call_method", "check_health", NULL, on_control_done);
    } else if (strcmp(op, "reconfigure") == 0) {
        json_t *uc = json_object_get(msg, "user_config");
        control_task(id, "_call_method", "reconfigure", uc ? uc : json_null(), on_control_done);
    } else if (strcmp(op, "stats") == 0) {
        control_task(id, "_stats", NULL, NULL, on_stats_done);
    } else if (strcmp(op, "configure") == 0) {
        configure(id, msg);
    } else {
        ctl_reply(id, json_object(), "unknown op");
    }
}

static void ctl_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    ms_buf_reserve(&R.ctl_in, suggested);
    *buf = uv_buf_init(R.ctl_in.data + R.ctl_in.len, (unsigned)suggested);
}

static void ctl_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)s;
    (void)buf;
    if (nread < 0) {
        /* The controller is gone (or closed our channel): nobody will route to us again. */
        ms_warn("control channel closed (%s): exiting", uv_strerror((int)nread));
        finish(1);
        return;
    }
    R.ctl_in.len += (size_t)nread;
    char *nl;
    while ((nl = memchr(R.ctl_in.data, '\n', R.ctl_in.len)) != NULL) {
        size_t line = (size_t)(nl - R.ctl_in.data);
        json_error_t jerr;
        json_t *msg = json_loadb(R.ctl_in.data, line, 0, &jerr);
        if (msg)
            handle_control(msg);
        else
            ms_warn("bad control message: %s", jerr.text);
        json_decref(msg);
        ms_buf_consume(&R.ctl_in, line + 1);
    }
}

/* ---- data plane -------------------------------------------------------------------------------
 */

/* Pushes the request table: method, path, query_string, headers (lower-case names, repeats
 * joined with ", "), body, id. */
/* Pushes s in lower case. A name may be as long as max_header_bytes allows (nginx takes them
 * too), so it goes through the buffer's blocks: a whole block at a time, not one luaL_addchar
 * per byte. */
static void push_lower(lua_State *co, const char *s, size_t n)
{
    luaL_Buffer b;
    luaL_buffinit(co, &b);
    while (n > 0) {
        char *out = luaL_prepbuffer(&b);
        size_t k = n < LUAL_BUFFERSIZE ? n : LUAL_BUFFERSIZE;
        for (size_t i = 0; i < k; i++)
            out[i] = (char)(s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]);
        luaL_addsize(&b, k);
        s += k;
        n -= k;
    }
    luaL_pushresult(&b);
}

static void push_request(lua_State *co, const ms_http_request_t *req)
{
    lua_createtable(co, 0, 8);
    lua_pushstring(co, req->method);
    lua_setfield(co, -2, "method");
    lua_pushlstring(co, req->path, req->path_len);
    lua_setfield(co, -2, "path");
    lua_pushstring(co, req->query);
    lua_setfield(co, -2, "query_string");
    lua_pushlstring(co, req->body ? req->body : "", req->body_len);
    lua_setfield(co, -2, "body");
    lua_pushstring(co, req->request_id);
    lua_setfield(co, -2, "id");
    lua_createtable(co, 0, (int)req->n_headers);
    for (size_t i = 0; i < req->n_headers; i++) {
        const ms_http_header_t *h = &req->headers[i];
        push_lower(co, h->name, h->name_len);
        lua_pushvalue(co, -1);
        lua_rawget(co, -3);
        if (lua_isstring(co, -1)) {
            lua_pushliteral(co, ", ");
            lua_pushlstring(co, h->value, h->value_len);
            lua_concat(co, 3);
        } else {
            lua_pop(co, 1);
            lua_pushlstring(co, h->value, h->value_len);
        }
        lua_rawset(co, -3);
    }
    lua_setfield(co, -2, "headers");
}

/* A JSON error answer (the same body the controller's own errors have). */
static void respond_error(ms_link_stream_t *s, int status, const char *message)
{
    static const ms_http_header_t type = {"Content-Type", 12, "application/json", 16};
    char body[MS_HTTP_ERROR_BODY_MAX];
    size_t n = ms_http_error_body(body, sizeof body, message, s->req.request_id);
    ms_link_respond(s, status, &type, 1, body, n, NULL, NULL);
}

/* A body larger than the link takes at once stays in the Lua string, anchored in the registry
 * until the link has queued its last byte. */
static void unref_body(void *ctx)
{
    luaL_unref(R.rt.L, LUA_REGISTRYINDEX, (int)(intptr_t)ctx);
}

/* Results on co: status, body, {name, value, ...}. A final status is 200-599: an interim one
 * (1xx) cannot end a response. */
static void respond_from_lua(ms_link_stream_t *s, lua_State *co)
{
    int status = (int)lua_tointeger(co, -3);
    size_t body_len;
    const char *body = lua_tolstring(co, -2, &body_len);
    if (status < 200 || status > 599 || !body || !lua_istable(co, -1)) {
        char msg[120];
        if (status >= 100 && status < 200)
            snprintf(msg, sizeof msg,
                     "handler returned status %d: a response needs a final "
                     "status (200-599)",
                     status);
        else
            snprintf(msg, sizeof msg, "handler returned an invalid response");
        ms_warn("request %s failed: %s", s->req.request_id, msg);
        respond_error(s, 500, msg);
        return;
    }
    int n = (int)lua_objlen(co, -1) / 2;
    ms_http_header_t *hs = ms_calloc((size_t)n + 1, sizeof *hs);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(co, -1, 2 * i + 1);
        lua_rawgeti(co, -2, 2 * i + 2);
        hs[i].name = lua_tolstring(co, -2, &hs[i].name_len);
        hs[i].value = lua_tolstring(co, -1, &hs[i].value_len);
        lua_pop(co, 2); /* the strings stay alive: the header table still holds them */
    }
    char err[200];
    if (rt_check_headers(hs, (size_t)n, err, sizeof err) == 0) {
        lua_pushvalue(co, -2);
        int ref = luaL_ref(co, LUA_REGISTRYINDEX);
        if (ms_link_respond(s, status, hs, (size_t)n, body, body_len, unref_body,
                            (void *)(intptr_t)ref))
            luaL_unref(co, LUA_REGISTRYINDEX, ref);
    } else {
        ms_warn("request %s failed: %s", s->req.request_id, err);
        respond_error(s, 500, err);
    }
    free(hs);
}

static void on_request_done(rt_task_t *t, int ok)
{
    ms_link_stream_t *s = t->stream;
    s->user = NULL;
    if (t->streaming) {
        /* The head is gone already: an error can only cut the stream short. */
        if (ok) {
            ms_link_end(s);
        } else {
            ms_warn("request %s failed mid-stream: %s", s->req.request_id,
                    rt_vm_error_text(t->co, -1));
            ms_link_abort(s);
        }
    } else if (ok) {
        respond_from_lua(s, t->co);
    } else {
        const char *msg = rt_vm_error_text(t->co, -1);
        ms_warn("request %s failed: %s", s->req.request_id, msg);
        respond_error(s, 500, msg);
    }
    R.ongoing--;
    rt_task_free(t);
}

static void on_request(ms_link_stream_t *s, void *data)
{
    (void)data;
    if (R.ongoing >= R.opt.max_ongoing) {
        /* Strict mode: the controller's router never sends more, so this is a safety net. */
        respond_error(s, 503, "replica is at max_ongoing_requests");
        return;
    }
    rt_task_t *t = rt_task_new(&R.rt, "_run_request", on_request_done);
    t->stream = s;
    ms_copy_str(t->request_id, sizeof t->request_id, s->req.request_id);
    /* The controller enforces the deadline (it cancels the request when it passes); the task
     * keeps it to send what is left with each handle call. */
    uint64_t left_ms;
    if (ms_link_deadline(s->req.headers, s->req.n_headers, &left_ms) > 0) {
        t->has_deadline = 1;
        t->deadline_ms = uv_now(R.rt.loop) + left_ms;
    }
    s->user = t;
    R.ongoing++;
    push_instance(t->co);
    push_request(t->co, &s->req);
    rt_task_start(t, 2);
}

/* The controller cancelled the request (its client left or it timed out), or the link went
 * away: the task is dropped and never resumed again. */
static void on_cancel(ms_link_stream_t *s, void *data)
{
    (void)data;
    rt_task_t *t = s->user;
    if (!t)
        return;
    ms_info("request %s cancelled", s->req.request_id);
    rt_task_cancel(t);
    rt_task_free(t);
    R.ongoing--;
}

/* ---- startup ----------------------------------------------------------------------------------
 */

static void become_ready(void)
{
    ms_link_server_config_t cfg = {.on_request = on_request, .on_cancel = on_cancel};
    int r = ms_link_listen_unix(R.rt.loop, R.opt.socket, &cfg, &R.server);
    if (r != 0) {
        char msg[512];
        snprintf(msg, sizeof msg, "cannot listen on %s: %s", R.opt.socket,
                 r < 0 ? uv_strerror(r) : "error");
        fail_startup(msg);
        return;
    }
    R.ready = 1;
    ms_info("ready on %s", R.opt.socket);
    ctl_send(json_pack("{s:s}", "op", "ready"), -1);
}

static void on_reconfigured(rt_task_t *t, int ok)
{
    if (ok)
        become_ready();
    else
        fail_startup(rt_vm_error_text(t->co, -1));
    rt_task_free(t);
}

static void on_constructed(rt_task_t *t, int ok)
{
    if (!ok) {
        fail_startup(rt_vm_error_text(t->co, -1));
        rt_task_free(t);
        return;
    }
    lua_xmove(t->co, R.rt.L, 1);
    R.rt.instance_ref = luaL_ref(R.rt.L, LUA_REGISTRYINDEX);
    rt_task_free(t);

    json_error_t jerr;
    json_t *uc = json_loads(R.opt.user_config_json ? R.opt.user_config_json : "null",
                            JSON_DECODE_ANY, &jerr);
    if (!uc) {
        fail_startup("--user-config-json is not valid JSON");
    } else if (json_is_null(uc)) {
        become_ready();
    } else {
        control_task(0, "_call_method", "reconfigure", uc, on_reconfigured);
    }
    json_decref(uc);
}

static void set_context(lua_State *L)
{
    char tag[256];
    snprintf(tag, sizeof tag, "%s#%s", R.opt.deployment, R.opt.replica_id);
    rt_vm_push_module(L);
    lua_createtable(L, 0, 4);
    lua_pushstring(L, R.opt.app);
    lua_setfield(L, -2, "app_name");
    lua_pushstring(L, R.opt.deployment);
    lua_setfield(L, -2, "deployment");
    lua_pushstring(L, R.opt.replica_id);
    lua_setfield(L, -2, "replica_id");
    lua_pushstring(L, tag);
    lua_setfield(L, -2, "replica_tag");
    /* The controller's indices of the GPUs placed for this replica (docs/gpu.md); the process
     * sees them through CUDA_VISIBLE_DEVICES, numbered from 0. */
    lua_newtable(L);
    const char *ids = getenv("MOONSERVE_GPU_IDS");
    for (int n = 0; ids && *ids;) {
        char *end;
        long id = strtol(ids, &end, 10);
        if (end == ids)
            break;
        lua_pushinteger(L, id);
        lua_rawseti(L, -2, ++n);
        ids = *end == ',' ? end + 1 : end;
    }
    lua_setfield(L, -2, "gpu_ids");
    lua_setfield(L, -2, "_context");
    lua_pop(L, 1);
}

/* Loads the module and starts the constructor task; returns -1 with *err on a load failure. */
static int start_construction(char **err)
{
    const char *colon = strrchr(R.opt.import, ':');
    if (!colon) {
        *err = ms_strdup("--import must be FILE:ATTR");
        return -1;
    }
    char *file = ms_strndup(R.opt.import, (size_t)(colon - R.opt.import));
    json_error_t jerr;
    json_t *args = R.opt.args_json ? json_loads(R.opt.args_json, JSON_DECODE_ANY, &jerr) : NULL;
    int rc = -1;
    R.rt.mem.limit = (size_t)R.opt.memory_bytes;
    R.rt.L = rt_vm_new(file, rt_task_lib, &R.rt.mem, err);
    if (R.rt.L) {
        lua_State *L = R.rt.L;
        rt_tasks_init(&R.rt);
        set_context(L);
        if (rt_vm_load_app(L, file, colon + 1, args, err) == 0) {
            rt_vm_push_module(L);
            lua_getfield(L, -1, "_instantiate");
            lua_pushvalue(L, -3);
            lua_pushstring(L, R.opt.deployment);
            lua_pushstring(L, R.opt.app);
            if (lua_pcall(L, 3, 3, 0) != 0) {
                *err = ms_strdup(rt_vm_error_text(L, -1));
            } else {
                rt_task_t *t = rt_task_new(&R.rt, "_construct", on_constructed);
                ms_random_id(t->request_id);
                lua_xmove(L, t->co, 3);
                lua_settop(L, 0);
                rt_task_start(t, 3);
                rc = 0;
            }
        }
        lua_settop(L, 0);
    }
    json_decref(args);
    free(file);
    return rc;
}

/* ---- shutdown ---------------------------------------------------------------------------------
 */

static void on_drain_tick(uv_timer_t *timer)
{
    (void)timer;
    /* Done once nothing runs and every answer has been written to the controller. */
    if (R.ongoing == 0 && ms_link_server_busy(R.server) == 0) {
        ms_info("drained: exiting");
        finish(0);
        return;
    }
    ms_info("draining: %ld requests still running", R.ongoing);
}

/* As Ray Serve: stop taking requests, always wait one loop period (so the controller's removal
 * of this replica propagates), then keep waiting in the same steps until nothing runs. */
static void on_sigterm(uv_signal_t *sig, int signum)
{
    (void)sig;
    (void)signum;
    if (R.draining)
        return;
    R.draining = 1;
    if (!R.ready) { /* a replica that never initialized has nothing to drain */
        finish(0);
        return;
    }
    ms_info("SIGTERM: draining (%ld ongoing)", R.ongoing);
    ms_link_server_stop_accepting(R.server);
    uint64_t step = (uint64_t)(R.opt.wait_loop_s * 1000.0 + 0.5);
    uv_timer_start(&R.drain_timer, on_drain_tick, step, step ? step : 1);
}

/* Dies with the controller: the kernel SIGKILLs us when the parent exits. The parent may have
 * died before prctl ran, hence the second look at our parent. */
static int tie_to_parent(pid_t parent)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) {
        perror("replica: prctl(PR_SET_PDEATHSIG)");
        return -1;
    }
    if (getppid() != parent || parent == 1) {
        fprintf(stderr, "replica: the controller is already gone\n");
        return -1;
    }
    return 0;
}

/* logging_config.logs_dir of the replica's deployment, from the controller (MOONSERVE_LOGS_DIR,
 * empty for none): REPLICA's own file replica_APP_DEPLOYMENT_ID.log, as Ray Serve names it. A
 * folder that went bad since the config was checked costs the file, not the replica. */
static void open_log_file(void)
{
    const char *dir = getenv("MOONSERVE_LOGS_DIR");
    if (!dir || !dir[0])
        return;
    const char *max = getenv("MOONSERVE_LOG_ROTATION_MAX_BYTES");
    const char *backups = getenv("MOONSERVE_LOG_ROTATION_BACKUP_COUNT");
    long long max_bytes = max && max[0] ? strtoll(max, NULL, 10) : 512LL * 1024 * 1024;
    long n_backups = backups && backups[0] ? strtol(backups, NULL, 10) : 5;
    char name[512], err[1600];
    snprintf(name, sizeof name, "replica_%s_%s_%s.log", R.opt.app, R.opt.deployment,
             R.opt.replica_id);
    if (ms_log_set_file(dir, name, max_bytes < 0 ? 0 : max_bytes,
                        n_backups < 0 ? 0 : (int)n_backups, err, sizeof err) != 0)
        ms_warn("%s; logging to stderr only", err);
}

int ms_runtime_main(int argc, char **argv)
{
    pid_t parent = getppid();
    if (tie_to_parent(parent) != 0 || parse_options(argc, argv, &R.opt) != 0)
        return 2;
    char role[256];
    snprintf(role, sizeof role, "replica %s/%s#%s", R.opt.app, R.opt.deployment, R.opt.replica_id);
    ms_log_set_role(role);
    open_log_file();
    /* Ctrl-C reaches the whole process group; the controller decides when replicas stop. */
    signal(SIGINT, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);

    struct stat st;
    if (fstat(CTL_FD, &st) != 0 || !(S_ISSOCK(st.st_mode) || S_ISFIFO(st.st_mode))) {
        fprintf(stderr, "replica: fd %d must be the controller's control channel\n", CTL_FD);
        return 2;
    }
    R.rt.loop = uv_default_loop();
    R.rt.controller_path = R.opt.controller;
    R.rt.max_ongoing = R.opt.max_ongoing;
    uv_pipe_init(R.rt.loop, &R.ctl, 0);
    if (uv_pipe_open(&R.ctl, CTL_FD) != 0 ||
        uv_read_start((uv_stream_t *)&R.ctl, ctl_alloc, ctl_read) != 0) {
        fprintf(stderr, "replica: fd %d is not the controller's control channel\n", CTL_FD);
        return 2;
    }
    uv_signal_init(R.rt.loop, &R.sigterm);
    uv_signal_start(&R.sigterm, on_sigterm, SIGTERM);
    uv_timer_init(R.rt.loop, &R.drain_timer);

    char *err = NULL;
    if (start_construction(&err) != 0) {
        fail_startup(err);
        free(err);
    }
    uv_run(R.rt.loop, UV_RUN_DEFAULT);
    /* Runs the futures' finalizers, which own their call records (the leak checker cannot see
     * into LuaJIT's own allocator). Nothing resumes Lua after this. */
    if (R.rt.L)
        lua_close(R.rt.L);
    return R.exit_code;
}
