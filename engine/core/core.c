/*
 * core: allocation wrappers, byte buffers, logging, clocks, ids. See core.h.
 */
#include "core/core.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

ms_log_level_t ms_log_min_level = MS_LOG_INFO;
static char log_role[64] = "controller";

static void die_oom(size_t n, const char *file, int line)
{
    fprintf(stderr, "moonserve: out of memory allocating %zu bytes at %s:%d\n", n, file, line);
    abort();
}

void *ms__malloc(size_t n, const char *file, int line)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die_oom(n, file, line);
    return p;
}

void *ms__calloc(size_t c, size_t n, const char *file, int line)
{
    void *p = calloc(c ? c : 1, n ? n : 1);
    if (!p)
        die_oom(c * n, file, line);
    return p;
}

void *ms__realloc(void *p, size_t n, const char *file, int line)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        die_oom(n, file, line);
    return q;
}

char *ms__strndup(const char *s, size_t n, const char *file, int line)
{
    if (!s)
        return NULL;
    char *d = ms__malloc(n + 1, file, line);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

void ms_buf_reserve(ms_buf_t *b, size_t extra)
{
    size_t need = b->len + extra + 1; /* +1 keeps room for the terminating NUL */
    if (need <= b->cap)
        return;
    /* A size this large can only be an arithmetic slip upstream; doubling would wrap to 0 and
     * spin forever, so stop loudly instead. */
    if (extra > SIZE_MAX / 4 || need < b->len)
        ms_fatal("buffer growth by %zu bytes (have %zu): length underflow upstream", extra, b->len);
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    b->data = ms_realloc(b->data, cap);
    b->cap = cap;
}

void ms_buf_append(ms_buf_t *b, const void *p, size_t n)
{
    ms_buf_reserve(b, n);
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void ms_buf_appendf(ms_buf_t *b, const char *fmt, ...)
{
    /* Format into the spare room first; only a line that does not fit is formatted twice. */
    ms_buf_reserve(b, 64);
    size_t room = b->cap - b->len;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->data + b->len, room, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->data[b->len] = '\0';
        return;
    }
    if ((size_t)n >= room) {
        ms_buf_reserve(b, (size_t)n);
        va_start(ap, fmt);
        vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t)n;
}

void ms_buf_append_str(ms_buf_t *b, const char *s)
{
    ms_buf_append(b, s, strlen(s));
}

void ms_buf_append_uint(ms_buf_t *b, uint64_t v)
{
    char digits[24];
    size_t i = sizeof digits;
    do {
        digits[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    ms_buf_append(b, digits + i, sizeof digits - i);
}

void ms_buf_append_label(ms_buf_t *b, const char *s)
{
    ms_buf_append(b, "", 0); /* an empty value is an empty string, not NULL */
    for (; *s; s++) {
        if (*s == '\n') {
            ms_buf_append(b, "\\n", 2);
            continue;
        }
        if (*s == '\\' || *s == '"')
            ms_buf_append(b, "\\", 1);
        ms_buf_append(b, s, 1);
    }
}

void ms_buf_consume(ms_buf_t *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->data, b->data + n, b->len - n);
        b->len -= n;
    }
    if (b->data)
        b->data[b->len] = '\0';
}

void ms_buf_reset(ms_buf_t *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void ms_buf_free(ms_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void ms_log_set_role(const char *role)
{
    ms_copy_str(log_role, sizeof log_role, role);
}

int ms_log_parse_level(const char *name, ms_log_level_t *out)
{
    static const char *names[] = {"DEBUG", "INFO", "WARNING", "ERROR"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(name, names[i]) == 0) {
            *out = (ms_log_level_t)i;
            return 0;
        }
    }
    if (strcasecmp(name, "WARN") == 0) {
        *out = MS_LOG_WARN;
        return 0;
    }
    return -1;
}

static int log_json;
/* Access lines wait here and leave in batches (a write per request would cost as much as the
 * request); other lines flush them first, so the log keeps its order. */
static ms_buf_t access_buf;
#define ACCESS_FLUSH_BYTES (32 * 1024)
/* Writes of at most PIPE_BUF bytes to a pipe are atomic: lines from several processes sharing
 * stderr never interleave within one. */
#define ATOMIC_WRITE 4096

void ms_log_set_json(int json)
{
    log_json = json;
}

static void write_fd(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

/* ---- log files (logging_config.logs_dir) -----------------------------------------------------
 * One file per process (controller.log, replica_APP_DEPLOYMENT_ID.log), so each has one writer
 * and rotation needs no lock between processes: the writer knows the size it wrote. The mutex
 * only guards this process's file state against a line from another thread. Writes go straight
 * to the file, as they go to stderr: a page-cache write, and a rotation is a few renames. */
#define LOG_PATH_MAX 1400
static struct {
    int fd; /* -1: no file */
    char path[LOG_PATH_MAX];
    long long max_bytes; /* 0: never rotate */
    int backups;
    long long size;  /* bytes in the file now */
    int open_failed; /* a reopen after a rotation failed and was reported */
} log_file = {.fd = -1};
static pthread_mutex_t log_file_mu = PTHREAD_MUTEX_INITIALIZER;
static int log_to_stderr = 1;

static int open_log_file(const char *path, int trunc, long long *size)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (trunc ? O_TRUNC : 0), 0644);
    struct stat st;
    *size = fd >= 0 && fstat(fd, &st) == 0 ? (long long)st.st_size : 0;
    return fd;
}

/* FILE -> FILE.1 -> FILE.2 ... -> FILE.N, the oldest overwritten; with no backups the file
 * starts again empty. Then a new FILE. */
static void rotate_log_file(void)
{
    close(log_file.fd);
    log_file.fd = -1;
    char from[LOG_PATH_MAX + 16], to[LOG_PATH_MAX + 16];
    for (int i = log_file.backups - 1; i >= 1; i--) {
        snprintf(from, sizeof from, "%s.%d", log_file.path, i);
        snprintf(to, sizeof to, "%s.%d", log_file.path, i + 1);
        rename(from, to); /* ENOENT: fewer rotations so far */
    }
    if (log_file.backups > 0) {
        snprintf(to, sizeof to, "%s.1", log_file.path);
        rename(log_file.path, to);
    }
    log_file.fd = open_log_file(log_file.path, log_file.backups == 0, &log_file.size);
    if (log_file.fd < 0 && !log_file.open_failed) {
        log_file.open_failed = 1;
        char msg[LOG_PATH_MAX + 128];
        int n = snprintf(msg, sizeof msg,
                         "moonserve: log file %s: cannot reopen after rotation: %s; "
                         "logging to stderr only\n",
                         log_file.path, strerror(errno));
        write_fd(STDERR_FILENO, msg, n > 0 && (size_t)n < sizeof msg ? (size_t)n : 0);
    }
}

/* Whole lines, so that a file holds at most max_bytes; a single line longer than that gets a
 * file to itself. */
static void file_write(const char *p, size_t n)
{
    while (n > 0 && log_file.fd >= 0) {
        size_t take = n;
        if (log_file.max_bytes > 0 && log_file.size + (long long)n > log_file.max_bytes) {
            long long room = log_file.max_bytes - log_file.size;
            size_t fit = room > 0 ? (size_t)room : 0; /* < n here */
            while (fit > 0 && p[fit - 1] != '\n')
                fit--;
            if (fit == 0 && log_file.size > 0) {
                rotate_log_file();
                continue;
            }
            if (fit == 0) {
                const char *nl = memchr(p, '\n', n);
                fit = nl ? (size_t)(nl - p) + 1 : n;
            }
            take = fit;
        }
        write_fd(log_file.fd, p, take);
        log_file.size += (long long)take;
        p += take;
        n -= take;
    }
}

/* Every log byte leaves here: to the file when there is one, and to stderr unless a file is open
 * and MOONSERVE_LOG_TO_STDERR=0 turned stderr off. */
static void emit(const char *p, size_t n)
{
    pthread_mutex_lock(&log_file_mu);
    if (log_file.fd < 0 || log_to_stderr)
        write_fd(STDERR_FILENO, p, n);
    if (log_file.fd >= 0)
        file_write(p, n);
    pthread_mutex_unlock(&log_file_mu);
}

void ms_log_set_stderr(int on)
{
    log_to_stderr = on;
}

/* mkdir -p, 0755. */
static int make_dirs(const char *dir)
{
    char path[LOG_PATH_MAX];
    ms_copy_str(path, sizeof path, dir);
    for (char *q = path + 1;; q++) {
        if (*q != '/' && *q != '\0')
            continue;
        char was = *q;
        *q = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST)
            return -1;
        *q = was;
        if (was == '\0')
            break;
    }
    struct stat st;
    if (stat(path, &st) != 0)
        return -1;
    if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

int ms_log_set_file(const char *dir, const char *name, long long max_bytes, int backup_count,
                    char *err, size_t err_cap)
{
    char path[LOG_PATH_MAX];
    int fd = -1;
    long long size = 0;
    if (dir && dir[0]) {
        int n = snprintf(path, sizeof path, "%s/", dir);
        if (n < 0 || (size_t)n >= sizeof path - 1 - strlen(name)) {
            snprintf(err, err_cap, "log folder %s: path too long", dir);
            return -1;
        }
        /* Names come from application and deployment names: never a path. */
        for (const char *q = name; *q && (size_t)n < sizeof path - 1; q++)
            path[n++] = *q == '/' ? '_' : *q;
        path[n] = '\0';
        pthread_mutex_lock(&log_file_mu);
        int same = log_file.fd >= 0 && strcmp(log_file.path, path) == 0;
        if (same) {
            log_file.max_bytes = max_bytes;
            log_file.backups = backup_count;
        }
        pthread_mutex_unlock(&log_file_mu);
        if (same)
            return 0;
        if (make_dirs(dir) != 0) {
            snprintf(err, err_cap, "log folder %s: cannot create it: %s", dir, strerror(errno));
            return -1;
        }
        fd = open_log_file(path, 0, &size);
        if (fd < 0) {
            snprintf(err, err_cap, "log file %s: cannot open it: %s", path, strerror(errno));
            return -1;
        }
    }
    ms_log_flush(); /* lines waiting belong where the log went until now */
    pthread_mutex_lock(&log_file_mu);
    if (log_file.fd >= 0)
        close(log_file.fd);
    log_file.fd = fd;
    ms_copy_str(log_file.path, sizeof log_file.path, fd >= 0 ? path : "");
    log_file.max_bytes = max_bytes;
    log_file.backups = backup_count;
    log_file.size = size;
    log_file.open_failed = 0;
    pthread_mutex_unlock(&log_file_mu);
    return 0;
}

void ms_log_flush(void)
{
    /* Nothing was ever buffered: no pointer arithmetic on NULL (UBSan, found by fuzz_config). */
    if (!access_buf.data)
        return;
    const char *p = access_buf.data, *end = p + access_buf.len;
    while (p < end) {
        /* Whole lines, up to ATOMIC_WRITE bytes at a time. */
        const char *cut = p + ((size_t)(end - p) > ATOMIC_WRITE ? ATOMIC_WRITE : (size_t)(end - p));
        if (cut < end) {
            const char *nl = cut;
            while (nl > p && nl[-1] != '\n')
                nl--;
            if (nl > p)
                cut = nl;
        }
        emit(p, (size_t)(cut - p));
        p = cut;
    }
    ms_buf_reset(&access_buf);
}

/* A JSON string: quotes, backslashes and control bytes escaped, bytes that are not UTF-8
 * replaced. */
static void append_json_string(ms_buf_t *b, const char *s)
{
    char clean[4096];
    size_t n = ms_utf8_copy(clean, sizeof clean, s, strlen(s));
    ms_buf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)clean[i];
        if (ch == '"' || ch == '\\') {
            char esc[2] = {'\\', (char)ch};
            ms_buf_append(b, esc, 2);
        } else if (ch < 0x20) {
            ms_buf_appendf(b, "\\u%04x", ch);
        } else {
            ms_buf_append(b, &clean[i], 1);
        }
    }
    ms_buf_append(b, "\"", 1);
}

