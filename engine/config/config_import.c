/*
 * config (import): turns an application's import_path into the absolute path of its Lua file
 * and the attribute to read from it. Three spellings, after Ray Serve's:
 *   path/to/file.lua:attr  -> <config dir>/path/to/file.lua (absolute paths kept)
 *   module.sub:attr        -> <config dir>/module/sub.lua (or module/sub/init.lua, as Lua does)
 *   module.sub.attr        -> as module.sub:attr (split at the last dot)
 * The same forms name policy functions and router classes (ms_cfg_resolve_lua).
 */
#include "config/config_internal.h"
#include "core/core.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char import_forms[] = "'path/file.lua:attr', 'module.sub:attr' or 'module.attr'";

/* A file form names a path; anything else is a dotted module name. */
static bool is_file_form(const char *mod)
{
    size_t n = strlen(mod);
    return strchr(mod, '/') || (n > 4 && !strcmp(mod + n - 4, ".lua"));
}

static bool valid_module(const char *mod)
{
    /* Empty segments ("a..b", ".a", "a.") would turn into odd paths such as "a//b.lua". */
    if (!*mod || mod[0] == '.' || mod[strlen(mod) - 1] == '.' || strstr(mod, ".."))
        return false;
    return true;
}

/* Relative path of the module's file: dots become slashes, plus `suffix`. */
static char *module_path(const char *mod, const char *suffix)
{
    ms_buf_t b = {0};
    for (const char *p = mod; *p; p++)
        ms_buf_append(&b, *p == '.' ? "/" : p, 1);
    ms_buf_appendf(&b, "%s", suffix);
    return b.data;
}

static char *join(const char *dir, const char *rel)
{
    ms_buf_t b = {0};
    if (rel[0] == '/')
        ms_buf_appendf(&b, "%s", rel);
    else
        ms_buf_appendf(&b, "%s/%s", dir, rel);
    return b.data;
}

/* realpath of `path` when it is an existing regular file, else NULL. */
static char *existing_file(const char *path)
{
    char *real = realpath(path, NULL);
    struct stat st;
    if (real && stat(real, &st) == 0 && S_ISREG(st.st_mode))
        return real;
    free(real);
    return NULL;
}

/* Resolves the module part to a file; on failure returns NULL and sets *tried (caller frees). */
static char *find_file(const char *dir, const char *mod, char **tried)
{
    if (is_file_form(mod)) {
        *tried = join(dir, mod);
        return existing_file(*tried);
    }
    char *rel = module_path(mod, ".lua");
    *tried = join(dir, rel);
    free(rel);
    char *found = existing_file(*tried);
    if (found)
        return found;
    rel = module_path(mod, "/init.lua");
    char *init = join(dir, rel);
    free(rel);
    found = existing_file(init);
    free(init);
    return found;
}

/* Splits at the one colon, or at the last dot when there is none. Returns a message on error. */
static char *split_ref(const char *key, const char *s, char **mod, const char **attr)
{
    ms_buf_t b = {0};
    const char *colon = strchr(s, ':');
    if (colon && strchr(colon + 1, ':')) {
        ms_buf_appendf(&b, "%s must contain at most one ':', got \"%s\"", key, s);
        return b.data;
    }
    const char *cut = colon ? colon : strrchr(s, '.');
    if (!colon && strchr(s, '/'))
        cut = NULL; /* "dir/file.lua" has no attribute: the last dot is the extension */
    if (!cut || cut == s || !cut[1]) {
        ms_buf_appendf(&b, "%s must look like %s, got \"%s\"", key, import_forms, s);
        return b.data;
    }
    *mod = ms_strndup(s, (size_t)(cut - s));
    *attr = cut + 1;
    if (!is_file_form(*mod) && !valid_module(*mod)) {
        ms_buf_appendf(&b, "%s has an empty module name segment in \"%s\"", key, s);
        free(*mod);
        return b.data;
    }
    return NULL;
}

char *ms_cfg_resolve_lua(const char *dir, const char *key, const char *s, char **file, char **attr)
{
    char *mod = NULL;
    const char *at = NULL;
    char *err = split_ref(key, s, &mod, &at);
    if (err)
        return err;
    char *tried = NULL;
    char *found = find_file(dir, mod, &tried);
    free(mod);
    if (!found) {
        ms_buf_t b = {0};
        ms_buf_appendf(&b, "%s \"%s\": file %s not found", key, s, tried);
        free(tried);
        return b.data;
    }
    free(tried);
    *file = found;
    *attr = ms_strdup(at);
    return NULL;
}

int ms_cfg_resolve_import(ms_cfg_ctx_t *c, ms_app_config_t *app, const yaml_node_t *val)
{
    char *err = ms_cfg_resolve_lua(c->dir, "import_path", app->import_path, &app->import_file,
                                   &app->import_attr);
    if (!err)
        return 0;
    ms_cfg_error(c, val, "%s", err);
    free(err);
    return -1;
}
