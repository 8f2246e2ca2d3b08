/*
 * config (scaling): autoscaling_config (with its policy), request_router_config, the
 * application's autoscaling_policy and its external_scaler hooks. One set of field tables
 * validates both sources:
 *   - a YAML mapping from the config file: each value node is converted to JSON and checked,
 *     and errors point at the key or value node;
 *   - a JSON object from code options (serve.deployment{autoscaling_config = {...}}): errors
 *     point at the caller's mark and start with the caller's `what`.
 * So a rule lives in one place whichever way the option arrives.
 */
#include "config/config_internal.h"
#include "core/core.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* ---- one validator for YAML and JSON ------------------------------------------------------ */

typedef struct jv {
    ms_cfg_ctx_t *c;
    const char *what;      /* JSON: prefix of every message; NULL for YAML */
    ms_config_mark_t mark; /* JSON: position of every message */
} jv_t;

/* One key and its value. For YAML the nodes give positions and the "got ..." text. */
typedef struct jkv {
    jv_t *v;
    const char *key;
    json_t *val;           /* borrowed */
    yaml_node_t *key_node; /* NULL from JSON */
    yaml_node_t *val_node; /* NULL from JSON */
} jkv_t;

typedef void (*jfield_fn)(jkv_t *kv, void *obj);
typedef struct jfield {
    const char *name;
    jfield_fn fn;
} jfield_t;

static void jv_verror(jv_t *v, const yaml_node_t *node, const char *fmt, va_list ap)
{
    ms_buf_t b = {0};
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n > 0) {
        ms_buf_reserve(&b, (size_t)n + 1);
        vsnprintf(b.data, (size_t)n + 1, fmt, ap);
        b.len = (size_t)n;
    }
    ms_config_mark_t m = node ? ms_cfg_mark(node) : v->mark;
    if (v->what)
        ms_cfg_error_at(v->c, m, "%s: %s", v->what, b.data ? b.data : "");
    else
        ms_cfg_error_at(v->c, m, "%s", b.data ? b.data : "");
    ms_buf_free(&b);
}

/* An error at `node` (YAML) or at the caller's mark (JSON, node NULL). */
static void __attribute__((format(printf, 3, 4)))
jv_error(jv_t *v, const yaml_node_t *node, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    jv_verror(v, node, fmt, ap);
    va_end(ap);
}

/* `KEY must be DESC, got VALUE` at the value. */
static void jbad(jkv_t *kv, const char *desc)
{
    char got[64];
    if (kv->val_node)
        ms_cfg_describe(kv->val_node, got, sizeof(got));
    else
        ms_cfg_describe_json(kv->val, got, sizeof(got));
    jv_error(kv->v, kv->val_node, "%s must be %s, got %s", kv->key, desc, got);
}

/* Ray's lax integers: quoted ones too ("5", "5.0"), and integral reals (a YAML 5.0, or a Lua
 * number from code that arrives as a JSON real). */
static bool jget_int(jkv_t *kv, long long lo, long long hi, const char *desc, long long *out)
{
    json_t *j = kv->val;
    long long x = 0;
    bool ok = false;
    if (json_is_integer(j)) {
        x = json_integer_value(j);
        ok = true;
    } else if (json_is_string(j)) {
        ok = ms_cfg_parse_lax_int(json_string_value(j), &x);
    } else if (json_is_real(j)) {
        double d = json_real_value(j);
        ok = d == floor(d) && fabs(d) < 9e15;
        x = ok ? (long long)d : 0;
    }
    if (ok && x >= lo && x <= hi) {
        *out = x;
        return true;
    }
    jbad(kv, desc);
    return false;
}

/* A finite number > lo, or >= lo when `inclusive`. */
static bool jget_num(jkv_t *kv, double lo, bool inclusive, double *out)
{
    json_t *j = kv->val;
    double x = 0;
    bool ok = false;
    if (json_is_number(j)) {
        x = json_number_value(j);
        ok = isfinite(x);
    } else if (json_is_string(j)) {
        ok = ms_cfg_parse_double(json_string_value(j), &x);
    }
    if (ok && (inclusive ? x >= lo : x > lo)) {
        *out = x;
        return true;
    }
    jbad(kv, inclusive ? "a number >= 0" : "a number > 0");
    return false;
}

