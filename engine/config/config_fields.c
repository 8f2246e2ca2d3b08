/*
 * config (fields): the pieces every level of the schema walk shares — value checks that report
 * `KEY must be DESC, got VALUE`, the walk of a mapping against a field table (unknown keys,
 * duplicates, did-you-mean, "not supported yet" warnings), loose checks for the Ray Serve keys
 * that later work will implement, and logging_config, which appears at three levels.
 */
#include "config/config_internal.h"
#include "core/core.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- value checks: each reports `KEY must be DESC, got VALUE` at the value ------------------ */

const char *ms_cfg_key_name(yaml_node_t *key)
{
    return ms_cfg_scalar(key);
}

void ms_cfg_bad_value(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, const char *desc)
{
    char got[64];
    ms_cfg_describe(val, got, sizeof(got));
    ms_cfg_error(c, val, "%s must be %s, got %s", ms_cfg_key_name(key), desc, got);
}

/* Scalars that are not null. Whether a quoted number counts as a number is up to each check,
 * after the pydantic type of the field in Ray Serve's schema. */
const char *ms_cfg_value_text(yaml_node_t *val)
{
    return ms_cfg_is_null(val) ? NULL : ms_cfg_scalar(val);
}

bool ms_cfg_get_int(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, long long lo, long long hi,
                    const char *desc, long long *out)
{
    const char *s = ms_cfg_value_text(val);
    long long v;
    if (s && ms_cfg_parse_lax_int(s, &v) && v >= lo && v <= hi) {
        *out = v;
        return true;
    }
    ms_cfg_bad_value(c, key, val, desc);
    return false;
}

void ms_cfg_renamed(ms_cfg_ctx_t *c, const yaml_node_t *key, const char *where, const char *now)
{
    ms_cfg_error(c, key, "unknown key '%s' %s; did you mean '%s'? (its old name in Ray Serve)",
                 ms_cfg_scalar(key), where, now);
}

void ms_cfg_quoted_number(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, const char *desc)
{
    char got[64];
    ms_cfg_describe(val, got, sizeof(got));
    ms_cfg_error(c, val,
                 "%s must be %s, got the string %s; write the number without quotes (Ray Serve "
                 "rejects a quoted one here too)",
                 ms_cfg_key_name(key), desc, got);
}

bool ms_cfg_get_strict_int(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, long long lo,
                           long long hi, const char *desc, long long *out)
{
    const char *s = ms_cfg_value_text(val);
    long long v;
    if (s && ms_cfg_parse_int(s, &v) && v >= lo && v <= hi) {
        if (ms_cfg_is_plain(val)) {
            *out = v;
            return true;
        }
        ms_cfg_quoted_number(c, key, val, desc);
        return false;
    }
    ms_cfg_bad_value(c, key, val, desc);
    return false;
}

/* A finite number > lo (or >= lo when `inclusive`). */
bool ms_cfg_get_num(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, double lo, bool inclusive,
                    const char *desc, double *out)
{
    const char *s = ms_cfg_value_text(val);
    double v;
    if (s && ms_cfg_parse_double(s, &v) && (inclusive ? v >= lo : v > lo)) {
        *out = v;
        return true;
    }
    ms_cfg_bad_value(c, key, val, desc);
    return false;
}

bool ms_cfg_get_bool(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, bool *out)
{
    const char *s = ms_cfg_value_text(val);
    if (s && ms_cfg_parse_bool(s, out))
        return true;
    ms_cfg_bad_value(c, key, val, "true or false");
    return false;
}

const char *ms_cfg_get_str(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val)
{
    const char *s = ms_cfg_value_text(val);
    if (s && *s)
        return s;
    ms_cfg_bad_value(c, key, val, "a non-empty string");
    return NULL;
}

/* One of `choices` (NULL-terminated), compared case-insensitively when `nocase`. */
const char *ms_cfg_get_choice(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val,
                              const char *const *choices, bool nocase, const char *desc)
{
    const char *s = ms_cfg_value_text(val);
    for (size_t i = 0; s && choices[i]; i++)
        if (nocase ? !strcasecmp(s, choices[i]) : !strcmp(s, choices[i]))
            return choices[i];
    ms_cfg_bad_value(c, key, val, desc);
    return NULL;
}

bool ms_cfg_want_mapping(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, bool null_ok)
{
    if (val->type == YAML_MAPPING_NODE || (null_ok && ms_cfg_is_null(val)))
        return true;
    ms_cfg_bad_value(c, key, val, null_ok ? "a mapping or null" : "a mapping");
    return false;
}

void ms_cfg_replace_str(char **dst, const char *s)
{
    free(*dst);
    *dst = ms_strdup(s);
}

