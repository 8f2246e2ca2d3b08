-- moonserve: the deployment API that application code requires (`local serve = require "moonserve"`).
--
-- It owns the Lua half of a Lua replica: deployment classes and their code options, the bind
-- graph (application nodes), request/response objects, handles and futures. The C half
-- (engine/runtime) registers "moonserve.core" before this module loads: JSON, logging and, inside
-- a replica only, the functions that yield the request's coroutine (sleep, handle calls).
-- docs/lua-api.md is the user-facing reference.

local core = require "moonserve.core"

local M = {}

M.json = {
    encode = core.json_encode,
    decode = core.json_decode,
    null = core.json_null,
    array = core.json_array,
}

M.log = {}
for _, level in ipairs { "debug", "info", "warn", "error" } do
    M.log[level] = function(fmt, ...)
        core.log(level, select("#", ...) > 0 and string.format(fmt, ...) or tostring(fmt))
    end
end

-- serve.nn: the built-in dense-model runtime (docs/nn.md), serve.metrics: Counter, Gauge
-- and Histogram (docs/metrics.md), and serve.routes: ingress routes (docs/lua-api.md), loaded
-- on first use; serve.app and serve.ingress are serve.routes'.
local LAZY = { nn = "moonserve.nn", metrics = "moonserve.metrics", routes = "moonserve.routes" }
local LAZY_FIELDS = { app = "moonserve.routes", ingress = "moonserve.routes" }
setmetatable(M, { __index = function(t, k)
    if LAZY[k] then
        rawset(t, k, require(LAZY[k]))
        return rawget(t, k)
    elseif LAZY_FIELDS[k] then
        rawset(t, k, require(LAZY_FIELDS[k])[k])
        return rawget(t, k)
    end
end })

-- ---- deployments ----------------------------------------------------------------------------

-- The code options serve.deployment{} accepts, with the Lua type each must have.
local OPTION_TYPES = {
    num_replicas = "number",
    max_ongoing_requests = "number",
    max_queued_requests = "number",
    user_config = "table",
    graceful_shutdown_wait_loop_s = "number",
    graceful_shutdown_timeout_s = "number",
    health_check_period_s = "number",
    health_check_timeout_s = "number",
    autoscaling_config = "table", -- validated by the engine like the config file's
    process = "table", -- a process deployment (docs/process-replicas.md): no Lua methods
}

-- Class metadata lives outside the class table so user methods can use any name.
local class_info = setmetatable({}, { __mode = "k" })

local Node = {}
Node.__index = Node

local ClassBase = {}

-- Class:bind(...) -> an application node holding the constructor arguments. Nodes found among
-- the arguments (at any depth in tables) become handles when the replica constructs the class.
function ClassBase.bind(cls, ...)
    if not class_info[cls] then
        error("bind must be called on a deployment class (Class:bind(...))", 2)
    end
    return setmetatable({ class = cls, args = { ... }, nargs = select("#", ...) }, Node)
end

function M.deployment(opts)
    if type(opts) ~= "table" then
        error("serve.deployment expects a table of options", 2)
    end
    if type(opts.name) ~= "string" or opts.name == "" or opts.name:find("/", 1, true) then
        error("serve.deployment: 'name' must be a non-empty string without '/'", 2)
    end
    local options = {}
    for k, v in pairs(opts) do
        if k ~= "name" then
            local want = OPTION_TYPES[k]
            if not want then
                error(string.format("serve.deployment %s: unknown option '%s'", opts.name, tostring(k)), 2)
            end
            -- num_replicas = "auto" is the one string option value.
            if type(v) ~= want and not (k == "num_replicas" and v == "auto") then
                error(string.format("serve.deployment %s: option '%s' must be a %s", opts.name, k, want), 2)
            end
            options[k] = v
        end
    end
    local cls = setmetatable({}, { __index = ClassBase })
    cls.__index = cls
    class_info[cls] = { name = opts.name, options = options }
    return cls
end

local function is_node(v)
    return getmetatable(v) == Node
end

-- Calls fn(node) for every node directly reachable from v (not looking inside nested nodes).
local function each_child_node(v, fn, seen)
    if is_node(v) then
        fn(v)
    elseif type(v) == "table" and not seen[v] then
        seen[v] = true
        for k, x in pairs(v) do
            each_child_node(k, fn, seen)
            each_child_node(x, fn, seen)
        end
    end
end

local function node_children(node, fn)
    local seen = {}
    for i = 1, node.nargs do
        each_child_node(node.args[i], fn, seen)
    end
end

-- Walks the bind graph from the root: returns the nodes in discovery order (root first) and a
-- name -> node map. Two different nodes may not share a deployment name, and the ingress (the
-- root), which HTTP requests reach, must define __call unless it only consumes tasks (checked
-- here so `moonserve check` reports it without constructing anything); the others are reached
-- through handles only.
-- A task consumer's class (serve.task_handler fields) needs no __call: tasks reach it, not HTTP.
local function has_task_handlers(cls)
    for _, v in pairs(cls) do
        if getmetatable(v) == M._TaskHandler then
            return true
        end
    end
    return false
end

