/*
 * config (process): a process deployment's `process` block (docs/process-replicas.md), from the
 * file or from code options, through the one validator of config_json.c.
 */
#include "config/config_internal.h"
#include "core/core.h"

#include <ctype.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_ARGS 256
#define MAX_ENV  256

typedef struct proc_build {
    ms_process_config_t *p;
    const char *dir; /* the config file's folder */
    yaml_node_t *command_node, *cwd_node;
} proc_build_t;

/* A string value, or the text of a number or boolean (environment values are text). */
static const char *scalar_text(json_t *j, char *buf, size_t cap)
{
    if (json_is_string(j))
        return json_string_value(j);
    if (json_is_integer(j))
        snprintf(buf, cap, "%lld", (long long)json_integer_value(j));
    else if (json_is_real(j))
        snprintf(buf, cap, "%.17g", json_real_value(j));
    else if (json_is_boolean(j))
        ms_copy_str(buf, cap, json_is_true(j) ? "true" : "false");
    else
        return NULL;
    return buf;
}

static void free_list(char **list)
{
    for (size_t i = 0; list && list[i]; i++)
        free(list[i]);
    free(list);
}

static void pr_command(jkv_t *kv, void *obj)
{
    proc_build_t *b = obj;
    b->command_node = kv->val_node;
    size_t n = json_is_array(kv->val) ? json_array_size(kv->val) : 0;
    if (n == 0 || n > MAX_ARGS) {
        jbad(kv, "a non-empty list of at most 256 strings (the program and its arguments)");
        return;
    }
    char **argv = ms_calloc(n + 1, sizeof *argv);
    for (size_t i = 0; i < n; i++) {
        char num[64];
        json_t *a = json_array_get(kv->val, i);
        const char *s = scalar_text(a, num, sizeof num);
        /* An argument with a NUL byte would be cut short by exec. */
        if (!s || (i == 0 && !*s) || (json_is_string(a) && json_string_length(a) != strlen(s))) {
            jbad(kv, "a non-empty list of strings (the program and its arguments)");
            free_list(argv);
            return;
        }
        argv[i] = ms_strdup(s);
    }
    free_list(b->p->argv);
    b->p->argv = argv;
    b->p->argc = n;
}

static int env_name_ok(const char *s)
{
    if (!*s || !(isalpha((unsigned char)*s) || *s == '_'))
        return 0;
    for (; *s; s++)
        if (!(isalnum((unsigned char)*s) || *s == '_'))
            return 0;
    return 1;
}

static void pr_env(jkv_t *kv, void *obj)
{
    proc_build_t *b = obj;
    if (json_is_null(kv->val))
        return;
    if (!json_is_object(kv->val) || json_object_size(kv->val) > MAX_ENV) {
        jbad(kv, "a mapping of at most 256 variable names to values");
        return;
    }
    char **env = ms_calloc(json_object_size(kv->val) + 1, sizeof *env);
    size_t n = 0;
    const char *name;
    json_t *v;
    json_object_foreach(kv->val, name, v)
    {
        char num[64];
        const char *s = scalar_text(v, num, sizeof num);
        if (!env_name_ok(name) || !s) {
            jv_error(kv->v, kv->val_node,
                     "env: '%s' must be a variable name ([A-Za-z_][A-Za-z0-9_]*) with a string, "
                     "number or boolean value",
                     name);
            continue;
        }
        ms_buf_t e = {0};
        ms_buf_appendf(&e, "%s=%s", name, s);
        env[n++] = e.data;
    }
    free_list(b->p->env);
    b->p->env = env;
    b->p->n_env = n;
}

static void pr_cwd(jkv_t *kv, void *obj)
{
    proc_build_t *b = obj;
    const char *s = json_is_string(kv->val) ? json_string_value(kv->val) : NULL;
    if (!s || !*s) {
        jbad(kv, "a folder (absolute, or relative to the config file's folder)");
        return;
    }
    b->cwd_node = kv->val_node;
    ms_buf_t path = {0};
    if (s[0] == '/')
        ms_buf_appendf(&path, "%s", s);
    else
        ms_buf_appendf(&path, "%s/%s", b->dir, s);
    char *real = realpath(path.data, NULL);
    struct stat st;
    if (!real || stat(real, &st) != 0 || !S_ISDIR(st.st_mode))
        jv_error(kv->v, kv->val_node, "cwd: %s is not a folder", path.data);
    else {
        free(b->p->cwd);
        b->p->cwd = ms_strdup(real);
    }
    free(real);
    ms_buf_free(&path);
}

