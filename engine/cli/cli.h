/*
 * cli: the `moonserve` subcommands that are clients of the admin API — status, deploy, scale,
 * reload, shutdown. Each one sends a single HTTP request to the admin listener (blocking, with
 * a timeout; no event loop, so it is safe to call from main() or from a test thread), prints a
 * readable result and returns an exit code.
 *
 * Options (anywhere after the command):
 *   --address URL, -a URL   admin API; default $MOONSERVE_ADMIN_ADDRESS or http://127.0.0.1:8265
 *   --token T               bearer token; default $MOONSERVE_ADMIN_TOKEN
 *   --timeout SECONDS       whole-request timeout, default 30
 *
 * Exit codes: see the MS_CLI_EXIT_* values (also in docs/cli.md).
 */
#ifndef MS_CLI_H
#define MS_CLI_H

#include <stdio.h>

#define MS_CLI_EXIT_OK          0 /* the admin API answered 2xx */
#define MS_CLI_EXIT_REJECTED    1 /* it answered 4xx/5xx (other than 401/403); its error printed */
#define MS_CLI_EXIT_USAGE       2 /* bad arguments, unreadable config file */
#define MS_CLI_EXIT_UNREACHABLE 3 /* cannot connect, timeout, malformed or non-HTTP answer */
#define MS_CLI_EXIT_AUTH        4 /* 401/403: token missing or wrong */

/* True when `command` is one of the admin-client subcommands handled here. */
int ms_cli_is_command(const char *command);

/* Runs `moonserve COMMAND ARGS...`. argc/argv are the arguments after the command (argv[0] is
 * the first of them, not the program name). Prints to stdout/stderr; returns the exit code. */
int ms_cli_main(const char *command, int argc, char **argv);

/* The same, printing results to `out` and errors to `err` (for tests). */
int ms_cli_run(const char *command, int argc, char **argv, FILE *out, FILE *err);

/* The usage text of these subcommands, for `moonserve help`. */
const char *ms_cli_usage(void);

#endif