/* The same, where null means "unset" and is stored as -1. */
static void jget_opt_num(jkv_t *kv, bool inclusive, double *out)
{
    double x;
    if (json_is_null(kv->val)) {
        *out = -1;
        return;
    }
    json_t *j = kv->val;
    bool ok = false;
    if (json_is_number(j)) {
        x = json_number_value(j);
        ok = isfinite(x);
    } else if (json_is_string(j)) {
        ok = ms_cfg_parse_double(json_string_value(j), &x);
    }
    if (ok && (inclusive ? x >= 0 : x > 0)) {
        *out = x;
        return;
    }
    jbad(kv, inclusive ? "a number >= 0 or null" : "a number > 0 or null");
}

static bool jget_bool(jkv_t *kv, int *out)
{
    bool b;
    if (json_is_boolean(kv->val)) {
        *out = json_is_true(kv->val);
        return true;
    }
    if (json_is_string(kv->val) && ms_cfg_parse_bool(json_string_value(kv->val), &b)) {
        *out = b;
        return true;
    }
    jbad(kv, "true or false");
    return false;
}

/* A mapping, copied; null gives NULL. */
static void jget_mapping(jkv_t *kv, json_t **out)
{
    if (json_is_null(kv->val))
        return;
    if (!json_is_object(kv->val)) {
        jbad(kv, "a mapping or null");
        return;
    }
    json_decref(*out);
    *out = json_deep_copy(kv->val);
}

void ms_config_lua_ref_free(ms_config_lua_ref_t *r)
{
    if (!r)
        return;
    free(r->path);
    free(r->file);
    free(r->attr);
    free(r);
}

ms_config_lua_ref_t *ms_config_lua_ref_copy(const ms_config_lua_ref_t *r)
{
    if (!r)
        return NULL;
    ms_config_lua_ref_t *c = ms_calloc(1, sizeof *c);
    c->path = ms_strdup(r->path);
    c->file = ms_strdup(r->file);
    c->attr = ms_strdup(r->attr);
    c->mark = r->mark;
    return c;
}

/* Is `s` Ray's `module:attr` name `ray_name`, or its dotted spelling `module.attr`? Ray imports
 * both (its import_attr splits a colon-less path at the last dot). */
static bool names_builtin(const char *s, const char *ray_name)
{
    if (!strcmp(s, ray_name))
        return true;
    if (strchr(s, ':') || strlen(s) != strlen(ray_name))
        return false;
    for (size_t i = 0; s[i]; i++)
        if (s[i] != (ray_name[i] == ':' ? '.' : ray_name[i]))
            return false;
    return true;
}

/* `file.lua:attr` or `module.sub:attr` resolved against the config's folder. `builtin` lists
 * Ray Serve's names of the built-in (NULL-terminated, colon forms): they mean "no script", so a
 * Ray config that spells out the default still loads. Returns true for such a name, which leaves
 * *out unchanged and reports nothing. */
static bool jget_ref(jkv_t *kv, const char *const *builtin, ms_config_lua_ref_t **out)
{
    if (json_is_null(kv->val))
        return false;
    const char *s = json_is_string(kv->val) ? json_string_value(kv->val) : NULL;
    if (!s || !*s) {
        jbad(kv, "a string 'file.lua:attr' or 'module.sub:attr'");
        return false;
    }
    for (size_t i = 0; builtin && builtin[i]; i++)
        if (names_builtin(s, builtin[i]))
            return true;
    char *file = NULL, *attr = NULL;
    char *err = ms_cfg_resolve_lua(kv->v->c->dir, kv->key, s, &file, &attr);
    if (err) {
        jv_error(kv->v, kv->val_node, "%s", err);
        free(err);
        return false;
    }
    ms_config_lua_ref_free(*out);
    ms_config_lua_ref_t *r = ms_calloc(1, sizeof(*r));
    r->path = ms_strdup(s);
    r->file = file;
    r->attr = attr;
    r->mark = kv->val_node ? ms_cfg_mark(kv->val_node) : kv->v->mark;
    *out = r;
    return false;
}

