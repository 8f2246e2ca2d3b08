/*
 * config (private): the helpers shared by the config loader's source files — error reporting
 * with node positions, scalar parsing that follows YAML 1.1 / PyYAML (which Ray Serve uses),
 * YAML-to-JSON conversion, the did-you-mean search and import_path resolution.
 * Nothing outside engine/config/ includes this header.
 */
#ifndef MS_CONFIG_INTERNAL_H
#define MS_CONFIG_INTERNAL_H

#include "config/config.h"

#include <stdbool.h>
#include <stdint.h>
#include <yaml.h>

/* Past this many errors a load stops recording them: a config PUT over HTTP could otherwise
 * make us build an unbounded error list from a large garbage body. */
#define MS_CFG_MAX_ERRORS 100
/* YAML aliases can nest (and even recurse), so JSON conversion has a depth and a node budget. */
#define MS_CFG_JSON_MAX_DEPTH 64
#define MS_CFG_JSON_MAX_NODES 100000
/* Collections (mappings and lists) nested in one document. A real config needs about 6 levels
 * plus what user_config holds (itself bounded at MS_CFG_JSON_MAX_DEPTH); deeper input is refused
 * before it is loaded, since loading it costs time that grows faster than its size. */
#define MS_CFG_MAX_NESTING 100

typedef struct ms_cfg_ctx {
    yaml_document_t *doc;
    const char *file; /* name used in messages, as given by the caller */
    const char *dir;  /* absolute folder that relative import paths resolve against */
    ms_config_errors_t *errs;
    size_t n_errors;    /* errors from this load only; errs may already hold earlier ones */
    size_t json_budget; /* nodes left for YAML-to-JSON conversion */
} ms_cfg_ctx_t;

/* ---- positions and messages (config_util.c) ---- */
ms_config_mark_t ms_cfg_mark(const yaml_node_t *node);
yaml_node_t *ms_cfg_node(ms_cfg_ctx_t *c, int index);
void ms_cfg_errors_vadd(ms_config_errors_t *errs, const char *file, ms_config_mark_t mark,
                        const char *fmt, va_list ap);