static const char *const LEVEL_TAGS[] = {"DEBUG", "INFO", "WARN", "ERROR"};

/* `TIME LEVEL [role pid] ` (TEXT), or `{"time": .., "level": .., "role": .., "pid": ..,` (JSON). */
static void line_start(ms_buf_t *b, ms_log_level_t level)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[96];
    snprintf(when, sizeof when, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    if (!log_json) {
        ms_buf_appendf(b, "%s %s [%s %d] ", when, LEVEL_TAGS[level], log_role, (int)getpid());
        return;
    }
    ms_buf_appendf(b, "{\"time\": \"%s\", \"level\": \"%s\", \"role\": ", when, LEVEL_TAGS[level]);
    append_json_string(b, log_role);
    ms_buf_appendf(b, ", \"pid\": %d, ", (int)getpid());
}

static void log_v(ms_log_level_t level, const char *fmt, va_list ap)
{
    char msg[4096];
    int m = vsnprintf(msg, sizeof msg, fmt, ap);
    if (m < 0)
        msg[0] = '\0';
    ms_buf_t b = {0};
    line_start(&b, level);
    if (log_json) {
        ms_buf_append_str(&b, "\"message\": ");
        append_json_string(&b, msg);
        ms_buf_append_str(&b, "}\n");
    } else {
        ms_buf_append_str(&b, msg);
        ms_buf_append(&b, "\n", 1);
    }
    ms_log_flush();
    /* One write per line keeps lines from different processes from interleaving. A longer line
     * is cut, and keeps its newline. */
    if (b.len > ATOMIC_WRITE) {
        b.len = ATOMIC_WRITE;
        b.data[ATOMIC_WRITE - 1] = '\n';
    }
    emit(b.data, b.len);
    ms_buf_free(&b);
}

