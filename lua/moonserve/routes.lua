-- moonserve.routes: ingress routes for Lua deployments, as Ray Serve users get from FastAPI
-- (`@serve.ingress(app)`, `@app.get("/status/{task_id}")`). docs/lua-api.md, "Ingress routes".
--
--   local app = serve.app()
--   app:get("/status/:task_id", function(self, req, params) return { id = params.task_id } end)
--   serve.ingress(app, Deployment)      -- Deployment:__call(req) now dispatches app's routes
--
-- Paths match below the application's route_prefix (the engine sends the prefix that matched
-- with each ingress request, X-Moonserve-Route-Prefix). Templates are literal segments,
-- `:name` (or `{name}`) parameters and a trailing `*name` (or `{name:path}`) wildcard; the most
-- specific template wins whatever the order of definition: at the first segment where two
-- templates differ, a literal beats a parameter, which beats a wildcard.

local M = {}

local function serve()
    return require "moonserve"
end

-- ---- errors answered as HTTP ------------------------------------------------------------------

-- An error a handler raises to answer with a status (FastAPI's HTTPException). Only the
-- dispatcher catches it; anywhere else it is an ordinary error whose text says what it was.
local HTTPError = {}
HTTPError.__index = HTTPError
HTTPError.__tostring = function(e)
    local detail = type(e.detail) == "string" and e.detail or serve().json.encode(e.detail)
    return string.format("HTTP %d: %s", e.status, detail)
end

function M.is_http_error(e)
    return getmetatable(e) == HTTPError
end

-- routes.abort(status, detail [, headers]) raises an HTTPError: the request answers `status`
-- with {"error": detail, "request_id": ...} (detail may be any JSON value).
function M.abort(status, detail, headers)
    if type(status) ~= "number" or status % 1 ~= 0 or status < 400 or status > 599 then
        error("routes.abort: status must be an integer in 400..599, got " .. tostring(status), 2)
    end
    if headers ~= nil and type(headers) ~= "table" then
        error("routes.abort: headers must be a table", 2)
    end
    error(setmetatable({ status = status, detail = detail, headers = headers }, HTTPError), 2)
end

local function error_response(req, status, detail, headers)
    local h = {}
    for k, v in pairs(headers or {}) do h[k] = v end
    h["Content-Type"] = "application/json"
    return serve().response { status = status, headers = h,
                              body = { error = detail == nil and "" or detail, request_id = req.id } }
end

-- ---- request helpers --------------------------------------------------------------------------

local function unescape(s, plus)
    if plus then s = s:gsub("+", " ") end
    return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- routes.query(req_or_query_string) -> a table mapping each name to the list of its values, in
-- order (`?tag=a&tag=b` gives {tag = {"a", "b"}}); `+` and %XX are decoded in names and values;
-- a name without `=` has the value "".
function M.query(x)
    local qs = type(x) == "string" and x or (x and x.query_string) or ""
    local q = {}
    for pair in qs:gmatch("[^&]+") do
        local k, v = pair:match("^([^=]*)=?(.*)$")
        k = unescape(k, true)
        local list = q[k]
        if not list then
            list = {}
            q[k] = list
        end
        list[#list + 1] = unescape(v, true)
    end
    return q
end

-- routes.json(req) -> the body decoded as JSON; a malformed (or empty) body answers 400 (an
-- HTTPError), so the handler never sees it.
function M.json(req)
    local ok, v = pcall(serve().json.decode, req.body or "")
    if not ok then
        error(setmetatable({ status = 400, detail = "invalid JSON body: " .. tostring(v) }, HTTPError), 2)
    end
    return v
end

-- ---- path templates -----------------------------------------------------------------------

local KIND_LITERAL, KIND_PARAM, KIND_WILD = 1, 2, 3
local NAME = "^[%a_][%w_]*$"

-- A template's segments: {kind, text} each (text is the literal or the parameter's name).
local function compile(path, level)
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
        error("routes: a path must be a string starting with '/', got " .. tostring(path), level)
    end
    local segs, names = {}, {}
    local parts = {}
    for s in (path:sub(2) .. "/"):gmatch("([^/]*)/") do parts[#parts + 1] = s end
    if parts[#parts] == "" then parts[#parts] = nil end -- "/" and a trailing slash
    for i, s in ipairs(parts) do
        local kind, text
        local p = s:match("^:(.*)$") or s:match("^{([^:}]*)}$")
        local w = s:match("^%*(.*)$") or s:match("^{([^:}]*):path}$")
        if p then
            kind, text = KIND_PARAM, p
        elseif w then
            kind, text = KIND_WILD, w
            if i ~= #parts then
                error("routes: a wildcard must be the last segment of " .. path, level)
            end
        elseif s == "" then
            error("routes: empty segment (//) in " .. path, level)
        else
            kind, text = KIND_LITERAL, unescape(s)
        end
        if kind ~= KIND_LITERAL then
            if not text:match(NAME) then
                error(string.format("routes: bad parameter name '%s' in %s", text, path), level)
            elseif names[text] then
                error(string.format("routes: parameter '%s' appears twice in %s", text, path), level)
            end
            names[text] = true
        end
        segs[i] = { kind, text }
    end
    return segs
end

-- The canonical form two templates share when they match the same paths (parameter names
-- aside): "/a/:/*".
local function shape(segs)
    local out = {}
    for i, s in ipairs(segs) do
        out[i] = s[1] == KIND_LITERAL and s[2]:gsub("[:*{]", "\\%0") or s[1] == KIND_PARAM and ":" or "*"
    end
    return "/" .. table.concat(out, "/")
end

-- The request path's segments, each percent-decoded; nil for a path that is not "/..." .
local function split_path(path)
    if path:sub(1, 1) ~= "/" then return nil end
    local parts = {}
    for s in (path:sub(2) .. "/"):gmatch("([^/]*)/") do parts[#parts + 1] = unescape(s) end
    if parts[#parts] == "" then parts[#parts] = nil end
    return parts
end

-- Every route matching the segments, most specific first: a depth-first walk of the route tree
-- that tries the literal child, then parameters, then the wildcard.
local function match_all(node, parts, i, params, out)
    if i > #parts then
        if node.routes then out[#out + 1] = { node = node, params = params } end
    else
        local child = node.literal[parts[i]]
        if child then match_all(child, parts, i + 1, params, out) end
        for _, c in ipairs(node.param) do
            if parts[i] ~= "" then
                local p = {}
                for k, v in pairs(params) do p[k] = v end
                p[c.name] = parts[i]
                match_all(c.node, parts, i + 1, p, out)
            end
        end
    end
    -- a wildcard takes the rest, none included ("/files/*p" matches "/files")
    for _, c in ipairs(node.wild) do
        local p = {}
        for k, v in pairs(params) do p[k] = v end
        p[c.name] = table.concat(parts, "/", i)
        out[#out + 1] = { node = c.node, params = p }
    end
end

-- ---- the app --------------------------------------------------------------------------------

local App = {}
App.__index = App

local RESPONSE_TYPES = { auto = true, json = true, text = "text/plain; charset=utf-8",
                         html = "text/html; charset=utf-8" }

local function check_response_type(t, level)
    if t ~= nil and not RESPONSE_TYPES[t] and not (type(t) == "string" and t:find("/", 1, true)) then
        error("routes: response_type must be auto, json, text, html or a content type, got "
            .. tostring(t), level)
    end
end

local function new_node()
    return { literal = {}, param = {}, wild = {} }
end

-- serve.app{response_type =} -> an empty app. response_type is the default of its routes
-- ("auto": the engine's own conversion, docs/lua-api.md "Responses").
function M.app(opts)
    opts = opts or {}
    if type(opts) ~= "table" then error("serve.app: expects a table of options", 2) end
    for k in pairs(opts) do
        if k ~= "response_type" then error("serve.app: unknown option '" .. tostring(k) .. "'", 2) end
    end
    check_response_type(opts.response_type, 3)
    return setmetatable({ root = new_node(), response_type = opts.response_type or "auto",
                          shapes = {}, list = {} }, App)
end

local ROUTE_OPTIONS = { response_type = true, status = true, name = true }

-- app:route(method(s), path, fn [, opts]) or app:route(method(s), path, opts, fn). method is a
-- name ("GET") or a list of names; opts: response_type, status (of a successful answer), name.
-- (Called by the wrappers below only, so the definer's code is always 3 levels up.)
local function add(self, methods, path, a, b)
    local fn, opts = a, b
    if type(a) == "table" and type(b) == "function" then fn, opts = b, a end
    if type(fn) ~= "function" then error("routes: a route needs a function(self, req, params)", 3) end
    opts = opts or {}
    for k in pairs(opts) do
        if not ROUTE_OPTIONS[k] then error("routes: unknown route option '" .. tostring(k) .. "'", 3) end
    end
    check_response_type(opts.response_type, 4)
    if opts.status ~= nil and (type(opts.status) ~= "number" or opts.status < 200 or opts.status > 599) then
        error("routes: status must be a number in 200..599", 3)
    end
    if type(methods) == "string" then methods = { methods } end
    if type(methods) ~= "table" or #methods == 0 then error("routes: method must be a name or a list of names", 3) end
    local segs = compile(path, 4)
    local node = self.root
    for _, s in ipairs(segs) do
        if s[1] == KIND_LITERAL then
            node.literal[s[2]] = node.literal[s[2]] or new_node()
            node = node.literal[s[2]]
        else
            local list = s[1] == KIND_PARAM and node.param or node.wild
            local found
            for _, c in ipairs(list) do if c.name == s[2] then found = c end end
            if not found then
                found = { name = s[2], node = new_node() }
                list[#list + 1] = found
            end
            node = found.node
        end
    end
    node.routes = node.routes or {}
    local sh = shape(segs)
    for _, m in ipairs(methods) do
        if type(m) ~= "string" or not m:match("^[A-Za-z]+$") then
            error("routes: bad method name " .. tostring(m), 3)
        end
        m = m:upper()
        local key = m .. " " .. sh
        if self.shapes[key] then
            error(string.format("routes: %s %s is already defined (as %s)", m, path, self.shapes[key]), 3)
        end
        self.shapes[key] = path
        local r = { method = m, path = path, fn = fn, status = opts.status, name = opts.name,
                    response_type = opts.response_type }
        node.routes[m] = r
        self.list[#self.list + 1] = r
    end
    return self
end

function App:route(methods, path, a, b)
    return (add(self, methods, path, a, b))
end

for _, m in ipairs { "get", "post", "put", "delete", "patch", "options", "head" } do
    App[m] = function(self, path, a, b)
        return (add(self, m:upper(), path, a, b))
    end
end

-- app:match(method, path) -> route, params (a match), or nil, status, allow: 404, or 405 with
-- the sorted list of the methods the path takes. HEAD falls back to a GET route.
function App:match(method, path)
    local parts = split_path(path)
    if not parts then return nil, 404 end
    local found = {}
    match_all(self.root, parts, 1, {}, found)
    if #found == 0 then return nil, 404 end
    for _, f in ipairs(found) do
        local r = f.node.routes[method] or (method == "HEAD" and f.node.routes.GET)
        if r then return r, f.params end
    end
    local allow, seen = {}, {}
    for _, f in ipairs(found) do
        for m in pairs(f.node.routes) do
            if not seen[m] then
                seen[m] = true
                allow[#allow + 1] = m
            end
            if m == "GET" and not seen.HEAD then
                seen.HEAD = true
                allow[#allow + 1] = "HEAD"
            end
        end
    end
    table.sort(allow)
    return nil, 405, allow
end

-- The path below the application's route_prefix, as the engine gave it ("/" when the path is
-- the prefix itself). A request without the header (not from the ingress) matches whole.
local function relative_path(req)
    local path = req.path or "/"
    local prefix = req.headers and req.headers["x-moonserve-route-prefix"]
    if prefix and prefix ~= "/" and prefix ~= "" and path:sub(1, #prefix) == prefix then
        local c = path:sub(#prefix + 1, #prefix + 1)
        if c == "" then return "/" end
        if c == "/" then return path:sub(#prefix + 1) end
    end
    return path
end
M.relative_path = relative_path

-- Turns a handler's return into the answer its route's response type asks for. A
-- serve.response or serve.stream passes as it is.
local response_mt, stream_mt

local function shape_response(r, app, res)
    local s = serve()
    if not response_mt then
        response_mt = getmetatable(s.response {})
        stream_mt = getmetatable(s.stream(function() end))
    end
    local mt = getmetatable(res)
    if mt ~= nil and (mt == response_mt or mt == stream_mt) then
        return res
    end
    local rt = r.response_type or app.response_type
    local body, ctype
    if rt == "auto" then
        if r.status == nil then return res end
        if res == nil then
            body = ""
        elseif type(res) == "string" then
            body, ctype = res, "text/plain; charset=utf-8"
        else
            body, ctype = s.json.encode(res), "application/json"
        end
    elseif rt == "json" then
        body, ctype = res == nil and "null" or s.json.encode(res), "application/json"
    else
        if type(res) == "number" or type(res) == "boolean" then
            res = tostring(res)
        elseif res == nil then
            res = ""
        elseif type(res) ~= "string" then
            error(string.format("route %s %s: response_type %s expects a string, got a %s",
                r.method, r.path, rt, type(res)), 0)
        end
        body, ctype = res, RESPONSE_TYPES[rt] or rt
    end
    local headers = {}
    if ctype then headers["Content-Type"] = ctype end
    return s.response { status = r.status or 200, headers = headers, body = body }
end

-- Other errors are raised again after the handler's stack has unwound, so the engine's own
-- debug-level traceback would start here: the handler's is logged (debug level) first. Nothing
-- here may fail (an error in a message handler would replace the original error).
local function log_traceback(e)
    serve().log.debug("route handler failed: %s", debug.traceback(tostring(e), 3))
end

local function keep_error(e)
    if getmetatable(e) ~= HTTPError then pcall(log_traceback, e) end
    return e
end

function App:dispatch(instance, req)
    local path = relative_path(req)
    local r, params, allow = self:match(req.method, path)
    if not r then
        if params == 404 then
            return error_response(req, 404, string.format("no route for %s %s", req.method, path))
        end
        return error_response(req, 405, string.format("method %s not allowed for %s", req.method, path),
            { Allow = table.concat(allow, ", ") })
    end
    rawset(req, "params", params)
    rawset(req, "route", r.path)
    rawset(req, "json", M.json)
    rawset(req, "query_all", function(q, name)
        local all = M.query(q)
        return all[name] or {}
    end)
    -- Handlers may suspend (serve.sleep, handle calls): LuaJIT yields across xpcall. Only an
    -- HTTPError is answered here; any other error goes on as it was raised (the request's 500).
    local ok, res = xpcall(r.fn, keep_error, instance, req, params)
    if ok then
        return shape_response(r, self, res)
    elseif getmetatable(res) == HTTPError then
        return error_response(req, res.status, res.detail, res.headers)
    end
    error(res, 0)
end

function App:routes()
    local out = {}
    for i, r in ipairs(self.list) do out[i] = { method = r.method, path = r.path, name = r.name } end
    return out
end

-- serve.ingress(app, Class) -> Class, whose __call(req) dispatches app's routes. The class may
-- define its own methods (init, reconfigure, ...) as usual; routes' handlers get the instance.
function M.ingress(app, cls)
    if getmetatable(app) ~= App then
        error("serve.ingress: expects an app (serve.app()) and a deployment class", 2)
    end
    if type(cls) ~= "table" or type(cls.bind) ~= "function" then
        error("serve.ingress: the second argument must be a deployment class (serve.deployment{...})", 2)
    end
    if rawget(cls, "__call") ~= nil then
        error("serve.ingress: the class already defines __call; the app's routes replace it", 2)
    end
    rawset(cls, "__call", function(self, req)
        return app:dispatch(self, req)
    end)
    return cls
end

M.App = App
return M
