/*
 * watch: Redis values that policy scripts read without waiting (docs/external-scaling.md,
 * "Redis signals"). A script asks through ctx.redis for the length of a key (a stream, list, set,
 * sorted set or hash) or its string value; the call answers at once with the value last read
 * (nil before the first read) and marks the key, and the controller reads every marked key once
 * per control-loop tick, asynchronously. So a script never blocks and never waits on Redis, and
 * its cost is a table lookup; a key nobody asked for since MS_WATCH_IDLE_S is dropped.
 */
#ifndef MS_WATCH_H
#define MS_WATCH_H

#include <lua.h>
#include <uv.h>

#define MS_WATCH_MAX_KEYS 64 /* distinct keys one watch reads; more are a script error */
#define MS_WATCH_IDLE_S   60

typedef struct ms_watch ms_watch_t;

/* Connects to url (redis://... or unix://...). NULL with *err on a bad URL. */
ms_watch_t *ms_watch_new(uv_loop_t *loop, const char *url, char **err);
void ms_watch_free(ms_watch_t *w);

/* Reads every key scripts asked for (call once per tick). */
void ms_watch_refresh(ms_watch_t *w);

/* Pushes ctx.redis for a script's state L: {len = function(key), get = function(key),
 * connected = bool}. The functions raise on a bad key or past MS_WATCH_MAX_KEYS keys. */
void ms_watch_push(ms_watch_t *w, lua_State *L);

#endif