/* Reports an unknown key (with a did-you-mean); returns the suggested index, or n. */
static size_t jv_unknown(jv_t *v, const yaml_node_t *key_node, const char *key, const char *where,
                         const jfield_t *fields, size_t n)
{
    const char *names[32];
    size_t k = 0;
    for (size_t i = 0; i < n && k < MS_N_FIELDS(names); i++)
        names[k++] = fields[i].name;
    const char *hint = ms_cfg_suggest(key, names, k);
    if (!hint) {
        jv_error(v, key_node, "unknown key '%s' %s", key, where);
        return n;
    }
    jv_error(v, key_node, "unknown key '%s' %s; did you mean '%s'?", key, where, hint);
    size_t i = 0;
    while (i < n && fields[i].name != hint)
        i++;
    return i;
}

static size_t jv_find(const jfield_t *fields, size_t n, const char *key)
{
    size_t i = 0;
    while (i < n && strcmp(fields[i].name, key) != 0)
        i++;
    return i;
}

/* Ray Serve's old name of a field: reported, and today's field's bit returned (0: not one). */
static uint64_t jv_renamed(jv_t *v, const yaml_node_t *key_node, const char *key, const char *where,
                           const jfield_t *fields, size_t n);

/* Dispatches each key of the mapping (`ymap` for YAML, else `obj`) to its field; returns a bit
 * per field present (a misspelt key counts as its suggestion, so it is not also "missing"). */
static uint64_t jv_walk(jv_t *v, json_t *obj, yaml_node_t *ymap, const char *where,
                        const jfield_t *fields, size_t n, void *dst)
{
    uint64_t seen = 0, suggested = 0;
    if (!ymap) {
        const char *key;
        json_t *val;
        json_object_foreach(obj, key, val)
        {
            size_t i = jv_find(fields, n, key);
            uint64_t now = i == n ? jv_renamed(v, NULL, key, where, fields, n) : 0;
            if (now) {
                suggested |= now;
                continue;
            }
            if (i == n) {
                size_t hint = jv_unknown(v, NULL, key, where, fields, n);
                if (hint < n)
                    suggested |= UINT64_C(1) << hint;
                continue;
            }
            seen |= UINT64_C(1) << i;
            jkv_t kv = {v, key, val, NULL, NULL};
            fields[i].fn(&kv, dst);
        }
        return seen | suggested;
    }
    for (yaml_node_pair_t *p = ymap->data.mapping.pairs.start; p < ymap->data.mapping.pairs.top;
         p++) {
        yaml_node_t *kn = ms_cfg_node(v->c, p->key), *vn = ms_cfg_node(v->c, p->value);
        const char *key = ms_cfg_scalar(kn);
        if (!key) {
            jv_error(v, kn, "keys %s must be strings", where);
            continue;
        }
        size_t i = jv_find(fields, n, key);
        uint64_t now = i == n ? jv_renamed(v, kn, key, where, fields, n) : 0;
        if (now) {
            suggested |= now;
            continue;
        }
        if (i == n) {
            size_t hint = jv_unknown(v, kn, key, where, fields, n);
            if (hint < n)
                suggested |= UINT64_C(1) << hint;
            continue;
        }
        if (seen & (UINT64_C(1) << i)) {
            jv_error(v, kn, "duplicate key '%s' %s", key, where);
            continue;
        }
        seen |= UINT64_C(1) << i;
        json_t *val = ms_cfg_to_json(v->c, vn);
        if (!val)
            continue; /* reported by the conversion */
        jkv_t kv = {v, key, val, kn, vn};
        fields[i].fn(&kv, dst);
        json_decref(val);
    }
    return seen | suggested;
}

/* Is the key's value (a mapping when valid) given as YAML? Then sub-walks use its node. */
static yaml_node_t *jv_submap(jkv_t *kv)
{
    return kv->val_node && kv->val_node->type == YAML_MAPPING_NODE ? kv->val_node : NULL;
}

/* ---- policy: {policy_function, policy_kwargs, dry_run} -------------------------------------- */

typedef struct policy_build {
    ms_config_lua_ref_t **ref;
    json_t **kwargs;
    int *dry_run;
    bool builtin; /* policy_function named Ray's built-in policy */
} policy_build_t;

/* Ray's names of its one built-in policy (the second is what the first is bound to). Ray has no
 * application-level built-in: these are the only names, at either level. */
static const char *const builtin_policies[] = {
    "ray.serve.autoscaling_policy:default_autoscaling_policy",
    "ray.serve.autoscaling_policy:replica_queue_length_autoscaling_policy",
    NULL,
};