local function collect(root)
    local order, by_name = {}, {}
    local function visit(node)
        local name = class_info[node.class].name
        local prev = by_name[name]
        if prev == node then
            return
        elseif prev then
            error(string.format("deployment name '%s' is bound twice with different arguments", name), 0)
        end
        if node == root and type(node.class.__call) ~= "function"
            and not class_info[node.class].options.process and not has_task_handlers(node.class) then
            error(string.format("deployment '%s' has no __call method", name), 0)
        end
        by_name[name] = node
        order[#order + 1] = node
        node_children(node, visit)
    end
    visit(root)
    return order, by_name
end

-- Resolves an import path's attribute from what the module chunk returned: a table of
-- attributes indexed by attr, or (when attr is "app") the node or builder itself. A builder
-- function is called with the config's args and must return a node.
function M._resolve(ret, attr, args, file)
    local target
    if (is_node(ret) or type(ret) == "function") and attr == "app" then
        target = ret
    elseif type(ret) == "table" and not is_node(ret) then
        target = ret[attr]
        if target == nil then
            error(string.format("%s: attribute '%s' not found in the table the module returned", file, attr), 0)
        end
    else
        error(string.format("%s: the module must return a table of attributes (got %s) to resolve '%s'",
            file, type(ret), attr), 0)
    end
    if type(target) == "function" then
        target = target(args)
        if not is_node(target) then
            error(string.format("%s: builder '%s' returned %s, not an application (Class:bind(...))",
                file, attr, type(target)), 0)
        end
    elseif not is_node(target) then
        error(string.format("%s: '%s' is a %s, not an application (Class:bind(...)) or builder function",
            file, attr, type(target)), 0)
    end
    collect(target) -- reject duplicate names at load time
    return target
end

-- The graph document ms_runtime_inspect returns (see engine/runtime/runtime.h).
function M._graph(root)
    local order = collect(root)
    local deployments = {}
    for i, node in ipairs(order) do
        local info = class_info[node.class]
        local handles, seen = {}, {}
        node_children(node, function(child)
            local name = class_info[child.class].name
            if not seen[name] then
                seen[name] = true
                handles[#handles + 1] = name
            end
        end)
        local batched = {}
        for k, v in pairs(node.class) do
            if getmetatable(v) == M._Batched then
                batched[#batched + 1] = { name = v.name or tostring(k), max_batch_size = v.opts.max_batch_size,
                                          max_concurrent_batches = v.opts.max_concurrent_batches }
            end
        end
        deployments[i] = { name = info.name, options = info.options, handles = M.json.array(handles),
                           batched = M.json.array(batched) }
    end
    return { ingress = class_info[root.class].name, deployments = M.json.array(deployments) }
end

-- ---- values through handles (docs/replica-protocol.md, "Value encoding") -------------------
--
-- A handle call carries Lua values as one compact binary payload in the body of the existing
-- handle-call request: a varint count, then each value as a tag byte and its payload. Integral
-- numbers up to 2^53 travel as varints (one byte below 128), every other number as its 8 bytes,
-- so numbers come back bit-exact; strings are binary-safe; tables keep the array/object
-- distinction. Written with string.buffer and the FFI: no intermediate strings or tables.

local ffi = require "ffi"
local strbuf = require "string.buffer"
local table_new = require "table.new"

local VALUES_TYPE = "application/x-moonserve-values"
local VALUE_STREAM_TYPE = "application/x-moonserve-value-stream"
local VALUES_MAX_DEPTH = 100
local TWO53 = 2 ^ 53
local NAN = 0 / 0
local ARRAY_MT = getmetatable(M.json.array())
local T_NIL, T_FALSE, T_TRUE, T_UINT, T_NEGINT, T_DOUBLE, T_STRING, T_ARRAY, T_MAP, T_NULL =
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9

assert(ffi.abi("le"), "the handle value encoding assumes a little-endian host")

-- The one table argument of a __call that came through a handle: Lua code written when such a
-- table arrived as a JSON request body calls `req:json()` on it, which still returns the table.
local LegacyArg = { __index = { json = function(t) return t end } }

local Request = {} -- the metatable of request objects (below)

local out = strbuf.new()
local dbl = ffi.new("double[1]")

local function put_varint(n) -- 0 <= n <= 2^53, integral
    local p = out:reserve(8)
    local i = 0
    while n >= 128 do
        local low = n % 128
        p[i] = low + 128
        n = (n - low) / 128
        i = i + 1
    end
    p[i] = n
    out:commit(i + 1)
end

local function put_tag(tag)
    local p = out:reserve(1)
    p[0] = tag
    out:commit(1)
end

-- Raised with a path into the value ("argument 2, field "a", item 3"); path[1] is the label
-- and position of the top-level value, the rest the keys below it.
local function encode_fail(path, what)
    local parts = { path[1] }
    for i = 2, #path do
        local k = path[i]
        parts[i] = type(k) == "number" and "item " .. k
            or type(k) == "string" and string.format("field %q", k) or "a " .. type(k) .. " key"
    end
    if #parts > 8 then -- deep paths: the top and the bottom say where
        parts = { parts[1], parts[2], parts[3], "...", parts[#parts - 1], parts[#parts] }
    end
    error({ values_error = table.concat(parts, ", ") .. ": cannot pass " .. what }, 0)
end

local put_value

local function put_table(t, depth, path, active)
    local mt = getmetatable(t)
    if mt == Request then
        encode_fail(path, "a request object (a request is forwarded only alone, to __call)")
    elseif mt ~= nil and mt ~= ARRAY_MT and mt ~= LegacyArg then
        encode_fail(path, "a table with a metatable (an object such as a request, response, handle or class instance)")
    elseif active[t] then
        encode_fail(path, "a table that contains itself (a cycle)")
    elseif depth >= VALUES_MAX_DEPTH then
        encode_fail(path, "tables nested deeper than " .. VALUES_MAX_DEPTH)
    end
    active[t] = true
    -- An array is a table whose keys are exactly 1..n (or an empty one marked serve.json.array).
    local count, max, array = 0, 0, true
    for k in pairs(t) do
        count = count + 1
        if array and type(k) == "number" and k >= 1 and k % 1 == 0 then
            max = k > max and k or max
        else
            array = false
        end
    end
    if count == 0 then
        array = mt == ARRAY_MT
    else
        array = array and max == count -- positive integer keys, as many as the largest: 1..n
    end
    local n = #path + 1
    if array then
        put_tag(T_ARRAY)
        put_varint(count)
        for i = 1, count do
            path[n] = i
            put_value(t[i], depth + 1, path, active)
        end
    else
        put_tag(T_MAP)
        put_varint(count)
        for k, v in pairs(t) do
            path[n] = k
            put_value(k, depth + 1, path, active)
            put_value(v, depth + 1, path, active)
        end
    end
    path[n] = nil
    active[t] = nil
end

put_value = function(v, depth, path, active)
    local tv = type(v)
    if tv == "nil" then
        put_tag(T_NIL)
    elseif tv == "boolean" then
        put_tag(v and T_TRUE or T_FALSE)
    elseif tv == "number" then
        if v % 1 == 0 and v >= -TWO53 and v <= TWO53 and (v ~= 0 or 1 / v > 0) then
            if v >= 0 then
                put_tag(T_UINT)
                put_varint(v)
            else
                put_tag(T_NEGINT)
                put_varint(-v)
            end
        else -- fractions, -0.0, infinities, NaN and integers beyond 2^53
            put_tag(T_DOUBLE)
            dbl[0] = v
            out:putcdata(dbl, 8)
        end
    elseif tv == "string" then
        put_tag(T_STRING)
        put_varint(#v)
        out:put(v)
    elseif tv == "table" then
        put_table(v, depth, path, active)
    elseif v == M.json.null then
        put_tag(T_NULL)
    else
        encode_fail(path, "a " .. tv .. (tv == "userdata" and " (only serve.json.null passes)" or ""))
    end
end

-- The payload for values v[1..n]; on a value that cannot pass, nil and the reason, which names
-- the value as `label` and its position ("argument 2").
local function put_values(v, n, label)
    put_varint(n)
    local path = {}
    for i = 1, n do
        path[1] = label .. " " .. i
        put_value(v[i], 1, path, {})
    end
end

local function values_encode(v, n, label)
    out:reset()
    local ok, err = pcall(put_values, v, n, label)
    local s = ok and out:tostring()
    if #out > 1048576 then
        out:free() -- the buffer is reused: do not keep a large call's space
    else
        out:reset()
    end
    if ok then
        return s
    elseif type(err) == "table" and err.values_error then
        return nil, err.values_error
    end
    error(err, 0) -- out of memory: not the value's fault
end

-- Decodes a payload into (n, {v1, ..., vn}); a malformed one raises.
local function values_decode(s)
    local p, len, pos = ffi.cast("const uint8_t *", s), #s, 0
    local function malformed(why)
        error("malformed handle value payload: " .. why .. " at byte " .. pos, 0)
    end
    local function varint()
        local n, scale = 0, 1
        repeat
            if pos >= len then
                malformed("truncated")
            elseif scale > TWO53 then
                malformed("varint too long")
            end
            local b = p[pos]
            pos = pos + 1
            n = n + (b % 128) * scale
            scale = scale * 128
        until b < 128
        if n > TWO53 then
            malformed("integer beyond 2^53")
        end
        return n
    end
    local function count(min_bytes_each)
        local n = varint()
        if n * min_bytes_each > len - pos then
            malformed("count larger than the payload")
        end
        return n
    end
    local value
    value = function(depth)
        if pos >= len then
            malformed("truncated")
        elseif depth > VALUES_MAX_DEPTH then
            malformed("nested too deep")
        end
        local tag = p[pos]
        pos = pos + 1
        if tag == T_NIL then
            return nil
        elseif tag == T_FALSE then
            return false
        elseif tag == T_TRUE then
            return true
        elseif tag == T_UINT then
            return varint()
        elseif tag == T_NEGINT then
            return -varint()
        elseif tag == T_DOUBLE then
            if len - pos < 8 then
                malformed("truncated")
            end
            -- A NaN's payload never reaches Lua: LuaJIT keeps its other values inside NaNs, and
            -- reading these bytes as a double would hand over whatever value they spell (found
            -- by tests/fuzz/fuzz_values.c). Exponent all ones and a mantissa: the one NaN.
            if p[pos + 7] % 128 == 127 and p[pos + 6] >= 240 and (p[pos + 6] % 16 ~= 0
                or p[pos] + p[pos + 1] + p[pos + 2] + p[pos + 3] + p[pos + 4] + p[pos + 5] ~= 0) then
                pos = pos + 8
                return NAN
            end
            ffi.copy(dbl, p + pos, 8)
            pos = pos + 8
            return dbl[0]
        elseif tag == T_STRING then
            local n = count(1)
            local v = ffi.string(p + pos, n)
            pos = pos + n
            return v
        elseif tag == T_ARRAY then
            local n = count(1)
            local t = table_new(n, 0)
            for i = 1, n do
                local v = value(depth + 1)
                if v == nil then
                    malformed("nil in an array")
                end
                t[i] = v
            end
            return setmetatable(t, ARRAY_MT)
        elseif tag == T_MAP then
            local n = count(2)
            local t = table_new(0, n)
            for _ = 1, n do
                local k = value(depth + 1)
                if k == nil or k ~= k then
                    malformed("nil or NaN key")
                end
                t[k] = value(depth + 1)
            end
            return t
        elseif tag == T_NULL then
            return M.json.null
        end
        pos = pos - 1
        malformed("unknown tag " .. tag)
    end
    local n = count(1)
    local vals = table_new(n, 0)
    for i = 1, n do
        vals[i] = value(1)
    end
    if pos ~= len then
        malformed("left-over bytes")
    end
    return n, vals
end

M._values = { encode = values_encode, decode = values_decode, content_type = VALUES_TYPE }

-- ---- handles and futures --------------------------------------------------------------------

-- A handle's state sits under a key no method name can be, so `handle.anything` stays free for
-- method names. state: app, deployment, class (nil for a process deployment), opts.
local STATE = {}
local Handle = {}
local HandleMethods = {}
local Future = {}
Future.__index = Future
local StreamResponse = {} -- what handle:options{stream = true}:remote() returns (below)
StreamResponse.__index = StreamResponse

local function replica_only(name)
    return core[name] or function()
        error("serve: " .. name .. " is only available inside a replica", 2)
    end
end
local core_sleep, core_call, core_result = replica_only("sleep"), replica_only("call"), replica_only("result")
local core_wait, core_done, core_cancel = replica_only("wait"), replica_only("done"), replica_only("cancel")
local core_wait_data, core_take = replica_only("wait_data"), replica_only("take")

-- The request each task's coroutine serves, and the model id of a batch's task: what
-- serve.get_multiplexed_model_id() reads. Coroutines are reused, so each request sets both.
local task_request = setmetatable({}, { __mode = "k" })
local task_model = setmetatable({}, { __mode = "k" })

-- serve.get_multiplexed_model_id() -> the model id of the request being served (its
-- serve_multiplexed_model_id header, which a handle's multiplexed_model_id option sets), or ""
-- when it has none. Inside a batch, the id all of the batch's items share.
function M.get_multiplexed_model_id()
    local co = coroutine.running()
    local id = task_model[co]
    if id then
        return id
    end
    local req = task_request[co]
    return req and req.headers["serve_multiplexed_model_id"] or ""
end
local core_time_left = replica_only("time_left")
local core_stream_start, core_stream_send = replica_only("stream_start"), replica_only("stream_send")
local core_batcher_new, core_batch_submit = replica_only("batcher_new"), replica_only("batch_submit")
local core_batch_configure, core_batch_stats = replica_only("batch_configure"), replica_only("batch_stats")

local function new_handle(state)
    return setmetatable({ [STATE] = state }, Handle)
end

local function is_identifier(s)
    return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil
end

-- handle.name -> a handle calling method `name` (as Ray's handle.name.remote()).
Handle.__index = function(h, k)
    local m = HandleMethods[k]
    if m then
        return m
    elseif is_identifier(k) then
        return HandleMethods.options(h, { method_name = k })
    end
end

Handle.__tostring = function(h)
    local st = rawget(h, STATE)
    return string.format("handle(%s/%s%s)", st.app, st.deployment,
        st.opts.method_name and "." .. st.opts.method_name or "")
end

-- The function a class offers as method `name` through handles (a batched method counts), or
-- nil. Only the class's own fields: `bind` and anything set on an instance are not methods.
local function class_method(cls, name)
    local f = rawget(cls, name)
    if type(f) == "function" or getmetatable(f) == M._Batched then
        return f
    end
end

-- The options handle:options{} accepts; each check returns an error message or nil.
local HANDLE_OPTIONS = {
    method_name = function(v)
        return not is_identifier(v) and "method_name must be a method name (a Lua identifier)" or nil
    end,
    multiplexed_model_id = function(v)
        return type(v) ~= "string" and "multiplexed_model_id must be a string" or nil
    end,
    stream = function(v)
        return type(v) ~= "boolean" and "stream must be a boolean" or nil
    end,
    timeout_s = function(v)
        return not (type(v) == "number" and v >= 0) and "timeout_s must be a number >= 0" or nil
    end,
}

-- handle:options{...} -> a new handle with the options merged over this one's.
function HandleMethods.options(h, opts)
    if getmetatable(h) ~= Handle then
        error("options must be called as handle:options{...}", 2)
    end
    if type(opts) ~= "table" then
        error("handle:options expects a table of options", 2)
    end
    local st = rawget(h, STATE)
    local merged = {}
    for k, v in pairs(st.opts) do
        merged[k] = v
    end
    for k, v in pairs(opts) do
        local check = HANDLE_OPTIONS[k]
        if not check then
            error(string.format("handle:options: unknown or unsupported option '%s' (supported: "
                .. "method_name, multiplexed_model_id, timeout_s, stream)", tostring(k)), 2)
        end
        local problem = check(v)
        if problem then
            error("handle:options: " .. problem, 2)
        end
        merged[k] = v
    end
    return new_handle({ app = st.app, deployment = st.deployment, class = st.class, opts = merged })
end

-- Headers a forwarded request must not carry over: framing and routing are the new hop's own.
local HOP_HEADERS = {
    ["content-length"] = true, ["transfer-encoding"] = true, connection = true,
    host = true, ["x-request-id"] = true, ["x-moonserve-target"] = true, ["keep-alive"] = true,
    ["x-moonserve-method"] = true, ["x-moonserve-timeout-ms"] = true, ["x-moonserve-stream"] = true,
    ["x-moonserve-task"] = true, ["x-moonserve-task-id"] = true, ["x-moonserve-task-attempt"] = true,
}

-- A request forwarded as is, for a request object; for a process deployment also a string
-- (POST body), a table (POST JSON body) or nothing (POST, no body). Returns method, path,
-- body, headers.
local function http_call(st, n, arg)
    local method, path, body, headers = "POST", "/", "", {}
    local mid = st.opts.multiplexed_model_id or M.get_multiplexed_model_id()
    mid = mid ~= "" and mid or nil
    if getmetatable(arg) == Request then
        method, body = arg.method, arg.body
        path = arg.path .. (arg.query_string ~= "" and ("?" .. arg.query_string) or "")
        for k, v in pairs(arg.headers) do
            if not HOP_HEADERS[k] and not (mid and k == "serve_multiplexed_model_id") then
                headers[#headers + 1] = k
                headers[#headers + 1] = v
            end
        end
    elseif n > 1 then
        error(string.format("handle:remote: %s is a process deployment: it takes one argument "
            .. "(a request, a string, a table or nil), got %d", st.deployment, n), 3)
    elseif type(arg) == "string" then
        body = arg
        headers = { "content-type", "text/plain; charset=utf-8" }
    elseif type(arg) == "table" then
        body = M.json.encode(arg)
        headers = { "content-type", "application/json" }
    elseif arg ~= nil then
        error("handle:remote: a process deployment takes a request, a string, a table or nil, got "
            .. type(arg), 3)
    end
    return method, path, body, headers
end

-- handle:remote(...) sends the call at once and returns a future. A Lua deployment's method
-- receives the same values (docs/lua-api.md); a request object alone is forwarded to __call as
-- an HTTP request, and a process deployment gets an HTTP request (http_call).
function HandleMethods.remote(h, ...)
    if getmetatable(h) ~= Handle then
        error("remote must be called as handle:remote(...)", 2)
    end
    local st = rawget(h, STATE)
    local n, first = select("#", ...), ...
    local name = st.opts.method_name
    local target = st.app .. "/" .. st.deployment
    local future = { target = target, app = st.app, deployment = st.deployment }
    local method, path, body, headers
    if st.class == nil or (name == nil and n == 1 and getmetatable(first) == Request) then
        if name then
            error(string.format("handle:remote: %s is a process deployment: it has no methods "
                .. "(method '%s')", st.deployment, name), 2)
        end
        method, path, body, headers = http_call(st, n, first)
    else
        name = name or "__call"
        if not class_method(st.class, name) then
            error(string.format("handle:remote: deployment '%s' has no method '%s'", st.deployment, name), 2)
        end
        local err
        body, err = values_encode({ ... }, n, "argument")
        if not body then
            error(string.format("handle:remote: call to %s.%s: %s", st.deployment, name, err), 2)
        end
        method, path = "POST", "/"
        headers = { "content-type", VALUES_TYPE, "x-moonserve-method", name }
        future.values, future.target, future.method = true, target .. "." .. name, name
    end
    -- The request's own model id goes on to the calls it makes, unless the handle names one.
    local mid = st.opts.multiplexed_model_id or M.get_multiplexed_model_id()
    if mid ~= "" then
        headers[#headers + 1] = "serve_multiplexed_model_id"
        headers[#headers + 1] = mid
    end
    local stream = st.opts.stream == true
    if stream and future.values then
        headers[#headers + 1], headers[#headers + 2] = "x-moonserve-stream", "1"
    end
    future.call = core_call(target, method, path, headers, body, st.opts.timeout_s, stream)
    if stream then
        future.pending = strbuf.new()
        return setmetatable(future, StreamResponse)
    end
    return setmetatable(future, Future)
end

-- ---- call errors ------------------------------------------------------------------------------

-- What a failed handle call raises: an object whose fields say what failed, and whose text (its
-- tostring, which is also what an uncaught one reports) names the callee and keeps its message.
local CallError = {}
CallError.__index = CallError
CallError.__tostring = function(e)
    return e.text
end
M.CallError = CallError

function M.is_call_error(v)
    return getmetatable(v) == CallError
end

-- kind: "timeout" (408: a deadline or timeout_s passed), "cancelled" (future:cancel()),
-- "unavailable" (no answer: the controller or replica went away) or "failed" (any other non-2xx).
local function call_error(f, kind, status, message, text)
    return setmetatable({ kind = kind, status = status, message = message, app = f.app,
        deployment = f.deployment, method = f.method, target = f.target, text = text }, CallError)
end

-- The message of an error answer: the "error" field of a JSON error body, else the body.
local function answer_message(ctype, body)
    if ctype:find("application/json", 1, true) then
        local ok, v = pcall(M.json.decode, body)
        if ok and type(v) == "table" and type(v.error) == "string" then
            return v.error
        end
    end
    return body
end

-- The future's outcome once its call ended: true and the values, or false and a CallError.
local function settle(f)
    if f.settled then
        return f.ok, f.value
    end
    local status, ctype, body = core_result(f.call)
    local ok, value = true, nil
    if status == nil then
        if body == "timeout" then
            ok, value = false, call_error(f, "timeout", 408, "the time limit passed mid-answer",
                string.format("call to %s: the time limit passed mid-answer (%s)", f.target, ctype))
        else
            ok, value = false, call_error(f, body, nil, ctype,
                string.format("call to %s failed: %s", f.target, ctype))
        end
    else
        ctype = ctype and ctype:lower() or ""
        if status < 200 or status > 299 then
            local msg = answer_message(ctype, body)
            ok, value = false, call_error(f, status == 408 and "timeout" or "failed", status, msg,
                string.format("call to %s failed with status %d: %s", f.target, status, msg))
        elseif f.values and ctype == VALUES_TYPE then
            local good, k, vals = pcall(values_decode, body)
            if good then
                vals.n, value = k, vals
            else
                ok, value = false, call_error(f, "failed", status, k,
                    string.format("call to %s: %s", f.target, k))
            end
        elseif ctype:find("application/json", 1, true) then
            value = { n = 1, M.json.decode(body) }
        else
            value = { n = 1, body }
        end
    end
    f.settled, f.ok, f.value = true, ok, value
    return ok, value
end

local function timeout_error(f, timeout_s)
    return call_error(f, "timeout", 408, "no answer within " .. timeout_s .. "s",
        string.format("call to %s: no answer within %gs", f.target, timeout_s))
end

-- future:result([timeout_s]) suspends the request until the answer arrives and returns the
-- method's values; a failed call raises its CallError. With timeout_s, no answer in time raises
-- a "timeout" CallError and leaves the call running (result() may be called again, or cancel()).
-- Errors carry no position: handlers often tail-call result(), which would make level 2 point
-- into this file.
function Future:result(timeout_s)
    if not core_wait(self.call, 1, timeout_s) then
        error(timeout_error(self, timeout_s), 0)
    end
    local ok, value = settle(self)
    if not ok then
        error(value, 0)
    end
    return unpack(value, 1, value.n)
end

-- Whether the call has ended (result() would not wait).
function Future:done()
    return core_done(self.call)
end

-- Ends the call now; the callee's request is cancelled at every depth. result() then raises a
-- "cancelled" CallError. Nothing happens once the call has ended.
function Future:cancel()
    core_cancel(self.call)
end

-- ---- streams through handles (docs/lua-api.md, "Streaming through handles") ----------------
--
-- A Lua method called with stream = true that returns serve.stream sends each send(v) as one
-- frame: a varint length, a kind byte ('v': one value in the value encoding; 'e': the producer
-- failed, with its message), and the payload. Any other stream call (a request forwarded as
-- is, a process deployment) yields the body's bytes as they arrive.

local function varint_bytes(n)
    local b = {}
    while n >= 128 do
        local low = n % 128
        b[#b + 1] = string.char(low + 128)
        n = (n - low) / 128
    end
    b[#b + 1] = string.char(n)
    return table.concat(b)
end

local function frame(kind, payload)
    return varint_bytes(#payload + 1) .. kind .. payload
end

-- The next whole frame in buf: kind and payload, or nil while it is incomplete.
local function pop_frame(buf)
    local p, len = buf:ref()
    local n, scale, i = 0, 1, 0
    repeat
        if i >= len then
            return nil
        elseif i >= 8 then
            error("malformed value stream: frame length too long", 0)
        end
        local b = p[i]
        i = i + 1
        n = n + (b % 128) * scale
        scale = scale * 128
    until b < 128
    if n < 1 then
        error("malformed value stream: empty frame", 0)
    elseif len - i < n then
        return nil
    end
    local kind, payload = string.char(p[i]), ffi.string(p + i + 1, n - 1)
    buf:skip(i + n)
    return kind, payload
end

-- The next item of the stream from what has arrived, or nil when more must come first.
local function next_item(g)
    if not g.framed then
        if #g.pending == 0 then
            return nil
        end
        local s = g.pending:get()
        return s
    end
    local ok, kind, payload = pcall(pop_frame, g.pending)
    if ok and kind == "v" then
        local good, n, vals = pcall(values_decode, payload)
        if good and n == 1 and vals[1] ~= nil then
            return vals[1]
        end
        kind, payload = "e", good and "a stream item must be one value, not nil" or n
    elseif not ok then
        kind, payload = "e", kind
    end
    if kind ~= nil then
        core_cancel(g.call)
        g.ended = true
        error(call_error(g, "failed", 200, payload, string.format("stream from %s failed: %s",
            g.target, payload)), 0)
    end
end

-- stream:next() -> the next item the callee sent, waiting for it; nil once the stream ended. A
-- failure (an error answer, the producer raising, a cancel or a deadline) raises its CallError.
function StreamResponse:next()
    while true do
        local item = next_item(self)
        if item ~= nil then
            return item
        elseif self.ended then
            return nil
        end
        local data, ctype = core_take(self.call)
        if data then
            if self.framed == nil then
                self.framed = ctype == VALUE_STREAM_TYPE
                if self.values and not self.framed then
                    core_cancel(self.call)
                    self.ended = true
                    local msg = string.format("%s did not return serve.stream (it was called "
                        .. "with stream = true)", self.target)
                    error(call_error(self, "failed", 200, msg, msg), 0)
                end
            end
            self.pending:put(data)
        elseif core_done(self.call) then
            self.ended = true
            local ok, err = settle(self)
            if not ok then
                error(err, 0)
            elseif #self.pending > 0 then
                local msg = "the stream ended inside a frame"
                error(call_error(self, "failed", 200, msg, "stream from " .. self.target .. ": " .. msg), 0)
            end
        else
            core_wait_data(self.call)
        end
    end
end

-- `for item in stream do ... end` calls stream:next() until it returns nil.
StreamResponse.__call = StreamResponse.next

-- Whether the stream has ended: next() returned nil or raised, or cancel() was called.
function StreamResponse:done()
    return self.ended == true
end

-- Ends the stream now; the producer's request is cancelled at every depth.
function StreamResponse:cancel()
    self.ended = true
    self.pending:reset()
    core_cancel(self.call)
end

-- The futures of a list, checked and without repeats, and their calls.
local function future_list(futures, who)
    if type(futures) ~= "table" then
        error(who .. ": expects a list of futures", 3)
    end
    local list, calls, seen = {}, {}, {}
    for i = 1, #futures do
        local f = futures[i]
        if getmetatable(f) ~= Future then
            error(string.format("%s: item %d is not a future (%s)", who, i, type(f)), 3)
        end
        if not seen[f] then
            seen[f] = true
            list[#list + 1], calls[#calls + 1] = f, f.call
        end
    end
    return list, calls
end

local function wait_options(opts, who, allowed)
    if opts == nil then
        return {}
    elseif type(opts) ~= "table" then
        error(who .. ": options must be a table", 3)
    end
    for k, v in pairs(opts) do
        if not allowed[k] then
            error(string.format("%s: unknown option '%s'", who, tostring(k)), 3)
        end
        if k == "timeout_s" and not (type(v) == "number" and v >= 0) then
            error(who .. ": timeout_s must be a number >= 0", 3)
        end
        if k == "num_returns" and not (type(v) == "number" and v >= 1 and v % 1 == 0) then
            error(who .. ": num_returns must be a whole number >= 1", 3)
        end
    end
    return opts
end

local function split_done(list)
    local done, pending = {}, {}
    for _, f in ipairs(list) do
        local t = core_done(f.call) and done or pending
        t[#t + 1] = f
    end
    return done, pending
end

-- serve.wait(futures, {num_returns =, timeout_s =}) -> done, pending: waits until num_returns
-- (default: all) of the futures have ended, or timeout_s passed, and returns two lists of them.
-- Nothing is cancelled; failed calls count as ended (their result() raises).
function M.wait(futures, opts)
    local o = wait_options(opts, "serve.wait", { num_returns = true, timeout_s = true })
    local list, calls = future_list(futures, "serve.wait")
    core_wait(calls, math.min(o.num_returns or #list, #list), o.timeout_s)
    return split_done(list)
end

local function cancel_all(list)
    for _, f in ipairs(list) do
        core_cancel(f.call)
    end
end

-- serve.gather(futures, {timeout_s =}) -> a list of each future's (first) result, in order. The
-- first call to fail, or the time limit, raises its CallError at once and cancels the calls
-- still running: the request cannot use their results any more.
function M.gather(futures, opts)
    local o = wait_options(opts, "serve.gather", { timeout_s = true })
    local list, calls = future_list(futures, "serve.gather")
    local in_time = core_wait(calls, #list, o.timeout_s, true)
    local out = {}
    for i, f in ipairs(list) do
        if core_done(f.call) then
            local ok, value = settle(f)
            if not ok then
                cancel_all(list)
                error(value, 0)
            end
            out[i] = value[1]
        end
    end
    if not in_time then
        cancel_all(list)
        error(timeout_error({ target = #list .. " calls" }, o.timeout_s), 0)
    end
    -- results by the caller's positions (a repeated future fills each of its places)
    local by_future, res = {}, {}
    for i, f in ipairs(list) do
        by_future[f] = out[i]
    end
    for i = 1, #futures do
        res[i] = by_future[futures[i]]
    end
    return res
end

-- serve.first(futures, {timeout_s =}) -> the first future to end, then its values: the others
-- are cancelled (a race, e.g. a hedged request). A failed first call raises its CallError; so
-- does the time limit (then every call is cancelled).
function M.first(futures, opts)
    local o = wait_options(opts, "serve.first", { timeout_s = true })
    local list, calls = future_list(futures, "serve.first")
    if #list == 0 then
        error("serve.first: expects at least one future", 2)
    end
    if not core_wait(calls, 1, o.timeout_s) then
        cancel_all(list)
        error(timeout_error({ target = #list .. " calls" }, o.timeout_s), 0)
    end
    local winner
    for _, f in ipairs(list) do
        if not winner and core_done(f.call) then
            winner = f
        else
            core_cancel(f.call)
        end
    end
    local ok, value = settle(winner)
    if not ok then
        error(value, 0)
    end
    return winner, unpack(value, 1, value.n)
end

-- Seconds left before the request's deadline (docs/lua-api.md, "Deadlines"), or nil without one.
function M.time_left()
    return core_time_left()
end

-- ---- serve.batch (docs/batching.md) ------------------------------------------------------------

-- A batched method: a callable table, so its settings can change at run time. Its batcher (in
-- C) is made on the first call inside a replica; `moonserve check` only reads the settings.
local Batched = {}
Batched.__index = Batched
M._Batched = Batched

local BATCH_DEFAULTS = { max_batch_size = 10, batch_wait_timeout_s = 0.01, max_concurrent_batches = 1 }

local function batch_settings(opts, level)
    local o = {}
    for k, v in pairs(opts) do
        if k ~= "name" and k ~= "batch_size_fn" and BATCH_DEFAULTS[k] == nil and k ~= "latency_target_s" then
            error("serve.batch: unknown option '" .. tostring(k) .. "'", level)
        end
        o[k] = v
    end
    for k, v in pairs(BATCH_DEFAULTS) do
        if o[k] == nil then o[k] = v end
    end
    local function int_at_least(k, min)
        local v = o[k]
        if type(v) ~= "number" or v ~= math.floor(v) or v < min then
            error(string.format("serve.batch: %s must be an integer >= %d, got %s", k, min, tostring(v)), level)
        end
    end
    int_at_least("max_batch_size", 1)
    int_at_least("max_concurrent_batches", 1)
    if type(o.batch_wait_timeout_s) ~= "number" or not (o.batch_wait_timeout_s >= 0) then
        error("serve.batch: batch_wait_timeout_s must be a number >= 0", level)
    end
    if o.latency_target_s ~= nil and (type(o.latency_target_s) ~= "number" or not (o.latency_target_s > 0)) then
        error("serve.batch: latency_target_s must be a number > 0", level)
    end
    if o.batch_size_fn ~= nil and type(o.batch_size_fn) ~= "function" then
        error("serve.batch: batch_size_fn must be a function", level)
    end
    return o
end

local function make_batched(fn, opts)
    if type(fn) ~= "function" then
        error("serve.batch: expects a function(self, items)", 3)
    end
    return setmetatable({ fn = fn, opts = batch_settings(opts, 4), name = opts.name }, Batched)
end

-- serve.batch(fn), serve.batch(opts, fn) or serve.batch(opts)(fn), as Ray's @serve.batch.
function M.batch(a, b)
    if type(a) == "table" and getmetatable(a) == nil and b == nil then
        return function(fn) return make_batched(fn, a) end
    end
    if type(a) == "table" and getmetatable(a) == nil then
        return make_batched(b, a)
    end
    return make_batched(a, {})
end

function Batched.__call(bm, self, item, ...)
    if select("#", ...) > 0 then
        error("a batched method takes one argument per call", 2)
    end
    local h = bm._h
    if not h then
        h = core_batcher_new(bm.fn, bm.opts, bm.name or "batched")
        bm._h = h
    end
    local mid = M.get_multiplexed_model_id()
    local ok, v = core_batch_submit(h, self, item, mid ~= "" and mid or nil)
    if not ok then
        error(v, 0)
    end
    return v
end

local function set_option(bm, k, v)
    local o = {}
    for key, x in pairs(bm.opts) do o[key] = x end
    o[k] = v
    bm.opts = batch_settings(o, 4)
    if bm._h then
        core_batch_configure(bm._h, bm.opts)
    end
end

function Batched:set_max_batch_size(n) set_option(self, "max_batch_size", n) end
function Batched:set_batch_wait_timeout_s(s) set_option(self, "batch_wait_timeout_s", s) end
function Batched:set_max_concurrent_batches(n) set_option(self, "max_concurrent_batches", n) end
function Batched:set_latency_target_s(s) set_option(self, "latency_target_s", s) end
function Batched:stats()
    return self._h and core_batch_stats(self._h) or {}
end

-- serve.multiplexed([opts,] loader): a per-replica LRU cache of models (lua/moonserve/multiplex.lua).
function M.multiplexed(opts, loader)
    return require("moonserve.multiplex").new(opts, loader)
end

-- ---- async tasks (docs/tasks.md) -----------------------------------------------------------

-- serve.task_handler([name,] fn): a task handler of the class, run for each task of that name
-- the deployment's task_queue delivers: fn(self, args...) (kwargs, when given, as one more
-- table), its return value the task's result. Named after its field unless given a name.
local TaskHandler = {}
TaskHandler.__index = TaskHandler
M._TaskHandler = TaskHandler
function M.task_handler(a, b)
    local name, fn = a, b
    if b == nil then
        name, fn = nil, a
    end
    if type(fn) ~= "function" or (name ~= nil and (type(name) ~= "string" or name == "")) then
        error("serve.task_handler: expects ([name,] function(self, ...))", 2)
    end
    return setmetatable({ name = name, fn = fn }, TaskHandler)
end

local TASK_STREAM_TYPE = "application/x-moonserve-task"
local task_of = setmetatable({}, { __mode = "k" }) -- coroutine -> the task it runs

local function task_line(kind, value)
    core_stream_send(kind .. M.json.encode(value) .. "\n")
end

-- serve.task_progress(value): stored as the running task's progress (any JSON value), for status.
function M.task_progress(value)
    if not task_of[coroutine.running()] then
        error("serve.task_progress: only inside a task handler", 2)
    end
    task_line("p", value == nil and M.json.null or value)
end

-- serve.get_task_context() -> {task_id =, name =, attempt =} inside a task handler, else nil.
function M.get_task_context()
    return task_of[coroutine.running()]
end

local function find_task_handler(cls, name)
    for k, v in pairs(cls) do
        if getmetatable(v) == TaskHandler and (v.name or tostring(k)) == name then
            return v
        end
    end
end

-- A task the controller's consumer delivers: the answer is a stream of lines (kind + JSON):
-- progress `p`, then `r` the result, `e` the handler's error or `u` unprocessable
-- (docs/replica-protocol.md, "Task calls").
local function run_task(self, req, name)
    core_stream_start(200, { "Content-Type", TASK_STREAM_TYPE })
    local handler = find_task_handler(getmetatable(self), name)
    if not handler then
        return task_line("u", string.format("deployment '%s' has no task handler '%s'",
            M._context.deployment, name))
    end
    local ok, payload = pcall(M.json.decode, req.body)
    if not ok or type(payload) ~= "table" or type(payload.args or {}) ~= "table" then
        return task_line("u", "the task's payload is not {\"args\": [...], \"kwargs\": {...}}")
    end
    local args, n = payload.args or {}, #(payload.args or {})
    if type(payload.kwargs) == "table" and next(payload.kwargs) ~= nil then
        n = n + 1
        args[n] = payload.kwargs
    end
    local co = coroutine.running()
    task_of[co] = { task_id = req.headers["x-moonserve-task-id"], name = name,
                    attempt = tonumber(req.headers["x-moonserve-task-attempt"]) }
    local good, res = pcall(handler.fn, self, unpack(args, 1, n))
    task_of[co] = nil
    if not good then
        M.log.warn("task %s (%s) failed: %s", tostring(req.headers["x-moonserve-task-id"]), name,
            tostring(res))
        return task_line("e", tostring(res))
    end
    local encoded, text = pcall(M.json.encode, res == nil and M.json.null or res)
    if not encoded then
        return task_line("e", "the result cannot be sent as JSON: " .. tostring(text))
    end
    core_stream_send("r" .. text .. "\n")
end

-- serve.tasks: producers from deployment code, through the controller (docs/tasks.md).
M.tasks = {}

local function tasks_call(method, path, body)
    local headers = { "content-type", "application/json" }
    local f = core_call("-", method, path, headers, body or "")
    core_wait(f, 1)
    local status, _, text = core_result(f)
    if status == nil then
        error("serve.tasks: the controller did not answer: " .. tostring(text), 3)
    end
    local ok, v = pcall(M.json.decode, text)
    if status < 200 or status > 299 then
        error(string.format("serve.tasks: %d: %s", status,
            ok and type(v) == "table" and v.error or text), 3)
    end
    return v
end

local function queue_path(queue, who)
    if type(queue) ~= "string" or not queue:match("^[%w_%-%.:]+$") then
        error(who .. ": the queue name must be a string of letters, digits, '_', '-', '.', ':'", 3)
    end
    return "/-/tasks/" .. queue
end

local function task_id_path(queue, id, who)
    if type(id) ~= "string" or not id:match("^[%w_%-]+$") then
        error(who .. ": the task id must be a string of letters, digits, '-', '_'", 3)
    end
    return queue_path(queue, who) .. "/" .. id
end

-- serve.tasks.enqueue(queue, name, args[, kwargs]) -> task id
function M.tasks.enqueue(queue, name, args, kwargs)
    local path = queue_path(queue, "serve.tasks.enqueue")
    if type(name) ~= "string" or name == "" then
        error("serve.tasks.enqueue: the task name must be a non-empty string", 2)
    end
    local body = { name = name, args = M.json.array() }
    for i, v in ipairs(args or {}) do
        body.args[i] = v
    end
    if kwargs ~= nil then
        body.kwargs = kwargs
    end
    return tasks_call("POST", path, M.json.encode(body)).task_id
end

-- serve.tasks.status(queue, id) -> {task_id, status, result, error, progress, attempts, ...}
function M.tasks.status(queue, id)
    return tasks_call("GET", task_id_path(queue, id, "serve.tasks.status"))
end

-- serve.tasks.cancel(queue, id) -> {task_id, status = "REVOKED"}
function M.tasks.cancel(queue, id)
    return tasks_call("POST", task_id_path(queue, id, "serve.tasks.cancel") .. "/cancel")
end

-- serve.sleep(seconds) suspends the calling request (other requests run meanwhile).
function M.sleep(seconds)
    return core_sleep(tonumber(seconds) or error("serve.sleep expects a number of seconds", 2))
end

function M.get_replica_context()
    return M._context or error("serve.get_replica_context: not running inside a replica", 2)
end

-- ---- requests and responses -----------------------------------------------------------------

local function unescape(s)
    s = s:gsub("+", " ")
    return (s:gsub("%%(%x%x)", function(h)
        return string.char(tonumber(h, 16))
    end))
end

-- Query parameters are decoded on first access; a repeated name keeps its last value.
local function parse_query(qs)
    local q = {}
    for pair in qs:gmatch("[^&]+") do
        local k, v = pair:match("^([^=]*)=?(.*)$")
        q[unescape(k)] = unescape(v)
    end
    return q
end

local RequestMethods = {}

function RequestMethods:json()
    local ok, v = pcall(M.json.decode, self.body)
    if not ok then
        error("invalid JSON body: " .. tostring(v), 0)
    end
    return v
end

Request.__index = function(req, k)
    if k == "query" then
        local q = parse_query(rawget(req, "query_string") or "")
        rawset(req, "query", q)
        return q
    end
    return RequestMethods[k]
end

local Response = {}

-- serve.response{status=, headers=, body=}: full control over the HTTP answer.
function M.response(t)
    t = t or {}
    if t.status ~= nil and type(t.status) ~= "number" then
        error("serve.response: status must be a number", 2)
    end
    if t.headers ~= nil and type(t.headers) ~= "table" then
        error("serve.response: headers must be a table", 2)
    end
    return setmetatable(t, Response)
end

local Stream = {}

-- serve.stream(producer, {status=, headers=}): a streamed response. After the handler returns
-- it, the head is sent and producer(send) runs in the request's coroutine; each send(chunk)
-- (a string, or a table sent as JSON) goes out at once as one HTTP chunk, and the response ends
-- when producer returns. producer may serve.sleep or call handles between chunks.
function M.stream(producer, opts)
    if type(producer) ~= "function" then
        error("serve.stream: expects a function(send)", 2)
    end
    opts = opts or {}
    if opts.status ~= nil and type(opts.status) ~= "number" then
        error("serve.stream: status must be a number", 2)
    end
    return setmetatable({ producer = producer, status = opts.status or 200,
                          headers = opts.headers or {} }, Stream)
end

-- ---- Server-Sent Events (docs/lua-api.md, "Server-Sent Events") ----------------------------

local function sse_field(ev, k)
    local v = ev[k]
    if v == nil then
        return nil
    elseif type(v) ~= "string" and type(v) ~= "number" then
        error(string.format("serve.sse: %s must be a string or a number", k), 3)
    end
    v = tostring(v)
    if v:find("[\r\n]") or (k == "id" and v:find("\0", 1, true)) then
        error(string.format("serve.sse: %s must be one line%s", k, k == "id" and " without NUL" or ""), 3)
    end
    return v
end

-- Appends `name: line` for each line of text (CRLF, CR and LF all end a line, as for a reader).
local function sse_lines(parts, name, text)
    text = text:gsub("\r\n", "\n"):gsub("\r", "\n")
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do
        parts[#parts + 1] = name .. line .. "\n"
    end
end

-- serve.sse_event(ev) -> the text of one event: ev is a string (its data) or a table with data
-- (a string, or a table sent as JSON), event, id, retry (ms) and comment, each optional.
function M.sse_event(ev)
    if type(ev) ~= "table" then
        if type(ev) ~= "string" then
            error("serve.sse: an event is a string or a table, got " .. type(ev), 2)
        end
        ev = { data = ev }
    end
    for k in pairs(ev) do
        if k ~= "data" and k ~= "event" and k ~= "id" and k ~= "retry" and k ~= "comment" then
            error(string.format("serve.sse: unknown event field '%s'", tostring(k)), 2)
        end
    end
    local parts = {}
    if ev.comment ~= nil then
        sse_lines(parts, ": ", tostring(ev.comment))
    end
    local event, id = sse_field(ev, "event"), sse_field(ev, "id")
    if event then
        parts[#parts + 1] = "event: " .. event .. "\n"
    end
    if id then
        parts[#parts + 1] = "id: " .. id .. "\n"
    end
    if ev.retry ~= nil then
        if type(ev.retry) ~= "number" or ev.retry < 0 or ev.retry % 1 ~= 0 then
            error("serve.sse: retry must be a whole number of milliseconds", 2)
        end
        parts[#parts + 1] = string.format("retry: %d\n", ev.retry)
    end
    local data = ev.data
    if data ~= nil then
        sse_lines(parts, "data: ", type(data) == "string" and data or M.json.encode(data))
    end
    if #parts == 0 then
        error("serve.sse: an event needs data, a comment, event, id or retry", 2)
    end
    parts[#parts + 1] = "\n"
    return table.concat(parts)
end

-- serve.sse(producer, {status=, headers=}): a serve.stream of Server-Sent Events; producer(send)
-- sends each event with send(ev) (see sse_event); send{comment = "keep-alive"} keeps an idle
-- connection open through proxies.
function M.sse(producer, opts)
    if type(producer) ~= "function" then
        error("serve.sse: expects a function(send)", 2)
    end
    opts = opts or {}
    local headers = { ["Content-Type"] = "text/event-stream; charset=utf-8",
                      ["Cache-Control"] = "no-cache", ["X-Accel-Buffering"] = "no" }
    for k, v in pairs(opts.headers or {}) do
        for d in pairs(headers) do -- a name given in any case replaces the default
            if d:lower() == tostring(k):lower() then
                headers[d] = nil
            end
        end
        headers[k] = v
    end
    return M.stream(function(send)
        producer(function(ev)
            send(M.sse_event(ev))
        end)
    end, { status = opts.status, headers = headers })
end

local function flatten_headers(headers, default_ctype)
    local flat, has_ctype = {}, false
    for k, v in pairs(headers) do
        flat[#flat + 1] = tostring(k)
        flat[#flat + 1] = tostring(v)
        has_ctype = has_ctype or tostring(k):lower() == "content-type"
    end
    if not has_ctype and default_ctype then
        flat[#flat + 1], flat[#flat + 2] = "Content-Type", default_ctype
    end
    return flat
end

local function send_chunk(chunk)
    if type(chunk) ~= "string" then
        chunk = M.json.encode(chunk)
    end
    core_stream_send(chunk)
end

local function run_stream(s)
    core_stream_start(s.status, flatten_headers(s.headers, "text/plain; charset=utf-8"))
    s.producer(send_chunk)
end

local function send_frame(v)
    if v == nil then
        error("send: a stream item cannot be nil (it would end the caller's loop)", 2)
    end
    local payload, err = values_encode({ v }, 1, "stream item")
    if not payload then
        error("send: " .. err, 2)
    end
    core_stream_send(frame("v", payload))
end

-- A stream to a handle caller that asked for one: each send(v) is a value frame; a producer
-- that raises ends the stream with an error frame, which the caller raises as a CallError
-- (the status went out as 200 already). The status and headers of serve.stream do not apply.
local function run_frame_stream(s, req)
    core_stream_start(200, { "Content-Type", VALUE_STREAM_TYPE })
    local ok, err = pcall(s.producer, send_frame)
    if not ok then
        local msg = tostring(err)
        core.log("warn", string.format("request %s failed mid-stream: %s", req.id, msg))
        core_stream_send(frame("e", msg))
    end
end

-- Turns a handler's return value into status, body, and a flat {name, value, ...} header list.
local function to_http(res)
    if res == nil then
        return 200, "", {}
    elseif type(res) == "string" then
        return 200, res, { "Content-Type", "text/plain; charset=utf-8" }
    elseif getmetatable(res) == Response then
        local flat, has_ctype = {}, false
        for k, v in pairs(res.headers or {}) do
            flat[#flat + 1] = tostring(k)
            flat[#flat + 1] = tostring(v)
            has_ctype = has_ctype or tostring(k):lower() == "content-type"
        end
        local body = res.body or ""
        if type(body) ~= "string" then
            body = M.json.encode(body)
            if not has_ctype then
                flat[#flat + 1], flat[#flat + 2] = "Content-Type", "application/json"
            end
        elseif not has_ctype and body ~= "" then
            flat[#flat + 1], flat[#flat + 2] = "Content-Type", "text/plain; charset=utf-8"
        end
        return res.status or 200, body, flat
    else
        return 200, M.json.encode(res), { "Content-Type", "application/json" }
    end
end

-- ---- entry points the C runtime calls (one coroutine each) ----------------------------------

-- Finds deployment `name` in the graph and returns its class and constructor arguments, with
-- every bound node replaced by a handle to that deployment in application `app`.
function M._instantiate(root, name, app)
    local _, by_name = collect(root)
    local node = by_name[name]
    if not node then
        error(string.format("deployment '%s' is not part of this application", name), 0)
    end
    local copies = {}
    local function convert(v)
        if is_node(v) then
            local info = class_info[v.class]
            return new_handle({ app = app, deployment = info.name, opts = {},
                                class = not info.options.process and v.class or nil })
        elseif type(v) ~= "table" or getmetatable(v) ~= nil then
            return v
        elseif copies[v] then
            return copies[v]
        end
        local c = {}
        copies[v] = c
        for k, x in pairs(v) do
            c[convert(k)] = convert(x)
        end
        return c
    end
    local args = {}
    for i = 1, node.nargs do
        args[i] = convert(node.args[i])
    end
    -- A batched method or a task handler is named after its field unless it names itself.
    for k, v in pairs(node.class) do
        local mt = getmetatable(v)
        if (mt == Batched or mt == TaskHandler) and not v.name then
            v.name = tostring(k)
        end
    end
    return node.class, args, node.nargs
end

function M._construct(cls, args, nargs)
    local self = setmetatable({}, cls)
    if cls.init then
        self:init(unpack(args, 1, nargs))
    end
    return self
end

function M._call_method(self, name, ...)
    local f = self[name]
    if f then
        return f(self, ...)
    end
end

-- The batch function of a batch's own task; model is the multiplexed model id its items share.
function M._run_batch(fn, self, model, items)
    task_model[coroutine.running()] = model
    return fn(self, items)
end

-- A task core.spawn started (serve.multiplexed's loads).
function M._run_spawned(f, args)
    return f(unpack(args, 1, args.n))
end

local function batching_stats(self)
    local out = {}
    for k, v in pairs(getmetatable(self) or {}) do
        if getmetatable(v) == Batched and v._h then
            out[v.name or tostring(k)] = core_batch_stats(v._h)
        end
    end
    return out
end

function M._stats(self)
    local autoscaling = M._call_method(self, "record_autoscaling_stats") or {}
    local routing = M._call_method(self, "record_routing_stats") or {}
    local metrics = package.loaded["moonserve.metrics"]
    return autoscaling, routing, batching_stats(self), metrics and metrics._snapshot() or {}
end

local function pack(...)
    return { n = select("#", ...), ... }
end

-- A call through a handle (it carries X-Moonserve-Method, which the HTTP ingress refuses from
-- clients): the method gets the decoded values and its results go back encoded, except a
-- serve.response or serve.stream, which is answered as HTTP as it would be to a client.
local function run_values_call(self, req, name)
    local f = class_method(getmetatable(self), name)
    if not f then
        local msg = string.format("deployment '%s' has no method '%s'", M._context.deployment, name)
        return to_http(M.response { status = 404, body = { error = msg, request_id = req.id } })
    end
    local ok, n, args = pcall(values_decode, req.body)
    if not ok then
        return to_http(M.response { status = 400, body = { error = n, request_id = req.id } })
    end
    if n == 1 and name == "__call" and type(args[1]) == "table" and getmetatable(args[1]) == nil then
        setmetatable(args[1], LegacyArg)
    end
    local res = pack(f(self, unpack(args, 1, n)))
    local mt = getmetatable(res[1])
    if mt == Stream and req.headers["x-moonserve-stream"] then
        return run_frame_stream(res[1], req)
    elseif mt == Stream then
        return run_stream(res[1])
    elseif mt == Response then
        return to_http(res[1])
    end
    local payload, err = values_encode(res, res.n, "return value")
    if not payload then
        error(string.format("%s.%s: %s through a handle", M._context.deployment, name, err), 0)
    end
    return 200, payload, { "Content-Type", VALUES_TYPE }
end

function M._run_request(self, req)
    local co = coroutine.running()
    task_request[co], task_model[co] = req, nil
    local task = req.headers["x-moonserve-task"]
    if task then
        return run_task(self, req, task)
    end
    local method = req.headers["x-moonserve-method"]
    if method then
        return run_values_call(self, req, method)
    end
    setmetatable(req, Request)
    local res = self:__call(req)
    if getmetatable(res) == Stream then
        return run_stream(res) -- nothing returned: the C side ends the streamed response
    end
    return to_http(res)
end

return M
