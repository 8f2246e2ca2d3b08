-- latency_aware.lua: prefers replicas that have been answering fast, weighted by their queue.
--
-- Config:   request_router_class: "scripts/routers/latency_aware.lua:LatencyAware"
-- kwargs:   alpha            EWMA weight of a new observation (default 0.3)
--           sample           candidates compared per request: 2 (default, power of two
--                            choices) or 0 for all of them
--           error_penalty_s  latency a failed request counts as, at least (default 1.0)
--
-- on_request_completed keeps an EWMA of each replica's latency (by replica id). A candidate's
-- score is ewma * (ongoing + 1), the expected wait if requests are served one after another; the
-- lowest score goes first. A replica with no observation yet is explored: it scores 0 while it
-- has nothing in flight, then the mean of the known replicas' EWMAs.
--
-- Ranks: sample = 2: { {best}, {other} }; sample = 0: { {best}, candidates }.

local LatencyAware = {}

-- Park-Miller generator in exact double arithmetic (math.random is a C call).
local seed = math.random(1, 2147483646)

function LatencyAware:initialize_state(kwargs)
    self.alpha = kwargs.alpha or 0.3
    self.sample = kwargs.sample or 2
    self.error_penalty_s = kwargs.error_penalty_s or 1.0
    assert(type(self.alpha) == "number" and self.alpha > 0 and self.alpha <= 1,
        "alpha must be in (0, 1]")
    assert(self.sample == 0 or self.sample == 2, "sample must be 2 or 0 (all)")
    self.ewma = {}  -- replica id -> latency EWMA (s)
    self.sum, self.count = 0, 0 -- of the EWMAs, for the mean
    self.first, self.second = {}, {}
    self.ranks = { self.first, self.second }
end

-- Forget replicas that left, so the table doesn't grow with churn.
function LatencyAware:on_replicas_changed(candidates)
    local keep, sum, count = {}, 0, 0
    for i = 1, #candidates do
        local id = candidates[i].id
        local e = self.ewma[id]
        if e then
            keep[id] = e
            sum, count = sum + e, count + 1
        end
    end
    self.ewma, self.sum, self.count = keep, sum, count
end

function LatencyAware:on_request_completed(replica, latency_s, ok)
    if not ok and latency_s < self.error_penalty_s then
        latency_s = self.error_penalty_s
    end
    local id = replica.id
    local old = self.ewma[id]
    local new
    if old then
        new = old + self.alpha * (latency_s - old)
        self.sum = self.sum + new - old
    else
        new = latency_s
        self.sum, self.count = self.sum + new, self.count + 1
    end
    self.ewma[id] = new
end

local function score(self, c)
    local e = self.ewma[c.id]
    if not e then
        if c.ongoing == 0 then
            return 0
        end
        e = self.count > 0 and self.sum / self.count or 0
    end
    return e * (c.ongoing + 1)
end

function LatencyAware:choose_replicas(candidates, request)
    local n = #candidates
    local first, second = self.first, self.second
    if n == 1 then
        first[1], second[1] = candidates[1], nil
        return self.ranks
    end
    if self.sample == 0 then
        local best, bs = nil, math.huge
        for i = 1, n do
            local c = candidates[i]
            local s = score(self, c)
            if s < bs then
                best, bs = c, s
            end
        end
        first[1] = best
        self.ranks[2] = candidates
        return self.ranks
    end
    seed = seed * 16807 % 2147483647
    local i = seed % n
    local j = (seed - i) / n % (n - 1) + 1
    i = i + 1
    if j >= i then
        j = j + 1
    end
    local a, b = candidates[i], candidates[j]
    if score(self, b) < score(self, a) then
        a, b = b, a
    end
    first[1] = a
    second[1] = b
    self.ranks[2] = second
    return self.ranks
end

return { LatencyAware = LatencyAware }
