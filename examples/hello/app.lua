-- hello: the smallest moonserve application. One deployment answers a JSON greeting; the
-- greeting word comes from user_config, so `moonserve deploy` with a new user_config changes it
-- without restarting the replicas (reconfigure runs in place).
local serve = require "moonserve"

local Hello = serve.deployment { name = "Hello", num_replicas = 1, max_ongoing_requests = 16 }

function Hello:init(default_name)
    self.default_name = default_name or "world"
    self.greeting = "Hello"
end

function Hello:reconfigure(user_config)
    self.greeting = user_config.greeting or "Hello"
end

function Hello:__call(req)
    local ctx = serve.get_replica_context()
    return {
        message = string.format("%s, %s!", self.greeting, req.query.name or self.default_name),
        replica = ctx.replica_tag,
        request_id = req.id,
    }
end

return { app = Hello:bind("world") }