static void pol_function(jkv_t *kv, void *obj)
{
    policy_build_t *pb = obj;
    pb->builtin = jget_ref(kv, builtin_policies, pb->ref);
}

static void pol_kwargs(jkv_t *kv, void *obj)
{
    policy_build_t *pb = obj;
    jget_mapping(kv, pb->kwargs);
}

static void pol_dry_run(jkv_t *kv, void *obj)
{
    policy_build_t *pb = obj;
    jget_bool(kv, pb->dry_run);
}

static const jfield_t policy_fields[] = {
    {"policy_function", pol_function},
    {"policy_kwargs", pol_kwargs},
    {"dry_run", pol_dry_run},
};

/* Walks a policy mapping; returns the fields seen, or 0 when the value is not a mapping. */
static uint64_t walk_policy(jkv_t *kv, const char *where, policy_build_t *pb)
{
    if (!json_is_object(kv->val)) {
        jbad(kv, "a mapping");
        return 0;
    }
    return jv_walk(kv->v, kv->val, jv_submap(kv), where, policy_fields, MS_N_FIELDS(policy_fields),
                   pb);
}

/* ---- autoscaling_config -----------------------------------------------------------------------
 */

typedef struct as_build {
    ms_autoscaling_config_t *a;
    /* Positions for the checks across fields (NULL: the mapping's, or the caller's mark). */
    yaml_node_t *min_node, *max_node, *initial_node;
} as_build_t;

static void as_min(jkv_t *kv, void *obj)
{
    as_build_t *b = obj;
    long long x;
    b->min_node = kv->val_node;
    if (jget_int(kv, 0, INT_MAX, "an integer >= 0", &x))
        b->a->min_replicas = (int)x;
}

static void as_initial(jkv_t *kv, void *obj)
{
    as_build_t *b = obj;
    long long x;
    b->initial_node = kv->val_node;
    if (json_is_null(kv->val))
        b->a->initial_replicas = -1;
    else if (jget_int(kv, 0, INT_MAX, "an integer >= 0 or null", &x))
        b->a->initial_replicas = (int)x;
}

static void as_max(jkv_t *kv, void *obj)
{
    as_build_t *b = obj;
    long long x;
    b->max_node = kv->val_node;
    b->a->max_replicas_given = 1;
    if (jget_int(kv, 1, INT_MAX, "an integer > 0", &x))
        b->a->max_replicas = (int)x;
}

static void as_target(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((as_build_t *)obj)->a->target_ongoing_requests);
}

static void as_metrics_interval(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((as_build_t *)obj)->a->metrics_interval_s);
}

static void as_look_back(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((as_build_t *)obj)->a->look_back_period_s);
}

static void as_smoothing(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((as_build_t *)obj)->a->smoothing_factor);
}

static void as_up_smoothing(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((as_build_t *)obj)->a->upscale_smoothing_factor);
}

static void as_down_smoothing(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((as_build_t *)obj)->a->downscale_smoothing_factor);
}

static void as_up_factor(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((as_build_t *)obj)->a->upscaling_factor);
}

static void as_down_factor(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, false, &((as_build_t *)obj)->a->downscaling_factor);
}

static void as_down_delay(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, true, &((as_build_t *)obj)->a->downscale_delay_s);
}

static void as_zero_delay(jkv_t *kv, void *obj)
{
    jget_opt_num(kv, true, &((as_build_t *)obj)->a->downscale_to_zero_delay_s);
}

static void as_up_delay(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, true, &((as_build_t *)obj)->a->upscale_delay_s);
}

static void as_aggregation(jkv_t *kv, void *obj)
{
    static const char *const choices[] = {"mean", "max", "min"};
    as_build_t *b = obj;
    const char *s = json_is_string(kv->val) ? json_string_value(kv->val) : NULL;
    for (size_t i = 0; s && i < MS_N_FIELDS(choices); i++) {
        if (!strcasecmp(s, choices[i])) {
            ms_cfg_replace_str(&b->a->aggregation_function, choices[i]);
            return;
        }
    }
    jbad(kv, "one of mean, max, min");
}

