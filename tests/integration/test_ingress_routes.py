"""Ingress routes for Lua deployments (docs/lua-api.md, "Ingress routes"): serve.app() routes
dispatched by an ingress class, matched below the application's route_prefix.

- Parameters (`:id`, `{id}`), a trailing wildcard, literal-over-parameter precedence whatever
  the order of definition, the prefix itself as "/".
- No route: 404; a path whose routes take other methods: 405 with Allow; both JSON bodies
  {"error", "request_id"} carrying the request's id. HEAD answers from a GET route.
- routes.query (percent-decoding, repeated names), req:json() answering 400 on malformed JSON,
  routes.abort, response types (json, text, html, a content type), a route's status, and a
  full serve.response passing through. Handlers may suspend (serve.sleep) and raise errors
  (500, as any handler's).
- A client cannot forge X-Moonserve-Route-Prefix, below a prefix or at "/"; the replica gets the
  header below a prefix and none at "/" (where a missing header means "/").
- examples/ingress (POST /submit, GET /status/:task_id) goes from pending to done.
"""

import json
import os
import unittest

import harness

APP_LUA = r'''
local serve = require "moonserve"
local routes = serve.routes

local app = serve.app()
local Api = serve.ingress(app, serve.deployment { name = "Api" })

function Api:init(tag) self.tag = tag end

-- least specific first: the order must not matter
app:get("/users/:id", function(self, req, params)
    return { route = "user", id = params.id, template = req.route, path = req.path, tag = self.tag }
end)
app:get("/users/me", function() return { route = "me" } end)
app:post("/users/:id", function(self, req, params) return { route = "user-post", id = params.id } end)
app:put("/items/{item_id}", function(self, req, params) return { route = "item", id = params.item_id } end)
app:get("/files/*path", function(self, req, params) return { path = params.path } end)
app:get("/query", function(self, req)
    return { all = routes.query(req), tags = serve.json.array(req:query_all("tag")), last = req.query }
end)
app:post("/echo", function(self, req) return { got = req:json() } end)
app:get("/text", function() return "plain words" end, { response_type = "text" })
app:get("/number", function() return 42 end, { response_type = "text" })
app:get("/html", function() return "<b>hi</b>" end, { response_type = "html" })
app:get("/json-string", function() return "hi" end, { response_type = "json" })
app:get("/csv", function() return "a,b\n1,2\n" end, { response_type = "text/csv" })
app:post("/created", { status = 201 }, function() return { ok = true } end)
app:get("/custom", function()
    return serve.response { status = 202, headers = { ["X-Custom"] = "yes" }, body = "custom body" }
end, { response_type = "json" })
app:get("/teapot", function()
    routes.abort(418, "short and stout", { ["X-Tea"] = "earl grey" })
end)
app:get("/boom", function() error("kaboom", 0) end)
app:get("/sleepy", function()
    serve.sleep(0.01)
    return { slept = true }
end)
app:get("/", function() return { root = true } end)
app:get("/prefix-header", function(self, req)
    return { header = req.headers["x-moonserve-route-prefix"] or "absent" }
end)

return { app = Api:bind("t1") }
'''

APPS = [{"name": "api", "route_prefix": "/api", "import_path": "app.lua:app"},
        {"name": "root", "route_prefix": "/", "import_path": "app.lua:app"}]


