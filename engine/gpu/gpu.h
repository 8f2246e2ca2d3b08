/*
 * gpu: the controller's view of the host's GPUs — discovery at run time, placement of replicas
 * onto devices, and per-device metrics. See docs/gpu.md.
 *
 * Discovery dlopens the CUDA runtime (device count, PCI bus ids) and NVML (names, memory,
 * utilization): there is no link-time CUDA dependency, and a host without a GPU, without the
 * libraries or with a failing driver simply has zero devices (logged once, at discovery).
 * MOONSERVE_FAKE_GPUS replaces all of that with described devices, for tests.
 *
 * Discovery blocks (library loading, driver start-up): call it once at start-up, before the
 * loop. Sampling is a few NVML calls per device (or one small file read in fake mode): cheap
 * enough for once per control-loop tick. Nothing here is thread-safe; the controller's loop
 * thread owns it all.
 */
#ifndef MS_GPU_H
#define MS_GPU_H

#include <jansson.h>
#include <lua.h>
#include <stddef.h>
#include <stdint.h>

#include "core/core.h"

#define MS_GPU_MAX_DEVICES 64
/* Fixed-point GPU shares: 1 GPU = 10000 units, so 4 x 0.25 is exactly 1. */
#define MS_GPU_UNITS 10000
/* Room for a pending reason or a request error, NUL included. */
#define MS_GPU_REASON_MAX 320

typedef enum { MS_GPU_SOURCE_NONE, MS_GPU_SOURCE_CUDA, MS_GPU_SOURCE_FAKE } ms_gpu_source_t;

/* One device as discovered, with its latest sample. `index` is the position in the controller's
 * list (CUDA's ordinal as the controller sees it). */
typedef struct ms_gpu_device {
    int index;
    char name[96];
    uint64_t memory_total_bytes;
    /* From the latest ms_gpu_sample; has_sample is 0 until a sample succeeded (no NVML, a failed
     * read): utilization and memory_used_bytes are then unknown, not zero. */
    int has_sample;
    double utilization; /* 0..1, the fraction of the last sample period a kernel ran */
    uint64_t memory_used_bytes;
} ms_gpu_device_t;

typedef struct ms_gpu ms_gpu_t;

/* Where discovery looks. NULL fields take the defaults (the environment and the usual library
 * names); tests point them elsewhere. */
typedef struct ms_gpu_options {
    int ignore_env;            /* 1: read no MOONSERVE_FAKE_* variables */
    const char *fake_spec;     /* a MOONSERVE_FAKE_GPUS value (wins over the environment) */
    const char *fake_metrics;  /* a MOONSERVE_FAKE_GPU_METRICS path */
    const char *const *cudart; /* NULL-terminated dlopen names of the CUDA runtime */
    const char *const *nvml;   /* NULL-terminated dlopen names of NVML */
} ms_gpu_options_t;

/* Discovers the GPUs: the fake spec when one is set, else CUDA. Logs one line either way ("2 GPUs:
 * 0 NVIDIA H100 (81559 MiB), ..." or "no GPU found (libcudart not loadable: ...); replicas run
 * on CPU"). Returns NULL with *err (malloc'd) only for a malformed fake spec; no GPU is not an
 * error (0 devices). `opts` may be NULL. */
ms_gpu_t *ms_gpu_discover(const ms_gpu_options_t *opts, char **err);
void ms_gpu_free(ms_gpu_t *g);

/* Parses a MOONSERVE_FAKE_GPUS value into out[] (at most `cap`): comma-separated entries
 * `[COUNTx]NAME:MEMORY_MIB`, e.g. "2xA100:81920,T4:16384", or "none" for zero devices. Returns the
 * device count, or -1 with a message in err ("MOONSERVE_FAKE_GPUS entry 2 \"T4\": expected
 * NAME:MEMORY_MIB, e.g. A100:81920"). */
int ms_gpu_parse_fake(const char *spec, ms_gpu_device_t *out, int cap, char *err, size_t errcap);

ms_gpu_source_t ms_gpu_source(const ms_gpu_t *g);
const char *ms_gpu_source_name(const ms_gpu_t *g); /* "cuda", "fake" or "none" */
/* Why there are no devices ("libcudart not loadable: ..."), or "" when there are. */
const char *ms_gpu_message(const ms_gpu_t *g);
int ms_gpu_count(const ms_gpu_t *g);
const ms_gpu_device_t *ms_gpu_device(const ms_gpu_t *g, int index);

/* Refreshes every device's utilization and memory in use (NVML, or the fake metrics file re-read
 * each time). A failing read leaves that device without a sample and logs once until it reads
 * again. */
void ms_gpu_sample(ms_gpu_t *g);

