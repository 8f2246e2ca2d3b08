-- The matcher of lua/moonserve/routes.lua, alone (no replica): run by test_routes.c. Returns
-- the list of failures (empty when every check passed).
local routes = require "moonserve.routes"
local failures = {}

local function check(cond, what)
    if not cond then failures[#failures + 1] = what end
end

local function h(name) return function() return name end end

-- Defined least specific first: the order must not matter.
local app = routes.app()
app:get("/*rest", h("wild-root"))
app:get("/users/:id", h("user"))
app:get("/users/me", h("me"))
app:post("/users/:id", h("user-post"))
app:get("/users/:id/posts/:post", h("post"))
app:get("/users/me/posts/:post", h("my-post"))
app:get("/files/*path", h("files"))
app:get("/files/special/:x", h("special"))
app:get("/", h("root"))
app:put("/items/{item_id}", h("item-put"))
app:route({ "GET", "delete" }, "/both", h("both"))
app:get("/a/:x/c", h("a-x-c"))
app:get("/a/b/:y", h("a-b-y"))

local function m(method, path, want, want_params)
    local r, params = app:match(method, path)
    local got = r and r.fn() or params
    check(got == want, string.format("%s %s -> %s, want %s", method, path, tostring(got), tostring(want)))
    for k, v in pairs(want_params or {}) do
        check(type(params) == "table" and params[k] == v,
            string.format("%s %s: param %s = %s, want %s", method, path, k,
                type(params) == "table" and tostring(params[k]) or "-", v))
    end
    return r, params
end

m("GET", "/", "root")
m("GET", "/users/42", "user", { id = "42" })
m("GET", "/users/me", "me")
m("GET", "/users/me/", "me")
m("GET", "/users/me/posts/7", "my-post", { post = "7" })
m("GET", "/users/9/posts/7", "post", { id = "9", post = "7" })
m("POST", "/users/me", "user-post", { id = "me" })  -- the literal takes no POST: the param does
m("GET", "/users/a%20b", "user", { id = "a b" })
m("GET", "/files/a/b/c.txt", "files", { path = "a/b/c.txt" })
m("GET", "/files", "files", { path = "" })
m("GET", "/files/special/1", "special", { x = "1" })
m("GET", "/files/special/1/2", "files", { path = "special/1/2" })
m("GET", "/elsewhere/x", "wild-root", { rest = "elsewhere/x" })
m("PUT", "/items/5", "item-put", { item_id = "5" })
m("DELETE", "/both", "both")
m("HEAD", "/users/1", "user")
-- literal beats param at the first segment where they differ, backtracking when it fails deeper
m("GET", "/a/b/c", "a-b-y", { y = "c" })
m("GET", "/a/z/c", "a-x-c", { x = "z" })

local r, status, allow = app:match("DELETE", "/users/1")
check(r == nil and status == 405, "DELETE /users/1 is 405")
check(allow and table.concat(allow, ",") == "GET,HEAD,POST", "Allow: " .. table.concat(allow or {}, ","))

local strict = routes.app()
strict:get("/only", h("only"))
local _, st = strict:match("GET", "/nope")
check(st == 404, "unknown path 404")
local _, st2, allow2 = strict:match("POST", "/only")
check(st2 == 405 and table.concat(allow2, ",") == "GET,HEAD", "POST /only 405 GET,HEAD")

-- definition errors
local function fails(fn, pattern, what)
    local ok, err = pcall(fn)
    check(not ok and tostring(err):find(pattern, 1, true), what .. ": " .. tostring(err))
end
fails(function() routes.app():get("no-slash", h("x")) end, "must be a string starting with '/'", "no slash")
fails(function() routes.app():get("/*a/b", h("x")) end, "wildcard must be the last", "wildcard middle")
fails(function() routes.app():get("/:a/:a", h("x")) end, "appears twice", "duplicate param")
fails(function() routes.app():get("/:1x", h("x")) end, "bad parameter name", "bad name")
fails(function() routes.app():get("/x", h("x"), { response_type = "yaml" }) end, "response_type", "bad type")
fails(function() routes.app():get("/x", h("x"), { bogus = 1 }) end, "unknown route option", "bad option")
fails(function()
    local a = routes.app()
    a:get("/u/:id", h("x"))
    a:get("/u/:name", h("y"))
end, "already defined", "same shape twice")

-- query parsing
local q = routes.query("tag=a&tag=b%20c&x=1+2&flag&caf%C3%A9=%E2%9C%93")
check(q.tag and q.tag[1] == "a" and q.tag[2] == "b c", "repeated keys")
check(q.x and q.x[1] == "1 2", "plus is space")
check(q.flag and q.flag[1] == "", "bare name")
check(q["café"] and q["café"][1] == "✓", "utf-8 decoding")

-- the path below the route prefix
local rel = routes.relative_path
check(rel { path = "/api/x", headers = { ["x-moonserve-route-prefix"] = "/api" } } == "/x", "prefix stripped")
check(rel { path = "/api", headers = { ["x-moonserve-route-prefix"] = "/api" } } == "/", "prefix alone")
check(rel { path = "/apix", headers = { ["x-moonserve-route-prefix"] = "/api" } } == "/apix", "not a boundary")
check(rel { path = "/x", headers = { ["x-moonserve-route-prefix"] = "/" } } == "/x", "root prefix")
check(rel { path = "/api/x", headers = {} } == "/api/x", "no header")

return failures
