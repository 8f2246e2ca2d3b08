/*
 * Unit tests for the router library in scripts/routers/: each router is loaded through the
 * script module (ms_router_script_new_class, as a deployment would) and driven with synthetic
 * candidates and many simulated requests. The "engine" here mimics engine/deployment/deployment.c:
 * ranks in order, and within a rank the first least-loaded replica below its max_ongoing_requests.
 * Checks are about effects (distribution, stickiness, spill-over, adaptation), not exact picks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "router/router.h"
#include "test.h"

#define MAXR 64

typedef struct sim {
    ms_router_script_t *s;
    int n; /* replicas 0..n-1 */
    int ongoing[MAXR];
    int max_ongoing[MAXR];
    int index[256];
    int rank_end[16];
    int nranks;
} sim_t;

static char *router_path(const char *file)
{
    const char *root = getenv("MS_SOURCE_DIR");
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "%s/scripts/routers/%s", root && *root ? root : MS_SOURCE_DIR, file);
    return b.data;
}

static int sim_open(sim_t *sim, const char *file, const char *cls, const char *kwargs, int n)
{
    memset(sim, 0, sizeof *sim);
    char *path = router_path(file), *err = NULL;
    /* A generous budget: these are correctness and speed checks, and a process descheduled for
     * a few tens of milliseconds on a loaded machine must not fail a routing call. */
    sim->s = ms_router_script_new_class(path, cls, kwargs, 1000000, &err);
    if (!sim->s)
        fprintf(stderr, "%s: %s\n", path, err);
    free(err);
    free(path);
    ASSERT_TRUE(sim->s != NULL);
    if (!sim->s)
        return -1;
    for (int i = 0; i < n; i++) {
        char id[32];
        snprintf(id, sizeof id, "replica-%d", i);
        ms_router_script_add_replica(sim->s, i, id, 8);
        sim->max_ongoing[i] = 8;
    }
    sim->n = n;
    return 0;
}

static void sim_add(sim_t *sim)
{
    char id[32];
    snprintf(id, sizeof id, "replica-%d", sim->n);
    ms_router_script_add_replica(sim->s, sim->n, id, 8);
    sim->max_ongoing[sim->n] = 8;
    sim->n++;
}

static void sim_set(sim_t *sim, int i, int ongoing)
{
    sim->ongoing[i] = ongoing;
    ms_router_script_set_ongoing(sim->s, i, ongoing);
}

static int sim_choose(sim_t *sim, const ms_route_request_t *req)
{
    sim->nranks = ms_router_script_choose(sim->s, req, sim->index, 256, sim->rank_end, 16);
    return sim->nranks;
}

static int rank_start(const sim_t *sim, int r)
{
    return r == 0 ? 0 : sim->rank_end[r - 1];
}

/* What the engine would take: the first least-loaded replica with room, rank by rank. */
static int sim_pick(const sim_t *sim)
{
    for (int r = 0; r < sim->nranks; r++) {
        int best = -1;
        for (int k = rank_start(sim, r); k < sim->rank_end[r]; k++) {
            int i = sim->index[k];
            if (sim->ongoing[i] < sim->max_ongoing[i] &&
                (best < 0 || sim->ongoing[i] < sim->ongoing[best]))
                best = i;
        }
        if (best >= 0)
            return best;
    }
    return -1;
}

static ms_route_request_t header_request(ms_http_header_t *h, const char *name, const char *value)
{
    *h = (ms_http_header_t){name, strlen(name), value, strlen(value)};
    return (ms_route_request_t){
        .id = "r", .method = "POST", .path = "/", .headers = h, .n_headers = 1};
}

/* ---- least_loaded --------------------------------------------------------------------------- */

