/*
 * Unit tests for the autoscale module, all deterministic: every decision gets its `now` from the
 * test, nothing sleeps. Covers the built-in policy and Ray Serve's wrapper (delays, N -> 1 -> 0,
 * cold start, factors, bounds, look-back aggregation), custom deployment-level and
 * application-level policies, failures of every kind falling back to the built-in, dry_run, hot
 * reload, custom metrics, the policies in examples/policies, and replays of the cases of Ray
 * Serve's own test_autoscaling_policy.py.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "autoscale/autoscale.h"
#include "policy/policy.h"
#include "autoscale/internal.h"
#include "core/core.h"
#include "test.h"

#define BUDGET_US 20000.0
#define MEM_LIMIT (8u << 20)

/* ---- helpers -------------------------------------------------------------------------------- */

static ms_autoscaling_config_t base_config(void)
{
    return (ms_autoscaling_config_t){
        .min_replicas = 1,
        .initial_replicas = -1,
        .max_replicas = 10,
        .target_ongoing_requests = 2,
        .metrics_interval_s = 10,
        .look_back_period_s = 30,
        .smoothing_factor = 1,
        .upscale_smoothing_factor = -1,
        .downscale_smoothing_factor = -1,
        .upscaling_factor = -1,
        .downscaling_factor = -1,
        .downscale_delay_s = 600,
        .downscale_to_zero_delay_s = -1,
        .upscale_delay_s = 30,
        .aggregation_function = "mean",
    };
}

/* Delays off: decisions act on the tick they are made. */
static ms_autoscaling_config_t quick_config(void)
{
    ms_autoscaling_config_t c = base_config();
    c.upscale_delay_s = 0;
    c.downscale_delay_s = 0;
    return c;
}

static char *write_file(const char *text)
{
    char *path = strdup("/tmp/ms_test_autoscale_XXXXXX.lua");
    int fd = mkstemps(path, 4);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) {
        perror("write_file");
        exit(2);
    }
    close(fd);
    return path;
}

static void rewrite_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static char *example_path(const char *name)
{
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/examples/policies/%s", MS_SOURCE_DIR, name);
    return b.data;
}

static ms_config_lua_ref_t make_ref(char *file, const char *attr)
{
    return (ms_config_lua_ref_t){.path = file, .file = file, .attr = (char *)attr};
}

static ms_autoscaler_t *new_as(const char *name, const ms_autoscaling_config_t *c)
{
    char *err = NULL;
    ms_autoscaler_t *a = ms_autoscaler_new("app", name, c, BUDGET_US, MEM_LIMIT, &err);
    if (!a)
        fprintf(stderr, "autoscaler_new: %s\n", err);
    free(err);
    return a;
}

/* Records `running` replicas r0..r(n-1), each with `per_replica` requests in flight. */
static void record(ms_autoscaler_t *a, double now, int running, double per_replica, double queued,
                   json_t *custom)
{
    static const char *ids[] = {"r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"};
    double reqs[8];
    for (int i = 0; i < 8; i++)
        reqs[i] = per_replica;
    ms_autoscale_sample_t s = {now, running, (size_t)running, ids, reqs, queued, 0, custom};
    ms_autoscaler_record(a, &s);
}

static int decide(ms_autoscaler_t *a, double now, int current, ms_autoscale_decision_t *d)
{
    ms_autoscale_decision_t local;
    return ms_autoscaler_decide(a, now, current, d ? d : &local);
}

/* A field of a's status; the status lives until the next call (NULL frees it). */
static json_t *status_field(ms_autoscaler_t *a, const char *key)
{
    static json_t *st;
    json_decref(st);
    st = a ? ms_autoscaler_status(a) : NULL;
    return st ? json_object_get(st, key) : NULL;
}

/* A field of a's policy script object (failures, last_error, ...), valid as status_field's. */
static json_t *script_field(ms_autoscaler_t *a, const char *key)
{
    return json_object_get(status_field(a, "policy"), key);
}

/* Reloads one policy script through the core: prepare and commit (or nothing). */
static int reload_one(struct ms_policy *p, json_t **info)
{
    json_t *scripts = NULL;
    int ok = ms_policy_reload_now(&p, 1, &scripts);
    if (info)
        *info = json_incref(json_array_get(scripts, 0));
    json_decref(scripts);
    return ok ? 0 : -1;
}

/* ---- the built-in policy and the wrapper ---------------------------------------------------- */

static void test_upscale_delay(void)
{
    ms_autoscaling_config_t c = base_config();
    ms_autoscaler_t *a = new_as("up", &c);
    ms_autoscale_decision_t d;
    record(a, 0, 1, 6, 0, NULL); /* 6 requests at 2 per replica: 3 wanted */
    ASSERT_INT_EQ(decide(a, 100, 1, &d), 1);
    ASSERT_TRUE(d.raw_target == 3.0);
    ASSERT_CONTAINS(d.reason, "waiting");
    ASSERT_INT_EQ(decide(a, 110, 1, NULL), 1);
    ASSERT_INT_EQ(decide(a, 129.9, 1, NULL), 1);
    ASSERT_INT_EQ(decide(a, 130, 1, &d), 3);
    ASSERT_CONTAINS(d.reason, "upscale 1 -> 3 after upscale_delay_s 30s");
    ASSERT_INT_EQ(d.applied, 1);

    /* A change of direction restarts the clock. */
    ASSERT_INT_EQ(decide(a, 200, 1, NULL), 1); /* up run starts at 200 */
    record(a, 200, 1, 0, 0, NULL);
    ms_autoscaler_decide(a, 260, 5, &d); /* load gone: down run starts, the up run is over */
    record(a, 261, 1, 6, 0, NULL);
    ASSERT_INT_EQ(decide(a, 280, 1, NULL), 1); /* up again: a fresh 30 s from 280 */
    ASSERT_INT_EQ(decide(a, 300, 1, NULL), 1);
    ASSERT_INT_EQ(decide(a, 310, 1, NULL), 3);
    ASSERT_INT_EQ(ms_autoscaler_initial_replicas(a), 1);
    ms_autoscaler_free(a);
}

static void test_downscale_delay(void)
{
    ms_autoscaling_config_t c = base_config();
    ms_autoscaler_t *a = new_as("down", &c);
    record(a, 0, 3, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 100, 3, NULL), 3);
    ASSERT_INT_EQ(decide(a, 699, 3, NULL), 3);
    ms_autoscale_decision_t d;
    ASSERT_INT_EQ(decide(a, 700, 3, &d), 1); /* min_replicas 1 */
    ASSERT_CONTAINS(d.reason, "downscale 3 -> 1 after downscale_delay_s 600s");

    /* The target moved by someone else mid-run: the delay starts over from the new target. */
    ASSERT_INT_EQ(decide(a, 800, 3, NULL), 3);
    ASSERT_INT_EQ(decide(a, 1000, 2, NULL), 2);
    ASSERT_INT_EQ(decide(a, 1400, 2, NULL), 2);
    ASSERT_INT_EQ(decide(a, 1600, 2, NULL), 1);
    ms_autoscaler_free(a);
}

static void test_down_to_zero(void)
{
    ms_autoscaling_config_t c = base_config();
    c.min_replicas = 0;
    c.downscale_to_zero_delay_s = 60;
    ms_autoscaler_t *a = new_as("zero", &c);
    record(a, 0, 3, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 100, 3, NULL), 3);
    ASSERT_INT_EQ(decide(a, 700, 3, NULL), 1); /* N -> 1 first, after downscale_delay_s */
    record(a, 701, 1, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 701, 1, NULL), 1); /* 1 -> 0 run starts */
    ASSERT_INT_EQ(decide(a, 760.5, 1, NULL), 1);
    ms_autoscale_decision_t d;
    ASSERT_INT_EQ(decide(a, 761, 1, &d), 0);
    ASSERT_CONTAINS(d.reason, "downscale_to_zero_delay_s 60s");
    ms_autoscaler_free(a);

    /* Without downscale_to_zero_delay_s, 1 -> 0 waits downscale_delay_s. */
    c.downscale_to_zero_delay_s = -1;
    a = new_as("zero2", &c);
    record(a, 0, 1, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 0, 1, NULL), 1);
    ASSERT_INT_EQ(decide(a, 599, 1, NULL), 1);
    ASSERT_INT_EQ(decide(a, 600, 1, NULL), 0);
    ms_autoscaler_free(a);
}

