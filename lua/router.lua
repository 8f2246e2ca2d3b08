-- router.lua: the built-in request router, power of two choices (Ray Serve's default policy).
--
-- Written on exactly the API user routers get (docs/routing.md): the chunk returns a class whose
-- choose_replicas(self, candidates, request) returns ranks, most preferred first.
--
-- Two distinct candidates are sampled at random and the one with fewer requests in flight comes
-- first, each in its own rank: the engine tries rank 1, then rank 2. When the request names a
-- multiplexed model, the two samples are drawn from the replicas that already hold it, or when
-- none does from those with the fewest models loaded, and the rest of the candidates follow as
-- a last rank, so a busy holder doesn't strand the request.
--
-- This runs on every request, so it builds no tables per call: the returned lists are reused
-- (the engine reads the result before the next call), and the multiplex scan writes into a
-- reused array. The common path draws its two samples from one step of a Park-Miller generator
-- in plain arithmetic: math.random is a C call, and with the JIT off (see docs/routing.md) two of
-- them were a fifth of the cost of a routing call. p2c needs no better randomness than that.

local random = math.random

-- Park-Miller "minimal standard" generator: seed * 16807 stays below 2^46, so double arithmetic
-- is exact. Seeded from math.random so that routers don't move in lockstep.
local seed = random(1, 2147483646)

local Router = {}

-- Reused result lists.
local first, second, rest = {}, {}, {}
local two_ranks = { first, second }
local one_rank = { first }
local three_ranks = { first, second, rest }
local holders = {}

-- Where the first request for a model no replica held was sent, until a replica reports holding
-- (or loading) it: the requests right behind it go there too instead of making other replicas
-- load the same model before the report arrives. Bounded: emptied when it fills.
local placed, n_placed, MAX_PLACED = {}, 0, 1024

function Router:initialize_state(kwargs)
    -- Nothing to configure yet; kwargs is the decoded request_router_kwargs table.
    self.kwargs = kwargs
end

-- Samples two distinct entries of list[1..n] (n >= 2), less loaded first.
local function two_choices(list, n)
    local i = random(n)
    local j = random(n - 1)
    if j >= i then
        j = j + 1
    end
    local a, b = list[i], list[j]
    if b.ongoing < a.ongoing then
        return b, a
    end
    return a, b
end

local function count_models(c)
    local k = 0
    for _ in pairs(c.multiplexed_model_ids) do
        k = k + 1
    end
    return k
end

-- Collects into the reused `holders` array the candidates that hold `model` or, when none
-- does, those with the fewest models loaded (so a burst for a new model loads it on few
-- replicas, not on every one); returns the count.
local function find_preferred(candidates, n, model)
    local h = 0
    local where = placed[model]
    for i = 1, n do
        local c = candidates[i]
        if c.multiplexed_model_ids[model] then
            h = h + 1
            holders[h] = c
        end
    end
    if h > 0 and where then
        placed[model], n_placed = nil, n_placed - 1
    elseif h == 0 and where then
        for i = 1, n do
            if candidates[i].id == where then
                h = 1
                holders[1] = candidates[i]
                break
            end
        end
    end
    if h == 0 then
        local fewest = math.huge
        for i = 1, n do
            local c = candidates[i]
            local k = count_models(c)
            if k < fewest then
                fewest, h = k, 0
            end
            if k == fewest then
                h = h + 1
                holders[h] = c
            end
        end
    end
    for i = h + 1, #holders do
        holders[i] = nil -- drop stale references so removed replicas can be collected
    end
    return h
end

-- Two of the preferred replicas, then every other candidate as a last rank, so busy
-- preferred replicas don't strand the request.
local function choose_multiplexed(candidates, n, model)
    local h = find_preferred(candidates, n, model)
    if h == 1 then
        first[1] = holders[1]
        second[1] = nil
    else
        first[1], second[1] = two_choices(holders, h)
    end
    if not first[1].multiplexed_model_ids[model] and not placed[model] then
        if n_placed >= MAX_PLACED then
            placed, n_placed = {}, 0
        end
        placed[model], n_placed = first[1].id, n_placed + 1
    end
    local k = 0
    for i = 1, n do
        local c = candidates[i]
        if c ~= first[1] and c ~= second[1] then
            k = k + 1
            rest[k] = c
        end
    end
    for i = k + 1, #rest do
        rest[i] = nil
    end
    return three_ranks
end

function Router:choose_replicas(candidates, request)
    local n = #candidates
    second[1] = nil
    if n == 0 then
        first[1] = nil
        return one_rank
    end
    local model = request and request.multiplexed_model_id
    if model ~= "" and model and n > 1 then
        return choose_multiplexed(candidates, n, model)
    end
    if n == 1 then
        first[1] = candidates[1]
        return one_rank
    end
    -- two_choices, inlined: this is the path every plain request takes. One draw gives both
    -- samples: i from its remainder mod n, j from the quotient mod n - 1.
    seed = seed * 16807 % 2147483647
    local i = seed % n
    local j = (seed - i) / n % (n - 1) + 1 -- exact: seed - i is a multiple of n
    i = i + 1
    if j >= i then
        j = j + 1
    end
    local a, b = candidates[i], candidates[j]
    if b.ongoing < a.ongoing then
        a, b = b, a
    end
    first[1], second[1] = a, b
    return two_ranks
end

return Router