/* ---- placement ------------------------------------------------------------------------------
 * A pool keeps what is reserved on each device. A request below 1 GPU takes that share of one
 * device (best fit: the device left fullest that still fits, then the lowest index); a request
 * of N >= 1 (whole numbers only) takes N devices nobody holds any share of, lowest indices first.
 * `memory_bytes` (0: none) is reserved on each device taken, against its total memory. Nothing is
 * ever over-committed. Each call is O(devices). */
typedef struct ms_gpu_pool ms_gpu_pool_t;

typedef struct ms_gpu_request {
    double num_gpus;       /* ray_actor_options.num_gpus: 0 (no GPU), a fraction, or a whole N */
    uint64_t memory_bytes; /* ray_actor_options.memory: GPU memory needed on each device */
} ms_gpu_request_t;

typedef struct ms_gpu_placement {
    int n_devices; /* 0: no GPU (num_gpus was 0) */
    int devices[MS_GPU_MAX_DEVICES];
    int64_t units;         /* share held on each device, in MS_GPU_UNITS */
    uint64_t memory_bytes; /* memory held on each device */
} ms_gpu_placement_t;

/* Checks a request on its own: num_gpus finite, >= 0, at least 0.0001 when positive, and a whole
 * number from 1 up. Returns 0, or -1 with a message ("num_gpus 1.5: above 1 it must be a whole
 * number of GPUs"). For config validation. */
int ms_gpu_request_check(const ms_gpu_request_t *req, char *err, size_t cap);

/* The pool borrows `g` (it must outlive the pool) and starts with nothing reserved. */
ms_gpu_pool_t *ms_gpu_pool_new(const ms_gpu_t *g);
void ms_gpu_pool_free(ms_gpu_pool_t *p);

/* Places `req`. Returns 0 with *out filled and the share reserved (num_gpus 0 places on no
 * device), 1 when it does not fit now (reason: "needs 0.5 GPU, 0.25 free (device 0: 0.75 used)"
 * — the replica stays pending; try again after a release), or -1 for a request that can never be
 * valid (reason: the ms_gpu_request_check message). */
int ms_gpu_pool_place(ms_gpu_pool_t *p, const ms_gpu_request_t *req, ms_gpu_placement_t *out,
                      char reason[MS_GPU_REASON_MAX]);
/* Frees what `pl` holds (a stopped replica) and zeroes it; a zeroed placement is a no-op. */
void ms_gpu_pool_release(ms_gpu_pool_t *p, ms_gpu_placement_t *pl);
/* The share held on a device, in MS_GPU_UNITS, and the memory reserved there. */
int64_t ms_gpu_pool_used_units(const ms_gpu_pool_t *p, int index);
uint64_t ms_gpu_pool_reserved_bytes(const ms_gpu_pool_t *p, int index);

/* The CUDA_VISIBLE_DEVICES value for a replica holding `pl` ("0", "0,1"; malloc'd). When the
 * controller itself was started with CUDA_VISIBLE_DEVICES, its entries are translated, so the
 * child sees exactly the devices the controller calls by these indices. A placement on no device
 * gives "" (hide every GPU from a CPU replica). */
char *ms_gpu_visible_devices(const ms_gpu_t *g, const ms_gpu_placement_t *pl);

/* ---- export -------------------------------------------------------------------------------- */

/* [{"index": 0, "name": "A100", "utilization": 0.4, "memory_used_bytes": N,
 *   "memory_total_bytes": N}, ...]; utilization and memory_used_bytes are null without a sample.
 * With a pool, each entry also has "allocated" (GPUs' worth held, e.g. 0.75) and
 * "memory_reserved_bytes". New reference. */
json_t *ms_gpu_devices_json(const ms_gpu_t *g, const ms_gpu_pool_t *p);
/* A placement's device indices, [0] or [0, 1] ([] for none), for a replica's "gpu_ids". */
json_t *ms_gpu_placement_json(const ms_gpu_placement_t *pl);

/* Fills the Lua table at `idx` in place as the list ctx.gpus = {{index = 0, name = "A100",
 * utilization = 0.4, memory_used_bytes = N, memory_total_bytes = N}, ...} (1-based list; the
 * unknown fields nil), reusing the entry tables it already holds and cutting any left over. */
void ms_gpu_lua_fill(lua_State *L, int idx, const ms_gpu_t *g);
/* Pushes a placement's device indices as a list, {0} or {0, 1}, for ctx.replica_gpu_ids[id]. */
void ms_gpu_lua_push_ids(lua_State *L, const ms_gpu_placement_t *pl);

/* Appends the Prometheus lines moonserve_gpu_utilization, moonserve_gpu_memory_used_bytes and
 * moonserve_gpu_memory_total_bytes (labels gpu, name), with their TYPE lines; a device without a
 * sample has only its total. Nothing at all without devices. */
void ms_gpu_metrics_text(const ms_gpu_t *g, ms_buf_t *b);

#endif