/* ---- walking a mapping against a field table ------------------------------------------- */

/* Reports an unknown key; returns the index of the suggested field, or n when none. */
static size_t unknown_key(ms_cfg_ctx_t *c, yaml_node_t *key, const char *where,
                          const ms_cfg_field_t *fields, size_t n)
{
    const char *names[64];
    size_t k = 0;
    for (size_t i = 0; i < n && k < MS_N_FIELDS(names); i++)
        if (fields[i].kind != MS_FIELD_LEGACY)
            names[k++] = fields[i].name;
    const char *hint = ms_cfg_suggest(ms_cfg_key_name(key), names, k);
    if (!hint) {
        ms_cfg_error(c, key, "unknown key '%s' %s", ms_cfg_key_name(key), where);
        return n;
    }
    ms_cfg_error(c, key, "unknown key '%s' %s; did you mean '%s'?", ms_cfg_key_name(key), where,
                 hint);
    size_t i = 0;
    while (i < n && fields[i].name != hint)
        i++;
    return i;
}

/* Dispatches each key of `map` to its field; returns a bit per field index that was present.
 * A misspelt key counts as its suggestion, so "aplications" is one error, not two. */
uint64_t ms_cfg_walk_fields(ms_cfg_ctx_t *c, yaml_node_t *map, const char *where,
                            const ms_cfg_field_t *fields, size_t n, void *obj)
{
    uint64_t seen = 0, suggested = 0;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *key = ms_cfg_node(c, p->key), *val = ms_cfg_node(c, p->value);
        if (!ms_cfg_key_name(key)) {
            ms_cfg_error(c, key, "keys %s must be strings", where);
            continue;
        }
        size_t i = 0;
        while (i < n && strcmp(fields[i].name, ms_cfg_key_name(key)) != 0)
            i++;
        if (i == n) {
            size_t hint = unknown_key(c, key, where, fields, n);
            if (hint < n)
                suggested |= UINT64_C(1) << hint;
            continue;
        }
        if (seen & (UINT64_C(1) << i)) {
            ms_cfg_error(c, key, "duplicate key '%s' %s", ms_cfg_key_name(key), where);
            continue;
        }
        seen |= UINT64_C(1) << i;
        if (fields[i].kind == MS_FIELD_LATER)
            ms_cfg_warn_unsupported(c, key);
        fields[i].fn(c, obj, key, val);
    }
    return seen | suggested;
}

bool ms_cfg_was_seen(uint64_t seen, const ms_cfg_field_t *fields, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(fields[i].name, name))
            return seen & (UINT64_C(1) << i);
    return false;
}

/* ---- loose checks for keys that later work will implement -------------------------------- */

void ms_cfg_later_mapping(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    (void)obj;
    ms_cfg_want_mapping(c, key, val, true);
}

void ms_cfg_later_string(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    (void)obj;
    if (!ms_cfg_is_null(val) && !ms_cfg_scalar(val))
        ms_cfg_error(c, val, "%s must be a string", ms_cfg_key_name(key));
}

void ms_cfg_later_proxy_location(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    static const char *const choices[] = {"Disabled", "HeadOnly", "EveryNode", NULL};
    (void)obj;
    ms_cfg_get_choice(c, key, val, choices, false, "one of Disabled, HeadOnly, EveryNode");
}

void ms_cfg_later_target_capacity(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    double v;
    (void)obj;
    if (ms_cfg_is_null(val))
        return;
    if (ms_cfg_get_num(c, key, val, 0, true, "a number in 0..100 or null", &v) && v > 100)
        ms_cfg_bad_value(c, key, val, "a number in 0..100 or null");
}

void ms_cfg_later_mappings(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    (void)obj;
    if (ms_cfg_is_null(val))
        return;
    if (val->type != YAML_SEQUENCE_NODE) {
        ms_cfg_bad_value(c, key, val, "a list of mappings");
        return;
    }
    for (yaml_node_item_t *it = val->data.sequence.items.start; it < val->data.sequence.items.top;
         it++)
        ms_cfg_want_mapping(c, key, ms_cfg_node(c, *it), false);
}

void ms_cfg_later_percentage(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    double v;
    (void)obj;
    if (ms_cfg_is_null(val))
        return;
    if (ms_cfg_get_num(c, key, val, 0, false, "a number in (0, 100] or null", &v) && v > 100)
        ms_cfg_bad_value(c, key, val, "a number in (0, 100] or null");
}