static void access_field(ms_buf_t *b, const char *key, const char *value, int first)
{
    if (log_json) {
        ms_buf_appendf(b, "%s\"%s\": ", first ? "" : ", ", key);
        append_json_string(b, value ? value : "");
        return;
    }
    ms_buf_appendf(b, "%s%s=", first ? "" : " ", key);
    append_json_string(b, value ? value : "");
}

void ms_log_access(const ms_access_record_t *r)
{
    if (MS_LOG_INFO < ms_log_min_level)
        return;
    ms_buf_t *b = &access_buf;
    line_start(b, MS_LOG_INFO);
    ms_buf_append_str(b, log_json ? "\"message\": \"access\", " : "access ");
    access_field(b, "request_id", r->request_id, 1);
    access_field(b, "application", r->application, 0);
    access_field(b, "deployment", r->deployment, 0);
    access_field(b, "replica", r->replica, 0);
    access_field(b, "method", r->method, 0);
    access_field(b, "route", r->route, 0);
    const char *sep = log_json ? ", \"" : " ";
    const char *eq = log_json ? "\": " : "=";
    if (r->disconnected)
        ms_buf_appendf(b, "%sstatus%s%s", sep, eq,
                       log_json ? "\"disconnection\"" : "disconnection");
    else
        ms_buf_appendf(b, "%sstatus%s%d", sep, eq, r->status);
    ms_buf_appendf(b, "%slatency_ms%s%.3f%s\n", sep, eq, r->latency_ms, log_json ? "}" : "");
    if (b->len >= ACCESS_FLUSH_BYTES)
        ms_log_flush();
}