class IngressRoutesTest(harness.ServerTestCase):
    APPLICATIONS = APPS
    FILES = {"app.lua": APP_LUA}

    def ok(self, method, path, **kw):
        r = self.server.request(method, path, **kw)
        self.assertEqual(r.status, 200, r)
        return r

    def assertError(self, r, status, message_part, request_id=None):
        self.assertEqual(r.status, status, r)
        self.assertEqual(r.header("content-type"), "application/json", r)
        doc = r.json()
        self.assertIn(message_part, doc["error"], doc)
        self.assertTrue(doc.get("request_id"), doc)
        if request_id:
            self.assertEqual(doc["request_id"], request_id, doc)
        return doc

    # -- matching -------------------------------------------------------------------------------

    def test_param(self):
        doc = self.ok("GET", "/api/users/42").json()
        self.assertEqual(doc, {"route": "user", "id": "42", "template": "/users/:id",
                               "path": "/api/users/42", "tag": "t1"})

    def test_param_is_percent_decoded(self):
        self.assertEqual(self.ok("GET", "/api/users/a%20b").json()["id"], "a b")

    def test_brace_param(self):
        self.assertEqual(self.ok("PUT", "/api/items/7", body=b"").json(), {"route": "item", "id": "7"})

    def test_literal_beats_param(self):
        self.assertEqual(self.ok("GET", "/api/users/me").json(), {"route": "me"})
        self.assertEqual(self.ok("GET", "/api/users/me/").json(), {"route": "me"})

    def test_param_takes_method_the_literal_lacks(self):
        r = self.ok("POST", "/api/users/me", body=b"")
        self.assertEqual(r.json(), {"route": "user-post", "id": "me"})

    def test_wildcard(self):
        self.assertEqual(self.ok("GET", "/api/files/a/b/c.txt").json(), {"path": "a/b/c.txt"})
        self.assertEqual(self.ok("GET", "/api/files").json(), {"path": ""})

    def test_prefix_itself_is_root(self):
        self.assertEqual(self.ok("GET", "/api").json(), {"root": True})
        self.assertEqual(self.ok("GET", "/api/").json(), {"root": True})

    def test_forged_route_prefix_is_ignored(self):
        r = self.ok("GET", "/api/users/me", headers={"X-Moonserve-Route-Prefix": "/api/users"})
        self.assertEqual(r.json(), {"route": "me"})

    def test_forged_route_prefix_is_dropped_at_root(self):
        r = self.ok("GET", "/users/me", headers={"X-Moonserve-Route-Prefix": "/users"})
        self.assertEqual(r.json(), {"route": "me"})
        r = self.ok("GET", "/prefix-header", headers={"X-Moonserve-Route-Prefix": "/users"})
        self.assertEqual(r.json(), {"header": "absent"})

    def test_route_prefix_header_below_a_prefix_only(self):
        self.assertEqual(self.ok("GET", "/api/prefix-header").json(), {"header": "/api"})
        self.assertEqual(self.ok("GET", "/prefix-header").json(), {"header": "absent"})

    def test_head_on_get_route(self):
        r = self.server.request("HEAD", "/api/users/me")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"")

    # -- 404 / 405 ----------------------------------------------------------------------------

    def test_no_route_404(self):
        r = self.server.request("GET", "/api/nowhere", headers={"X-Request-ID": "rid-404"})
        doc = self.assertError(r, 404, "no route for GET /nowhere", "rid-404")
        self.assertEqual(set(doc), {"error", "request_id"})

    def test_wrong_method_405(self):
        r = self.server.request("DELETE", "/api/users/5", headers={"X-Request-ID": "rid-405"})
        self.assertError(r, 405, "method DELETE not allowed for /users/5", "rid-405")
        self.assertEqual(r.header("allow"), "GET, HEAD, POST", r)

    def test_405_on_literal_route(self):
        r = self.server.request("POST", "/api/text", body=b"")
        self.assertError(r, 405, "not allowed")
        self.assertEqual(r.header("allow"), "GET, HEAD", r)

    # -- helpers -----------------------------------------------------------------------------

    def test_query(self):
        doc = self.ok("GET", "/api/query?tag=a&tag=b%20c&x=1+2&flag&caf%C3%A9=%E2%9C%93").json()
        self.assertEqual(doc["tags"], ["a", "b c"])
        self.assertEqual(doc["all"], {"tag": ["a", "b c"], "x": ["1 2"], "flag": [""],
                                      "caf\u00e9": ["\u2713"]})
        self.assertEqual(doc["last"]["tag"], "b c")

    def test_query_absent_name_is_empty_list(self):
        self.assertEqual(self.ok("GET", "/api/query").json()["tags"], [])

    def test_json_body(self):
        r = self.ok("POST", "/api/echo", body=json.dumps({"a": [1, 2]}).encode(),
                    headers={"Content-Type": "application/json"})
        self.assertEqual(r.json(), {"got": {"a": [1, 2]}})

    def test_bad_json_is_400(self):
        r = self.server.request("POST", "/api/echo", body=b"{not json",
                                headers={"X-Request-ID": "rid-400"})
        self.assertError(r, 400, "invalid JSON body", "rid-400")

    def test_abort(self):
        r = self.server.request("GET", "/api/teapot", headers={"X-Request-ID": "rid-418"})
        self.assertError(r, 418, "short and stout", "rid-418")
        self.assertEqual(r.header("x-tea"), "earl grey")

    def test_handler_error_is_500(self):
        r = self.server.request("GET", "/api/boom", headers={"X-Request-ID": "rid-500"})
        self.assertError(r, 500, "kaboom", "rid-500")

    def test_handler_may_sleep(self):
        self.assertEqual(self.ok("GET", "/api/sleepy").json(), {"slept": True})

    # -- response types ----------------------------------------------------------------------

    def test_auto_table_is_json(self):
        r = self.ok("GET", "/api/users/1")
        self.assertEqual(r.header("content-type"), "application/json")

    def test_text(self):
        r = self.ok("GET", "/api/text")
        self.assertEqual((r.header("content-type"), r.body), ("text/plain; charset=utf-8", b"plain words"))
        self.assertEqual(self.ok("GET", "/api/number").body, b"42")

    def test_html(self):
        r = self.ok("GET", "/api/html")
        self.assertEqual((r.header("content-type"), r.body), ("text/html; charset=utf-8", b"<b>hi</b>"))

    def test_json_string(self):
        r = self.ok("GET", "/api/json-string")
        self.assertEqual((r.header("content-type"), r.body), ("application/json", b'"hi"'))

    def test_content_type(self):
        r = self.ok("GET", "/api/csv")
        self.assertEqual((r.header("content-type"), r.body), ("text/csv", b"a,b\n1,2\n"))

    def test_route_status(self):
        r = self.server.request("POST", "/api/created", body=b"")
        self.assertEqual(r.status, 201, r)
        self.assertEqual(r.json(), {"ok": True})
        self.assertEqual(r.header("content-type"), "application/json")

    def test_full_response_passes(self):
        r = self.server.request("GET", "/api/custom")
        self.assertEqual(r.status, 202, r)
        self.assertEqual(r.header("x-custom"), "yes")
        self.assertEqual(r.body, b"custom body")


