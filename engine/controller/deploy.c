/*
 * controller/deploy: declarative redeploys (PUT /api/serve/applications/, `moonserve deploy`).
 * The body is a whole config, the new goal state. It is validated completely first (the file,
 * every application module, every policy and router script): an invalid config changes nothing
 * and answers 400 with every error. Then, deployment by deployment:
 *  - still there, same code: lightweight settings change in place (user_config reaches
 *    reconfigure() on the running replicas; no restart), the replica count follows num_replicas
 *    unless autoscaling or an external scaler owns it (an externally set count survives);
 *  - still there, code changed (import_path, args, or the application file's content): replicas
 *    are replaced, each new one ready before an old one stops;
 *  - new: started; gone (or its application gone): drained and stopped.
 * Policies, routes and scale hooks are rebuilt from the new config.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "controller/internal.h"
#include "history/history.h"

/* SHA-256 of the application file, to notice code changes behind an unchanged import_path. */
static void file_sha(const char *path, char out[65])
{
    ms_buf_t b = {0};
    if (path) /* a config-only application has no file: its hash is that of nothing */
        ms_read_file(path, &b); /* unreadable: the hash of what was read still tells a change */
    ms_sha256_hex(b.data ? b.data : "", b.len, out);
    ms_buf_free(&b);
}