static void as_policy(jkv_t *kv, void *obj)
{
    ms_autoscaling_config_t *a = ((as_build_t *)obj)->a;
    if (json_is_null(kv->val))
        return; /* the built-in policy */
    policy_build_t pb = {&a->policy, &a->policy_kwargs, &a->dry_run, false};
    walk_policy(kv, "in autoscaling_config.policy", &pb);
}

static const jfield_t as_fields[] = {
    {"min_replicas", as_min},
    {"initial_replicas", as_initial},
    {"max_replicas", as_max},
    {"target_ongoing_requests", as_target},
    {"metrics_interval_s", as_metrics_interval},
    {"look_back_period_s", as_look_back},
    {"smoothing_factor", as_smoothing},
    {"upscale_smoothing_factor", as_up_smoothing},
    {"downscale_smoothing_factor", as_down_smoothing},
    {"upscaling_factor", as_up_factor},
    {"downscaling_factor", as_down_factor},
    {"downscale_delay_s", as_down_delay},
    {"downscale_to_zero_delay_s", as_zero_delay},
    {"upscale_delay_s", as_up_delay},
    {"aggregation_function", as_aggregation},
    {"policy", as_policy},
};

/* Ray Serve's old names of keys of a table, found by jv_walk among the unknown keys. */
typedef struct jrename {
    const jfield_t *table;
    const char *old, *now;
} jrename_t;
static const jrename_t renames[] = {
    {as_fields, "target_num_ongoing_requests_per_replica", "target_ongoing_requests"},
    {policy_fields, "name", "policy_function"},
};

static uint64_t jv_renamed(jv_t *v, const yaml_node_t *key_node, const char *key, const char *where,
                           const jfield_t *fields, size_t n)
{
    for (size_t i = 0; i < MS_N_FIELDS(renames); i++) {
        if (renames[i].table == fields && !strcmp(renames[i].old, key)) {
            jv_error(v, key_node,
                     "unknown key '%s' %s; did you mean '%s'? (its old name in Ray Serve)", key,
                     where, renames[i].now);
            size_t now = jv_find(fields, n, renames[i].now);
            return now < n ? UINT64_C(1) << now : 0;
        }
    }
    return 0;
}

ms_autoscaling_config_t *ms_config_autoscaling_default(int num_replicas_auto)
{
    ms_autoscaling_config_t *a = ms_calloc(1, sizeof(*a));
    a->min_replicas = MS_DEFAULT_AS_MIN_REPLICAS;
    a->initial_replicas = -1;
    a->max_replicas =
        num_replicas_auto ? MS_DEFAULT_AS_MAX_REPLICAS_AUTO : MS_DEFAULT_AS_MAX_REPLICAS;
    a->target_ongoing_requests = MS_DEFAULT_AS_TARGET_ONGOING_REQUESTS;
    a->metrics_interval_s = MS_DEFAULT_AS_METRICS_INTERVAL_S;
    a->look_back_period_s = MS_DEFAULT_AS_LOOK_BACK_PERIOD_S;
    a->smoothing_factor = MS_DEFAULT_AS_SMOOTHING_FACTOR;
    a->upscale_smoothing_factor = -1;
    a->downscale_smoothing_factor = -1;
    a->upscaling_factor = -1;
    a->downscaling_factor = -1;
    a->downscale_delay_s = MS_DEFAULT_AS_DOWNSCALE_DELAY_S;
    a->downscale_to_zero_delay_s = -1;
    a->upscale_delay_s = MS_DEFAULT_AS_UPSCALE_DELAY_S;
    a->aggregation_function = ms_strdup("mean");
    a->mark = (ms_config_mark_t){1, 1};
    return a;
}

void ms_config_autoscaling_free(ms_autoscaling_config_t *a)
{
    if (!a)
        return;
    free(a->aggregation_function);
    ms_config_lua_ref_free(a->policy);
    json_decref(a->policy_kwargs);
    free(a);
}

