/*
 * config (JSON): the one validator behind every option that arrives both as a YAML mapping from
 * the config file and as a JSON object from code options (autoscaling_config, process, ...):
 *   - from YAML each value node is converted to JSON and checked, and errors point at the key or
 *     value node;
 *   - from JSON errors point at the caller's mark and start with the caller's `what`.
 * So a rule lives in one place whichever way the option arrives.
 */
#include "config/config_internal.h"
#include "broker/broker.h"
#include "core/core.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
void jv_error(jv_t *v, const yaml_node_t *node, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    jv_verror(v, node, fmt, ap);
    va_end(ap);
}

/* `KEY must be DESC, got VALUE` at the value. */
void jbad(jkv_t *kv, const char *desc)
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
bool jget_int(jkv_t *kv, long long lo, long long hi, const char *desc, long long *out)
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
bool jget_num(jkv_t *kv, double lo, bool inclusive, double *out)
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
void jget_opt_num(jkv_t *kv, bool inclusive, double *out)
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

bool jget_bool(jkv_t *kv, int *out)
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
void jget_mapping(jkv_t *kv, json_t **out)
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

void jget_redis_url(jkv_t *kv, char **out)
{
    const char *s = json_is_string(kv->val) ? json_string_value(kv->val) : NULL;
    ms_broker_url_t url;
    char err[300];
    if (!s) {
        jbad(kv, "a redis:// or unix:// URL");
    } else if (ms_broker_parse_url(s, &url, err, sizeof err) != 0) {
        jv_error(kv->v, kv->val_node, "%s: %s", kv->key, err);
    } else {
        free(*out);
        *out = ms_strdup(s);
    }
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
bool jget_ref(jkv_t *kv, const char *const *builtin, ms_config_lua_ref_t **out)
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
    const char *names[32] = {0};
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

size_t jv_find(const jfield_t *fields, size_t n, const char *key)
{
    size_t i = 0;
    while (i < n && strcmp(fields[i].name, key) != 0)
        i++;
    return i;
}

/* Dispatches each key of the mapping (`ymap` for YAML, else `obj`) to its field; returns a bit
 * per field present (a misspelt key counts as its suggestion, so it is not also "missing"). */
uint64_t jv_walk(jv_t *v, json_t *obj, yaml_node_t *ymap, const char *where, const jfield_t *fields,
                 size_t n, void *dst)
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
yaml_node_t *jv_submap(jkv_t *kv)
{
    return kv->val_node && kv->val_node->type == YAML_MAPPING_NODE ? kv->val_node : NULL;
}

/* Folder that a code option's relative Lua references resolve against: that of `file` (the
 * file the option came from), else the current directory. Always absolute. */
char *jv_ref_dir(const char *file)
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