void ms_cfg_later_pg_strategy(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    static const char *const choices[] = {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD", NULL};
    (void)obj;
    ms_cfg_get_choice(c, key, val, choices, false,
                      "one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD");
}

void ms_cfg_later_per_node(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    long long v;
    (void)obj;
    if (!ms_cfg_is_null(val))
        ms_cfg_get_int(c, key, val, 1, 100, "an integer in 1..100 or null", &v);
}

/* ---- logging_config ------------------------------------------------------------------------ */

/* Ray Serve validates log_level against Python's logging tables: a name from
 * logging._nameToLevel (case matters) or, unquoted, a number from logging._levelToName. Each maps
 * to the nearest of our four levels; there is nothing above ERROR, and NOTSET logs everything. */
static const struct {
    const char *name;
    int number;
    const char *ours;
} ray_levels[] = {
    {"CRITICAL", 50, "ERROR"},  {"FATAL", 50, "ERROR"},  {"ERROR", 40, "ERROR"},
    {"WARNING", 30, "WARNING"}, {"WARN", 30, "WARNING"}, {"INFO", 20, "INFO"},
    {"DEBUG", 10, "DEBUG"},     {"NOTSET", 0, "DEBUG"},
};

static const char *ray_level(yaml_node_t *val)
{
    const char *s = ms_cfg_value_text(val);
    long long n;
    bool numeric = s && ms_cfg_is_plain(val) && ms_cfg_parse_lax_int(s, &n);
    for (size_t i = 0; s && i < MS_N_FIELDS(ray_levels); i++)
        if (numeric ? n == ray_levels[i].number : !strcmp(s, ray_levels[i].name))
            return ray_levels[i].ours;
    return NULL;
}

static void log_level(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    static const char desc[] = "one of CRITICAL, FATAL, ERROR, WARNING, WARN, INFO, DEBUG, NOTSET "
                               "or 50, 40, 30, 20, 10, 0";
    ms_logging_config_t *lc = obj;
    const char *ours = ray_level(val);
    if (ours) {
        ms_copy_str(lc->level, sizeof lc->level, ours);
        lc->set |= MS_LOG_SET_LEVEL;
        return;
    }
    const char *s = ms_cfg_value_text(val);
    for (size_t i = 0; s && i < MS_N_FIELDS(ray_levels); i++) {
        if (!strcasecmp(s, ray_levels[i].name)) {
            char got[64];
            ms_cfg_describe(val, got, sizeof(got));
            ms_cfg_error(c, val, "%s must be %s, got %s; did you mean '%s'? (names are upper case)",
                         ms_cfg_key_name(key), desc, got, ray_levels[i].name);
            return;
        }
    }
    ms_cfg_bad_value(c, key, val, desc);
}

static void log_encoding(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    static const char *const encodings[] = {"TEXT", "JSON", NULL};
    ms_logging_config_t *lc = obj;
    const char *s = ms_cfg_get_choice(c, key, val, encodings, false, "TEXT or JSON");
    if (!s)
        return;
    lc->json = strcmp(s, "JSON") == 0;
    lc->set |= MS_LOG_SET_ENCODING;
}

/* Why `dir` (absolute) cannot be a log folder, or NULL when it is one or can be made one: it is
 * a writable folder, or the nearest part of it that exists is. Checked at load so that `check`,
 * a start and a reload all refuse a bad logs_dir with its position; the folder itself is made
 * when the files open (ms_log_set_file). */
static const char *logs_dir_problem(const char *dir, char *why, size_t cap)
{
    char path[MS_LOGS_DIR_MAX];
    size_t len = strnlen(dir, sizeof path - 1);
    memcpy(path, dir, len);
    path[len] = '\0';
    int own = 1; /* `path` is still the folder asked for, not one above it */
    for (;;) {
        struct stat st;
        if (stat(path, &st) == 0) {
            if (!S_ISDIR(st.st_mode))
                snprintf(why, cap, "'%s' is not a folder", path);
            else if (access(path, W_OK | X_OK) != 0)
                snprintf(why, cap, "'%s' is not writable%s", path, own ? "" : " (to create it in)");
            else
                return NULL;
            return why;
        }
        if (errno != ENOENT && errno != ENOTDIR) { /* ENOTDIR: a file above; found next */
            snprintf(why, cap, "'%s': %s", path, strerror(errno));
            return why;
        }
        char *slash = strrchr(path, '/');
        if (!slash || slash == path)
            return NULL; /* up to the root: nothing there to stop mkdir */
        *slash = '\0';
        own = 0;
    }
}

/* A folder for log files, relative to the config's folder; null = stderr only (which overrides
 * a level above). */
static void log_dir(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_logging_config_t *lc = obj;
    if (ms_cfg_is_null(val)) {
        memset(lc->logs_dir, 0, sizeof lc->logs_dir);
        lc->set |= MS_LOG_SET_DIR;
        return;
    }
    const char *s = ms_cfg_get_str(c, key, val);
    if (!s)
        return;
    char abs[MS_LOGS_DIR_MAX + 1];
    int n = s[0] == '/' ? snprintf(abs, sizeof abs, "%s", s)
                        : snprintf(abs, sizeof abs, "%s/%s", c->dir ? c->dir : ".", s);
    /* Room for the longest file name (replica_APP_DEPLOYMENT_ID.log.N) in a path. */
    if (n < 0 || (size_t)n >= MS_LOGS_DIR_MAX - 300) {
        ms_cfg_error(c, val, "logs_dir is too long (at most %d bytes once made absolute)",
                     MS_LOGS_DIR_MAX - 301);
        return;
    }
    while (n > 1 && abs[n - 1] == '/')
        abs[--n] = '\0';
    char why[MS_LOGS_DIR_MAX + 64];
    if (logs_dir_problem(abs, why, sizeof why)) {
        ms_cfg_error(c, val, "logs_dir '%s' cannot hold log files: %s", abs, why);
        return;
    }
    memset(lc->logs_dir, 0, sizeof lc->logs_dir);
    memcpy(lc->logs_dir, abs, (size_t)n);
    lc->set |= MS_LOG_SET_DIR;
}

/* Ray Serve takes these from RAY_ROTATION_MAX_BYTES and RAY_ROTATION_BACKUP_COUNT; moonserve
 * has them in logging_config, at every level (docs/logging.md). */
static void log_max_bytes(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_logging_config_t *lc = obj;
    long long v;
    if (!ms_cfg_get_int(c, key, val, 0, LLONG_MAX, "an integer >= 0 (bytes; 0 = never rotate)", &v))
        return;
    lc->rotation_max_bytes = v;
    lc->set |= MS_LOG_SET_MAX_BYTES;
}

static void log_backups(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_logging_config_t *lc = obj;
    long long v;
    if (!ms_cfg_get_int(c, key, val, 0, 1000, "an integer from 0 to 1000", &v))
        return;
    lc->rotation_backup_count = (int)v;
    lc->set |= MS_LOG_SET_BACKUPS;
}

static void log_access(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    ms_logging_config_t *lc = obj;
    bool b;
    if (!ms_cfg_get_bool(c, key, val, &b))
        return;
    lc->access_log = b;
    lc->set |= MS_LOG_SET_ACCESS;
}

static void log_attrs(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val)
{
    (void)obj;
    if (val->type != YAML_SEQUENCE_NODE) {
        ms_cfg_bad_value(c, key, val, "a list of strings");
        return;
    }
    bool ok = true;
    for (yaml_node_item_t *it = val->data.sequence.items.start; it < val->data.sequence.items.top;
         it++)
        ok = ms_cfg_get_str(c, key, ms_cfg_node(c, *it)) && ok;
    if (ok && val->data.sequence.items.top > val->data.sequence.items.start)
        ms_cfg_warn_unsupported(c, key);
}

static const ms_cfg_field_t logging_fields[] = {
    {"log_level", log_level, MS_FIELD_OK},
    {"encoding", log_encoding, MS_FIELD_OK},
    {"logs_dir", log_dir, MS_FIELD_OK},
    {"rotation_max_bytes", log_max_bytes, MS_FIELD_OK},
    {"rotation_backup_count", log_backups, MS_FIELD_OK},
    {"enable_access_log", log_access, MS_FIELD_OK},
    {"additional_log_standard_attrs", log_attrs, MS_FIELD_OK},
};

void ms_cfg_walk_logging(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val,
                         ms_logging_config_t *out)
{
    if (ms_cfg_is_null(val) || !ms_cfg_want_mapping(c, key, val, true))
        return;
    ms_cfg_walk_fields(c, val, "in logging_config", logging_fields, MS_N_FIELDS(logging_fields),
                       out);
}

ms_logging_config_t ms_config_logging_merge(ms_logging_config_t base, ms_logging_config_t over)
{
    if (over.set & MS_LOG_SET_LEVEL)
        memcpy(base.level, over.level, sizeof base.level);
    if (over.set & MS_LOG_SET_ENCODING)
        base.json = over.json;
    if (over.set & MS_LOG_SET_ACCESS)
        base.access_log = over.access_log;
    if (over.set & MS_LOG_SET_DIR)
        memcpy(base.logs_dir, over.logs_dir, sizeof base.logs_dir);
    if (over.set & MS_LOG_SET_MAX_BYTES)
        base.rotation_max_bytes = over.rotation_max_bytes;
    if (over.set & MS_LOG_SET_BACKUPS)
        base.rotation_backup_count = over.rotation_backup_count;
    base.set |= over.set;
    return base;
}
