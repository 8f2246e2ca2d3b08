/*
 * controller: the `moonserve run` process. It turns a loaded config into running deployments
 * (learning each application's graph from its Lua module, merging file overrides over code
 * options over Ray Serve's defaults), opens the HTTP ingress and the internal handle socket,
 * and drains and stops everything on SIGTERM/SIGINT.
 */
#ifndef MS_CONTROLLER_H
#define MS_CONTROLLER_H

#include "config/config.h"

/* Validates what `moonserve check` validates beyond the file itself: every application module
 * loads, and every deployment named in the file exists in its application. Returns 0 or -1
 * with errors appended to errs. */
int ms_controller_check(const ms_config_t *cfg, ms_config_errors_t *errs);

/* Runs the controller in the foreground until SIGTERM/SIGINT; returns the exit code. */
int ms_controller_run(const ms_config_t *cfg, const char *exe_path);

#endif
