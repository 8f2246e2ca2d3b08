-- moonserve.metrics: Counter, Gauge and Histogram for deployment code, as Ray Serve's
-- ray.serve.metrics (docs/metrics.md#custom-metrics). Values live in the replica; the controller
-- asks for them with each stats poll, sums them over the deployment's replicas and exports them
-- on /metrics.

local M = {}

-- Bounds on what one replica may create, so a metric tagged with request data cannot grow the
-- controller's memory or the scrape without limit: further series are dropped (logged once).
local MAX_METRICS, MAX_SERIES = 64, 256
local NAME = "^[a-zA-Z_][a-zA-Z0-9_]*$"
-- Label names the engine sets itself, or that Prometheus reserves.
local RESERVED = { application = true, deployment = true, le = true, quantile = true }

local registry, n_registered = {}, 0
-- Read by the controller, raw, for metrics defined in policy and router scripts
-- (engine/policy/metrics.c); replicas send _snapshot() instead.
M._registry = registry

local function log_warn(msg)
    local ok, serve = pcall(require, "moonserve")
    if ok and serve.log then serve.log.warn("%s", msg) end
end

local function check_name(kind, name, engine)
    if type(name) ~= "string" or not name:match(NAME) or name:sub(1, 2) == "__" then
        error(kind .. ": name must match [a-zA-Z_][a-zA-Z0-9_]*, got " .. tostring(name), 3)
    end
    if name:sub(1, 10) == "moonserve_" and not engine then
        error(kind .. ": the prefix moonserve_ is the engine's (" .. name .. ")", 3)
    end
end

local function check_tag_keys(kind, keys)
    keys = keys or {}
    if type(keys) ~= "table" then error(kind .. ": tag_keys must be a list of names", 3) end
    local out = {}
    for i, k in ipairs(keys) do
        if type(k) ~= "string" or not k:match(NAME) or k:sub(1, 2) == "__" or RESERVED[k] then
            error(kind .. ": tag key " .. tostring(k) .. " is not allowed (names as for metrics; "
                      .. "not application, deployment, le or quantile)", 3)
        end
        out[i] = k
    end
    return out
end

local function check_boundaries(b)
    if type(b) ~= "table" or #b == 0 then
        error("Histogram: boundaries must be a non-empty list of increasing numbers", 3)
    end
    local out = {}
    for i, v in ipairs(b) do
        if type(v) ~= "number" or v ~= v or (i > 1 and v <= out[i - 1]) then
            error("Histogram: boundaries must be a non-empty list of increasing numbers", 3)
        end
        out[i] = v
    end
    return out
end

local Metric = {}
Metric.__index = Metric

-- The series for these tags (defaults filled in), created on first use; nil past MAX_SERIES.
local function series(self, tags, level)
    if tags ~= nil and type(tags) ~= "table" then
        error(self.kind .. " " .. self.name .. ": tags must be a table", level)
    end
    local values = {}
    for i, k in ipairs(self.tag_keys) do
        local v = tags and tags[k]
        if v == nil then v = self.default_tags[k] end
        if type(v) ~= "string" and type(v) ~= "number" then
            error(self.kind .. " " .. self.name .. ": missing value for tag key " .. k, level)
        end
        values[i] = tostring(v)
    end
    for k in pairs(tags or {}) do
        if not self.keyset[k] then
            error(self.kind .. " " .. self.name .. ": unknown tag key " .. tostring(k), level)
        end
    end
    local key = table.concat(values, "\0")
    local s = self.series[key]
    if s then return s end
    if self.n_series >= MAX_SERIES then
        if not self.warned then
            self.warned = true
            log_warn(string.format("metric %s: more than %d tag combinations; new ones are "
                                       .. "dropped", self.name, MAX_SERIES))
        end
        return nil
    end
    s = { tags = {}, value = 0, count = 0, sum = 0 }
    for i, k in ipairs(self.tag_keys) do s.tags[k] = values[i] end
    if self.boundaries then
        s.buckets = {}
        for i = 1, #self.boundaries + 1 do s.buckets[i] = 0 end
    end
    self.series[key] = s
    self.n_series = self.n_series + 1
    return s
end

function Metric:set_default_tags(tags)
    if type(tags) ~= "table" then error("set_default_tags: tags must be a table", 2) end
    for k, v in pairs(tags) do
        if not self.keyset[k] then error(self.name .. ": unknown tag key " .. tostring(k), 2) end
        if type(v) ~= "string" and type(v) ~= "number" then
            error(self.name .. ": tag " .. k .. " must be a string or a number", 2)
        end
        self.default_tags[k] = v
    end
    return self
end

local function check_value(self, v)
    if type(v) ~= "number" or v ~= v then
        error(self.kind .. " " .. self.name .. ": value must be a number", 3)
    end
end

local Counter = setmetatable({}, { __index = Metric })
Counter.__index = Counter
function Counter:inc(value, tags)
    value = value == nil and 1 or value
    check_value(self, value)
    if value < 0 then error("Counter " .. self.name .. ": inc by a negative value", 2) end
    local s = series(self, tags, 3)
    if s then s.value = s.value + value end
end

local Gauge = setmetatable({}, { __index = Metric })
Gauge.__index = Gauge
function Gauge:set(value, tags)
    check_value(self, value)
    local s = series(self, tags, 3)
    if s then s.value = value end
end

local Histogram = setmetatable({}, { __index = Metric })
Histogram.__index = Histogram
function Histogram:observe(value, tags)
    check_value(self, value)
    local s = series(self, tags, 3)
    if not s then return end
    local b = self.boundaries
    local i = 1
    while i <= #b and value > b[i] do i = i + 1 end
    s.buckets[i] = s.buckets[i] + 1
    s.count = s.count + 1
    s.sum = s.sum + value
end

local function new(kind, class, opts, engine)
    if type(opts) ~= "table" then error(kind .. ": options must be a table", 3) end
    check_name(kind, opts.name, engine)
    local tag_keys = check_tag_keys(kind, opts.tag_keys)
    local boundaries = kind == "Histogram" and check_boundaries(opts.boundaries) or nil
    local old = registry[opts.name]
    if old then
        -- A constructor that runs again (a new instance) gets the same metric back.
        if old.kind ~= kind or table.concat(old.tag_keys, ",") ~= table.concat(tag_keys, ",") then
            error(kind .. ": " .. opts.name .. " already exists as a " .. old.kind
                      .. " with other tag keys", 3)
        end
        return old
    end
    if n_registered >= MAX_METRICS then
        error(kind .. ": more than " .. MAX_METRICS .. " metrics in one replica", 3)
    end
    local keyset = {}
    for _, k in ipairs(tag_keys) do keyset[k] = true end
    local m = setmetatable({ kind = kind, name = opts.name,
                             description = tostring(opts.description or ""),
                             tag_keys = tag_keys, keyset = keyset, boundaries = boundaries,
                             default_tags = {}, series = {}, n_series = 0 }, class)
    registry[opts.name] = m
    n_registered = n_registered + 1
    return m
end

function M.Counter(opts) return new("Counter", Counter, opts) end
function M.Gauge(opts) return new("Gauge", Gauge, opts) end
function M.Histogram(opts) return new("Histogram", Histogram, opts) end

-- The engine's own replica-side metrics (serve.multiplexed's), which carry the moonserve_ prefix
-- and travel and aggregate exactly as custom ones do.
local CLASSES = { Counter = Counter, Gauge = Gauge, Histogram = Histogram }
function M._engine(kind, opts) return new(kind, CLASSES[kind], opts, true) end

-- What the stats poll carries: {name = {type, description, boundaries?, series = {...}}}.
function M._snapshot()
    local out = {}
    for name, m in pairs(registry) do
        local list = {}
        for _, s in pairs(m.series) do
            local e = { tags = s.tags }
            if m.boundaries then
                e.buckets, e.count, e.sum = s.buckets, s.count, s.sum
            else
                e.value = s.value
            end
            list[#list + 1] = e
        end
        out[name] = { type = m.kind:lower(), description = m.description,
                      boundaries = m.boundaries, series = list }
    end
    return out
end

return M
