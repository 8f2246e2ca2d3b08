/*
 * core: process-wide basics shared by every module — abort-on-OOM allocation, growable byte
 * buffers, logging with a level check before argument evaluation, and a monotonic clock.
 *
 * Nothing here touches the event loop, and nothing here may block.
 */
#ifndef MS_CORE_H
#define MS_CORE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define MS_VERSION "0.1.0"

/* ---- allocation ----------------------------------------------------------------------------
 * ms_malloc/ms_calloc/ms_realloc/ms_strdup never return NULL: they abort with file and line on
 * failure, so call sites need no checks. Use plain malloc where running out must become a 503.
 */
#define ms_malloc(n)     ms__malloc((n), __FILE__, __LINE__)
#define ms_calloc(c, n)  ms__calloc((c), (n), __FILE__, __LINE__)
#define ms_realloc(p, n) ms__realloc((p), (n), __FILE__, __LINE__)
#define ms_strdup(s)     ms__strndup((s), (s) ? __builtin_strlen(s) : 0, __FILE__, __LINE__)
#define ms_strndup(s, n) ms__strndup((s), (n), __FILE__, __LINE__)
void *ms__malloc(size_t n, const char *file, int line);
void *ms__calloc(size_t c, size_t n, const char *file, int line);
void *ms__realloc(void *p, size_t n, const char *file, int line);
char *ms__strndup(const char *s, size_t n, const char *file, int line);

/* ---- byte buffer ---------------------------------------------------------------------------
 * A growable buffer. `data` is always NUL-terminated after an append (one spare byte), so text
 * held in it can be passed to C string functions.
 */
typedef struct ms_buf {
    char *data;
    size_t len;
    size_t cap;
} ms_buf_t;

void ms_buf_reserve(ms_buf_t *b, size_t extra);
void ms_buf_append(ms_buf_t *b, const void *p, size_t n);
void ms_buf_appendf(ms_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Hot-path appends that avoid printf: a C string, and an unsigned integer in decimal. */
void ms_buf_append_str(ms_buf_t *b, const char *s);
void ms_buf_append_uint(ms_buf_t *b, uint64_t v);
/* A Prometheus label value: backslash, double quote and newline escaped. */
void ms_buf_append_label(ms_buf_t *b, const char *s);
void ms_buf_consume(ms_buf_t *b, size_t n); /* drop n bytes from the front */
void ms_buf_reset(ms_buf_t *b);             /* len = 0, keep the memory */
void ms_buf_free(ms_buf_t *b);

/* ---- logging -------------------------------------------------------------------------------
 * Lines go to stderr, and to a log file when logs_dir is set, as `TIME LEVEL [role pid] message`,
 * or as one JSON object per line (docs/logging.md). The level is checked before the arguments are
 * evaluated, so a filtered-out debug line costs one comparison.
 */
typedef enum { MS_LOG_DEBUG, MS_LOG_INFO, MS_LOG_WARN, MS_LOG_ERROR } ms_log_level_t;
extern ms_log_level_t ms_log_min_level;
void ms_log_set_role(const char *role); /* "controller", "replica Model#2", ... (copied) */
int ms_log_parse_level(const char *name, ms_log_level_t *out); /* 0 ok, -1 unknown name */
void ms_log_set_json(int json); /* logging_config.encoding: JSON (1) or TEXT (0) */
void ms__log(ms_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* One HTTP request's access line, at INFO. Lines are buffered and written in batches of whole
 * lines: call ms_log_flush regularly (the control loop does) and before exiting. */
typedef struct ms_access_record {
    const char *request_id, *application, *deployment, *replica, *method, *route;
    int status;
    int disconnected; /* the client left before its answer: status is not meaningful */
    double latency_ms;
} ms_access_record_t;
void ms_log_access(const ms_access_record_t *r);
void ms_log_flush(void);
/* logging_config.logs_dir (docs/logging.md): from now on lines also go to DIR/NAME (the folder
 * made as needed, the file appended to), rotated when a line would take it past max_bytes
 * (0 = never) with backup_count older files kept (NAME.1 newest); dir NULL or "" closes the file.
 * The same file again only updates the rotation settings. Blocking (mkdir, open): for start-up
 * and reload. Returns 0, or -1 with a message in err (the previous file, if any, is kept). */
int ms_log_set_file(const char *dir, const char *name, long long max_bytes, int backup_count,
                    char *err, size_t err_cap);
/* MOONSERVE_LOG_TO_STDERR=0: while a log file is open, lines go to it only (as Ray Serve's
 * RAY_SERVE_LOG_TO_STDERR=0). Without a file they always go to stderr. */
void ms_log_set_stderr(int on);
#define ms_log(level, ...)                                                                         \
    do {                                                                                           \
        if ((level) >= ms_log_min_level)                                                           \
            ms__log((level), __VA_ARGS__);                                                         \
    } while (0)
#define ms_debug(...) ms_log(MS_LOG_DEBUG, __VA_ARGS__)
#define ms_info(...)  ms_log(MS_LOG_INFO, __VA_ARGS__)
#define ms_warn(...)  ms_log(MS_LOG_WARN, __VA_ARGS__)
#define ms_error(...) ms_log(MS_LOG_ERROR, __VA_ARGS__)

/* Unrecoverable invariant breach: logs file and line, then aborts. */
#define ms_fatal(...) ms__fatal(__FILE__, __LINE__, __VA_ARGS__)
void ms__fatal(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4), noreturn));

