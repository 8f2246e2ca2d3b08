-- prefix_cache.lua: prefix-cache affinity for LLM chat traffic. The router remembers which
-- prompt prefixes it sent to each replica and sends a request to the replica that holds the
-- longest prefix of it (its KV cache can skip that part of the prefill), as long as that
-- replica is not much busier than the least-loaded one. Modelled on Ray Serve LLM's
-- PrefixCacheAffinityRouter (the code and the details here are this file's own).
--
-- Config:   request_router_class: "scripts/routers/prefix_cache.lua:PrefixCache"
-- kwargs:   block_chars           characters per block of the body (default 64)
--           imbalanced_threshold  a replica with more than this many requests in flight above
--                                 the least-loaded one is not chosen for its prefix (default 2)
--           match_rate_threshold  the share of the body's blocks that must match, else the
--                                 request goes by load alone (default 0.1)
--           max_blocks            bound on the blocks remembered, all replicas together
--                                 (default 16384)
--
-- What is remembered: the body (the raw JSON text; a multi-turn chat grows at the end, so an
-- earlier turn's body is a prefix of the next one's) is cut into blocks of block_chars; the
-- blocks form a path in a prefix tree whose nodes list the replicas the path was sent to (in
-- on_request_routed, for the replica the engine really took). A replica on a node is on all of
-- its ancestors, so each candidate's match length is found by binary search along the path.
-- The tree lives in two generations: insertions go into the current one; once it holds
-- max_blocks / 2 nodes it becomes the old one (the previous old one is dropped) and a new one
-- starts. Lookups read both. A prefix used again is re-inserted into the current generation, so
-- what is dropped is what was not used for a generation: LRU-like, O(1) per eviction, and
-- memory bounded by max_blocks nodes.
--
-- Choice: among candidates with room (ongoing < max_ongoing_requests) and at most
-- imbalanced_threshold above the least-loaded one, the one with the longest match (ties: fewer
-- in flight). If that match covers less than match_rate_threshold of the body's blocks, the
-- least-loaded candidate instead (ties: the one holding fewer blocks, so new prefixes spread).
-- Unlike Ray's router, the imbalance test is per candidate: a busy replica loses its own
-- affinity, the others keep theirs.
--
-- Ranks: { {choice}, candidates }: the second rank lets the engine spill to any replica with
-- room. No body: all candidates in one rank. A replica that leaves is removed from the tree
-- (on_replicas_changed).

local sub = string.sub
local floor = math.floor

local TENANTS = 1 -- node[1] = {[replica id] = true}; children are node[block text]

local function new_generation()
    return { root = { {} }, nodes = 0 }
end

local PrefixCache = {}

function PrefixCache:initialize_state(kwargs)
    local function num(name, default, min)
        local v = kwargs[name]
        if v == nil then
            return default
        end
        assert(type(v) == "number" and v >= min, name .. " must be a number >= " .. min)
        return v
    end
    self.block_chars = floor(num("block_chars", 64, 1))
    self.imbalanced_threshold = num("imbalanced_threshold", 2, 0)
    self.match_rate_threshold = num("match_rate_threshold", 0.1, 0)
    self.max_blocks = floor(num("max_blocks", 16384, 2))
    self.cur, self.old = new_generation(), new_generation()
    self.held = {} -- replica id -> blocks inserted for it in the current generation
    self.blocks = {} -- the last request's blocks, reused between calls
    self.nblocks = 0
    self.pending = false -- the blocks of the request being routed, for on_request_routed
    self.path = {}
    self.first = {}
    self.ranks = { self.first, false } -- [2] is the candidates array, set per call
end

-- Cuts the body into full blocks (a partial last block is not matched: it changes next turn).
function PrefixCache:cut(body)
    local blocks, size = self.blocks, self.block_chars
    local n = floor(#body / size)
    for i = 1, n do
        blocks[i] = sub(body, (i - 1) * size + 1, i * size)
    end
    self.nblocks = n
    return n
end

-- Walks a generation along the blocks; fills self.path[1..depth] and returns the depth.
function PrefixCache:walk(gen, n)
    local node, path, blocks = gen.root, self.path, self.blocks
    for d = 1, n do
        node = node[blocks[d]]
        if not node then
            return d - 1
        end
        path[d] = node
    end
    return n
end

-- The deepest d <= depth whose node lists id (0 if none): tenants only shrink going down.
local function match_depth(path, depth, id)
    if depth == 0 or not path[1][TENANTS][id] then
        return 0
    end
    local lo, hi = 1, depth -- path[lo] has id
    while lo < hi do
        local mid = floor((lo + hi + 1) / 2)
        if path[mid][TENANTS][id] then
            lo = mid
        else
            hi = mid - 1
        end
    end
    return lo
end

function PrefixCache:least_loaded(candidates)
    local best, held = nil, self.held
    for i = 1, #candidates do
        local c = candidates[i]
        if c.ongoing < c.max_ongoing_requests then
            if not best or c.ongoing < best.ongoing
                or (c.ongoing == best.ongoing and (held[c.id] or 0) < (held[best.id] or 0)) then
                best = c
            end
        end
    end
    return best
end

function PrefixCache:choose_replicas(candidates, request)
    local body = request and request.body
    self.pending = false
    if not body or body == "" then
        return candidates
    end
    local n = self:cut(body)
    local fallback = self:least_loaded(candidates)
    local choice = fallback
    if fallback and n > 0 then
        local path = self.path
        local limit = fallback.ongoing + self.imbalanced_threshold
        local depth_cur = self:walk(self.cur, n)
        local best, best_depth = nil, 0
        for i = 1, #candidates do
            local c = candidates[i]
            if c.ongoing < c.max_ongoing_requests and c.ongoing <= limit then
                local d = match_depth(path, depth_cur, c.id)
                if d > best_depth or (d == best_depth and best and c.ongoing < best.ongoing) then
                    best, best_depth = c, d
                end
            end
        end
        if best_depth < n then
            -- the old generation may know a longer match (each walk overwrites self.path)
            local depth_old = self:walk(self.old, n)
            for i = 1, #candidates do
                local c = candidates[i]
                if c.ongoing < c.max_ongoing_requests and c.ongoing <= limit then
                    local d = match_depth(path, depth_old, c.id)
                    if d > best_depth or (d == best_depth and best and c.ongoing < best.ongoing) then
                        best, best_depth = c, d
                    end
                end
            end
        end
        if best and best_depth >= self.match_rate_threshold * n and best_depth > 0 then
            choice = best
        end
        self.pending = true
    end
    if not choice then
        return candidates
    end
    self.first[1] = choice
    self.ranks[2] = candidates
    return self.ranks
end

-- Records the routed request's blocks as held by the replica that got it.
function PrefixCache:on_request_routed(_, replica)
    if not self.pending then
        return
    end
    self.pending = false
    local gen, id, blocks = self.cur, replica.id, self.blocks
    local node, added, new_nodes = gen.root, 0, 0
    node[TENANTS][id] = true
    for d = 1, self.nblocks do
        local b = blocks[d]
        local child = node[b]
        if not child then
            child = { {} }
            node[b] = child
            new_nodes = new_nodes + 1
        end
        if not child[TENANTS][id] then
            child[TENANTS][id] = true
            added = added + 1
        end
        node = child
    end
    gen.nodes = gen.nodes + new_nodes
    self.held[id] = (self.held[id] or 0) + added
    if gen.nodes >= self.max_blocks / 2 then
        self.old, self.cur, self.held = gen, new_generation(), {}
    end
end

-- Removes the ids not in `live` from every node of a generation (iterative: paths are deep).
local function forget(gen, live)
    local stack, top = { gen.root }, 1
    while top > 0 do
        local node = stack[top]
        stack[top] = nil
        top = top - 1
        for k, v in pairs(node) do
            if k == TENANTS then
                for id in pairs(v) do
                    if not live[id] then
                        v[id] = nil
                    end
                end
            else
                top = top + 1
                stack[top] = v
            end
        end
    end
end

function PrefixCache:on_replicas_changed(candidates)
    local live = {}
    for i = 1, #candidates do
        live[candidates[i].id] = true
    end
    forget(self.cur, live)
    forget(self.old, live)
    for id in pairs(self.held) do
        if not live[id] then
            self.held[id] = nil
        end
    end
end

return { PrefixCache = PrefixCache }