static void test_cold_start(void)
{
    ms_autoscaling_config_t c = base_config();
    c.min_replicas = 0;
    ms_autoscaler_t *a = new_as("cold", &c);
    ms_autoscale_decision_t d;
    record(a, 0, 0, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 0, 0, NULL), 0); /* idle at zero stays at zero */
    record(a, 1, 0, 0, 1, NULL);             /* one request queued */
    ASSERT_INT_EQ(decide(a, 1, 0, &d), 1);   /* at once, despite upscale_delay_s 30 */
    ASSERT_CONTAINS(d.reason, "cold start 0 -> 1");
    ms_autoscaler_free(a);

    /* Replicas already starting (target 3, none running) are not scaled down by a small queue. */
    a = new_as("cold1", &c);
    record(a, 0, 0, 0, 1, NULL);
    ASSERT_INT_EQ(decide(a, 0, 3, NULL), 3);
    ms_autoscaler_free(a);

    /* A larger queue still starts ceil(1 * upscaling_factor) = 1: the policy is left out (its
     * answer would be ceil(9 / 2) = 5); once a replica runs, the policy takes over. */
    a = new_as("cold2", &c);
    record(a, 0, 0, 0, 9, NULL);
    ASSERT_INT_EQ(decide(a, 0, 0, &d), 1);
    ASSERT_TRUE(d.raw_target == 1.0);
    ms_autoscaler_free(a);
    c.upscaling_factor = 3;
    a = new_as("cold3", &c);
    record(a, 0, 0, 0, 1, NULL);
    ASSERT_INT_EQ(decide(a, 0, 0, NULL), 3);
    ms_autoscaler_free(a);

    /* Custom policies get the cold start too, without being called: this one always wants zero,
     * and a second one always fails, yet no failure is counted at the cold start. */
    char *path = write_file("return { zero = function(ctx) return 0 end,\n"
                            "         fail = function(ctx) error('called') end }\n");
    ms_config_lua_ref_t ref = make_ref(path, "zero");
    c = base_config();
    c.min_replicas = 0;
    c.policy = &ref;
    a = new_as("cold4", &c);
    record(a, 0, 0, 0, 2, NULL);
    ASSERT_INT_EQ(decide(a, 0, 0, NULL), 1);
    ms_autoscaler_free(a);
    ref.attr = "fail";
    a = new_as("cold5", &c);
    record(a, 0, 0, 0, 2, NULL);
    ASSERT_INT_EQ(decide(a, 0, 0, NULL), 1);
    ASSERT_INT_EQ(json_integer_value(status_field(a, "failures")), 0);
    ms_autoscaler_free(a);
    unlink(path);
    free(path);
}

/* Replicas still starting (none running) with no traffic: the target stays, for any factor and
 * however short the delays, instead of scaling them away before they ever serve. */
static void test_starting_replicas_kept(void)
{
    ms_autoscaling_config_t c = quick_config();
    c.min_replicas = 0;
    c.initial_replicas = 3;
    c.downscale_to_zero_delay_s = 0;
    ms_autoscaler_t *a = new_as("starting", &c);
    ms_autoscale_decision_t d;
    for (int i = 0; i < 50; i++) {
        record(a, i * 0.1, 0, 0, 0, NULL);
        ASSERT_INT_EQ(decide(a, i * 0.1, 3, &d), 3);
    }
    ASSERT_CONTAINS(d.reason, "hold at 3: no replica running");
    /* Once they run, the idle deployment goes down as usual: N -> 1, then 1 -> 0. */
    record(a, 5, 3, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 5, 3, NULL), 1);
    ms_autoscaler_free(a);

    /* A custom policy at zero running replicas: a positive answer is taken at once, an answer of
     * 0 waits for the downscale delay like any downscale. */
    char *path = write_file("return { two = function(ctx) return 2 end,\n"
                            "         zero = function(ctx) return 0 end }\n");
    ms_config_lua_ref_t ref = make_ref(path, "two");
    c = base_config();
    c.min_replicas = 0;
    c.policy = &ref;
    a = new_as("two", &c);
    record(a, 0, 0, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 0, 3, &d), 2);
    ASSERT_CONTAINS(d.reason, "downscale 3 -> 2 at once: no replica running");
    ASSERT_INT_EQ(decide(a, 1, 0, &d), 2);
    ASSERT_CONTAINS(d.reason, "upscale 0 -> 2 at once");
    ms_autoscaler_free(a);
    ref.attr = "zero";
    a = new_as("zero", &c);
    record(a, 0, 0, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 0, 3, NULL), 3);
    ASSERT_INT_EQ(decide(a, 600, 3, NULL), 1);
    ms_autoscaler_free(a);
    unlink(path);
    free(path);
}

static void test_factors(void)
{
    ms_autoscaling_config_t c = quick_config();
    c.upscaling_factor = 0.5;
    c.downscaling_factor = 0.5;
    ms_autoscaler_t *a = new_as("factors", &c);
    record(a, 0, 2, 6, 0, NULL); /* 12 requests: 6 wanted, 2 + 0.5 * 4 = 4 */
    ASSERT_INT_EQ(decide(a, 0, 2, NULL), 4);
    record(a, 100, 4, 0.5, 0, NULL); /* 2 requests: 1 wanted, ceil(4 - 0.5 * 3) = 3 */
    ASSERT_INT_EQ(decide(a, 200, 4, NULL), 3);
    ms_autoscaler_free(a);

    /* Smoothing factors stand in when the factors are unset. */
    c = quick_config();
    c.upscale_smoothing_factor = 0.25;
    a = new_as("smoothing", &c);
    record(a, 0, 2, 10, 0, NULL); /* 20 requests: 10 wanted, 2 + 0.25 * 8 = 4 */
    ASSERT_INT_EQ(decide(a, 0, 2, NULL), 4);
    ms_autoscaler_free(a);

    /* The stuck fix: a tiny downscaling factor still takes one step down. */
    c = quick_config();
    c.downscaling_factor = 0.1;
    a = new_as("stuck", &c);
    record(a, 0, 2, 0.5, 0, NULL); /* 1 request: 0.5 wanted, ceil(2 - 0.15) = 2 -> 1 */
    ASSERT_INT_EQ(decide(a, 0, 2, NULL), 1);
    ms_autoscaler_free(a);
}

static void test_bounds(void)
{
    ms_autoscaling_config_t c = quick_config();
    c.min_replicas = 2;
    c.max_replicas = 5;
    ms_autoscaler_t *a = new_as("bounds", &c);
    record(a, 0, 3, 100, 0, NULL);
    ASSERT_INT_EQ(decide(a, 0, 3, NULL), 5);
    record(a, 100, 3, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 200, 3, NULL), 2);
    ms_autoscaler_free(a);
}

/* A target in force outside the bounds (a redeploy changed them) is brought within them at once,
 * as Ray's controller bounds every answer, not after a downscale or upscale delay. */
static void test_target_outside_bounds(void)
{
    ms_autoscaling_config_t c = base_config();
    c.min_replicas = 2;
    c.max_replicas = 5;
    ms_autoscaler_t *a = new_as("outside", &c);
    ms_autoscale_decision_t d;
    record(a, 0, 8, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 0, 8, &d), 5);
    ASSERT_CONTAINS(d.reason, "8 is outside [2, 5]: 5");
    record(a, 1, 1, 0, 0, NULL);
    ASSERT_INT_EQ(decide(a, 1, 1, NULL), 2);
    ms_autoscaler_free(a);
}

static void test_aggregation(void)
{
    const char *fns[] = {"mean", "max", "min"};
    const double want[] = {5, 10, 0};
    for (int i = 0; i < 3; i++) {
        ms_autoscaling_config_t c = quick_config();
        c.look_back_period_s = 10;
        c.aggregation_function = (char *)fns[i];
        ms_autoscaler_t *a = new_as("agg", &c);
        record(a, -20, 1, 100, 0, NULL); /* outside the window by the time of the decision */
        record(a, 0, 1, 0, 0, NULL);
        record(a, 5, 1, 10, 0, NULL); /* 0 for 5 s, then 10 for 5 s */
        ms_autoscale_decision_t d;
        decide(a, 10, 1, &d);
        ASSERT_TRUE(d.total_requests == want[i]);
        if (d.total_requests != want[i])
            fprintf(stderr, "  %s: total_requests %g\n", fns[i], d.total_requests);
        ms_autoscaler_free(a);
    }
}

