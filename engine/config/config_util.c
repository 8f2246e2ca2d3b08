/*
 * config (util): the error list, node positions, YAML 1.1 scalar parsing, YAML-to-JSON
 * conversion and the did-you-mean search used by the config loader. See config_internal.h.
 */
#include "config/config_internal.h"
#include "core/core.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- error list ------------------------------------------------------------------------- */

void ms_cfg_errors_vadd(ms_config_errors_t *errs, const char *file, ms_config_mark_t mark,
                        const char *fmt, va_list ap)
{
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s:%d:%d: ", file, mark.line, mark.col);
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n > 0) {
        ms_buf_reserve(&b, (size_t)n);
        vsnprintf(b.data + b.len, (size_t)n + 1, fmt, ap);
        b.len += (size_t)n;
    }
    errs->items = ms_realloc(errs->items, (errs->n + 1) * sizeof(*errs->items));
    errs->items[errs->n++] = b.data;
}

void ms_config_errors_add(ms_config_errors_t *errs, const char *file, ms_config_mark_t mark,
                          const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ms_cfg_errors_vadd(errs, file, mark, fmt, ap);
    va_end(ap);
}

void ms_config_errors_free(ms_config_errors_t *errs)
{
    if (!errs)
        return;
    for (size_t i = 0; i < errs->n; i++)
        free(errs->items[i]);
    free(errs->items);
    errs->items = NULL;
    errs->n = 0;
}

/* ---- positions and messages ------------------------------------------------------------- */

ms_config_mark_t ms_cfg_mark(const yaml_node_t *node)
{
    ms_config_mark_t m = {1, 1};
    if (node) {
        /* libyaml marks are 0-based; editors and compilers count from 1. */
        m.line = (int)node->start_mark.line + 1;
        m.col = (int)node->start_mark.column + 1;
    }
    return m;
}

yaml_node_t *ms_cfg_node(ms_cfg_ctx_t *c, int index)
{
    return yaml_document_get_node(c->doc, index);
}

static void error_vat(ms_cfg_ctx_t *c, ms_config_mark_t mark, const char *fmt, va_list ap)
{
    c->n_errors++;
    if (c->n_errors > MS_CFG_MAX_ERRORS + 1)
        return;
    if (c->n_errors == MS_CFG_MAX_ERRORS + 1) {
        ms_config_errors_add(c->errs, c->file, mark, "too many errors; stopping here");
        return;
    }
    ms_cfg_errors_vadd(c->errs, c->file, mark, fmt, ap);
}

void ms_cfg_error_at(ms_cfg_ctx_t *c, ms_config_mark_t mark, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vat(c, mark, fmt, ap);
    va_end(ap);
}

void ms_cfg_error(ms_cfg_ctx_t *c, const yaml_node_t *node, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vat(c, ms_cfg_mark(node), fmt, ap);
    va_end(ap);
}

void ms_cfg_warn_unsupported(ms_cfg_ctx_t *c, const yaml_node_t *key)
{
    ms_config_mark_t m = ms_cfg_mark(key);
    ms_warn("%s:%d:%d: warning: '%s' is not supported yet and has no effect", c->file, m.line,
            m.col, ms_cfg_scalar(key));
}

static void describe_text(const char *s, char *out, size_t size);

void ms_cfg_describe(const yaml_node_t *node, char *out, size_t size)
{
    if (!node || ms_cfg_is_null(node)) {
        snprintf(out, size, "null");
        return;
    }
    if (node->type == YAML_MAPPING_NODE) {
        snprintf(out, size, "a mapping");
        return;
    }
    if (node->type == YAML_SEQUENCE_NODE) {
        snprintf(out, size, "a list");
        return;
    }
    describe_text(ms_cfg_scalar(node), out, size);
}

void ms_cfg_describe_json(const json_t *j, char *out, size_t size)
{
    char num[64];
    if (!j || json_is_null(j))
        snprintf(out, size, "null");
    else if (json_is_object(j))
        snprintf(out, size, "a mapping");
    else if (json_is_array(j))
        snprintf(out, size, "a list");
    else if (json_is_string(j))
        describe_text(json_string_value(j), out, size);
    else {
        if (json_is_integer(j))
            snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(j));
        else if (json_is_real(j))
            snprintf(num, sizeof(num), "%.15g", json_real_value(j));
        else
            ms_copy_str(num, sizeof(num), json_is_true(j) ? "true" : "false");
        describe_text(num, out, size);
    }
}

/* Quotes the text and keeps it short and printable: it is echoed into a one-line message.
 * `room` leaves space for two quotes, "..." and the NUL. */