static void test_least_loaded(void)
{
    sim_t sim;
    if (sim_open(&sim, "least_loaded.lua", "LeastLoaded", NULL, 8) != 0)
        return;
    ms_route_request_t req = {.id = "r", .method = "GET", .path = "/"};
    srand(7);
    int ok = 1;
    for (int round = 0; round < 500 && ok; round++) {
        for (int i = 0; i < 8; i++)
            sim_set(&sim, i, rand() % 5);
        int nr = sim_choose(&sim, &req);
        int seen = 0, prev = -1;
        for (int r = 0; r < nr; r++) {
            int v = sim.ongoing[sim.index[rank_start(&sim, r)]];
            ok &= v > prev; /* ranks strictly ascending by ongoing */
            prev = v;
            for (int k = rank_start(&sim, r); k < sim.rank_end[r]; k++) {
                ok &= sim.ongoing[sim.index[k]] == v; /* one value per rank */
                seen |= 1 << sim.index[k];
            }
        }
        int min = 99;
        for (int i = 0; i < 8; i++)
            min = sim.ongoing[i] < min ? sim.ongoing[i] : min;
        ok &= seen == 0xff && sim.ongoing[sim.index[0]] == min;
    }
    ASSERT_TRUE(ok);

    /* Ties: with equal loads, the first entry is spread over every replica. */
    int first[8] = {0};
    for (int i = 0; i < 8; i++)
        sim_set(&sim, i, 3);
    for (int round = 0; round < 8000; round++) {
        ASSERT_INT_EQ(sim_choose(&sim, &req), 1);
        first[sim.index[0]]++;
    }
    for (int i = 0; i < 8; i++)
        ASSERT_TRUE(first[i] > 700 && first[i] < 1300);
    ASSERT_INT_EQ(ms_router_script_failures(sim.s), 0);
    ms_router_script_free(sim.s);

    /* More distinct loads than max_ranks: the last rank takes the rest. */
    if (sim_open(&sim, "least_loaded.lua", "LeastLoaded", "{\"max_ranks\": 4}", 10) != 0)
        return;
    for (int i = 0; i < 10; i++)
        sim_set(&sim, i, 9 - i);
    ASSERT_INT_EQ(sim_choose(&sim, &req), 4);
    ASSERT_INT_EQ(sim.index[0], 9);
    ASSERT_INT_EQ(sim.rank_end[2], 3);
    ASSERT_INT_EQ(sim.rank_end[3], 10);
    ms_router_script_free(sim.s);
}

/* ---- consistent_hash ------------------------------------------------------------------------ */

#define SESSIONS 1000

static int preferred_of(sim_t *sim, int session)
{
    char key[32];
    ms_http_header_t h;
    snprintf(key, sizeof key, "session-%d", session);
    ms_route_request_t req = header_request(&h, "X-Session-Id", key);
    if (sim_choose(sim, &req) < 1)
        return -1;
    return sim->index[0];
}