static ms_app_policy_t *new_app(const char *file, const char *attr, json_t *kwargs, int dry_run);

/* ---- Ray Serve's own cases ------------------------------------------------------------------ */

/*
 * Replays of python/ray/serve/tests/unit/test_autoscaling_policy.py (ray-project/ray master, the
 * wall-clock form), each named after its Ray test. Ray hands the wrapped policy a ctx built by
 * hand: current_num_replicas, target_num_replicas and total_num_requests, one control-loop tick
 * (0.1 s of a fake clock) per call. Here each tick records one sample just before `now`, alone in
 * a look-back window shorter than the gap, so total_num_requests is exactly the given number.
 * Ray's wrapper leaves the bounds to the controller (apply_bounds after the policy); this engine
 * applies them in the same decision, so where Ray's test reads the wrapper's unbounded answer the
 * replay checks the bounded target and the raw answer.
 */
#define RAY_MAX_REPLICAS 32
#define RAY_LOOK_BACK_S  0.0005

static ms_autoscaling_config_t ray_config(int min, int max)
{
    ms_autoscaling_config_t c = base_config();
    c.min_replicas = min;
    c.max_replicas = max;
    c.look_back_period_s = RAY_LOOK_BACK_S;
    return c;
}

/* Ray's fake clock: tick k is k / 10 s (a division, as there, not k * 0.1). */
static double ray_now(int tick)
{
    return 1000.0 + tick / 10.0;
}

static int ray_decide(ms_autoscaler_t *a, double now, int current, double total, int target,
                      ms_autoscale_decision_t *d)
{
    static char names[RAY_MAX_REPLICAS][8];
    const char *ids[RAY_MAX_REPLICAS];
    double zero[RAY_MAX_REPLICAS] = {0};
    for (int i = 0; i < current && i < RAY_MAX_REPLICAS; i++) {
        snprintf(names[i], sizeof names[i], "r%d", i);
        ids[i] = names[i];
    }
    ms_autoscale_sample_t s = {now - 0.001, current, (size_t)current, ids, zero, total, 0, NULL};
    ms_autoscaler_record(a, &s);
    return decide(a, now, target, d);
}

/* One replayed tick on the fake clock. */
static int ray_step(ms_autoscaler_t *a, int *tick, int current, double total, int target)
{
    return ray_decide(a, ray_now((*tick)++), current, total, target, NULL);
}

/* `n` ticks that must all answer `want`: the index of the first that does not, or -1. */
static int ray_hold(ms_autoscaler_t *a, int *tick, int n, int current, double total, int target,
                    int want)
{
    for (int i = 0; i < n; i++)
        if (ray_step(a, tick, current, total, target) != want)
            return i;
    return -1;
}

/* _run_upscale_downscale_flow: up after upscale_delay_s, down to 1 after downscale_delay_s, 1 -> 0
 * after the zero delay, and each run interrupted halfway by the other direction starting over.
 * Wait counts are ceil(delay_s * 10) ticks, as there. */
static void ray_flow(ms_autoscaler_t *a, const ms_autoscaling_config_t *c, double overload,
                     int start, int up_target)
{
    int up = (int)ceil(c->upscale_delay_s * 10), down = (int)ceil(c->downscale_delay_s * 10);
    double zero_s =
        c->downscale_to_zero_delay_s > 0 ? c->downscale_to_zero_delay_s : c->downscale_delay_s;
    int zero = (int)ceil(zero_s * 10), ut = up_target, t = 0;
    ASSERT_INT_EQ(ray_hold(a, &t, up, start, overload, start, start), -1);
    ASSERT_INT_EQ(ray_step(a, &t, start, overload, start), ut);
    ASSERT_INT_EQ(ray_hold(a, &t, down, ut, 0, ut, ut), -1);
    ASSERT_INT_EQ(ray_step(a, &t, ut, 0, ut), 1);
    ASSERT_INT_EQ(ray_hold(a, &t, zero, 1, 0, 1, 1), -1);
    ASSERT_INT_EQ(ray_step(a, &t, 1, 0, 1), 0);

    ASSERT_INT_EQ(ray_hold(a, &t, up / 2, 1, overload, 1, 1), -1);
    ray_step(a, &t, 1, 0, 1); /* interrupted by a scale-down decision */
    ASSERT_INT_EQ(ray_hold(a, &t, up, 1, overload, 1, 1), -1);
    ASSERT_INT_EQ(ray_step(a, &t, 1, overload, 1), ut);

    ASSERT_INT_EQ(ray_hold(a, &t, down / 2, ut, 0, ut, ut), -1);
    ray_step(a, &t, ut, overload, ut); /* interrupted by a scale-up decision */
    ASSERT_INT_EQ(ray_hold(a, &t, down, ut, 0, ut, ut), -1);
    ASSERT_INT_EQ(ray_step(a, &t, ut, 0, ut), 1);

    ASSERT_INT_EQ(ray_hold(a, &t, zero / 2, 1, 0, 1, 1), -1);
    ray_step(a, &t, 1, overload, 1); /* interrupted by a scale-up decision */
    ASSERT_INT_EQ(ray_hold(a, &t, zero, 1, 0, 1, 1), -1);
    ASSERT_INT_EQ(ray_step(a, &t, 1, 0, 1), 0);
}

/* Ray parametrises the factor tests over which spelling sets the factor: (smoothing, factor). */
static const int ray_factor_spellings[3][2] = {{1, 1}, {1, 0}, {0, 1}};

static void set_up_factor(ms_autoscaling_config_t *c, const int spelling[2], double f)
{
    c->upscale_smoothing_factor = spelling[0] ? f : -1;
    c->upscaling_factor = spelling[1] ? f : -1;
}

static void set_down_factor(ms_autoscaling_config_t *c, const int spelling[2], double f)
{
    c->downscale_smoothing_factor = spelling[0] ? f : -1;
    c->downscaling_factor = spelling[1] ? f : -1;
}

/* TestReplicaQueueLengthPolicy.test_scaling_factor_scale_up_from_0_replicas */
static void test_ray_scale_up_from_0(void)
{
    for (int k = 0; k < 3; k++) {
        ms_autoscaling_config_t c = ray_config(0, 2);
        set_up_factor(&c, ray_factor_spellings[k], 10);
        ms_autoscaler_t *a = new_as("ray_up_from_0", &c);
        ms_autoscale_decision_t d;
        /* 1 * 10: Ray's wrapper answers 10, its controller bounds it to max_replicas 2. */
        ASSERT_INT_EQ(ray_decide(a, ray_now(0), 0, 1, 0, &d), 2);
        ASSERT_TRUE(d.raw_target == 10.0);
        ms_autoscaler_free(a);
        set_up_factor(&c, ray_factor_spellings[k], 0.5);
        a = new_as("ray_up_from_0", &c);
        ASSERT_INT_EQ(ray_decide(a, ray_now(0), 0, 1, 0, NULL), 1); /* ceil(1 * 0.5) */
        ms_autoscaler_free(a);
    }
}

/* TestReplicaQueueLengthPolicy.test_scaling_factor_scale_down_to_0_replicas */
static void test_ray_scale_down_to_0(void)
{
    for (int k = 0; k < 3; k++) {
        ms_autoscaling_config_t c = ray_config(0, 5);
        set_down_factor(&c, ray_factor_spellings[k], 10);
        c.upscale_delay_s = 0;
        c.downscale_delay_s = 0;
        ms_autoscaler_t *a = new_as("ray_down_to_0", &c);
        int t = 0;
        ASSERT_INT_EQ(ray_step(a, &t, 5, 0, 5), 1); /* downscaling to 0 first stops at 1 */
        ASSERT_INT_EQ(ray_step(a, &t, 1, 0, 1), 0);
        ms_autoscaler_free(a);

        /* A factor below 1 must not get stuck above zero. */
        set_down_factor(&c, ray_factor_spellings[k], 0.2);
        a = new_as("ray_down_to_0", &c);
        int n = 5;
        for (int i = 0; i < 5; i++)
            n = ray_step(a, &t, n, 0, n);
        ASSERT_INT_EQ(n, 0);
        ms_autoscaler_free(a);
    }
}