/* Equal strings, or both NULL (a config-only application has no import_path). */
static int same_text(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

/* Code changes: another module or attribute, other args, or other content in the file. */
static int code_changed(const ms_app_config_t *old, const ms_app_config_t *now)
{
    return !same_text(old->import_file, now->import_file) ||
           !same_text(old->import_attr, now->import_attr) || !json_equal(old->args, now->args) ||
           strcmp(old->code_sha, now->code_sha) != 0;
}

static dep_entry_t *find_entry(controller_t *c, const char *app, const char *name, const char *kept)
{
    for (size_t i = 0; i < c->n_deps; i++)
        if (!kept[i] && strcmp(c->deps[i].app->name, app) == 0 &&
            strcmp(c->deps[i].name, name) == 0)
            return &c->deps[i];
    return NULL;
}

static void on_retired(void *data)
{
    ms_deployment_free(data);
}

/* The replica count a redeploy asks for, unless something else owns it. */
static void apply_count(dep_entry_t *e, const planned_t *p, const ms_app_config_t *old_app)
{
    if (p->autoscaling)
        return; /* the new autoscaler decides from the current count */
    if (p->app->external_scaler_enabled && old_app->external_scaler_enabled)
        return; /* an externally set count survives a redeploy, as in Ray Serve */
    ms_deployment_set_target(e->dep, p->num_replicas);
}

/* "app/deployment: what", into the deploy's list of changes (its reload history entry). */
static void note_change(json_t *changed, const char *app, const char *dep, const char *what)
{
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/%s: %s", app, dep, what);
    json_t *text = json_string(b.data);
    if (text)
        json_array_append_new(changed, text);
    ms_buf_free(&b);
}

static int update_or_start(controller_t *c, const planned_t *p, char *kept, dep_entry_t *out,
                           json_t *changed)
{
    dep_entry_t *old = find_entry(c, p->app->name, p->name, kept);
    if (!old) {
        ms_deployment_t *d = ms__start_deployment(c, p);
        if (!d) {
            note_change(changed, p->app->name, p->name, "failed to start");
            return -1;
        }
        note_change(changed, p->app->name, p->name, "started");
        memset(out, 0, sizeof *out);
        out->dep = d;
        out->name = ms_strdup(p->name);
        const ms_deployment_config_t *file = ms_config_find_deployment(p->app, p->name);
        out->actor_options =
            file && file->ray_actor_options ? json_deep_copy(file->ray_actor_options) : NULL;
        out->process_json = p->process_json ? json_deep_copy(p->process_json) : NULL;
        out->logging = p->logging;
        return 0;
    }
    kept[old - c->deps] = 1;
    *out = *old;
    const ms_deployment_config_t *file = ms_config_find_deployment(p->app, p->name);
    json_t *actor = file ? file->ray_actor_options : NULL;
    int actor_changed = !(actor == old->actor_options ||
                          (actor && old->actor_options && json_equal(actor, old->actor_options)));
    json_decref(out->actor_options);
    out->actor_options = actor ? json_deep_copy(actor) : NULL;
    int process_changed =
        !(p->process_json == old->process_json ||
          (p->process_json && old->process_json && json_equal(p->process_json, old->process_json)));
    json_decref(out->process_json);
    out->process_json = p->process_json ? json_deep_copy(p->process_json) : NULL;
    ms__settings_t st;
    ms__settings_fill(c, p, &st);
    ms_deployment_update(old->dep, &st.s);
    /* A replica reads its logging_config at start: a change replaces the replicas. */
    int logging_changed = memcmp(&old->logging, &p->logging, sizeof p->logging) != 0;
    out->logging = p->logging;
    int code = code_changed(old->app, p->app);
    if (code || actor_changed || process_changed || logging_changed) {
        ms_buf_t why = {0};
        ms_buf_appendf(&why, "replicas replaced (%s%s%s%s)", code ? "code, " : "",
                       actor_changed ? "ray_actor_options, " : "",
                       process_changed ? "process, " : "",
                       logging_changed ? "logging_config, " : "");
        why.data[why.len - 3] = ')'; /* the last ", " goes */
        why.data[why.len - 2] = '\0';
        note_change(changed, p->app->name, p->name, why.data);
        ms_buf_free(&why);
        ms_deployment_roll(old->dep, &st.s.spec);
    } else {
        note_change(changed, p->app->name, p->name, "settings applied in place");
    }
    ms__settings_free(&st);
    apply_count(out, p, old->app);
    return 0;
}

static void retire_unkept(controller_t *c, const char *kept, json_t *changed)
{
    for (size_t i = 0; i < c->n_deps; i++) {
        if (kept[i])
            continue;
        note_change(changed, c->deps[i].app->name, c->deps[i].name, "stopped (not in the config)");
        ms_info("deployment %s/%s: not in the new config; stopping it", c->deps[i].app->name,
                c->deps[i].name);
        ms_deployment_shutdown(c->deps[i].dep, on_retired, c->deps[i].dep);
        ms_task_queue_free(c->deps[i].tasks); /* what it runs is delivered again later */
        free(c->deps[i].name);
        json_decref(c->deps[i].actor_options);
        json_decref(c->deps[i].process_json);
    }
}

static void apply(controller_t *c, ms_config_t *cfg, const plan_t *plan, json_t *changed)
{
    char *kept = ms_calloc(c->n_deps ? c->n_deps : 1, 1);
    dep_entry_t *deps = ms_calloc(plan->n ? plan->n : 1, sizeof *deps);
    size_t n = 0;
    ms__control_release_policies(c);
    c->cfg = cfg;
    for (size_t i = 0; i < plan->n; i++) {
        const planned_t *p = &plan->items[i];
        if (update_or_start(c, p, kept, &deps[n], changed) != 0)
            continue; /* logged; the rest of the config still applies */
        deps[n].app = p->app;
        deps[n].app_index = (size_t)(p->app - cfg->apps);
        n++;
    }
    retire_unkept(c, kept, changed);
    free(kept);
    free(c->deps);
    c->deps = deps;
    c->n_deps = n;
    ms_ingress_clear(c->proxy);
    ms_ingress_set_access_log(c->proxy, cfg->logging.access_log);
    /* The controller's own logging follows the new config at once. */
    ms_log_level_t level;
    if (ms_log_parse_level(cfg->logging.level, &level) == 0)
        ms_log_min_level = level;
    ms_log_set_json(cfg->logging.json);
    char log_err[1600];
    /* The config was checked (logs_dir can hold files): this fails only if the folder changed
     * since, and a deploy already under way goes on. */
    if (ms__apply_log_file(cfg, log_err, sizeof log_err) != 0)
        ms_error("deploy: %s; the controller's lines keep going where they went", log_err);
    for (size_t i = 0; i < plan->n; i++)
        for (size_t k = 0; k < n; k++)
            if (c->deps[k].app == plan->items[i].app &&
                strcmp(c->deps[k].name, plan->items[i].name) == 0)
                ms_ingress_add_deployment(
                    c->proxy, plan->items[i].app->name, c->deps[k].name,
                    plan->items[i].is_ingress ? plan->items[i].app->route_prefix : NULL,
                    c->deps[k].dep, plan->items[i].logging.access_log);
    if (ms__control_setup(c, plan) != 0)
        ms_error("deploy: some policies failed to load; their deployments keep their counts");
}

int ms__apply_log_file(const ms_config_t *cfg, char *err, size_t err_cap)
{
    const ms_logging_config_t *lc = &cfg->logging;
    return ms_log_set_file(lc->logs_dir, "controller.log", lc->rotation_max_bytes,
                           lc->rotation_backup_count, err, err_cap);
}

/* A deploy's entry in the reload history: kind "config", the whole config (no application). */
static void record_deploy(controller_t *c, json_t *changed, const char *error)
{
    json_t *err = error ? json_string(error) : json_null();
    json_t *e =
        json_pack("{s:f, s:s, s:n, s:n, s:n, s:s, s:o, s:s, s:o, s:I}", "time", ms_wall_time(),
                  "kind", "config", "application", "deployment", "role", "requested_by", "deploy",
                  "changed", changed, "result", error ? "failed" : "ok", "error",
                  err ? err : json_null(), "version", (json_int_t)c->deploys);
    ms_history_record(MS_HISTORY_RELOADS, e);
}

void ms__remember_code(ms_config_t *cfg)
{
    for (size_t i = 0; i < cfg->n_apps; i++)
        file_sha(cfg->apps[i].import_file, cfg->apps[i].code_sha);
}

static int invalid(controller_t *c, ms_config_errors_t *errs, json_t **body)
{
    json_t *list = json_array();
    for (size_t i = 0; i < errs->n; i++)
        json_array_append_new(list, json_string(errs->items[i]));
    char msg[160];
    snprintf(msg, sizeof msg, "invalid config (%zu error%s); nothing changed", errs->n,
             errs->n == 1 ? "" : "s");
    ms_buf_t text = {0};
    ms_buf_append_str(&text, msg);
    for (size_t i = 0; i < errs->n; i++)
        ms_buf_appendf(&text, "%s%s", i ? "; " : ": ", errs->items[i]);
    record_deploy(c, json_array(), text.data);
    ms_buf_free(&text);
    *body = json_pack("{s:s, s:o}", "error", msg, "errors", list);
    ms_config_errors_free(errs);
    return 400;
}

int ms__deploy(controller_t *c, const char *text, size_t len, json_t **body)
{
    if (c->shutting_down) {
        *body = json_pack("{s:s}", "error", "shutting down");
        return 503;
    }
    ms_config_errors_t errs = {0};
    ms_config_t *cfg = NULL;
    if (ms_config_load_string(text, len, "deploy", c->cfg->dir, &cfg, &errs) != 0)
        return invalid(c, &errs, body);
    plan_t plan = {0};
    if (ms__plan_build(cfg, &plan, &errs) != 0 || ms__plan_check_scripts(cfg, &plan, &errs) != 0) {
        ms__plan_free(&plan);
        ms_config_free(cfg);
        return invalid(c, &errs, body);
    }
    if (strcmp(cfg->http.host, c->cfg->http.host) != 0 || cfg->http.port != c->cfg->http.port)
        ms_warn("deploy: http_options host and port cannot change while running; ignored");
    ms__remember_code(cfg);
    /* The listeners in force stay as they are; so does what status reports of them. */
    free(cfg->http.host);
    cfg->http.host = ms_strdup(c->cfg->http.host);
    cfg->http.port = c->cfg->http.port;
    json_t *changed = json_array();
    apply(c, cfg, &plan, changed);
    ms__plan_free(&plan);
    c->deploys++;
    record_deploy(c, changed, NULL);
    /* Everything now points into cfg: deployment entries, applications, policies and routes.
     * What was taken from the old config (names, specs, scripts, stopping deployments) was
     * copied, so the previous deploy's config can go. The file's stays with its caller. */
    ms_config_free(c->deployed);
    c->deployed = cfg;
    ms_info("deploy: applied (%zu applications)", cfg->n_apps);
    *body = NULL;
    return 200;
}
