/*
 * The web dashboard's static files on the admin listener (docs/dashboard.md): GET|HEAD
 * /dashboard/NAME answers a file of ms_dashboard_dir(). Only plain names of known types are
 * served, so no request can reach a file outside that folder or one the engine did not ship:
 * whatever the folder holds besides (a backup, a dotfile) has a type we do not know or a name we
 * refuse. The files are small and read on each request, on the loop: the admin listener takes
 * blocking reads (as its deploy and reload paths do), and an upgrade replacing them is seen at
 * the next request.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "admin/admin.h"
#include "core/core.h"
#include "http/http.h"

/* Our files are a few tens of KiB; anything this large was not shipped with the engine. */
#define DASHBOARD_MAX_FILE_BYTES (4 * 1024 * 1024)
#define DASHBOARD_MAX_NAME       128

static const struct {
    const char *ext;
    const char *type;
} types[] = {
    {".html", "text/html; charset=utf-8"},
    {".js", "text/javascript; charset=utf-8"},
    {".css", "text/css; charset=utf-8"},
    {".svg", "image/svg+xml"},
    {".png", "image/png"},
    {".ico", "image/x-icon"},
    {".json", "application/json"},
    {".txt", "text/plain; charset=utf-8"},
};

const char *ms_dashboard_content_type(const char *name)
{
    const char *dot = strrchr(name, '.');
    if (!dot)
        return NULL;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (strcmp(dot, types[i].ext) == 0)
            return types[i].type;
    return NULL;
}

int ms_dashboard_name_ok(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > DASHBOARD_MAX_NAME)
        return 0;
    /* One folder level of plain names: no "..", no dotfiles, no empty or absolute segments, and
     * no percent escapes (the listener does not decode paths, so none is needed for our names
     * and an encoded "../" must not become one further down). */
    const char *seg = name;
    for (size_t i = 0; i <= n; i++) {
        char c = name[i];
        if (c == '/' || c == '\0') {
            if (name + i == seg || *seg == '.')
                return 0;
            seg = name + i + 1;
            continue;
        }
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '-' || c == '_';
        if (!ok)
            return 0;
    }
    return 1;
}

#define CSP                                                                                        \
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "              \
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

static const ms_http_header_t common[] = {
    /* Revalidate on every load: no ETag is kept, so this refetches, which costs little for a few
     * files on the admin port and means an upgraded engine never runs an old script. */
    {"Cache-Control", 13, "no-cache", 8},
    {"X-Content-Type-Options", 22, "nosniff", 7},
    /* The page holds the admin token: nothing but its own files and the admin API may run or be
     * reached from it, and no other site may frame it. */
    {"Content-Security-Policy", 23, CSP, sizeof CSP - 1},
    {"Referrer-Policy", 15, "no-referrer", 11},
};
#define N_COMMON (sizeof common / sizeof common[0])

void ms_admin_serve_dashboard(ms_http_request_t *req)
{
    const char *path = req->path;
    if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0) {
        static const ms_http_header_t allow = {"Allow", 5, "GET, HEAD", 9};
        char msg[160];
        snprintf(msg, sizeof msg, "method %.32s not allowed here; allowed: GET, HEAD", req->method);
        ms_http_respond_error_headers(req, 405, msg, &allow, 1);
        return;
    }
    if (strcmp(path, "/dashboard") == 0) {
        /* Relative asset links need the slash; a 308 keeps the method (HEAD stays HEAD). */
        static const ms_http_header_t loc[] = {{"Location", 8, "/dashboard/", 11},
                                               {"Cache-Control", 13, "no-cache", 8}};
        ms_http_respond(req, 308, loc, 2, "", 0);
        return;
    }
    const char *name = path + strlen("/dashboard/");
    if (!*name)
        name = "index.html";
    if (!ms_dashboard_name_ok(name)) {
        ms_http_respond_error(req, 400, "invalid dashboard path");
        return;
    }
    const char *type = ms_dashboard_content_type(name);
    char msg[256];
    snprintf(msg, sizeof msg, "no such dashboard file: %s", name);
    if (!type) {
        ms_http_respond_error(req, 404, msg);
        return;
    }
    const char *dir = ms_dashboard_dir();
    char file[PATH_MAX + 256];
    snprintf(file, sizeof file, "%s/%s", dir, name);
    struct stat st;
    if (stat(file, &st) != 0 || !S_ISREG(st.st_mode)) {
        /* Say where it looked in the log only: the page is served without the token. */
        if (strcmp(name, "index.html") == 0)
            ms_warn("admin: dashboard not found: %s (set MOONSERVE_DASHBOARD_DIR)", file);
        ms_http_respond_error(req, 404, msg);
        return;
    }
    if (st.st_size > DASHBOARD_MAX_FILE_BYTES) {
        ms_warn("admin: dashboard file %s is %lld bytes, over the %d served", file,
                (long long)st.st_size, DASHBOARD_MAX_FILE_BYTES);
        ms_http_respond_error(req, 500, "dashboard file too large");
        return;
    }
    ms_buf_t body = {0};
    if (ms_read_file(file, &body) != 0) {
        int err = errno;
        ms_warn("admin: cannot read %s: %s", file, strerror(err));
        ms_buf_free(&body);
        ms_http_respond_error(req, err == ENOENT ? 404 : 500,
                              err == ENOENT ? msg : "cannot read dashboard file");
        return;
    }
    ms_http_header_t h[N_COMMON + 1];
    memcpy(h, common, sizeof common);
    h[N_COMMON] = (ms_http_header_t){"Content-Type", 12, type, strlen(type)};
    ms_http_respond(req, 200, h, N_COMMON + 1, body.data ? body.data : "", body.len);
    ms_buf_free(&body);
}
