-- fanout: the Driver / HeavyLoad / LightLoad application of Ray Serve's advanced-autoscaling
-- guide. The Driver calls both models at once and waits for the two answers; each model keeps
-- its CPU busy for a while (here 40 ms and 20 ms of spinning, a fifth of the guide's 0.2 s and
-- 0.1 s, so the example scales on a small machine), so under load the heavy one needs about twice
-- the replicas of the light one, which the autoscaler finds on its own (config.yaml).
local serve = require "moonserve"

-- Spins the CPU for `seconds` of processor time, as the guide's busy-wait loop does.
local function busy(seconds)
    local start = os.clock()
    while os.clock() - start < seconds do
    end
end

local LightLoad = serve.deployment { name = "LightLoad" }
function LightLoad:__call()
    busy(0.02)
    return "light"
end

local HeavyLoad = serve.deployment { name = "HeavyLoad" }
function HeavyLoad:__call()
    busy(0.04)
    return "heavy"
end

local Driver = serve.deployment { name = "Driver" }
function Driver:init(a_handle, b_handle)
    self.a_handle, self.b_handle = a_handle, b_handle
end

function Driver:__call()
    local a_future = self.a_handle:remote()
    local b_future = self.b_handle:remote()
    return { a_future:result(), b_future:result() }
end

return { app = Driver:bind(HeavyLoad:bind(), LightLoad:bind()) }