/* The walk and the checks across fields, for either source. `ymap` is NULL for JSON. */
static ms_autoscaling_config_t *autoscaling_parse(jv_t *v, json_t *obj, yaml_node_t *ymap,
                                                  int num_replicas_auto, ms_config_mark_t mark)
{
    size_t before = v->c->n_errors;
    ms_autoscaling_config_t *a = ms_config_autoscaling_default(num_replicas_auto);
    a->mark = mark;
    as_build_t b = {a, NULL, NULL, NULL};
    jv_walk(v, obj, ymap, "in autoscaling_config", as_fields, MS_N_FIELDS(as_fields), &b);
    /* Bounds only when every field was valid: a rejected value would compare as its default. */
    if (v->c->n_errors == before) {
        if (a->max_replicas < a->min_replicas)
            jv_error(v,
                     b.max_node   ? b.max_node
                     : b.min_node ? b.min_node
                                  : ymap,
                     "max_replicas (%d) must be >= min_replicas (%d)%s", a->max_replicas,
                     a->min_replicas,
                     a->max_replicas_given ? ""
                     : num_replicas_auto   ? " (max_replicas defaults to 100 under "
                                             "num_replicas: auto)"
                                           : " (max_replicas defaults to 1)");
        else if (a->initial_replicas >= 0 &&
                 (a->initial_replicas < a->min_replicas || a->initial_replicas > a->max_replicas))
            jv_error(v, b.initial_node ? b.initial_node : ymap,
                     "initial_replicas (%d) must lie between min_replicas (%d) and max_replicas "
                     "(%d)",
                     a->initial_replicas, a->min_replicas, a->max_replicas);
    }
    if (v->c->n_errors != before) {
        ms_config_autoscaling_free(a);
        return NULL;
    }
    return a;
}

ms_autoscaling_config_t *ms_cfg_autoscaling_yaml(ms_cfg_ctx_t *c, yaml_node_t *map,
                                                 int num_replicas_auto)
{
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    return autoscaling_parse(&v, NULL, map, num_replicas_auto, ms_cfg_mark(map));
}

/* Folder that a code option's relative Lua references resolve against: that of `file` (the
 * file the option came from), else the current directory. Always absolute. */
static char *ref_dir(const char *file)
{
    const char *slash = file ? strrchr(file, '/') : NULL;
    char *dir =
        slash ? ms_strndup(file, slash == file ? 1 : (size_t)(slash - file)) : ms_strdup(".");
    char *real = realpath(dir, NULL);
    if (real) {
        free(dir);
        return real;
    }
    char cwd[PATH_MAX];
    if (dir[0] == '/' || !getcwd(cwd, sizeof(cwd)))
        return dir;
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/%s", cwd, dir);
    free(dir);
    return b.data;
}

ms_autoscaling_config_t *ms_config_autoscaling_from_json(json_t *obj, int num_replicas_auto,
                                                         const char *file, ms_config_mark_t mark,
                                                         const char *what, ms_config_errors_t *errs)
{
    char *dir = ref_dir(file);
    ms_cfg_ctx_t c = {.file = file ? file : "<code>",
                      .dir = dir,
                      .errs = errs,
                      .json_budget = MS_CFG_JSON_MAX_NODES};
    jv_t v = {&c, what && *what ? what : NULL, mark};
    ms_autoscaling_config_t *a = NULL;
    if (!json_is_object(obj)) {
        char got[64];
        ms_cfg_describe_json(obj, got, sizeof(got));
        jv_error(&v, NULL, "autoscaling_config must be a mapping, got %s", got);
    } else {
        a = autoscaling_parse(&v, obj, NULL, num_replicas_auto, mark);
    }
    free(dir);
    return a;
}

/* ---- request_router_config --------------------------------------------------------------------
 */

/* Ray's default request_router_class and the module that defines it. */
static const char *const builtin_routers[] = {
    "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter",
    NULL,
};

static void rt_class(jkv_t *kv, void *obj)
{
    jget_ref(kv, builtin_routers, &((ms_router_config_t *)obj)->router_class);
}

static void rt_kwargs(jkv_t *kv, void *obj)
{
    jget_mapping(kv, &((ms_router_config_t *)obj)->kwargs);
}

static void rt_period(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((ms_router_config_t *)obj)->stats_period_s);
}

static void rt_timeout(jkv_t *kv, void *obj)
{
    jget_num(kv, 0, false, &((ms_router_config_t *)obj)->stats_timeout_s);
}

/* A newer Ray Serve key with no effect here yet: checked loosely, then warned about. */
static void rt_later(jkv_t *kv, void *obj)
{
    (void)obj;
    if (!json_is_boolean(kv->val) && !json_is_object(kv->val) && !json_is_null(kv->val)) {
        jbad(kv, "true, false, a mapping or null");
        return;
    }
    if (kv->key_node)
        ms_cfg_warn_unsupported(kv->v->c, kv->key_node);
}