void ms__log(ms_log_level_t level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_v(level, fmt, ap);
    va_end(ap);
}

void ms__fatal(const char *file, int line, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ms__log(MS_LOG_ERROR, "fatal at %s:%d: %s", file, line, msg);
    abort();
}

uint64_t ms_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t ms_now_ms(void)
{
    return ms_now_us() / 1000u;
}

double ms_wall_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 when it is not one: a stray
 * continuation byte, a truncated sequence, an overlong form, a surrogate, or beyond U+10FFFF. */
static size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    size_t len = s[0] < 0x80         ? 1
                 : (s[0] >> 5) == 6  ? 2
                 : (s[0] >> 4) == 14 ? 3
                 : (s[0] >> 3) == 30 ? 4
                                     : 0;
    if (len == 0 || len > n || (len == 2 && s[0] < 0xc2) || (len == 4 && s[0] > 0xf4))
        return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    if (len == 3 && ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] >= 0xa0)))
        return 0;
    if (len == 4 && ((s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] >= 0x90)))
        return 0;
    return len;
}

/* True when s (n bytes, the end of the text) is the start of a character cut short, as a
 * fixed-size snprintf leaves it. */
static int utf8_cut_tail(const unsigned char *s, size_t n)
{
    size_t want = (s[0] >> 5) == 6 ? 2 : (s[0] >> 4) == 14 ? 3 : (s[0] >> 3) == 30 ? 4 : 0;
    if (n >= want)
        return 0;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    return 1;
}