static void test_consistent_hash(void)
{
    sim_t sim;
    if (sim_open(&sim, "consistent_hash.lua", "ConsistentHash", NULL, 8) != 0)
        return;
    static int home[SESSIONS];
    int per[MAXR] = {0}, sticky = 1;
    for (int k = 0; k < SESSIONS; k++) {
        home[k] = preferred_of(&sim, k);
        if (home[k] >= 0)
            per[home[k]]++;
    }
    for (int k = 0; k < SESSIONS; k++)
        sticky &= preferred_of(&sim, k) == home[k];
    ASSERT_TRUE(sticky);
    for (int i = 0; i < 8; i++) {
        printf("consistent_hash: replica %d owns %d of %d sessions\n", i, per[i], SESSIONS);
        ASSERT_TRUE(per[i] > SESSIONS / 8 / 2 && per[i] < SESSIONS / 8 * 2);
    }

    /* Ranks: [preferred], [next on the ring], [the other 6]. */
    ASSERT_INT_EQ(preferred_of(&sim, 0), home[0]);
    ASSERT_INT_EQ(sim.nranks, 3);
    ASSERT_INT_EQ(sim.rank_end[0], 1);
    ASSERT_INT_EQ(sim.rank_end[1], 2);
    ASSERT_INT_EQ(sim.rank_end[2], 8);
    int next = sim.index[1];
    ASSERT_TRUE(next != home[0]);

    /* Spill-over: the home replica over load_factor x average gives way to the next one on the
     * ring, and gets the session back once it has room again. */
    sim_set(&sim, home[0], 6); /* bound = ceil(1.25 * 7 / 8) = 2 */
    ASSERT_INT_EQ(preferred_of(&sim, 0), next);
    for (int i = 0; i < 8; i++)
        sim_set(&sim, i, 1); /* bound = ceil(1.25 * 9 / 8) = 2: room for one more at home */
    ASSERT_INT_EQ(preferred_of(&sim, 0), home[0]);
    for (int i = 0; i < 8; i++)
        sim_set(&sim, i, 0);

    /* Simulated traffic: sessions keep coming while requests stay in flight; with bounded loads
     * no replica runs far above the average, and most requests still land at home. */
    int at_home = 0, total = 0, worst = 0;
    srand(11);
    for (int step = 0; step < 4000; step++) {
        int k = rand() % 50;
        /* a few hot sessions: half of the traffic goes to sessions 0..2 */
        if (rand() % 2)
            k = rand() % 3;
        preferred_of(&sim, k);
        int r = sim_pick(&sim);
        if (r >= 0) {
            sim_set(&sim, r, sim.ongoing[r] + 1);
            at_home += r == home[k];
            total++;
        }
        int sum = 0, max = 0;
        for (int i = 0; i < 8; i++) {
            sum += sim.ongoing[i];
            max = sim.ongoing[i] > max ? sim.ongoing[i] : max;
        }
        if (max > worst)
            worst = max;
        /* a random request finishes */
        for (int tries = 0; tries < 8 && sum > 12; tries++) {
            int i = rand() % 8;
            if (sim.ongoing[i] > 0) {
                sim_set(&sim, i, sim.ongoing[i] - 1);
                break;
            }
        }
    }
    printf("consistent_hash: %d of %d requests at their session's home, max in flight %d\n",
           at_home, total, worst);
    ASSERT_TRUE(worst <= 4); /* ~1.25 x the average of ~1.5-2 in flight, rounded up, +1 */
    ASSERT_TRUE(at_home > total / 4);
    for (int i = 0; i < 8; i++)
        sim_set(&sim, i, 0);

    /* A ninth replica takes about 1/9 of the sessions, all from the others, and moves nothing
     * else. */
    sim_add(&sim);
    int moved = 0, moved_elsewhere = 0;
    for (int k = 0; k < SESSIONS; k++) {
        int now = preferred_of(&sim, k);
        if (now != home[k]) {
            moved++;
            moved_elsewhere += now != 8;
        }
    }
    printf("consistent_hash: adding a 9th replica moved %d of %d sessions\n", moved, SESSIONS);
    ASSERT_TRUE(moved > SESSIONS / 9 / 3 && moved < SESSIONS / 9 * 2);
    ASSERT_INT_EQ(moved_elsewhere, 0);

    /* No session header: one rank with everyone. */
    ms_route_request_t plain = {.id = "r", .method = "GET", .path = "/"};
    ASSERT_INT_EQ(sim_choose(&sim, &plain), 1);
    ASSERT_INT_EQ(sim.rank_end[0], 9);
    ASSERT_INT_EQ(ms_router_script_failures(sim.s), 0);
    ms_router_script_free(sim.s);

    /* kwargs: another header. */
    if (sim_open(&sim, "consistent_hash.lua", "ConsistentHash",
                 "{\"header\": \"X-User\", \"virtual_nodes\": 50, \"load_factor\": 2}", 4) != 0)
        return;
    ms_http_header_t h;
    ms_route_request_t req = header_request(&h, "x-user", "alice");
    ASSERT_INT_EQ(sim_choose(&sim, &req), 3);
    int alice = sim.index[0];
    for (int i = 0; i < 20; i++) {
        sim_choose(&sim, &req);
        ASSERT_INT_EQ(sim.index[0], alice);
    }
    ms_router_script_free(sim.s);

    char *path = router_path("consistent_hash.lua"), *err = NULL;
    ASSERT_TRUE(ms_router_script_new_class(path, "ConsistentHash", "{\"load_factor\": 0.5}", 1000,
                                           &err) == NULL);
    ASSERT_CONTAINS(err, "load_factor");
    free(err);
    free(path);
}

/* ---- prefix_affinity ------------------------------------------------------------------------ */

static int body_choice(sim_t *sim, const char *body)
{
    ms_route_request_t req = {.id = "r",
                              .method = "POST",
                              .path = "/v1/completions",
                              .body = body,
                              .body_len = strlen(body)};
    if (sim_choose(sim, &req) < 1)
        return -1;
    return sim->index[0];
}