/* TestReplicaQueueLengthPolicy.test_upscale_downscale_delay[None] and [300] */
static void test_ray_upscale_downscale_delay(void)
{
    const double zero_delays[] = {-1, 300};
    for (int k = 0; k < 2; k++) {
        ms_autoscaling_config_t c = ray_config(0, 2);
        c.target_ongoing_requests = 1;
        c.upscale_delay_s = 30;
        c.downscale_delay_s = 600;
        c.downscale_to_zero_delay_s = zero_delays[k];
        ms_autoscaler_t *a = new_as("ray_delays", &c);
        /* Scale up when there are 0 replicas and requests waiting. */
        ASSERT_INT_EQ(ray_decide(a, ray_now(-1), 0, 1, 0, NULL), 1);
        ray_flow(a, &c, 2, 1, 2);
        ms_autoscaler_free(a);
    }
}

/* TestReplicaQueueLengthPolicy.test_replicas_delayed_startup */
static void test_ray_replicas_delayed_startup(void)
{
    ms_autoscaling_config_t c = ray_config(1, 200);
    c.upscale_delay_s = 0;
    c.downscale_delay_s = 100000;
    c.target_ongoing_requests = 1;
    ms_autoscaler_t *a = new_as("ray_delayed_startup", &c);
    int t = 0;
    ASSERT_INT_EQ(ray_step(a, &t, 1, 100, 1), 100);
    /* New target is 100, but no new replica finished starting during this tick. */
    ASSERT_INT_EQ(ray_step(a, &t, 1, 100, 100), 100);
    /* Two new replicas started during this tick. */
    ASSERT_INT_EQ(ray_step(a, &t, 3, 123, 100), 123);
    /* Most requests drained and more replicas started: no decrease, because of the delay. */
    ASSERT_INT_EQ(ray_step(a, &t, 4, 10, 123), 123);
    ms_autoscaler_free(a);
}

/* TestReplicaQueueLengthPolicy.test_fluctuating_ongoing_requests[30.0] and [0.0] */
static void test_ray_fluctuating_ongoing_requests(void)
{
    const double delays[] = {30, 0};
    for (int k = 0; k < 2; k++) {
        ms_autoscaling_config_t c = ray_config(1, 10);
        c.upscale_delay_s = c.downscale_delay_s = delays[k];
        c.target_ongoing_requests = 50;
        ms_autoscaler_t *a = new_as("ray_fluctuating", &c);
        int t = 0, wrong = -1;
        for (int trial = 0; trial < 1000 && wrong < 0; trial++) {
            int got = trial % 2 == 0 ? ray_step(a, &t, 1, 100, 1) : ray_step(a, &t, 2, 40, 2);
            int want = trial % 2 == 0 ? (delays[k] > 0 ? 1 : 2) : (delays[k] > 0 ? 2 : 1);
            if (got != want)
                wrong = trial;
        }
        ASSERT_INT_EQ(wrong, -1);
        ms_autoscaler_free(a);
    }
}

/* TestReplicaQueueLengthPolicy.test_single_replica_receives_all_requests[20], [100] and [10] */
static void test_ray_single_replica_receives_all_requests(void)
{
    const double ongoing[] = {20, 100, 10};
    for (int k = 0; k < 3; k++) {
        ms_autoscaling_config_t c = ray_config(1, 50);
        c.target_ongoing_requests = 5;
        c.upscale_delay_s = c.downscale_delay_s = 0;
        ms_autoscaler_t *a = new_as("ray_single", &c);
        ASSERT_INT_EQ(ray_decide(a, ray_now(0), 4, ongoing[k], 4, NULL), (int)(ongoing[k] / 5));
        ms_autoscaler_free(a);
    }
}

/* TestAutoscalingConfigParameters.test_apply_scaling_factors_upscale, _downscale and
 * _stuck_downscale, through a whole decision: the built-in policy answers the desired count
 * (total / target_ongoing_requests), delays off, bounds [1, 30]. */
static void test_ray_apply_scaling_factors(void)
{
    const struct {
        double desired;
        int current;
        double up, down;
        int want;
    } cases[] = {
        {20, 10, 0.5, -1, 15}, /* 10 + 0.5 * (20 - 10) */
        {5, 20, -1, 0.5, 13},  /* ceil(20 - 0.5 * (20 - 5)) = ceil(12.5) */
        {9, 10, -1, 0.5, 9},   /* ceil(9.5) = 10 would be stuck: one lower */
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        ms_autoscaling_config_t c = ray_config(1, 30);
        c.upscaling_factor = cases[k].up;
        c.downscaling_factor = cases[k].down;
        c.upscale_delay_s = c.downscale_delay_s = 0;
        ms_autoscaler_t *a = new_as("ray_factors", &c);
        double total = cases[k].desired * c.target_ongoing_requests;
        ASSERT_INT_EQ(ray_decide(a, ray_now(0), cases[k].current, total, cases[k].current, NULL),
                      cases[k].want);
        ms_autoscaler_free(a);
    }
}

/* TestAutoscalingConfigParameters.test_upscale_delay_respected_with_slow_loop_steps: with
 * 600 ms between ticks, an upscale_delay_s of 100 s fires within one tick after 100 s. */
static void test_ray_upscale_delay_slow_loop(void)
{
    ms_autoscaling_config_t c = ray_config(1, 10);
    c.upscale_delay_s = 100;
    ms_autoscaler_t *a = new_as("ray_slow_loop", &c);
    double start = 1000, fired = -1;
    for (int i = 0; i < 1000 && fired < 0; i++) {
        double now = start + i * 0.6;
        if (ray_decide(a, now, 1, 10, 1, NULL) != 1) /* 10 requests at 2 each: 5 wanted */
            fired = now;
    }
    ASSERT_TRUE(fired - start >= 100 && fired - start <= 100 + 0.6);
    ms_autoscaler_free(a);
}

/* TestAutoscalingConfigParameters.test_apply_delay_logic_upscale */
static void test_ray_delay_logic_upscale(void)
{
    ms_autoscaling_config_t c = ray_config(1, 10);
    c.upscale_delay_s = 0.3;
    ms_autoscaler_t *a = new_as("ray_delay_up", &c);
    double base = 1000;
    for (int i = 0; i < 3; i++)
        ASSERT_INT_EQ(ray_decide(a, base + i * 0.05, 1, 10, 1, NULL), 1);
    ASSERT_INT_EQ(ray_decide(a, base + 0.31, 1, 10, 1, NULL), 5);
    ms_autoscaler_free(a);
}

/* TestAutoscalingConfigParameters.test_apply_delay_logic_downscale */
static void test_ray_delay_logic_downscale(void)
{
    ms_autoscaling_config_t c = ray_config(0, 10);
    c.downscale_to_zero_delay_s = 0.4;
    c.downscale_delay_s = 0.3;
    ms_autoscaler_t *a = new_as("ray_delay_down", &c);
    double base = 1000;
    for (int i = 0; i < 3; i++) /* 4 -> 1 waits downscale_delay_s */
        ASSERT_INT_EQ(ray_decide(a, base + i * 0.05, 4, 0, 4, NULL), 4);
    ASSERT_INT_EQ(ray_decide(a, base + 0.31, 4, 0, 4, NULL), 1);
    double base2 = base + 0.5;
    for (int i = 0; i < 3; i++) /* 1 -> 0 waits downscale_to_zero_delay_s */
        ASSERT_INT_EQ(ray_decide(a, base2 + i * 0.1, 1, 0, 1, NULL), 1);
    ASSERT_INT_EQ(ray_decide(a, base2 + 0.41, 1, 0, 1, NULL), 0);
    ms_autoscaler_free(a);
}

