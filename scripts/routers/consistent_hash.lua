-- consistent_hash.lua: session affinity by consistent hashing with bounded loads.
--
-- Config:   request_router_class: "scripts/routers/consistent_hash.lua:ConsistentHash"
-- kwargs:   header         request header holding the session key (default "x-session-id")
--           virtual_nodes  points per replica on the ring (default 100)
--           load_factor    bound on a replica's load relative to the average (default 1.25)
--
-- Each replica owns `virtual_nodes` points on a 32-bit ring; a session key hashes to a point
-- and belongs to the first replica clockwise. Adding or removing a replica only moves the keys
-- of the arcs it gains or loses (about 1/N of them). Bounded loads ("Consistent Hashing with
-- Bounded Loads", Mirrokni, Thorup, Zadimoghaddam): a replica may take the request only while
-- ongoing + 1 <= ceil(load_factor * (total ongoing + 1) / N); otherwise the walk continues
-- clockwise to the next replica (spill-over). So a session stays on its replica while that one
-- has room, and a hot session can't pile up on one replica.
--
-- Ranks: { {preferred}, {next on the ring within the bound}, {the rest} }. The engine falls back
-- to rank 2 if the preferred replica is at max_ongoing_requests. Requests without the header
-- get all candidates as one rank (the engine takes the least loaded).
--
-- The ring is rebuilt in on_replicas_changed (once per burst of replica changes, not per
-- request); each replica's points are computed once and cached by id. The sandbox has no `bit`
-- library, so the hash is plain double arithmetic (exact below 2^53).

local byte, floor, sort = string.byte, math.floor, table.sort

local M32 = 4294967296

-- (a * c) mod 2^32 for a, c < 2^32; each partial product stays below 2^48, so it is exact.
local function mulmod32(a, c)
    local lo = a % 65536
    local hi = (a - lo) / 65536
    return (lo * c + (hi * c % 65536) * 65536) % M32
end

-- Murmur3's finalizer with "h ^= h >> k" replaced by an addition of the high part (no xor
-- without `bit`): it still spreads every input bit over the whole word.
local function finalize(h)
    h = mulmod32((h + floor(h / 65536)) % M32, 0x85ebca6b)
    h = mulmod32((h + floor(h / 8192)) % M32, 0xc2b2ae35)
    return (h + floor(h / 65536)) % M32
end

local function hash_string(s)
    local h = 2166136261
    for i = 1, #s do
        h = (h * 31 + byte(s, i)) % M32
    end
    return finalize(h)
end

local ConsistentHash = {}

function ConsistentHash:initialize_state(kwargs)
    self.header = string.lower(kwargs.header or "x-session-id")
    self.virtual_nodes = kwargs.virtual_nodes or 100
    self.load_factor = kwargs.load_factor or 1.25
    assert(type(self.virtual_nodes) == "number" and self.virtual_nodes >= 1,
        "virtual_nodes must be a number >= 1")
    assert(type(self.load_factor) == "number" and self.load_factor >= 1,
        "load_factor must be a number >= 1")
    self.points_of = {} -- replica id -> its ring points (cached across rebuilds)
    self.ring = {}      -- sorted points
    self.owner = {}     -- point -> candidate table
    self.npoints = 0
    self.seen = {}      -- candidate -> generation, for the ring walk
    self.gen = 0
    self.first, self.second, self.rest = {}, {}, {}
    self.ranks = { self.first, self.second, self.rest }
end

function ConsistentHash:on_replicas_changed(candidates)
    local points_of, ring, owner = {}, {}, {}
    local m = 0
    for i = 1, #candidates do
        local c = candidates[i]
        local pts = self.points_of[c.id]
        if not pts then
            pts = {}
            for v = 1, self.virtual_nodes do
                pts[v] = hash_string(c.id .. "#" .. v)
            end
        end
        points_of[c.id] = pts
        for v = 1, #pts do
            local p = pts[v]
            if not owner[p] then -- a collision keeps the first owner: rare and harmless
                m = m + 1
                ring[m] = p
                owner[p] = c
            end
        end
    end
    sort(ring)
    self.points_of, self.ring, self.owner, self.npoints = points_of, ring, owner, m
    self.seen = {}
end

-- Index of the first ring point >= h, wrapping to 1.
local function ring_search(ring, m, h)
    local lo, hi = 1, m
    while lo < hi do
        local mid = floor((lo + hi) / 2)
        if ring[mid] < h then
            lo = mid + 1
        else
            hi = mid
        end
    end
    if ring[lo] < h then
        return 1
    end
    return lo
end

function ConsistentHash:choose_replicas(candidates, request)
    local n, m = #candidates, self.npoints
    local key = request and request.headers[self.header]
    if not key or key == "" or m == 0 then
        return candidates -- one rank: the engine takes the least loaded
    end
    local total = 0
    for i = 1, n do
        total = total + candidates[i].ongoing
    end
    local bound = math.ceil(self.load_factor * (total + 1) / n)

    local ring, owner, seen = self.ring, self.owner, self.seen
    local gen = self.gen + 1
    self.gen = gen
    local preferred, spill
    local distinct = 0
    local at = ring_search(ring, m, hash_string(key))
    for _ = 1, m do
        local c = owner[ring[at]]
        if seen[c] ~= gen then
            seen[c] = gen
            distinct = distinct + 1
            if c.ongoing + 1 <= bound then
                if not preferred then
                    preferred = c
                else
                    spill = c
                    break
                end
            end
            if distinct == n then
                break
            end
        end
        at = at == m and 1 or at + 1
    end

    local first, second, rest = self.first, self.second, self.rest
    first[1], second[1] = preferred, spill
    local k = 0
    for i = 1, n do
        local c = candidates[i]
        if c ~= preferred and c ~= spill then
            k = k + 1
            rest[k] = c
        end
    end
    for i = #rest, k + 1, -1 do
        rest[i] = nil
    end
    return self.ranks
end

return { ConsistentHash = ConsistentHash }