static void test_prefix_affinity(void)
{
    sim_t sim;
    if (sim_open(&sim, "prefix_affinity.lua", "PrefixAffinity", "{\"prefix_bytes\": 32}", 8) != 0)
        return;
    char body[256];
    int holder[100], used = 0, same = 1;
    for (int p = 0; p < 100; p++) {
        snprintf(body, sizeof body, "system prompt number %04d ......|user question A", p);
        holder[p] = body_choice(&sim, body);
        used |= 1 << holder[p];
        /* same 32-byte prefix, other suffixes: same replica */
        for (int q = 0; q < 5; q++) {
            snprintf(body, sizeof body, "system prompt number %04d ......|question %d", p, q);
            same &= body_choice(&sim, body) == holder[p];
        }
    }
    ASSERT_TRUE(same);
    ASSERT_INT_EQ(used, 0xff); /* 100 prefixes spread over all 8 replicas */
    ASSERT_INT_EQ(sim.nranks, 2);
    ASSERT_INT_EQ(sim.rank_end[1], 9); /* then every candidate */

    /* The holder full: the least-loaded replica goes first. */
    snprintf(body, sizeof body, "system prompt number %04d ......|again", 0);
    for (int i = 0; i < 8; i++)
        sim_set(&sim, i, 4);
    sim_set(&sim, holder[0], 8);
    int other = (holder[0] + 3) % 8;
    sim_set(&sim, other, 1);
    ASSERT_INT_EQ(body_choice(&sim, body), other);
    sim_set(&sim, holder[0], 7); /* room again: back to the holder */
    ASSERT_INT_EQ(body_choice(&sim, body), holder[0]);

    /* No body: one rank with everyone. */
    ms_route_request_t req = {.id = "r", .method = "GET", .path = "/"};
    ASSERT_INT_EQ(sim_choose(&sim, &req), 1);
    ASSERT_INT_EQ(sim.rank_end[0], 8);
    ASSERT_INT_EQ(ms_router_script_failures(sim.s), 0);
    ms_router_script_free(sim.s);
}

/* ---- prefix_cache --------------------------------------------------------------------------- */

/* A chat body as the OpenAI API sends it: a system prompt (one of a few shared ones), then the
 * conversation's turns so far; turn t's body is turn t-1's plus one exchange, before the tail. */
static char *chat_body(int system, int conv, int turns)
{
    ms_buf_t b = {0};
    ms_buf_appendf(&b, "{\"model\":\"m\",\"messages\":[{\"role\":\"system\",\"content\":\"");
    for (int i = 0; i < 24; i++)
        ms_buf_appendf(&b, "System prompt %d, sentence %02d, shared by many chats. ", system, i);
    ms_buf_appendf(&b, "\"}");
    for (int t = 0; t < turns; t++)
        ms_buf_appendf(&b,
                       ",{\"role\":\"user\",\"content\":\"conversation %d asks question %d, which "
                       "is long enough to fill a block or two of text\"},{\"role\":\"assistant\","
                       "\"content\":\"an answer of some length to question %d of chat %d\"}",
                       conv, t, t, conv);
    ms_buf_appendf(&b, "],\"stream\":true}");
    return b.data;
}

/* Routes one body as the engine does: choose, take, on_request_routed; the request stays in
 * flight (ongoing + 1). Returns the replica. */
static int route_body(sim_t *sim, const char *body)
{
    ms_route_request_t req = {.id = "r",
                              .method = "POST",
                              .path = "/v1/chat/completions",
                              .body = body,
                              .body_len = strlen(body)};
    if (sim_choose(sim, &req) < 1)
        return -1;
    int r = sim_pick(sim);
    if (r >= 0) {
        ms_router_script_on_routed(sim->s, &req, r);
        sim_set(sim, r, sim->ongoing[r] + 1);
    }
    return r;
}

static int route_chat(sim_t *sim, int system, int conv, int turns)
{
    char *body = chat_body(system, conv, turns);
    int r = route_body(sim, body);
    free(body);
    return r;
}