/* ---- time ---------------------------------------------------------------------------------- */
uint64_t ms_now_ms(void);  /* monotonic milliseconds */
uint64_t ms_now_us(void);  /* monotonic microseconds */
double ms_wall_time(void); /* seconds since the epoch, for status and logs */

/* ---- files --------------------------------------------------------------------------------- */
/* Appends the whole file to `out`. Returns 0, or -1 with errno set (EISDIR for a folder); `out`
 * may then hold part of the file. Blocking: for start-up, reload and admin paths only. */
int ms_read_file(const char *path, ms_buf_t *out);

/* The engine's Lua folder (the `moonserve` module, the built-in router and autoscaling policy):
 * $MOONSERVE_LUA_DIR when set and not empty (read on every call); else, found relative to the
 * running executable so an installed tree can be moved, <exe dir>/../share/moonserve/lua (an
 * installed layout), then <exe dir>/../lua (a build folder inside the source tree, such as
 * build/moonserve). When neither exists the first is returned, so errors name where it was
 * expected. No source path is compiled in (docs/install.md). Thread-safe; never NULL. */
const char *ms_lua_dir(void);
/* The web dashboard's static files (docs/dashboard.md), found the same way:
 * $MOONSERVE_DASHBOARD_DIR when set and not empty; else <exe dir>/../share/moonserve/web/dashboard,
 * then <exe dir>/../web/dashboard (the source tree's, for build/moonserve). Thread-safe; never
 * NULL. */
const char *ms_dashboard_dir(void);

/* ---- text ---------------------------------------------------------------------------------- */
/* Copies n bytes of s into out (cap bytes, NUL included) as valid UTF-8, for script and user text
 * bound for JSON (jansson refuses anything else): a byte that does not begin a valid sequence
 * becomes '?'; a character cut short at the end of s (as a fixed-size snprintf leaves it) is
 * dropped, and when out is too small the copy ends before a character, never inside one. The
 * copy is never longer than s, so out may be s. Returns the length written. */
size_t ms_utf8_copy(char *out, size_t cap, const char *s, size_t n);
/* Copies s into out (cap > 0 bytes), cut to fit, always NUL-terminated; NULL copies as "". The
 * bounded copy snprintf(out, cap, "%s", s) makes, without parsing a format: one of these runs
 * on every request. */
void ms_copy_str(char *out, size_t cap, const char *s);
/* The value of one hex digit, either case; -1 for anything else (percent-decoding). */
int ms_hex_digit(char c);

/* ---- misc ---------------------------------------------------------------------------------- */
/* SHA-256 of data as 64 lowercase hex digits plus NUL, for script fingerprints. */
void ms_sha256_hex(const void *data, size_t len, char out[65]);

/* Fills `out` (at least 33 bytes) with a random 32-hex-digit id, NUL-terminated. Not a secret:
 * it is drawn from a per-process xorshift generator seeded from the clock and the pid. */
void ms_random_id(char *out);

#endif
