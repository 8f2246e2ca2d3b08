-- least_loaded.lua: ranks every candidate by requests in flight, fewest first.
--
-- Config:   request_router_class: "scripts/routers/least_loaded.lua:LeastLoaded"
-- kwargs:   max_ranks (default 16, the engine's rank limit): candidates beyond the last rank
--           are merged into it.
--
-- Candidates with the same `ongoing` share a rank, in random order: the engine takes the first
-- least-loaded replica with room in a rank, so the shuffle is what spreads ties. Ranks are built
-- by bucketing on `ongoing` (a counting sort over the few distinct values), in reused tables:
-- O(candidates) per request, no table allocated per call.

local sort = table.sort

local LeastLoaded = {}

-- Park-Miller generator in exact double arithmetic (math.random is a C call, slow with the JIT
-- off); good enough to break ties.
local seed = math.random(1, 2147483646)

function LeastLoaded:initialize_state(kwargs)
    local max_ranks = kwargs.max_ranks or 16
    assert(type(max_ranks) == "number" and max_ranks >= 1, "max_ranks must be a number >= 1")
    self.max_ranks = math.floor(max_ranks)
    self.keys = {}    -- distinct ongoing values seen this call
    self.buckets = {} -- ongoing -> reused list of candidates
    self.sizes = {}   -- ongoing -> entries used this call
    self.ranks = {}
    self.tail = {}    -- the last rank when there are more distinct values than max_ranks
end

function LeastLoaded:on_replicas_changed(candidates)
    self.buckets = {} -- drop references to removed replicas
end

function LeastLoaded:choose_replicas(candidates, request)
    local n = #candidates
    local keys, buckets, sizes = self.keys, self.buckets, self.sizes
    local nkeys = 0
    for i = 1, n do
        local c = candidates[i]
        local o = c.ongoing
        local k = sizes[o]
        if not k then
            k = 0
            nkeys = nkeys + 1
            keys[nkeys] = o
            if not buckets[o] then
                buckets[o] = {}
            end
        end
        k = k + 1
        sizes[o] = k
        -- Inside-out Fisher-Yates: put c at a random position among the first k.
        local b = buckets[o]
        seed = seed * 16807 % 2147483647
        local j = seed % k + 1
        b[k] = b[j]
        b[j] = c
    end
    for i = #keys, nkeys + 1, -1 do
        keys[i] = nil
    end
    sort(keys)
    local ranks, max_ranks = self.ranks, self.max_ranks
    local tail, ntail = self.tail, 0
    for i = 1, nkeys do
        local o = keys[i]
        local b, k = buckets[o], sizes[o]
        for t = #b, k + 1, -1 do
            b[t] = nil
        end
        sizes[o] = nil
        if i < max_ranks or nkeys == max_ranks then
            ranks[i] = b
        else
            for t = 1, k do
                ntail = ntail + 1
                tail[ntail] = b[t]
            end
        end
    end
    for t = #tail, ntail + 1, -1 do
        tail[t] = nil
    end
    local nranks = nkeys
    if nkeys > max_ranks then
        ranks[max_ranks] = tail
        nranks = max_ranks
    end
    for i = #ranks, nranks + 1, -1 do
        ranks[i] = nil
    end
    return ranks
end

return { LeastLoaded = LeastLoaded }