with open(os.path.join(harness.SOURCE_DIR, "examples", "ingress", "app.lua")) as f:
    EXAMPLE_LUA = f.read()


class IngressExampleTest(harness.ServerTestCase):
    # Jobs take 2 s: the first status query, made at once, sees the task pending.
    APPLICATIONS = [{"name": "tasks", "route_prefix": "/tasks", "import_path": "app.lua:app",
                     "args": {"work_s": 2}}]
    FILES = {"app.lua": EXAMPLE_LUA}

    def test_submit_then_status(self):
        r = self.server.request("POST", "/tasks/submit",
                                body=json.dumps({"text": "the moon is a harsh mistress"}).encode())
        self.assertEqual(r.status, 202, r)
        task_id = r.json()["task_id"]
        first = self.server.get("/tasks/status/" + task_id)
        self.assertEqual(first.status, 200, first)
        self.assertEqual(first.json()["status"], "pending", first)

        def done():
            doc = self.server.get("/tasks/status/" + task_id).json()
            return doc if doc["status"] == "done" else None
        doc = harness.wait_until(done, 10)
        self.assertTrue(doc, "the task never finished")
        self.assertEqual(doc["result"], {"words": 6, "upper": "THE MOON IS A HARSH MISTRESS"})

    def test_unknown_task_404(self):
        r = self.server.get("/tasks/status/nope")
        self.assertEqual(r.status, 404, r)
        self.assertIn("no task nope", r.json()["error"])

    def test_bad_submit(self):
        self.assertEqual(self.server.request("POST", "/tasks/submit", body=b"{").status, 400)
        self.assertEqual(self.server.request("POST", "/tasks/submit", body=b"[1]").status, 422)


if __name__ == "__main__":
    harness.main()