void ms_cfg_error_at(ms_cfg_ctx_t *c, ms_config_mark_t mark, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void ms_cfg_error(ms_cfg_ctx_t *c, const yaml_node_t *node, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void ms_cfg_warn_unsupported(ms_cfg_ctx_t *c, const yaml_node_t *key);
/* Writes a short description of a value for "got ..." in messages: "abc" quoted, null, a list. */
void ms_cfg_describe(const yaml_node_t *node, char *out, size_t size);
/* The same for a JSON value (from code options): scalars quoted as their text. */
void ms_cfg_describe_json(const json_t *j, char *out, size_t size);

/* ---- scalars (config_util.c) ---- */
const char *ms_cfg_scalar(const yaml_node_t *node); /* NULL unless a scalar */
bool ms_cfg_is_null(const yaml_node_t *node);       /* plain ~, null, Null, NULL or empty */
bool ms_cfg_is_plain(const yaml_node_t *node);
bool ms_cfg_parse_int(const char *s, long long *out);
/* An integer as pydantic's lax int reads text: ms_cfg_parse_int, or that followed by a '.' and
 * only zeros ("5.0", "5."), which is still the integer 5. */
bool ms_cfg_parse_lax_int(const char *s, long long *out);
bool ms_cfg_parse_double(const char *s, double *out);
bool ms_cfg_parse_bool(const char *s, bool *out);

/* Converts a YAML node to JSON; reports problems and returns NULL on failure. */
json_t *ms_cfg_to_json(ms_cfg_ctx_t *c, yaml_node_t *node);

/* The known key closest to `key` (edit distance <= 2, or a long shared prefix), or NULL. */
const char *ms_cfg_suggest(const char *key, const char *const *names, size_t n);

/* ---- schema walk (config_fields.c) ---- */
/* One key of a mapping level: implemented, known to Ray Serve but not implemented yet (loosely
 * type-checked, then warned about), or a legacy key that is an error (its `fn` reports it;
 * did-you-mean never suggests it). */
typedef void (*ms_cfg_field_fn)(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);
typedef enum { MS_FIELD_OK, MS_FIELD_LATER, MS_FIELD_LEGACY } ms_cfg_field_kind_t;
typedef struct ms_cfg_field {
    const char *name;
    ms_cfg_field_fn fn;
    ms_cfg_field_kind_t kind;
} ms_cfg_field_t;
#define MS_N_FIELDS(t) (sizeof(t) / sizeof((t)[0]))

/* Dispatches each key of `map`; returns a bit per field index present (or suggested for a
 * misspelt key). `where` completes "unknown key 'x' ...": "in deployment", "at the top level". */
uint64_t ms_cfg_walk_fields(ms_cfg_ctx_t *c, yaml_node_t *map, const char *where,
                            const ms_cfg_field_t *fields, size_t n, void *obj);
bool ms_cfg_was_seen(uint64_t seen, const ms_cfg_field_t *fields, size_t n, const char *name);

/* Value checks: on a bad value each reports `KEY must be DESC, got VALUE` at the value. */
const char *ms_cfg_key_name(yaml_node_t *key);
const char *ms_cfg_value_text(yaml_node_t *val); /* non-null scalar text, or NULL */
void ms_cfg_bad_value(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, const char *desc);
/* Ray's lax integers (pydantic `int`, PositiveInt, ...): quoted ones too, and "5.0". */
bool ms_cfg_get_int(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, long long lo, long long hi,
                    const char *desc, long long *out);
/* Ray's StrictInt: an unquoted integer only. */
bool ms_cfg_get_strict_int(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, long long lo,
                           long long hi, const char *desc, long long *out);
/* Ray Serve's old name of a key: an error at the key with a did-you-mean to today's name. */
void ms_cfg_renamed(ms_cfg_ctx_t *c, const yaml_node_t *key, const char *where, const char *now);
/* `KEY must be DESC, got the string "5"; ...`: for a quoted number where Ray wants a number. */
void ms_cfg_quoted_number(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, const char *desc);
/* A finite number > lo, or >= lo when `inclusive`. */
bool ms_cfg_get_num(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, double lo, bool inclusive,
                    const char *desc, double *out);
bool ms_cfg_get_bool(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, bool *out);
const char *ms_cfg_get_str(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val); /* non-empty */
const char *ms_cfg_get_choice(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val,
                              const char *const *choices, bool nocase, const char *desc);
bool ms_cfg_want_mapping(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val, bool null_ok);
void ms_cfg_replace_str(char **dst, const char *s);

/* logging_config at any level, into *out (the fields given are marked in out->set). */
void ms_cfg_walk_logging(ms_cfg_ctx_t *c, yaml_node_t *key, yaml_node_t *val,
                         ms_logging_config_t *out);

/* Loose checks for keys that later work will implement (field functions; obj unused). */
void ms_cfg_later_mapping(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);
void ms_cfg_later_string(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);
void ms_cfg_later_proxy_location(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);
void ms_cfg_later_target_capacity(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);
void ms_cfg_later_mappings(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);
void ms_cfg_later_percentage(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);
void ms_cfg_later_pg_strategy(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);
void ms_cfg_later_per_node(ms_cfg_ctx_t *c, void *obj, yaml_node_t *key, yaml_node_t *val);

/* ---- import_path (config_import.c) ---- */
/* Splits app->import_path and fills import_file (absolute, must exist) and import_attr.
 * Reports problems at `val` and returns -1 on failure. */
int ms_cfg_resolve_import(ms_cfg_ctx_t *c, ms_app_config_t *app, const yaml_node_t *val);
/* The same resolution for any Lua reference (policy_function, request_router_class): on success
 * returns NULL and sets *file (absolute) and *attr; else returns a message starting with `key`
 * (caller frees). */
char *ms_cfg_resolve_lua(const char *dir, const char *key, const char *s, char **file, char **attr);

/* ---- one validator for YAML and JSON options (config_json.c) ---- */
/* An option that may come from the file (a YAML mapping) or from code (a JSON object) is walked
 * by one table of jfield_t, so each rule lives in one place. */
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

/* An error at `node` (YAML) or at the caller's mark (JSON, node NULL). */
void jv_error(jv_t *v, const yaml_node_t *node, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* `KEY must be DESC, got VALUE` at the value. */
void jbad(jkv_t *kv, const char *desc);
/* Ray's lax integers: quoted ones too ("5", "5.0"), and integral reals. */
bool jget_int(jkv_t *kv, long long lo, long long hi, const char *desc, long long *out);
/* A finite number > lo, or >= lo when `inclusive`. */
bool jget_num(jkv_t *kv, double lo, bool inclusive, double *out);
/* The same, where null means "unset" and is stored as -1. */
void jget_opt_num(jkv_t *kv, bool inclusive, double *out);
bool jget_bool(jkv_t *kv, int *out);
/* A mapping, copied; null gives NULL. */
void jget_mapping(jkv_t *kv, json_t **out);
/* A Redis URL (redis://... or unix://..., broker.h) into *out (replacing it); a bad one is an
 * error at the value naming the key. */
void jget_redis_url(jkv_t *kv, char **out);
/* A Lua reference resolved against the folder; true when it names one of Ray's built-ins (listed
 * in `builtin`, NULL-terminated), which leaves *out unchanged. */
bool jget_ref(jkv_t *kv, const char *const *builtin, ms_config_lua_ref_t **out);
/* The index of `key` in fields, or n. */
size_t jv_find(const jfield_t *fields, size_t n, const char *key);
/* Dispatches each key of the mapping (`ymap` for YAML, else `obj`) to its field; returns a bit
 * per field present (a misspelt key counts as its suggestion). */
uint64_t jv_walk(jv_t *v, json_t *obj, yaml_node_t *ymap, const char *where, const jfield_t *fields,
                 size_t n, void *dst);
/* Ray Serve's old name of a field (config_scaling.c): reported, and today's field's bit returned
 * (0: not one). */
uint64_t jv_renamed(jv_t *v, const yaml_node_t *key_node, const char *key, const char *where,
                    const jfield_t *fields, size_t n);
/* The key's value as a YAML mapping node when it came from the file, else NULL. */
yaml_node_t *jv_submap(jkv_t *kv);
/* Folder that a code option's relative references resolve against: that of `file`, else the
 * current directory. Always absolute; the caller frees it. */
char *jv_ref_dir(const char *file);

/* ---- autoscaling, routers and policies (config_scaling.c) ---- */
/* One implementation validates both sources: a YAML mapping (errors at its nodes) and a JSON
 * object from code options (errors at one mark, prefixed). Each returns NULL after reporting
 * errors. `map` must be a mapping node. */
ms_autoscaling_config_t *ms_cfg_autoscaling_yaml(ms_cfg_ctx_t *c, yaml_node_t *map,
                                                 int num_replicas_auto);
ms_router_config_t *ms_cfg_router_yaml(ms_cfg_ctx_t *c, yaml_node_t *map);
/* A deployment's task_queue block (config_tasks.c). */
ms_task_queue_config_t *ms_cfg_task_queue_yaml(ms_cfg_ctx_t *c, yaml_node_t *map);
void ms_cfg_task_queue_free(ms_task_queue_config_t *t);
/* The process block of a deployment (config_process.c). */
ms_process_config_t *ms_cfg_process_yaml(ms_cfg_ctx_t *c, yaml_node_t *map);
/* applications[].autoscaling_policy into app->autoscaling_policy{,_kwargs,_dry_run}. */
void ms_cfg_app_policy_yaml(ms_cfg_ctx_t *c, yaml_node_t *map, ms_app_config_t *app);
/* applications[].external_scaler (ours) into app->scale_hook, scale_tick,
 * scale_tick_interval_s and scale_hook_kwargs. `map` must be a mapping node. */
void ms_cfg_external_scaler_yaml(ms_cfg_ctx_t *c, yaml_node_t *map, ms_app_config_t *app);
void ms_cfg_router_free(ms_router_config_t *r);

#endif