static void sim_idle(sim_t *sim)
{
    for (int i = 0; i < sim->n; i++)
        sim_set(sim, i, 0);
}

#define CONVS 24

static void test_prefix_cache(void)
{
    sim_t sim;
    if (sim_open(&sim, "prefix_cache.lua", "PrefixCache", NULL, 4) != 0)
        return;

    /* Two conversations sharing a system prompt: with the first one's replica no busier than
     * the others, the second follows the shared prefix there; once that replica is more than
     * imbalanced_threshold (2) above the least loaded, it goes elsewhere. */
    int a = route_chat(&sim, 0, 0, 1);
    ASSERT_TRUE(a >= 0);
    ASSERT_INT_EQ(route_chat(&sim, 0, 1, 1), a); /* a: 1 in flight, others 0 */
    ASSERT_INT_EQ(route_chat(&sim, 0, 2, 1), a); /* a: 2 */
    sim_set(&sim, a, 3);                         /* 3 above the others */
    int spilled = route_chat(&sim, 0, 3, 1);
    ASSERT_TRUE(spilled >= 0 && spilled != a);
    /* A conversation's next turn goes back to the replica that served it, even when another
     * replica holds the shared system prompt too. */
    sim_idle(&sim);
    ASSERT_INT_EQ(route_chat(&sim, 0, 3, 2), spilled);
    ASSERT_INT_EQ(route_chat(&sim, 0, 1, 2), a);
    ASSERT_INT_EQ(sim.nranks, 2);
    ASSERT_INT_EQ(sim.rank_end[1], 5); /* then every candidate */

    /* A full replica spills: its conversation goes to the least-loaded replica with room. */
    for (int i = 0; i < 4; i++)
        sim_set(&sim, i, 8);
    int least = (a + 1) % 4;
    sim_set(&sim, least, 7);
    ASSERT_INT_EQ(route_chat(&sim, 0, 1, 3), least); /* a is at its max (8) */
    ms_router_script_free(sim.s);

    /* Simulated chats: 24 conversations over 3 system prompts, 6 turns each, interleaved, two
     * requests in flight per replica at most before one finishes. Nearly every later turn lands
     * where its conversation has been, and the replicas share the work. */
    if (sim_open(&sim, "prefix_cache.lua", "PrefixCache", NULL, 4) != 0)
        return;
    int home[CONVS], per[MAXR] = {0}, at_home = 0, later = 0;
    srand(5);
    for (int t = 1; t <= 6; t++) {
        for (int k = 0; k < CONVS; k++) {
            int r = route_chat(&sim, k % 3, k, t);
            ASSERT_TRUE(r >= 0);
            per[r]++;
            if (t == 1)
                home[k] = r;
            else {
                later++;
                at_home += r == home[k];
            }
            /* a random request in flight finishes, so loads stay a little uneven */
            int i = rand() % 4;
            if (sim.ongoing[i] > 0)
                sim_set(&sim, i, sim.ongoing[i] - 1);
            if (sim.ongoing[i] > 1)
                sim_set(&sim, i, sim.ongoing[i] - 1);
        }
        sim_idle(&sim);
    }
    printf("prefix_cache: %d of %d later turns at their conversation's replica; per replica "
           "%d %d %d %d\n",
           at_home, later, per[0], per[1], per[2], per[3]);
    ASSERT_TRUE(at_home > later * 8 / 10);
    for (int i = 0; i < 4; i++)
        ASSERT_TRUE(per[i] > CONVS * 6 / 4 / 3);

    /* A replica that leaves is forgotten: its conversations move, nothing fails. */
    ms_router_script_remove_replica(sim.s, home[0]);
    int moved = route_chat(&sim, 0, 0, 7);
    ASSERT_TRUE(moved >= 0 && moved != home[0]);
    ASSERT_INT_EQ(route_chat(&sim, 0, 0, 8), moved); /* and stay where they moved */
    ASSERT_INT_EQ(ms_router_script_failures(sim.s), 0);

    /* No body: one rank with everyone. */
    ms_route_request_t plain = {.id = "r", .method = "GET", .path = "/"};
    ASSERT_INT_EQ(sim_choose(&sim, &plain), 1);
    ASSERT_INT_EQ(sim.rank_end[0], 3);
    ms_router_script_free(sim.s);

    /* Bounded memory: with max_blocks 64, a conversation not seen for many others is forgotten
     * (the next turn goes by load: the replica with the fewest blocks), a recent one is not. */
    if (sim_open(&sim, "prefix_cache.lua", "PrefixCache", "{\"max_blocks\": 64}", 4) != 0)
        return;
    int old_home = route_chat(&sim, 7, 0, 1);
    for (int k = 1; k < 40; k++) {
        route_chat(&sim, 8 + k, k, 1); /* distinct system prompts: ~25 blocks each */
        sim_idle(&sim);
    }
    /* Its replica one request busier than the rest: a remembered prefix still wins there (within
     * imbalanced_threshold), a forgotten one goes to an idle replica. */
    int recent = route_chat(&sim, 8 + 39, 39, 2);
    sim_idle(&sim);
    sim_set(&sim, recent, 1);
    ASSERT_INT_EQ(route_chat(&sim, 8 + 39, 39, 3), recent);
    sim_idle(&sim);
    sim_set(&sim, old_home, 1);
    ASSERT_TRUE(route_chat(&sim, 7, 0, 2) != old_home);
    ASSERT_INT_EQ(ms_router_script_failures(sim.s), 0);
    ms_router_script_free(sim.s);

    /* Bad kwargs fail the load. */
    char *path = router_path("prefix_cache.lua"), *err = NULL;
    ASSERT_TRUE(ms_router_script_new_class(path, "PrefixCache", "{\"block_chars\": 0}", 1000,
                                           &err) == NULL);
    ASSERT_CONTAINS(err, "block_chars");
    free(err);
    free(path);
}

