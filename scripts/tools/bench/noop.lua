-- The benchmark's no-op deployment: answers every request with the two-byte body "ok".
local serve = require "moonserve"
local Noop = serve.deployment{name="Noop", max_ongoing_requests=1000}
function Noop:__call(req) return "ok" end
return {app = Noop:bind()}