void ms_copy_str(char *out, size_t cap, const char *s)
{
    size_t n = s ? strnlen(s, cap - 1) : 0;
    memmove(out, s ? s : "", n);
    out[n] = '\0';
}

size_t ms_utf8_copy(char *out, size_t cap, const char *s, size_t n)
{
    if (cap == 0)
        return 0;
    const unsigned char *p = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t len = utf8_seq_len(p + i, n - i);
        if (len == 0 && utf8_cut_tail(p + i, n - i))
            break;
        if (o + (len ? len : 1) >= cap)
            break;
        if (len == 0) {
            out[o++] = '?';
            i++;
        } else {
            memmove(out + o, p + i, len);
            o += len;
            i += len;
        }
    }
    out[o] = '\0';
    return o;
}

void ms_random_id(char *out)
{
    static uint64_t state;
    if (!state)
        state = ms_now_us() ^ ((uint64_t)getpid() << 32) ^ 0x9e3779b97f4a7c15ull;
    static const char hex[] = "0123456789abcdef";
    for (int half = 0; half < 2; half++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        uint64_t v = state;
        for (int i = 0; i < 16; i++) {
            out[half * 16 + i] = hex[v & 15];
            v >>= 4;
        }
    }
    out[32] = '\0';
}

int ms_read_file(const char *path, ms_buf_t *out)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    char chunk[8192];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        ms_buf_append(out, chunk, n);
    /* Keep fread's errno (EISDIR for a folder): fclose may overwrite it. */
    int err = ferror(f) ? (errno ? errno : EIO) : 0;
    fclose(f);
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

/* A folder of files installed with the engine, found like the Lua one (see ms_lua_dir). */
typedef struct {
    const char *env;       /* the override variable */
    const char *installed; /* under PREFIX, for an installed tree */
    const char *source;    /* under the source tree, for build/moonserve */
    pthread_once_t once;
    char path[PATH_MAX + 64];
} data_dir_t;

static int is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Resolved once per folder: the executable does not move while it runs, and reload prepares
 * scripts off the event loop, so the lookup must be safe from any thread. */
static void find_data_dir(data_dir_t *d)
{
    char prefix[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", prefix, sizeof prefix - 1);
    if (n <= 0) {
        /* No /proc: the working directory's copy is the only guess left. */
        ms_copy_str(d->path, sizeof d->path, d->source);
        return;
    }
    prefix[n] = '\0';
    /* PREFIX/bin/moonserve -> PREFIX. The kernel's path has no symlinks, "." or "..", so taking
     * two components off by hand is the real parent, and errors read without "bin/..". A binary
     * in / or /bin leaves "", so the paths below start at /. */
    for (int up = 0; up < 2; up++) {
        char *slash = strrchr(prefix, '/');
        if (slash)
            *slash = '\0';
    }
    char build[sizeof d->path];
    snprintf(d->path, sizeof d->path, "%s/%s", prefix, d->installed);
    snprintf(build, sizeof build, "%s/%s", prefix, d->source);
    if (!is_dir(d->path) && is_dir(build))
        memcpy(d->path, build, sizeof build);
}

static const char *data_dir(data_dir_t *d, void (*find)(void))
{
    const char *env = getenv(d->env);
    if (env && *env)
        return env;
    pthread_once(&d->once, find);
    return d->path;
}

static data_dir_t lua_dir = {"MOONSERVE_LUA_DIR", "share/moonserve/lua", "lua", PTHREAD_ONCE_INIT,
                             ""};
static data_dir_t dashboard_dir = {"MOONSERVE_DASHBOARD_DIR", "share/moonserve/web/dashboard",
                                   "web/dashboard", PTHREAD_ONCE_INIT, ""};

/* pthread_once takes no argument: one finder per folder. */
static void find_lua_dir(void)
{
    find_data_dir(&lua_dir);
}

static void find_dashboard_dir(void)
{
    find_data_dir(&dashboard_dir);
}

const char *ms_lua_dir(void)
{
    return data_dir(&lua_dir, find_lua_dir);
}

const char *ms_dashboard_dir(void)
{
    return data_dir(&dashboard_dir, find_dashboard_dir);
}

int ms_hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}
