-- prefix_affinity.lua: sends requests whose bodies start alike to the same replica, so that a
-- replica's prefix cache (e.g. an LLM's KV cache for a shared system prompt) is reused.
--
-- Config:   request_router_class: "scripts/routers/prefix_affinity.lua:PrefixAffinity"
-- kwargs:   prefix_bytes   how many leading bytes of the body form the key (default 64)
--
-- The key is a hash of the first prefix_bytes bytes of the body. Its replica (the holder) is
-- chosen by rendezvous hashing: the candidate with the highest hash(key, replica id). Like a
-- hash ring, this moves only the keys of a replica that leaves or joins, and it needs no
-- structure beyond one cached hash per replica. When the holder is full (ongoing >=
-- max_ongoing_requests) the least-loaded candidate goes first instead.
--
-- Ranks: { {holder or least loaded}, candidates }: the second rank lets the engine spill to any
-- replica with room. Requests with no body get all candidates as one rank.
--
-- Reading request.body copies the body into Lua (only when this router is used); the hash
-- reads at most prefix_bytes of it. Rendezvous costs one hash per candidate, so the holder of
-- each key is memoized (up to memo_size keys, default 4096; cleared when replicas change):
-- prefixes repeat, which is the point of this router.

local byte, floor = string.byte, math.floor

local M32 = 4294967296

-- See consistent_hash.lua: exact 32-bit arithmetic in doubles, no `bit` in the sandbox.
local function mulmod32(a, c)
    local lo = a % 65536
    local hi = (a - lo) / 65536
    return (lo * c + (hi * c % 65536) * 65536) % M32
end

local function finalize(h)
    h = mulmod32((h + floor(h / 65536)) % M32, 0x85ebca6b)
    h = mulmod32((h + floor(h / 8192)) % M32, 0xc2b2ae35)
    return (h + floor(h / 65536)) % M32
end

local function hash_prefix(s, n)
    local h = 2166136261
    for i = 1, n do
        h = (h * 31 + byte(s, i)) % M32
    end
    return finalize(h)
end

local PrefixAffinity = {}

function PrefixAffinity:initialize_state(kwargs)
    local p = kwargs.prefix_bytes or 64
    assert(type(p) == "number" and p >= 1, "prefix_bytes must be a number >= 1")
    self.prefix_bytes = floor(p)
    self.memo_size = kwargs.memo_size or 4096
    self.memo, self.memo_n = {}, 0 -- key hash -> holder
    self.id_hash = {} -- candidate table -> hash of its id
    self.first = {}
    self.ranks = { self.first, false } -- [2] is the candidates array, set per call
end

function PrefixAffinity:on_replicas_changed(candidates)
    local id_hash = {}
    for i = 1, #candidates do
        local c = candidates[i]
        id_hash[c] = hash_prefix(c.id, #c.id)
    end
    self.id_hash = id_hash
    self.memo, self.memo_n = {}, 0
end

function PrefixAffinity:choose_replicas(candidates, request)
    local body = request and request.body
    local n = #candidates
    if not body or body == "" then
        return candidates
    end
    local len = #body
    local key = hash_prefix(body, len < self.prefix_bytes and len or self.prefix_bytes)
    local holder = self.memo[key]
    if not holder then
        local id_hash, best = self.id_hash, -1
        for i = 1, n do
            local c = candidates[i]
            local w = finalize((key + (id_hash[c] or 0)) % M32)
            if w > best then
                holder, best = c, w
            end
        end
        if self.memo_n >= self.memo_size then
            self.memo, self.memo_n = {}, 0
        end
        self.memo[key] = holder
        self.memo_n = self.memo_n + 1
    end
    if holder.ongoing >= holder.max_ongoing_requests then
        for i = 1, n do
            local c = candidates[i]
            if c.ongoing < holder.ongoing then
                holder = c
            end
        end
    end
    self.first[1] = holder
    self.ranks[2] = candidates
    return self.ranks
end

return { PrefixAffinity = PrefixAffinity }
