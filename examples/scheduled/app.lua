-- scheduled: a deployment whose replica count follows business hours
-- (../policies/scheduled.lua), whatever the load.
local serve = require "moonserve"

local Api = serve.deployment { name = "Api" }

function Api:__call(req)
    return { replica = serve.get_replica_context().replica_tag, path = req.path }
end

return { app = Api:bind() }
