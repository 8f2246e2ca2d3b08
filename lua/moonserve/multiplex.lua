-- moonserve.multiplex: serve.multiplexed, model multiplexing as Ray Serve's @serve.multiplexed
-- (docs/lua-api.md, "Model multiplexing"). Each replica keeps the models its loader made in an
-- LRU cache of max_num_models_per_replica; a miss loads the model in a task of its own (so a
-- request that goes away does not abandon a half-done load), one load or unload at a time per
-- cache, while the requests that want it wait on a signal. The replica tells the controller
-- which models it holds or is loading whenever that changes, so routers send a model's
-- requests to its holders at once.

local core = require "moonserve.core"
local metrics = require "moonserve.metrics"

local M = {}

local LATENCY_BUCKETS = { 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300 }

local caches = {} -- every cache in the replica, in creation order: their ids are reported together

local m_requests, m_loads, m_unloads, m_models, m_load_s, m_unload_s
local function engine_metrics()
    if m_requests then
        return
    end
    m_requests = metrics._engine("Counter", { name = "moonserve_multiplexed_get_model_requests_total",
        description = "Calls of a serve.multiplexed loader function (hits and misses)." })
    m_loads = metrics._engine("Counter", { name = "moonserve_multiplexed_models_load_total",
        description = "Models loaded by serve.multiplexed loaders." })
    m_unloads = metrics._engine("Counter", { name = "moonserve_multiplexed_models_unload_total",
        description = "Models evicted from serve.multiplexed caches." })
    m_models = metrics._engine("Gauge", { name = "moonserve_multiplexed_models",
        description = "Models held in serve.multiplexed caches, summed over the replicas." })
    m_load_s = metrics._engine("Histogram", { name = "moonserve_multiplexed_model_load_latency_seconds",
        description = "Time a serve.multiplexed loader took.", boundaries = LATENCY_BUCKETS })
    m_unload_s = metrics._engine("Histogram", {
        name = "moonserve_multiplexed_model_unload_latency_seconds",
        description = "Time a serve.multiplexed unload hook took.", boundaries = LATENCY_BUCKETS })
end

-- Tells the controller every model the replica's caches hold or are loading.
local function report()
    local ids, total = {}, 0
    for _, c in ipairs(caches) do
        for _, id in ipairs(c.order) do
            ids[#ids + 1] = id
        end
        total = total + #c.order
        if c.round then
            ids[#ids + 1] = c.round.id
        end
    end
    m_models:set(total)
    core.report_models(ids)
end

local function remove(list, v)
    for i = #list, 1, -1 do
        if list[i] == v then
            table.remove(list, i)
            return
        end
    end
end

local function log_warn(fmt, ...)
    core.log("warn", string.format(fmt, ...))
end

-- Evicts the least recently used model, calling the unload hook (or the model's own unload
-- method) on it; an error there is logged: the model is gone either way.
local function evict(c, self)
    local id = table.remove(c.order, 1)
    local model = c.models[id]
    c.models[id] = nil
    local t0 = core.now()
    local ok, err = true, nil
    if c.unload then
        ok, err = pcall(c.unload, self, model, id)
    elseif type(model) == "table" and type(model.unload) == "function" then
        ok, err = pcall(model.unload, model)
    end
    m_unload_s:observe(core.now() - t0)
    m_unloads:inc()
    if not ok then
        log_warn("serve.multiplexed: unloading model '%s' failed: %s", id, tostring(err))
    end
end

-- The body of a load's own task: makes room, loads, and wakes everyone waiting.
local function load_round(c, self, round)
    local ok, err = pcall(function()
        while c.max > 0 and #c.order >= c.max do
            evict(c, self)
            report()
        end
        local t0 = core.now()
        local model = c.loader(self, round.id)
        m_load_s:observe(core.now() - t0)
        if model == nil then
            error("the loader returned nil", 0)
        end
        c.models[round.id] = model
        c.order[#c.order + 1] = round.id
        m_loads:inc()
    end)
    if not ok then
        round.err = string.format("serve.multiplexed: loading model '%s' failed: %s", round.id,
            tostring(err))
        log_warn("%s", round.err)
    end
    c.round = nil
    report()
    core.signal_fire(c.sig)
end

local function get(c, self, id)
    m_requests:inc()
    while true do
        local model = c.models[id]
        if model ~= nil then
            if c.order[#c.order] ~= id then -- now the most recently used
                remove(c.order, id)
                c.order[#c.order + 1] = id
            end
            return model
        end
        local round = c.round
        if not round then -- nothing loading: this request's model is next
            round = { id = id }
            c.round = round
            report() -- advertised as loading at once, so routers send its requests here
            core.spawn(load_round, { n = 3, c, self, round })
        end
        core.signal_wait(c.sig)
        if round.id == id and round.err then
            error(round.err, 0)
        end
    end
end

-- serve.multiplexed([opts,] loader) -> a method: self:get_model(model_id) returns
-- loader(self, model_id)'s model, loading it on first use and evicting the least recently used
-- one beyond max_num_models_per_replica (default 3; 0 or less: no limit), with opts.unload(self,
-- model, model_id) (or the model's own :unload()) called on it.
function M.new(opts, loader)
    if type(opts) == "function" and loader == nil then
        opts, loader = {}, opts
    end
    if type(opts) ~= "table" or type(loader) ~= "function" then
        error("serve.multiplexed: expects ([options,] loader function)", 3)
    end
    for k in pairs(opts) do
        if k ~= "max_num_models_per_replica" and k ~= "unload" then
            error(string.format("serve.multiplexed: unknown option '%s'", tostring(k)), 3)
        end
    end
    local max = opts.max_num_models_per_replica
    if max == nil then
        max = 3
    elseif type(max) ~= "number" or max % 1 ~= 0 then
        error("serve.multiplexed: max_num_models_per_replica must be a whole number", 3)
    end
    if opts.unload ~= nil and type(opts.unload) ~= "function" then
        error("serve.multiplexed: unload must be a function(self, model, model_id)", 3)
    end
    local per_instance = setmetatable({}, { __mode = "k" })
    return function(self, model_id)
        if type(model_id) ~= "string" or model_id == "" then
            error("serve.multiplexed: the model id must be a non-empty string, got "
                .. (type(model_id) == "string" and '""' or type(model_id)), 2)
        end
        local c = per_instance[self]
        if not c then
            engine_metrics()
            c = { max = max, loader = loader, unload = opts.unload, models = {}, order = {},
                  sig = core.signal() }
            per_instance[self] = c
            caches[#caches + 1] = c
        end
        return get(c, self, model_id)
    end
end

-- Ids held by the replica's caches (tests and status).
function M.loaded()
    local ids = {}
    for _, c in ipairs(caches) do
        for _, id in ipairs(c.order) do
            ids[#ids + 1] = id
        end
    end
    return ids
end

return M
