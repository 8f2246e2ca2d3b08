/*
 * scale_hooks: the Lua hooks of the external scaling API (applications[].external_scaler, ours; see
 * docs/external-scaling.md). Ray Serve lets an outside system set a deployment's replica count
 * with POST /api/v1/applications/{app}/deployments/{deployment}/scale; moonserve lets the
 * application add two optional policy functions around that API:
 *
 *   - a hook (`judge`) that sees each scale request and accepts it, clamps it to another count,
 *     or refuses it with a reason (the admin API answers 422 with that reason);
 *   - a tick that runs every tick_interval_s, pulls an exogenous signal (a schedule today) and
 *     sets targets itself, as if it had posted scale requests.
 *
 * Both run in a sandbox like every policy script (allow-listed globals, a wall-clock budget per
 * call, a memory cap), reload in two phases with the other scripts, and report version, sha256,
 * failures and the last error in status. A hook that fails (error, budget, memory, bad answer)
 * never blocks the API: the request is accepted as Ray Serve would, and the failure is counted.
 *
 * One ms_scale_hook_t per application that configures external_scaler. Nothing here touches
 * replicas: the controller asks, then applies the answer. Single-threaded (the controller's loop).
 */
#ifndef MS_SCALE_HOOKS_H
#define MS_SCALE_HOOKS_H

#include <jansson.h>
#include <stddef.h>

#include "config/config.h"
#include "watch/watch.h"

typedef struct ms_scale_hook ms_scale_hook_t;

/* Room a caller should give `reason` in ms_scale_hook_judge (longer reasons are cut at a UTF-8
 * character boundary). */
#define MS_SCALE_HOOK_REASON_MAX 256

/* Loads the hook and/or tick functions (at least one non-NULL) into sandboxes: one sandbox per
 * distinct file, so a hook and a tick in the same file share their module's locals. Runs each
 * file's optional self_test(). `kwargs` (a JSON object or NULL) is copied and passed to both
 * functions; `tick_interval_s` <= 0 means 1 s. Budgets: `budget_us` wall-clock microseconds per
 * call (<= 0: 10 ms), `mem_limit` bytes per sandbox (0: MS_SANDBOX_DEFAULT_MEM_LIMIT). Returns
 * NULL with *err (malloc'd, `file:line: message`) when a file does not load, lacks a function or
 * fails its self_test. The refs are copied. */
ms_scale_hook_t *ms_scale_hook_new(const char *app, const ms_config_lua_ref_t *hook,
                                   const ms_config_lua_ref_t *tick, json_t *kwargs,
                                   double tick_interval_s, double budget_us, size_t mem_limit,
                                   char **err);
/* The same from an application's config (scale_hook, scale_tick, scale_tick_interval_s,
 * scale_hook_kwargs). Returns NULL with *err left NULL when the application has no hooks. */
ms_scale_hook_t *ms_scale_hook_from_config(const ms_app_config_t *app, double budget_us,
                                           size_t mem_limit, char **err);
void ms_scale_hook_free(ms_scale_hook_t *h);
/* Gives the hook and the tick ctx.redis (watch.h); w stays the caller's. */
void ms_scale_hook_set_watch(ms_scale_hook_t *h, ms_watch_t *w);

typedef enum { MS_HOOK_ACCEPT, MS_HOOK_CLAMP, MS_HOOK_REFUSE } ms_hook_verdict_t;

/* Judges one scale request (`requested` replicas for `deployment`, already validated >= 0 by the
 * caller) at wall-clock `now`:
 *   ACCEPT: *target_out = requested; reason is "" (or says that the hook failed);
 *   CLAMP:  *target_out = the hook's count (>= 0); reason says why (the hook's or ours);
 *   REFUSE: *target_out = current_target; reason is the hook's, for a 422 answer.
 * Without a hook function, or when the hook fails (error, budget, memory, a bad answer), the
 * answer is ACCEPT as Ray Serve would; `failures` goes up and `last_error` keeps the message.
 * `reason` (reason_cap bytes, MS_SCALE_HOOK_REASON_MAX advised) is always NUL-terminated UTF-8. */
ms_hook_verdict_t ms_scale_hook_judge(ms_scale_hook_t *h, const char *deployment,
                                      long long requested, int current_target, int running_replicas,
                                      double now, long long *target_out, char *reason,
                                      size_t reason_cap);

/* Runs tick(ctx, kwargs) when there is a tick and it is due (first call, or tick_interval_s since
 * the last run; a failed run counts as a run, so a broken tick does not spin). `state` is the
 * application's {deployment: {"current_target": n, "running_replicas": n}} (borrowed). Returns a
 * new {deployment: target} object holding only targets that differ from current_target, or NULL
 * (not due, no tick, failure, nothing to change). A target for a deployment not in `state`, or
 * one that is not an integer in [0, INT_MAX], fails the whole tick (nothing applied). */
json_t *ms_scale_hook_tick(ms_scale_hook_t *h, double now, json_t *state);

/* True when the application has a tick function (so the caller need only call tick then). */
int ms_scale_hook_has_tick(const ms_scale_hook_t *h);

/* The hook's policy scripts (engine/policy, kind "scale_hook"): one when the hook and the tick
 * live in one file, else one per function. Fills out (room for 2) and returns how many. A
 * committed reload hands the tick's state over. */
struct ms_policy;
size_t ms_scale_hook_policies(ms_scale_hook_t *h, struct ms_policy **out);

/* Status: {"hook": {script object} | null, "tick": {script object} | null, "tick_interval_s",
 *          "last_tick": seconds | null, "accepted", "clamped", "refused", "ticks"}. New
 * reference. The script objects carry the failures and the last error. */
json_t *ms_scale_hook_status(const ms_scale_hook_t *h);

#endif