static void pr_listen(jkv_t *kv, void *obj)
{
    proc_build_t *b = obj;
    const char *s = json_is_string(kv->val) ? json_string_value(kv->val) : "";
    if (strcmp(s, "unix") == 0)
        b->p->listen_port = 0;
    else if (strcmp(s, "port") == 0)
        b->p->listen_port = 1;
    else
        jbad(kv, "\"unix\" (a Unix socket path in MOONSERVE_SOCKET) or \"port\" (a TCP port in "
                 "PORT)");
}

/* A request path the engine sends itself: absolute, no spaces or control bytes. */
static void get_path(jkv_t *kv, char **out, int null_ok)
{
    if (null_ok && json_is_null(kv->val)) {
        free(*out);
        *out = NULL;
        return;
    }
    const char *s = json_is_string(kv->val) ? json_string_value(kv->val) : NULL;
    int ok = s && s[0] == '/';
    for (const char *q = s; ok && *q; q++)
        ok = (unsigned char)*q > ' ' && *q != 0x7f;
    if (!ok) {
        jbad(kv, null_ok ? "a path starting with '/', or null" : "a path starting with '/'");
        return;
    }
    free(*out);
    *out = ms_strdup(s);
}

static void pr_ready_path(jkv_t *kv, void *obj)
{
    get_path(kv, &((proc_build_t *)obj)->p->ready_path, 0);
}

static void pr_ready_timeout(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((proc_build_t *)obj)->p->ready_timeout_s);
}

static void pr_health_path(jkv_t *kv, void *obj)
{
    get_path(kv, &((proc_build_t *)obj)->p->health_path, 1);
}

static void pr_stream_body_bytes(jkv_t *kv, void *obj)
{
    jget_int(kv, 0, LLONG_MAX, "an integer >= 0 (bytes; 0 streams every body)",
             &((proc_build_t *)obj)->p->stream_body_bytes);
}

static void pb_max_batch_size(jkv_t *kv, void *obj)
{
    long long n = 0;
    if (jget_int(kv, 1, 100000, "an integer from 1 to 100000", &n))
        ((ms_process_config_t *)obj)->batch_max_size = (int)n;
}

static void pb_wait(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, true, &((ms_process_config_t *)obj)->batch_wait_timeout_s);
}

static void pb_path(jkv_t *kv, void *obj)
{
    get_path(kv, &((ms_process_config_t *)obj)->batch_path, 0);
}

/* The names and defaults of Ray Serve's @serve.batch. */
static const jfield_t batch_fields[] = {
    {"max_batch_size", pb_max_batch_size},
    {"batch_wait_timeout_s", pb_wait},
    {"path", pb_path},
};

static void pr_batch(jkv_t *kv, void *obj)
{
    ms_process_config_t *p = ((proc_build_t *)obj)->p;
    if (json_is_null(kv->val))
        return;
    if (!json_is_object(kv->val)) {
        jbad(kv, "a mapping (max_batch_size, batch_wait_timeout_s, path), or null");
        return;
    }
    p->batch_max_size = MS_DEFAULT_MAX_BATCH_SIZE;
    p->batch_wait_timeout_s = MS_DEFAULT_BATCH_WAIT_TIMEOUT_S;
    free(p->batch_path);
    p->batch_path = ms_strdup("/batch");
    jv_walk(kv->v, kv->val, jv_submap(kv), "in process.batch", batch_fields,
            MS_N_FIELDS(batch_fields), p);
}

static const jfield_t process_fields[] = {
    {"command", pr_command},
    {"env", pr_env},
    {"cwd", pr_cwd},
    {"listen", pr_listen},
    {"ready_path", pr_ready_path},
    {"ready_timeout_s", pr_ready_timeout},
    {"health_path", pr_health_path},
    {"stream_body_bytes", pr_stream_body_bytes},
    {"batch", pr_batch},
};