static void describe_text(const char *s, char *out, size_t size)
{
    size_t len = strlen(s), room = size > 16 ? size - 6 : 10, j = 0;
    out[j++] = '"';
    for (size_t i = 0; i < len && i < room; i++)
        out[j++] = isprint((unsigned char)s[i]) ? s[i] : '?';
    if (len > room) {
        memcpy(out + j, "...", 3);
        j += 3;
    }
    out[j++] = '"';
    out[j] = '\0';
}

/* ---- scalars ---------------------------------------------------------------------------- */

const char *ms_cfg_scalar(const yaml_node_t *node)
{
    if (!node || node->type != YAML_SCALAR_NODE)
        return NULL;
    return (const char *)node->data.scalar.value;
}

bool ms_cfg_is_plain(const yaml_node_t *node)
{
    return node && node->type == YAML_SCALAR_NODE &&
           node->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}

bool ms_cfg_is_null(const yaml_node_t *node)
{
    if (!ms_cfg_is_plain(node))
        return false;
    const char *s = ms_cfg_scalar(node);
    return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

bool ms_cfg_parse_int(const char *s, long long *out)
{
    /* Decimal only, optional sign: PyYAML would also read 0x/0o/underscores, but no config
     * value here needs them and "010" silently meaning 8 helps nobody. */
    const char *p = s;
    if (*p == '+' || *p == '-')
        p++;
    if (!isdigit((unsigned char)*p))
        return false;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q))
            return false;
    errno = 0;
    long long v = strtoll(s, NULL, 10);
    if (errno == ERANGE)
        return false;
    *out = v;
    return true;
}

bool ms_cfg_parse_lax_int(const char *s, long long *out)
{
    /* pydantic-core strips a fraction of zeros before parsing text as an int, and a YAML 5.0
     * arrives there as the float 5.0, which its lax int accepts as well. */
    const char *dot = strchr(s, '.');
    if (!dot)
        return ms_cfg_parse_int(s, out);
    for (const char *q = dot + 1; *q; q++)
        if (*q != '0')
            return false;
    char *head = ms_strndup(s, (size_t)(dot - s));
    bool ok = ms_cfg_parse_int(head, out);
    free(head);
    return ok;
}

bool ms_cfg_parse_double(const char *s, double *out)
{
    /* strtod accepts "inf", "nan", hex floats and leading spaces; a config number should be
     * a plain decimal, so require a digit and a character set that excludes those. */
    bool digit = false;
    for (const char *q = s; *q; q++) {
        if (isdigit((unsigned char)*q))
            digit = true;
        else if (!strchr("+-.eE", *q))
            return false;
    }
    if (!digit)
        return false;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (*end || errno == ERANGE || !isfinite(v))
        return false;
    *out = v;
    return true;
}

/* YAML 1.1 only knows "true", "True" and "TRUE", not "tRUE". */
static bool yaml11_case(const char *s)
{
    bool all_lower = true, all_upper = true, tail_lower = true;
    for (size_t i = 0; s[i]; i++) {
        if (isupper((unsigned char)s[i])) {
            all_lower = false;
            if (i > 0)
                tail_lower = false;
        } else {
            all_upper = false;
        }
    }
    return all_lower || all_upper || tail_lower;
}

bool ms_cfg_parse_bool(const char *s, bool *out)
{
    /* YAML 1.1 booleans as PyYAML reads them (Ray Serve loads configs with PyYAML). */
    static const char *const yes[] = {"true", "yes", "on"};
    static const char *const no[] = {"false", "no", "off"};
    if (!yaml11_case(s))
        return false;
    for (size_t i = 0; i < 3; i++) {
        if (!strcasecmp(s, yes[i])) {
            *out = true;
            return true;
        }
        if (!strcasecmp(s, no[i])) {
            *out = false;
            return true;
        }
    }
    return false;
}

/* ---- YAML to JSON ----------------------------------------------------------------------- */

static json_t *to_json(ms_cfg_ctx_t *c, yaml_node_t *node, int depth);

static json_t *scalar_to_json(const yaml_node_t *node)
{
    const char *s = ms_cfg_scalar(node);
    /* Quoted and block scalars are strings whatever they look like: "5" stays "5". */
    if (!ms_cfg_is_plain(node))
        return json_string(s);
    if (ms_cfg_is_null(node))
        return json_null();
    bool b;
    long long i;
    double d;
    if (ms_cfg_parse_bool(s, &b))
        return json_boolean(b);
    if (ms_cfg_parse_int(s, &i))
        return json_integer(i);
    if (ms_cfg_parse_double(s, &d))
        return json_real(d);
    return json_string(s);
}