/* Ray's simple_custom_policy: 3 replicas under any load, 0 without. */
static const char *ray_simple_custom_policy =
    "return { simple = function(ctx)\n"
    "  if ctx.total_num_requests > 0 then return 3, {} end\n"
    "  return 0, {}\n"
    "end }\n";

/* TestCustomPolicyWithDefaultParameters.test_upscale_downscale_delay[None] and [300] */
static void test_ray_custom_upscale_downscale_delay(void)
{
    char *path = write_file(ray_simple_custom_policy);
    ms_config_lua_ref_t ref = make_ref(path, "simple");
    const double zero_delays[] = {-1, 300};
    for (int k = 0; k < 2; k++) {
        ms_autoscaling_config_t c = ray_config(0, 4);
        c.target_ongoing_requests = 1;
        c.upscale_delay_s = 20;
        c.downscale_delay_s = 400;
        c.downscale_to_zero_delay_s = zero_delays[k];
        c.policy = &ref;
        ms_autoscaler_t *a = new_as("ray_custom_delays", &c);
        ASSERT_INT_EQ(ray_decide(a, ray_now(-1), 0, 1, 0, NULL), 1);
        ray_flow(a, &c, 70, 1, 3);
        ASSERT_INT_EQ(json_integer_value(status_field(a, "failures")), 0);
        ms_autoscaler_free(a);
    }
    unlink(path);
    free(path);
}

/* TestCustomPolicyWithDefaultParameters.test_apply_scaling_factors (its four cases) */
static void test_ray_custom_apply_scaling_factors(void)
{
    char *path = write_file(ray_simple_custom_policy);
    ms_config_lua_ref_t ref = make_ref(path, "simple");
    const struct {
        int current;
        double total, up, down;
        int want;
    } cases[] = {
        {1, 100, 0.5, -1, 2}, /* ceil(1 + 0.5 * (3 - 1)) */
        {1, 100, 1.0, -1, 3}, /* ceil(1 + 1.0 * (3 - 1)) */
        {3, 0, -1, 0.5, 2},   /* ceil(3 + 0.5 * (0 - 3)) = ceil(1.5) */
        {3, 0, -1, 1.0, 1},   /* max(ceil(3 + 1.0 * (0 - 3)), 1) */
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        ms_autoscaling_config_t c = ray_config(0, 10);
        c.upscaling_factor = cases[k].up;
        c.downscaling_factor = cases[k].down;
        c.upscale_delay_s = c.downscale_delay_s = c.downscale_to_zero_delay_s = 0;
        c.policy = &ref;
        ms_autoscaler_t *a = new_as("ray_custom_factors", &c);
        ASSERT_INT_EQ(
            ray_decide(a, ray_now(0), cases[k].current, cases[k].total, cases[k].current, NULL),
            cases[k].want);
        ms_autoscaler_free(a);
    }
    unlink(path);
    free(path);
}

/* TestWarmupScalingFeedbackLoop.test_no_runaway_scaling_during_warmup[0.5, 1.0, 1.5, 2.0, 10.0]:
 * replicas scheduled but none running yet, no traffic: the target holds for 100 ticks. */
static void test_ray_no_runaway_scaling_during_warmup(void)
{
    const double factors[] = {0.5, 1.0, 1.5, 2.0, 10.0};
    for (int k = 0; k < 5; k++) {
        ms_autoscaling_config_t c = ray_config(2, 10);
        c.target_ongoing_requests = 0.2;
        c.upscaling_factor = factors[k];
        c.upscale_delay_s = 5;
        c.downscale_delay_s = 30;
        ms_autoscaler_t *a = new_as("ray_warmup", &c);
        int t = 0;
        ASSERT_INT_EQ(ray_hold(a, &t, 100, 0, 0, 2, 2), -1);
        ms_autoscaler_free(a);
    }
}

/* TestAppLevelPolicyWithDefaultParameters.test_cold_start_fast_path: an application policy that
 * always asks for 5 still cold-starts each deployment at 1, at once despite the delays. */
static void test_ray_app_cold_start_fast_path(void)
{
    char *path = write_file("return { five = function(ctxs)\n"
                            "  local out = {}\n"
                            "  for name in pairs(ctxs) do out[name] = 5 end\n"
                            "  return out, {}\n"
                            "end }\n");
    ms_app_policy_t *p = new_app(path, "five", NULL, 0);
    ms_autoscaling_config_t c = ray_config(0, 10);
    c.target_ongoing_requests = 10;
    c.upscale_delay_s = 20;
    c.downscale_delay_s = 200;
    ms_autoscaler_t *deps[2] = {new_as("d1", &c), new_as("d2", &c)};
    for (int i = 0; i < 2; i++)
        record(deps[i], ray_now(0) - 0.001, 0, 0, 1, NULL);
    int current[2] = {0, 0};
    ms_autoscale_decision_t out[2];
    ms_app_policy_decide(p, ray_now(0), deps, current, 2, out);
    ASSERT_INT_EQ(out[0].target, 1);
    ASSERT_INT_EQ(out[1].target, 1);
    ASSERT_TRUE(out[0].raw_target == 1.0); /* the policy's 5 is set aside */
    ms_app_policy_free(p);
    ms_autoscaler_free(deps[0]);
    ms_autoscaler_free(deps[1]);
    unlink(path);
    free(path);
}

/* TestAppLevelPolicyStateIsolation.test_shared_user_state_does_not_contaminate_internal_state:
 * one user state table returned for two deployments; each keeps its own delay run (the delay
 * state lives in C per deployment) and the user state stays intact. */
static void test_ray_app_shared_state_isolation(void)
{
    char *path = write_file("local calls = 0\n"
                            "return { f = function(ctxs)\n"
                            "  calls = calls + 1\n"
                            "  if calls > 1 and ctxs.d2.policy_state.counter ~= 5 then\n"
                            "    error('user state lost')\n"
                            "  end\n"
                            "  local shared = ctxs.d1.policy_state\n"
                            "  shared.counter = 5\n"
                            "  local d2 = ctxs.d1.current_time >= 1050 and 3 or 2\n"
                            "  return { d1 = 3, d2 = d2 }, { d1 = shared, d2 = shared }\n"
                            "end }\n");
    ms_app_policy_t *p = new_app(path, "f", NULL, 0);
    ms_autoscaling_config_t c = ray_config(1, 5);
    c.upscale_delay_s = c.downscale_delay_s = 100;
    ms_autoscaler_t *deps[2] = {new_as("d1", &c), new_as("d2", &c)};
    int current[2] = {2, 2};
    ms_autoscale_decision_t out[2];
    const double times[] = {1000, 1050, 1100, 1150};
    const int want_d1[] = {2, 2, 3, 3}, want_d2[] = {2, 2, 2, 3};
    for (int i = 0; i < 4; i++) {
        for (int k = 0; k < 2; k++)
            record(deps[k], times[i] - 0.001, 2, 0, 0, NULL);
        ms_app_policy_decide(p, times[i], deps, current, 2, out);
        ASSERT_INT_EQ(out[0].target, want_d1[i]);
        ASSERT_INT_EQ(out[1].target, want_d2[i]);
        if (out[0].target == 3)
            current[0] = 3;
    }
    json_t *st = ms_app_policy_status(p);
    ASSERT_INT_EQ(json_integer_value(json_object_get(st, "failures")), 0);
    json_decref(st);
    ms_app_policy_free(p);
    ms_autoscaler_free(deps[0]);
    ms_autoscaler_free(deps[1]);
    unlink(path);
    free(path);
}

/* ---- custom deployment-level policies ------------------------------------------------------- */

static const char *counting_policy =
    "local M = {}\n"
    "function M.count(ctx, kwargs)\n"
    "  local s = ctx.policy_state\n"
    "  s.n = (s.n or 0) + 1\n"
    "  if s.n == 2 then return s.n, nil end -- nil keeps the state\n"
    "  return s.n * kwargs.step, s\n"
    "end\n"
    "return M\n";