/* Whether `prog` names an executable: a path (relative to cwd) or a name found in PATH. */
static int program_found(const char *prog, const char *cwd)
{
    ms_buf_t b = {0};
    int ok = 0;
    if (strchr(prog, '/')) {
        if (prog[0] == '/')
            ms_buf_appendf(&b, "%s", prog);
        else
            ms_buf_appendf(&b, "%s/%s", cwd, prog);
        ok = access(b.data, X_OK) == 0;
        ms_buf_free(&b);
        return ok;
    }
    const char *path = getenv("PATH");
    for (const char *p = path ? path : "/usr/bin:/bin"; !ok && p;) {
        const char *colon = strchr(p, ':');
        size_t n = colon ? (size_t)(colon - p) : strlen(p);
        ms_buf_reset(&b);
        ms_buf_appendf(&b, "%.*s/%s", (int)n, n ? p : ".", prog);
        ok = access(b.data, X_OK) == 0;
        p = colon ? colon + 1 : NULL;
    }
    ms_buf_free(&b);
    return ok;
}

static ms_process_config_t *process_parse(jv_t *v, json_t *obj, yaml_node_t *ymap, const char *dir)
{
    ms_process_config_t *p = ms_calloc(1, sizeof *p);
    p->cwd = ms_strdup(dir);
    p->ready_path = ms_strdup("/");
    p->ready_timeout_s = MS_DEFAULT_PROCESS_READY_TIMEOUT_S;
    p->stream_body_bytes = MS_DEFAULT_PROCESS_STREAM_BODY_BYTES;
    p->mark = v->mark;
    proc_build_t b = {p, dir, NULL, NULL};
    size_t before = v->c->n_errors;
    uint64_t seen =
        jv_walk(v, obj, ymap, "in process", process_fields, MS_N_FIELDS(process_fields), &b);
    if (!(seen & 1))
        jv_error(v, ymap,
                 "process is missing required key 'command' (the program and its "
                 "arguments, a list)");
    else if (p->argv && !program_found(p->argv[0], p->cwd))
        jv_error(v, b.command_node, "process.command: program '%s' not found%s", p->argv[0],
                 strchr(p->argv[0], '/') ? " (or not executable)" : " in PATH");
    if (v->c->n_errors != before) {
        ms_config_process_free(p);
        return NULL;
    }
    return p;
}

ms_process_config_t *ms_cfg_process_yaml(ms_cfg_ctx_t *c, yaml_node_t *map)
{
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    return process_parse(&v, NULL, map, c->dir);
}

ms_process_config_t *ms_config_process_from_json(json_t *obj, const char *file, const char *dir,
                                                 ms_config_mark_t mark, const char *what,
                                                 ms_config_errors_t *errs)
{
    ms_cfg_ctx_t c = {.file = file ? file : "<code>",
                      .dir = dir,
                      .errs = errs,
                      .json_budget = MS_CFG_JSON_MAX_NODES};
    jv_t v = {&c, what && *what ? what : NULL, mark};
    if (!json_is_object(obj)) {
        char got[64];
        ms_cfg_describe_json(obj, got, sizeof(got));
        jv_error(&v, NULL, "process must be a mapping, got %s", got);
        return NULL;
    }
    return process_parse(&v, obj, NULL, dir);
}

static char **copy_list(char *const *list)
{
    size_t n = 0;
    while (list && list[n])
        n++;
    char **out = ms_calloc(n + 1, sizeof *out);
    for (size_t i = 0; i < n; i++)
        out[i] = ms_strdup(list[i]);
    return out;
}

static char *dup_opt(const char *s)
{
    return s ? ms_strdup(s) : NULL;
}

ms_process_config_t *ms_config_process_copy(const ms_process_config_t *p)
{
    if (!p)
        return NULL;
    ms_process_config_t *c = ms_calloc(1, sizeof *c);
    *c = *p;
    c->argv = copy_list(p->argv);
    c->env = copy_list(p->env);
    c->cwd = dup_opt(p->cwd);
    c->ready_path = dup_opt(p->ready_path);
    c->health_path = dup_opt(p->health_path);
    c->batch_path = dup_opt(p->batch_path);
    return c;
}

void ms_config_process_free(ms_process_config_t *p)
{
    if (!p)
        return;
    free_list(p->argv);
    free_list(p->env);
    free(p->cwd);
    free(p->ready_path);
    free(p->health_path);
    free(p->batch_path);
    free(p);
}