static json_t *mapping_to_json(ms_cfg_ctx_t *c, yaml_node_t *node, int depth)
{
    json_t *obj = json_object();
    for (yaml_node_pair_t *p = node->data.mapping.pairs.start; p < node->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = ms_cfg_node(c, p->key);
        const char *key = ms_cfg_scalar(k);
        if (!key) {
            ms_cfg_error(c, k, "mapping keys must be strings, got %s",
                         k && k->type == YAML_MAPPING_NODE ? "a mapping" : "a list");
            json_decref(obj);
            return NULL;
        }
        json_t *v = to_json(c, ms_cfg_node(c, p->value), depth + 1);
        if (!v) {
            json_decref(obj);
            return NULL;
        }
        json_object_set_new(obj, key, v);
    }
    return obj;
}

static json_t *sequence_to_json(ms_cfg_ctx_t *c, yaml_node_t *node, int depth)
{
    json_t *arr = json_array();
    for (yaml_node_item_t *it = node->data.sequence.items.start; it < node->data.sequence.items.top;
         it++) {
        json_t *v = to_json(c, ms_cfg_node(c, *it), depth + 1);
        if (!v) {
            json_decref(arr);
            return NULL;
        }
        json_array_append_new(arr, v);
    }
    return arr;
}

static json_t *to_json(ms_cfg_ctx_t *c, yaml_node_t *node, int depth)
{
    if (!node)
        return json_null();
    if (depth > MS_CFG_JSON_MAX_DEPTH) {
        ms_cfg_error(c, node, "value nests deeper than %d levels (recursive alias?)",
                     MS_CFG_JSON_MAX_DEPTH);
        return NULL;
    }
    if (c->json_budget == 0) {
        ms_cfg_error(c, node, "value expands to more than %d nodes (alias bomb?)",
                     MS_CFG_JSON_MAX_NODES);
        return NULL;
    }
    c->json_budget--;
    switch (node->type) {
    case YAML_MAPPING_NODE:
        return mapping_to_json(c, node, depth);
    case YAML_SEQUENCE_NODE:
        return sequence_to_json(c, node, depth);
    default:
        return scalar_to_json(node);
    }
}

json_t *ms_cfg_to_json(ms_cfg_ctx_t *c, yaml_node_t *node)
{
    return to_json(c, node, 0);
}

/* ---- did-you-mean ----------------------------------------------------------------------- */

/* Case-insensitive edit distance counting an adjacent swap as one edit (the usual typo). */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    size_t *d = ms_malloc((la + 1) * (lb + 1) * sizeof(*d));
#define D(i, j) d[(i) * (lb + 1) + (j)]
    for (size_t i = 0; i <= la; i++)
        D(i, 0) = i;
    for (size_t j = 0; j <= lb; j++)
        D(0, j) = j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            size_t cost = tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]);
            size_t best = D(i - 1, j - 1) + cost;
            if (D(i - 1, j) + 1 < best)
                best = D(i - 1, j) + 1;
            if (D(i, j - 1) + 1 < best)
                best = D(i, j - 1) + 1;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                D(i - 2, j - 2) + 1 < best)
                best = D(i - 2, j - 2) + 1;
            D(i, j) = best;
        }
    }
    size_t r = D(la, lb);
#undef D
    free(d);
    return r;
}

static size_t common_prefix(const char *a, const char *b)
{
    size_t n = 0;
    while (a[n] && tolower((unsigned char)a[n]) == tolower((unsigned char)b[n]))
        n++;
    return n;
}

const char *ms_cfg_suggest(const char *key, const char *const *names, size_t n)
{
    const char *best = NULL;
    size_t best_d = 3;
    for (size_t i = 0; i < n; i++) {
        size_t d = edit_distance(key, names[i]);
        if (d < best_d) {
            best_d = d;
            best = names[i];
        }
    }
    if (best)
        return best;
    /* A long shared prefix catches truncations ("health_check") and long-tailed mistakes
     * ("graceful_shutdown_wait_s") that are too far apart by edit distance. */
    size_t best_p = 5;
    for (size_t i = 0; i < n; i++) {
        size_t p = common_prefix(key, names[i]);
        if (p > best_p) {
            best_p = p;
            best = names[i];
        }
    }
    return best;
}

const char *ms_cfg_name_problem(const char *s)
{
    if (strlen(s) > MS_CFG_NAME_MAX)
        return "is longer than 255 bytes";
    if (strchr(s, '/'))
        return "contains '/'";
    if (!strcmp(s, ".") || !strcmp(s, ".."))
        return "is '.' or '..'";
    return NULL;
}