static void test_custom_state(void)
{
    char *path = write_file(counting_policy);
    ms_config_lua_ref_t ref = make_ref(path, "count");
    ms_autoscaling_config_t c = quick_config();
    c.policy = &ref;
    c.policy_kwargs = json_pack("{s:i}", "step", 2);
    ms_autoscaler_t *a = new_as("custom", &c);
    json_decref(c.policy_kwargs);
    ms_autoscale_decision_t d;
    record(a, 0, 1, 0, 0, NULL);
    decide(a, 1, 1, &d);
    ASSERT_TRUE(d.raw_target == 2);
    decide(a, 2, 1, &d);
    ASSERT_TRUE(d.raw_target == 2);
    decide(a, 3, 1, &d);
    ASSERT_TRUE(d.raw_target == 6); /* n reached 3: the state persisted */
    ASSERT_INT_EQ(json_integer_value(script_field(a, "failures")), 0);
    ms_autoscaler_free(a);
    unlink(path);
    free(path);
}

/* The ctx carries Ray's AutoscalingContext fields. */
static void test_ctx_fields(void)
{
    char *path = write_file(
        "return { check = function(ctx)\n"
        "  assert(ctx.deployment_name == 'Model' and ctx.app_name == 'app')\n"
        "  assert(ctx.current_num_replicas == 2 and ctx.target_num_replicas == 3)\n"
        "  assert(#ctx.running_replicas == 2 and ctx.running_replicas[2] == 'r1')\n"
        "  assert(ctx.total_num_requests == 7 and ctx.total_queued_requests == 1)\n"
        "  assert(ctx.total_running_requests == 6)\n"
        "  assert(ctx.capacity_adjusted_min_replicas == 1)\n"
        "  assert(ctx.capacity_adjusted_max_replicas == 10)\n"
        "  assert(ctx.current_time == 5 and ctx.last_scale_up_time == nil)\n"
        "  assert(ctx.config.target_ongoing_requests == 2 and ctx.config.upscaling_factor == nil)\n"
        "  assert(ctx.policy_state.__decision_timestamp == nil)\n"
        "  assert(next(ctx.aggregated_metrics) == nil and next(ctx.raw_metrics) == nil)\n"
        "  return 3\n"
        "end }\n");
    ms_config_lua_ref_t ref = make_ref(path, "check");
    ms_autoscaling_config_t c = base_config();
    c.policy = &ref;
    ms_autoscaler_t *a = new_as("Model", &c);
    record(a, 0, 2, 3, 1, NULL);
    decide(a, 5, 3, NULL);
    ASSERT_INT_EQ(json_integer_value(script_field(a, "failures")), 0);
    ASSERT_TRUE(json_is_null(script_field(a, "last_error")));
    ms_autoscaler_free(a);
    unlink(path);
    free(path);
}

/* Each failing policy: the built-in decides that tick (6 requests -> 3), the counter goes up and
 * the error is kept as `file:line: message`. */