static const jfield_t router_fields[] = {
    {"request_router_class", rt_class},
    {"request_router_kwargs", rt_kwargs},
    {"request_routing_stats_period_s", rt_period},
    {"request_routing_stats_timeout_s", rt_timeout},
    {"ingress_router_fallback", rt_later},
};

void ms_cfg_router_free(ms_router_config_t *r)
{
    if (!r)
        return;
    ms_config_lua_ref_free(r->router_class);
    json_decref(r->kwargs);
    free(r);
}

ms_router_config_t *ms_cfg_router_yaml(ms_cfg_ctx_t *c, yaml_node_t *map)
{
    size_t before = c->n_errors;
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    ms_router_config_t *r = ms_calloc(1, sizeof(*r));
    r->stats_period_s = MS_DEFAULT_ROUTING_STATS_PERIOD_S;
    r->stats_timeout_s = MS_DEFAULT_ROUTING_STATS_TIMEOUT_S;
    jv_walk(&v, NULL, map, "in request_router_config", router_fields, MS_N_FIELDS(router_fields),
            r);
    if (c->n_errors != before) {
        ms_cfg_router_free(r);
        return NULL;
    }
    return r;
}

/* ---- applications[].autoscaling_policy --------------------------------------------------------
 */

void ms_cfg_app_policy_yaml(ms_cfg_ctx_t *c, yaml_node_t *map, ms_app_config_t *app)
{
    size_t before = c->n_errors;
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    policy_build_t pb = {&app->autoscaling_policy, &app->autoscaling_policy_kwargs,
                         &app->autoscaling_policy_dry_run, false};
    uint64_t seen = jv_walk(&v, NULL, map, "in autoscaling_policy", policy_fields,
                            MS_N_FIELDS(policy_fields), &pb);
    if (!(seen & 1)) {
        jv_error(&v, map, "autoscaling_policy is missing required key 'policy_function'");
    } else if (pb.builtin) {
        /* Ray has no application-level built-in; its default policy decides per deployment,
         * which is what happens here without an application-level policy. So the application
         * gets none, exactly as if the key were absent. */
        json_decref(app->autoscaling_policy_kwargs);
        app->autoscaling_policy_kwargs = NULL;
        app->autoscaling_policy_dry_run = 0;
    } else if (!app->autoscaling_policy && c->n_errors == before) {
        /* An application-level policy has no built-in to fall back on. */
        jv_error(&v, map,
                 "autoscaling_policy.policy_function must name a Lua function "
                 "('file.lua:attr' or 'module.sub:attr')");
    }
}

/* ---- applications[].external_scaler (ours) ------------------------------------------------- */

static void es_hook(jkv_t *kv, void *obj)
{
    jget_ref(kv, NULL, &((ms_app_config_t *)obj)->scale_hook);
}

static void es_tick(jkv_t *kv, void *obj)
{
    jget_ref(kv, NULL, &((ms_app_config_t *)obj)->scale_tick);
}

static void es_tick_interval(jkv_t *kv, void *obj)
{
    /* Zero would run the tick on every control-loop pass; a period must be positive. */
    jget_num(kv, 0, false, &((ms_app_config_t *)obj)->scale_tick_interval_s);
}

static void es_kwargs(jkv_t *kv, void *obj)
{
    jget_mapping(kv, &((ms_app_config_t *)obj)->scale_hook_kwargs);
}

static const jfield_t scaler_fields[] = {
    {"hook", es_hook},
    {"tick", es_tick},
    {"tick_interval_s", es_tick_interval},
    {"kwargs", es_kwargs},
};

void ms_cfg_external_scaler_yaml(ms_cfg_ctx_t *c, yaml_node_t *map, ms_app_config_t *app)
{
    size_t before = c->n_errors;
    jv_t v = {c, NULL, ms_cfg_mark(map)};
    jv_walk(&v, NULL, map, "in external_scaler", scaler_fields, MS_N_FIELDS(scaler_fields), app);
    /* Without either function the key would configure nothing: most likely a typo. */
    if (!app->scale_hook && !app->scale_tick && c->n_errors == before)
        jv_error(&v, map, "external_scaler needs at least one of 'hook' or 'tick'");
}