/* The cost of one prefix_cache call on a long chat (a 30-turn history, ~9 KB), with and
 * without a matching history; it must stay well inside the 200 us budget routers run under. */
static void bench_prefix_cache(void)
{
    for (int n = 8; n <= 64; n *= 8) {
        sim_t sim;
        if (sim_open(&sim, "prefix_cache.lua", "PrefixCache", NULL, n) != 0)
            return;
        for (int k = 0; k < n; k++) {
            route_chat(&sim, k % 4, k, 30);
            sim_idle(&sim);
        }
        char *body = chat_body(1, 1, 30);
        ms_route_request_t req = {.id = "r",
                                  .method = "POST",
                                  .path = "/v1/chat/completions",
                                  .body = body,
                                  .body_len = strlen(body)};
        const int calls = 2000;
        double best = 1e9;
        for (int round = 0; round < 3; round++) {
            uint64_t t0 = ms_now_us();
            for (int i = 0; i < calls; i++) {
                sim_choose(&sim, &req);
                ms_router_script_on_routed(sim.s, &req, sim.index[0]);
            }
            double us = (double)(ms_now_us() - t0) / calls;
            best = us < best ? us : best;
        }
        printf("PrefixCache, %d candidates, %zu-byte chat body: %.1f us/request (choose + "
               "routed)\n",
               n, strlen(body), best);
        ASSERT_TRUE(best < 100);
        ASSERT_INT_EQ(ms_router_script_failures(sim.s), 0);
        free(body);
        ms_router_script_free(sim.s);
    }
}

/* ---- latency_aware -------------------------------------------------------------------------- */

/* Routes `n` requests, each completing at once with its replica's latency; returns how many of
 * the last half went to replica `watch`. */
static int latency_run(sim_t *sim, const double *latency, int n, int watch)
{
    ms_route_request_t req = {.id = "r", .method = "GET", .path = "/"};
    int hits = 0;
    for (int k = 0; k < n; k++) {
        sim_choose(sim, &req);
        int r = sim_pick(sim);
        if (r < 0)
            continue;
        ms_router_script_on_completed(sim->s, r, latency[r], 1);
        hits += k >= n / 2 && r == watch;
    }
    return hits;
}