static void test_custom_failures(void)
{
    struct {
        const char *text, *want;
    } cases[] = {
        {"return { f = function(ctx)\n  error('boom')\nend }\n", ":2: boom"},
        {"return { f = function(ctx)\n  while true do end\nend }\n", "budget exceeded"},
        {"return { f = function(ctx)\n  while true do pcall(function() while true do end end) "
         "end\nend }\n",
         "budget exceeded"},
        /* One piece larger than the cap: refused before anything is allocated, so the memory
         * limit is what stops it however slow the machine (a few 2 MB pieces could still run
         * past the wall-clock budget first under the sanitizers on a loaded machine). */
        {"return { f = function(ctx)\n  local t = {}\n  for i = 1, 1e9 do t[i] = "
         "string.rep('x', 1e7) .. i end\nend }\n",
         "memory limit exceeded"},
        {"return { f = function(ctx) return 'many' end }\n", "as the target"},
        {"return { f = function(ctx) return 0/0 end }\n", "as the target"},
        {"return { f = function(ctx) return 1, 'state' end }\n", "as the state"},
        {"return { f = function(ctx) return os.execute('true') end }\n", "field 'execute'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *path = write_file(cases[i].text);
        ms_config_lua_ref_t ref = make_ref(path, "f");
        ms_autoscaling_config_t c = quick_config();
        c.policy = &ref;
        ms_autoscaler_t *a = new_as("failing", &c);
        record(a, 0, 1, 6, 0, NULL);
        ms_autoscale_decision_t d;
        ASSERT_INT_EQ(decide(a, 0, 1, &d), 3);
        ASSERT_CONTAINS(d.reason, "built-in used");
        ASSERT_INT_EQ(decide(a, 1, 3, NULL), 3);
        ASSERT_INT_EQ(json_integer_value(script_field(a, "failures")), 2);
        const char *err = json_string_value(script_field(a, "last_error"));
        ASSERT_CONTAINS(err, cases[i].want);
        ASSERT_CONTAINS(err, path);
        ms_autoscaler_free(a);
        unlink(path);
        free(path);
    }
}

static void test_load_errors(void)
{
    struct {
        const char *text, *attr, *want;
    } cases[] = {
        {"return { f = function( }", "f", ":1:"},
        {"return { g = function() return 1 end }", "f", "no function 'f'"},
        {"return 42", "f", "must return a table"},
        {"return { f = function() return 1 end, self_test = function()\n  assert(false, 'nope')\n"
         "end }",
         "f", ":2: nope"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *path = write_file(cases[i].text);
        ms_config_lua_ref_t ref = make_ref(path, cases[i].attr);
        ms_autoscaling_config_t c = base_config();
        c.policy = &ref;
        char *err = NULL;
        ms_autoscaler_t *a = ms_autoscaler_new("app", "x", &c, BUDGET_US, MEM_LIMIT, &err);
        ASSERT_TRUE(a == NULL);
        ASSERT_CONTAINS(err, cases[i].want);
        free(err);
        unlink(path);
        free(path);
    }
}

static void test_dry_run(void)
{
    ms_autoscaling_config_t c = quick_config();
    c.dry_run = 1;
    ms_autoscaler_t *a = new_as("dry", &c);
    record(a, 0, 1, 8, 0, NULL);
    ms_autoscale_decision_t d;
    ASSERT_INT_EQ(decide(a, 0, 1, &d), 1);
    ASSERT_INT_EQ(d.target, 4);
    ASSERT_INT_EQ(d.applied, 0);
    ASSERT_CONTAINS(d.reason, "dry_run: upscale 1 -> 4");
    json_t *recent = status_field(a, "recent_decisions");
    ASSERT_INT_EQ(json_array_size(recent), 1);
    ASSERT_INT_EQ(json_integer_value(json_object_get(json_array_get(recent, 0), "target")), 4);
    ASSERT_TRUE(json_is_false(json_object_get(json_array_get(recent, 0), "applied")));
    ms_autoscaler_free(a);
}

static void test_history_ring(void)
{
    ms_autoscaling_config_t c = base_config();
    ms_autoscaler_t *a = new_as("ring", &c);
    record(a, 0, 1, 0, 0, NULL);
    /* The same decision tick after tick is one entry, refreshed. */
    for (int i = 0; i < 3; i++)
        decide(a, i, 1, NULL);
    json_t *recent = status_field(a, "recent_decisions");
    ASSERT_INT_EQ(json_array_size(recent), 1);
    ASSERT_TRUE(json_real_value(json_object_get(json_array_get(recent, 0), "now")) == 2);
    /* Decisions that differ (here: the target in force alternates) each get an entry. */
    for (int i = 0; i < AS_HISTORY + 5; i++)
        decide(a, i, 1 + i % 2, NULL);
    recent = status_field(a, "recent_decisions");
    ASSERT_INT_EQ(json_array_size(recent), AS_HISTORY);
    ASSERT_TRUE(json_real_value(json_object_get(json_array_get(recent, 0), "now")) == 5);
    ASSERT_TRUE(json_real_value(json_object_get(json_array_get(recent, AS_HISTORY - 1), "now")) ==
                AS_HISTORY + 4);
    ms_autoscaler_free(a);
}

/* ---- hot reload ----------------------------------------------------------------------------- */

static void test_reload(void)
{
    char *path = write_file(counting_policy);
    ms_config_lua_ref_t ref = make_ref(path, "count");
    ms_autoscaling_config_t c = quick_config();
    c.policy = &ref;
    c.policy_kwargs = json_pack("{s:i}", "step", 1);
    ms_autoscaler_t *a = new_as("reload", &c);
    json_decref(c.policy_kwargs);
    record(a, 0, 1, 0, 0, NULL);
    decide(a, 1, 1, NULL); /* n = 1 */
    json_t *policy = status_field(a, "policy");
    ASSERT_INT_EQ(json_integer_value(json_object_get(policy, "version")), 1);
    char sha1[65];
    snprintf(sha1, sizeof sha1, "%s", json_string_value(json_object_get(policy, "sha256")));
    ASSERT_INT_EQ(strlen(sha1), 64);

    /* Success: the new code runs with the old state (n continues from 1). */
    rewrite_file(path, "return { count = function(ctx)\n"
                       "  local s = ctx.policy_state\n  s.n = s.n + 1\n  return 10 * s.n, s\n"
                       "end }\n");
    ms_autoscale_decision_t d;
    decide(a, 2, 1, &d);
    ASSERT_TRUE(d.raw_target == 2);
    json_t *info = NULL;
    ASSERT_INT_EQ(reload_one(ms_autoscaler_policy(a), &info), 0);
    ASSERT_TRUE(json_is_true(json_object_get(info, "ok")));
    ASSERT_INT_EQ(json_integer_value(json_object_get(info, "version")), 2);
    ASSERT_TRUE(strcmp(json_string_value(json_object_get(info, "sha256")), sha1) != 0);
    json_decref(info);
    decide(a, 3, 1, &d);
    ASSERT_TRUE(d.raw_target == 30); /* n was 2 before the swap */
    ASSERT_INT_EQ(json_integer_value(json_object_get(status_field(a, "policy"), "version")), 2);

    /* Failures leave version 2 in force. */
    const char *bad[][2] = {
        {"return { count = function( }", ":1:"},
        {"return { other = function() return 1 end }", "no function 'count'"},
        {"return { count = function() return 1 end,\n"
         "  self_test = function() error('self test broke') end }",
         ":2: self test broke"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        rewrite_file(path, bad[i][0]);
        info = NULL;
        ASSERT_INT_EQ(reload_one(ms_autoscaler_policy(a), &info), -1);
        ASSERT_TRUE(json_is_false(json_object_get(info, "ok")));
        ASSERT_CONTAINS(json_string_value(json_object_get(info, "error")), bad[i][1]);
        ASSERT_INT_EQ(json_integer_value(json_object_get(info, "version")), 2);
        ASSERT_CONTAINS(json_string_value(script_field(a, "last_reload_error")), bad[i][1]);
        json_decref(info);
        decide(a, 4 + (double)i, 1, &d);
        ASSERT_TRUE(d.raw_target == 40 + 10 * (double)i);
    }

    ASSERT_INT_EQ(json_integer_value(json_object_get(status_field(a, "policy"), "version")), 2);
    ms_autoscaler_free(a);
    unlink(path);
    free(path);
}

/* The built-in policy reloads too (lua/autoscaling.lua), keeping its version count. */
static void test_reload_builtin(void)
{
    ms_autoscaling_config_t c = base_config();
    ms_autoscaler_t *a = new_as("builtin", &c);
    json_t *policy = status_field(a, "policy");
    ASSERT_TRUE(json_is_true(json_object_get(policy, "builtin")));
    ASSERT_STR_EQ(json_string_value(json_object_get(policy, "function")), AS_BUILTIN_FUNCTION);
    ASSERT_INT_EQ(reload_one(ms_autoscaler_policy(a), NULL), 0);
    ASSERT_INT_EQ(json_integer_value(json_object_get(status_field(a, "policy"), "version")), 2);
    ms_autoscaler_free(a);
}

/* ---- custom metrics ------------------------------------------------------------------------- */

static void test_custom_metrics(void)
{
    char *path =
        write_file("return { f = function(ctx)\n"
                   "  local agg = ctx.aggregated_metrics.cpu\n"
                   "  local raw = ctx.raw_metrics.cpu\n"
                   "  assert(agg.r0 == 60 and agg.r1 == 20, 'agg ' .. tostring(agg.r0))\n"
                   "  assert(#raw.r0 == 2 and raw.r0[1][1] == 0 and raw.r0[2][2] == 80)\n"
                   "  assert(#raw.r1 == 1 and raw.r1[1][2] == 20)\n"
                   "  assert(ctx.aggregated_metrics.cpu.r9 == nil, 'a replica gone is dropped')\n"
                   "  return #raw.r0\n"
                   "end }\n");
    ms_config_lua_ref_t ref = make_ref(path, "f");
    ms_autoscaling_config_t c = quick_config();
    c.policy = &ref;
    ms_autoscaler_t *a = new_as("metrics", &c);
    json_t *m1 =
        json_pack("{s:{s:i}, s:{s:i}, s:{s:i}}", "r0", "cpu", 40, "r1", "cpu", 20, "r9", "cpu", 99);
    json_t *m2 = json_pack("{s:{s:i, s:s}}", "r0", "cpu", 80, "note", "not a number");
    record(a, 0, 2, 0, 0, m1);
    record(a, 10, 2, 0, 0, m2); /* r0: 40 for 10 s, then 80 for 10 s */
    json_decref(m1);
    json_decref(m2);
    ms_autoscale_decision_t d;
    decide(a, 20, 2, &d);
    ASSERT_INT_EQ(json_integer_value(script_field(a, "failures")), 0);
    ASSERT_TRUE(json_is_null(script_field(a, "last_error")) ||
                (fprintf(stderr, "  %s\n", json_string_value(script_field(a, "last_error"))), 0));
    ASSERT_TRUE(d.raw_target == 2);
    ms_autoscaler_free(a);
    unlink(path);
    free(path);
}

/* ---- application level ---------------------------------------------------------------------- */

static ms_app_policy_t *new_app(const char *file, const char *attr, json_t *kwargs, int dry_run)
{
    ms_config_lua_ref_t ref = make_ref((char *)file, attr);
    char *err = NULL;
    ms_app_policy_t *p =
        ms_app_policy_new("app", &ref, kwargs, dry_run, BUDGET_US, MEM_LIMIT, &err);
    if (!p)
        fprintf(stderr, "app_policy_new: %s\n", err);
    free(err);
    return p;
}

static void test_app_policy(void)
{
    char *path = example_path("coordinated.lua");
    ms_app_policy_t *p = new_app(path, "coordinated_scaling_policy", NULL, 0);
    ASSERT_TRUE(p != NULL);
    ms_autoscaling_config_t c = quick_config();
    ms_autoscaler_t *deps[3] = {new_as("Preprocessor", &c), new_as("Model", &c),
                                new_as("Other", &c)};
    record(deps[0], 0, 1, 5, 20, NULL); /* queue depth 25 -> 3 preprocessors, 6 models */
    record(deps[1], 0, 1, 0, 0, NULL);
    record(deps[2], 0, 1, 40, 0, NULL); /* busy, but left out by the policy */
    int current[3] = {1, 1, 1};
    ms_autoscale_decision_t out[3];
    ms_app_policy_decide(p, 1, deps, current, 3, out);
    ASSERT_INT_EQ(out[0].target, 3);
    ASSERT_INT_EQ(out[1].target, 6);
    ASSERT_INT_EQ(out[2].target, 1);
    ASSERT_CONTAINS(out[2].reason, "left out");

    /* Each deployment's own bounds apply on top. */
    ms_autoscaling_config_t small = quick_config();
    small.max_replicas = 4;
    ms_autoscaler_free(deps[1]);
    deps[1] = new_as("Model", &small);
    record(deps[1], 0, 1, 0, 0, NULL);
    ms_app_policy_decide(p, 2, deps, current, 2, out);
    ASSERT_INT_EQ(out[1].target, 4);
    json_t *st = ms_app_policy_status(p);
    ASSERT_INT_EQ(json_integer_value(json_object_get(json_object_get(st, "policy"), "failures")),
                  0);
    json_decref(st);
    ms_app_policy_free(p);

    /* dry_run: decided and recorded, nothing applied. */
    json_t *kwargs = json_pack("{s:i}", "requests_per_replica", 5);
    p = new_app(path, "coordinated_scaling_policy", kwargs, 1);
    json_decref(kwargs);
    ms_app_policy_decide(p, 3, deps, current, 2, out);
    ASSERT_INT_EQ(out[0].target, 5);
    ASSERT_INT_EQ(out[0].applied, 0);
    ASSERT_CONTAINS(out[0].reason, "dry_run");
    ms_app_policy_free(p);
    for (int i = 0; i < 3; i++)
        ms_autoscaler_free(deps[i]);
    free(path);
}

static void test_app_policy_state_and_failure(void)
{
    char *path = write_file("local M = {}\n"
                            "function M.f(ctxs)\n"
                            "  local s = ctxs.A.policy_state\n"
                            "  s.n = (s.n or 0) + 1\n"
                            "  if s.n == 3 then error('third call fails') end\n"
                            "  if s.n == 4 then return { A = 'x' } end\n"
                            "  return { A = s.n, B = 2 }, { A = s }\n"
                            "end\n"
                            "return M\n");
    ms_app_policy_t *p = new_app(path, "f", NULL, 0);
    ms_autoscaling_config_t c = quick_config();
    ms_autoscaler_t *deps[2] = {new_as("A", &c), new_as("B", &c)};
    record(deps[0], 0, 1, 6, 0, NULL);
    record(deps[1], 0, 1, 0, 0, NULL);
    int current[2] = {1, 1};
    ms_autoscale_decision_t out[2];
    ms_app_policy_decide(p, 1, deps, current, 2, out);
    ASSERT_TRUE(out[0].raw_target == 1 && out[1].raw_target == 2);
    ms_app_policy_decide(p, 2, deps, current, 2, out);
    ASSERT_TRUE(out[0].raw_target == 2);
    ms_app_policy_decide(p, 3, deps, current, 2, out); /* error: the built-in per deployment */
    ASSERT_TRUE(out[0].raw_target == 3 && out[1].raw_target == 0);
    ASSERT_CONTAINS(out[0].reason, "application policy failed");
    ms_app_policy_decide(p, 4, deps, current, 2, out); /* bad answer: the same */
    ASSERT_TRUE(out[0].raw_target == 3);
    json_t *st = ms_app_policy_status(p);
    ASSERT_INT_EQ(json_integer_value(json_object_get(json_object_get(st, "policy"), "failures")),
                  2);
    ASSERT_CONTAINS(json_string_value(json_object_get(json_object_get(st, "policy"), "last_error")),
                    "bad target for 'A'");
    json_decref(st);

    /* Reload hands the per-deployment state over. */
    rewrite_file(path, "return { f = function(ctxs) return { A = ctxs.A.policy_state.n * 10 } "
                       "end }\n");
    ASSERT_INT_EQ(reload_one(ms_app_policy_policy(p), NULL), 0);
    ms_app_policy_decide(p, 5, deps, current, 2, out);
    ASSERT_TRUE(out[0].raw_target == 40); /* the state held n = 4 (n is kept even on failure) */
    st = ms_app_policy_status(p);
    ASSERT_INT_EQ(json_integer_value(json_object_get(json_object_get(st, "policy"), "version")), 2);
    json_decref(st);
    rewrite_file(path, "return {");
    json_t *info = NULL;
    ASSERT_INT_EQ(reload_one(ms_app_policy_policy(p), &info), -1);
    ASSERT_CONTAINS(json_string_value(json_object_get(info, "error")), path);
    json_decref(info);
    ms_app_policy_free(p);
    ms_autoscaler_free(deps[0]);
    ms_autoscaler_free(deps[1]);
    unlink(path);
    free(path);
}

/* ---- examples/policies ---------------------------------------------------------------------- */

static time_t local_time_at(int hour)
{
    struct tm tm = {.tm_year = 125, .tm_mon = 5, .tm_mday = 4, .tm_hour = hour, .tm_isdst = -1};
    return mktime(&tm);
}

static void test_example_scheduled(void)
{
    char *path = example_path("scheduled.lua");
    ms_config_lua_ref_t ref = make_ref(path, "business_hours");
    ms_autoscaling_config_t c = quick_config();
    c.policy = &ref;
    ms_autoscaler_t *a = new_as("scheduled", &c);
    record(a, 0, 1, 0, 0, NULL);
    ms_autoscale_decision_t d;
    decide(a, (double)local_time_at(10), 1, &d);
    ASSERT_TRUE(d.raw_target == 4);
    decide(a, (double)local_time_at(3), 1, &d);
    ASSERT_TRUE(d.raw_target == 1);
    ASSERT_INT_EQ(json_integer_value(script_field(a, "failures")), 0);
    ms_autoscaler_free(a);
    free(path);
}

static void test_example_custom_metrics(void)
{
    char *path = example_path("custom_metrics.lua");
    ms_config_lua_ref_t ref = make_ref(path, "cpu_policy");
    ms_autoscaling_config_t c = quick_config();
    c.policy = &ref;
    c.policy_kwargs = json_pack("{s:s, s:i}", "metric", "cpu", "target_usage", 50);
    ms_autoscaler_t *a = new_as("cpu", &c);
    json_decref(c.policy_kwargs);
    json_t *m = json_pack("{s:{s:i}, s:{s:i}}", "r0", "cpu", 100, "r1", "cpu", 50);
    record(a, 0, 2, 0, 0, m); /* mean 75% of a 50% target: 2 * 1.5 = 3 */
    json_decref(m);
    ms_autoscale_decision_t d;
    ASSERT_INT_EQ(decide(a, 1, 2, &d), 3);
    ASSERT_TRUE(d.raw_target == 3);
    ms_autoscaler_free(a);
    free(path);
}

static void test_sha256(void)
{
    char hex[65];
    ms_sha256_hex("abc", 3, hex);
    ASSERT_STR_EQ(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    ms_sha256_hex(two, strlen(two), hex);
    ASSERT_STR_EQ(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    ms_sha256_hex("", 0, hex);
    ASSERT_STR_EQ(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

/* Prints the cost of one tick (built-in policy, 8 replicas, a full 30 s window of 0.1 s samples
 * with one custom metric): measured, never asserted. */
static void report_tick_cost(void)
{
    ms_autoscaling_config_t c = base_config();
    ms_autoscaler_t *a = new_as("cost", &c);
    json_t *m = json_pack("{s:{s:f}, s:{s:f}}", "r0", "cpu", 50.0, "r7", "cpu", 70.0);
    for (int i = 0; i < 300; i++)
        record(a, i * 0.1, 8, 2, 1, m);
    json_decref(m);
    int n = 2000;
    uint64_t t0 = ms_now_us();
    for (int i = 0; i < n; i++)
        decide(a, 30, 8, NULL);
    printf("one tick of the built-in policy: %.1f us\n", (double)(ms_now_us() - t0) / n);
    ms_autoscaler_free(a);
}

int main(void)
{
    ms_log_min_level = MS_LOG_ERROR; /* expected policy failures would warn */
    test_sha256();
    test_upscale_delay();
    test_downscale_delay();
    test_down_to_zero();
    test_cold_start();
    test_starting_replicas_kept();
    test_factors();
    test_bounds();
    test_target_outside_bounds();
    test_aggregation();
    test_ray_scale_up_from_0();
    test_ray_scale_down_to_0();
    test_ray_upscale_downscale_delay();
    test_ray_replicas_delayed_startup();
    test_ray_fluctuating_ongoing_requests();
    test_ray_single_replica_receives_all_requests();
    test_ray_apply_scaling_factors();
    test_ray_upscale_delay_slow_loop();
    test_ray_delay_logic_upscale();
    test_ray_delay_logic_downscale();
    test_ray_custom_upscale_downscale_delay();
    test_ray_custom_apply_scaling_factors();
    test_ray_no_runaway_scaling_during_warmup();
    test_ray_app_cold_start_fast_path();
    test_ray_app_shared_state_isolation();
    test_custom_state();
    test_ctx_fields();
    test_custom_failures();
    test_load_errors();
    test_dry_run();
    test_history_ring();
    test_reload();
    test_reload_builtin();
    test_custom_metrics();
    test_app_policy();
    test_app_policy_state_and_failure();
    test_example_scheduled();
    test_example_custom_metrics();
    report_tick_cost();
    status_field(NULL, NULL);
    return TEST_DONE();
}
