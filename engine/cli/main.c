/*
 * main: the `moonserve` command line. `run` and `check` take a config file; `status`, `deploy`,
 * `scale`, `reload` and `shutdown` are admin API clients (engine/cli); `__replica` is the hidden
 * replica mode the controller spawns. Exit codes: 0 success, 1 the config or a script is invalid,
 * the server failed or the admin API answered an error, 2 usage error, 3 the admin API cannot be
 * reached, 4 the admin API refused the token.
 */
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

#include "cli/cli.h"
#include "config/config.h"
#include "controller/controller.h"
#include "core/core.h"
#include "replica/replica.h"
#include "runtime/runtime.h"

static const char usage[] =
    "usage: moonserve COMMAND [ARGS]\n"
    "\n"
    "commands:\n"
    "  run CONFIG.yaml     start serving the applications in CONFIG (foreground)\n"
    "  check CONFIG.yaml   validate CONFIG and load every script it names\n"
    "  version             print the version\n"
    "  help                print this help\n";

static const char exit_codes[] =
    "\nexit codes: 0 success, 1 invalid config, server failure or an error from the admin API,\n"
    "            2 usage error, 3 admin API unreachable, 4 admin token refused\n";

static void print_usage(FILE *to)
{
    fputs(usage, to);
    fputs(ms_cli_usage(), to);
    fputs(exit_codes, to);
}

static int print_errors(ms_config_errors_t *errs)
{
    for (size_t i = 0; i < errs->n; i++)
        fprintf(stderr, "%s\n", errs->items[i]);
    ms_config_errors_free(errs);
    return 1;
}

static int load_config(const char *path, ms_config_t **cfg)
{
    ms_config_errors_t errs = {0};
    if (ms_config_load(path, cfg, &errs) != 0)
        return print_errors(&errs);
    ms_config_errors_free(&errs);
    ms_log_level_t level;
    if (ms_log_parse_level((*cfg)->logging.level, &level) == 0)
        ms_log_min_level = level;
    ms_log_set_json((*cfg)->logging.json);
    return 0;
}

static int cmd_check(const char *path)
{
    ms_config_t *cfg = NULL;
    if (load_config(path, &cfg) != 0)
        return 1;
    ms_config_errors_t errs = {0};
    int rc = ms_controller_check(cfg, &errs);
    ms_config_free(cfg);
    if (rc != 0)
        return print_errors(&errs);
    printf("%s: ok\n", path);
    return 0;
}

static int cmd_run(const char *path)
{
    ms_config_t *cfg = NULL;
    if (load_config(path, &cfg) != 0)
        return 1;
    char exe[4096];
    size_t exe_len = sizeof exe;
    if (uv_exepath(exe, &exe_len) != 0) {
        fprintf(stderr, "moonserve: cannot find its own executable\n");
        ms_config_free(cfg);
        return 1;
    }
    int rc = ms_controller_run(cfg, exe);
    ms_config_free(cfg);
    return rc;
}

/* Under ASan, LeakSanitizer asks this at exit. A replica process (`__replica`, `__exec`) is
 * never leak-checked: LuaJIT keeps its own allocator and a replica exits without closing its
 * VM, so every C block a Lua value holds would be reported. The controller follows
 * ASAN_OPTIONS, which replicas inherit, so one setting checks the controller alone
 * (scripts/tools/test.sh, docs/reliability.md "Fuzzing"). */
static int is_replica_process;
int __lsan_is_turned_off(void);
int __lsan_is_turned_off(void)
{
    return is_replica_process;
}

int main(int argc, char **argv)
{
    is_replica_process =
        argc >= 2 && (strcmp(argv[1], "__replica") == 0 || strcmp(argv[1], "__exec") == 0);
    /* Peers vanish (clients, replicas); their sockets must fail writes, not kill us. */
    /* The process replica shim runs the user's command: it keeps the default signal dispositions
     * a command expects, so it goes before anything below changes them. */
    if (argc >= 2 && strcmp(argv[1], "__exec") == 0)
        return ms_replica_exec_main(argc - 2, argv + 2);
    signal(SIGPIPE, SIG_IGN);
    /* Large buffers (a big body, a burst of output) come from mmap and go back to the system
     * when freed. glibc would otherwise raise this threshold after the first such free and serve
     * later ones from a heap it rarely returns: a busy minute would set the RSS for good. */
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    /* A replica learns its deployment's logging_config from these (and so may a user). */
    const char *level = getenv("MOONSERVE_LOG_LEVEL");
    if (level)
        ms_log_parse_level(level, &ms_log_min_level);
    const char *encoding = getenv("MOONSERVE_LOG_ENCODING");
    if (encoding)
        ms_log_set_json(strcasecmp(encoding, "JSON") == 0);
    const char *to_stderr = getenv("MOONSERVE_LOG_TO_STDERR");
    if (to_stderr && strcmp(to_stderr, "0") == 0)
        ms_log_set_stderr(0);
    if (argc < 2) {
        print_usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "__replica") == 0)
        return ms_runtime_main(argc - 2, argv + 2);
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("moonserve %s\n", MS_VERSION);
        return 0;
    }
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        print_usage(stdout);
        return 0;
    }
    if (ms_cli_is_command(cmd))
        return ms_cli_main(cmd, argc - 2, argv + 2);
    if ((strcmp(cmd, "run") == 0 || strcmp(cmd, "check") == 0) && argc == 3)
        return cmd[0] == 'r' ? cmd_run(argv[2]) : cmd_check(argv[2]);
    fprintf(stderr, "moonserve: unknown command or wrong arguments: %s\n\n", cmd);
    print_usage(stderr);
    return 2;
}