static void test_latency_aware(void)
{
    const double latency[4] = {0.200, 0.010, 0.012, 0.011};
    const char *kwargs[] = {NULL, "{\"sample\": 0, \"alpha\": 0.5}"};
    for (int v = 0; v < 2; v++) {
        sim_t sim;
        if (sim_open(&sim, "latency_aware.lua", "LatencyAware", kwargs[v], 4) != 0)
            return;
        int hits = latency_run(&sim, latency, 4000, 0);
        printf("latency_aware (%s): slow replica got %d of the last 2000 requests\n",
               kwargs[v] ? kwargs[v] : "p2c", hits);
        ASSERT_TRUE(hits < 2000 / 20); /* an even share would be 500 */

        /* It gets faster: traffic comes back once the EWMA reflects it. */
        const double healed[4] = {0.005, 0.010, 0.012, 0.011};
        /* with p2c the slow one is still sampled, and failed or not, refreshes its EWMA only
         * when picked: feed it observations directly, as completions of earlier requests */
        for (int k = 0; k < 20; k++)
            ms_router_script_on_completed(sim.s, 0, healed[0], 1);
        hits = latency_run(&sim, healed, 4000, 0);
        printf("latency_aware: healed replica got %d of the last 2000 requests\n", hits);
        ASSERT_TRUE(hits > 2000 / 4);

        /* Errors count as slow. */
        for (int k = 0; k < 20; k++)
            ms_router_script_on_completed(sim.s, 1, 0.001, 0);
        ASSERT_TRUE(latency_run(&sim, healed, 2000, 1) < 1000 / 20);
        ASSERT_INT_EQ(ms_router_script_failures(sim.s), 0);
        ms_router_script_free(sim.s);
    }

    /* A new replica is explored before it has any observation. */
    sim_t sim;
    if (sim_open(&sim, "latency_aware.lua", "LatencyAware", "{\"sample\": 0}", 3) != 0)
        return;
    const double lat[4] = {0.01, 0.01, 0.01, 0.01};
    latency_run(&sim, lat, 100, 0);
    sim_add(&sim);
    ms_route_request_t req = {.id = "r", .method = "GET", .path = "/"};
    sim_choose(&sim, &req);
    ASSERT_INT_EQ(sim.index[0], 3);
    ms_router_script_free(sim.s);
}

/* Per-request cost of each library router (choose only), printed for the record. */
static void bench_routers(void)
{
    static const struct {
        const char *file, *cls;
    } routers[] = {
        {"least_loaded.lua", "LeastLoaded"},       {"consistent_hash.lua", "ConsistentHash"},
        {"prefix_affinity.lua", "PrefixAffinity"}, {"latency_aware.lua", "LatencyAware"},
        {"prefix_cache.lua", "PrefixCache"},
    };
    const char *body = "You are a helpful assistant. Answer briefly and precisely. | What is 2+2?";
    ms_http_header_t h[3] = {
        {"Host", 4, "localhost", 9},
        {"Content-Type", 12, "application/json", 16},
        {"X-Session-Id", 12, "session-42", 10},
    };
    ms_route_request_t req = {.id = "r",
                              .method = "POST",
                              .path = "/",
                              .headers = h,
                              .n_headers = 3,
                              .body = body,
                              .body_len = strlen(body)};
    for (size_t k = 0; k < sizeof routers / sizeof routers[0]; k++) {
        for (int n = 8; n <= 64; n *= 8) {
            sim_t sim;
            if (sim_open(&sim, routers[k].file, routers[k].cls, NULL, n) != 0)
                return;
            for (int i = 0; i < n; i++)
                sim_set(&sim, i, i % 3);
            const int calls = 20000;
            double best = 1e9;
            for (int round = 0; round < 3; round++) {
                uint64_t t0 = ms_now_us();
                for (int i = 0; i < calls; i++)
                    sim_choose(&sim, &req);
                double us = (double)(ms_now_us() - t0) / calls;
                best = us < best ? us : best;
            }
            printf("%s, %d candidates: %.2f us/request\n", routers[k].cls, n, best);
            ASSERT_INT_EQ(ms_router_script_failures(sim.s), 0);
            ms_router_script_free(sim.s);
        }
    }
}

int main(void)
{
    ms_log_min_level = MS_LOG_ERROR;
    test_least_loaded();
    test_consistent_hash();
    test_prefix_affinity();
    test_prefix_cache();
    test_latency_aware();
    bench_routers();
    bench_prefix_cache();
    return TEST_DONE();
}
