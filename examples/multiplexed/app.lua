-- multiplexed: a "per-customer model" deployment, as Ray Serve's model multiplexing guide has it.
-- Each customer's model is a small linear scorer whose weights are derived from the customer id
-- (standing in for weights fetched from storage). A replica holds at most two models and evicts
-- the least recently used one; the serve_multiplexed_model_id header picks the customer.
local serve = require "moonserve"

local CustomerModel = serve.deployment { name = "CustomerModel", max_ongoing_requests = 16 }

-- Deterministic weights from the id: what loading them from storage would return.
local function weights_for(model_id)
    local w, h = {}, 7
    for i = 1, #model_id do
        h = (h * 31 + model_id:byte(i)) % 1000003
    end
    for i = 1, 8 do
        h = (h * 1103515245 + 12345) % 2147483648
        w[i] = (h % 2001 - 1000) / 1000
    end
    return w
end

CustomerModel.get_model = serve.multiplexed({
    max_num_models_per_replica = 2,
    unload = function(self, model, model_id)
        serve.log.info("unloaded the model of %s", model_id)
    end,
}, function(self, model_id)
    serve.sleep(0.05) -- the time a download would take
    return { id = model_id, weights = weights_for(model_id) }
end)

function CustomerModel:__call(req)
    local model_id = serve.get_multiplexed_model_id()
    if model_id == "" then
        return serve.response { status = 400,
                                body = { error = "set the serve_multiplexed_model_id header" } }
    end
    local model = self:get_model(model_id)
    local features = req.body ~= "" and req:json() or {}
    local score = 0
    for i, x in ipairs(features) do
        score = score + (model.weights[(i - 1) % 8 + 1] * (tonumber(x) or 0))
    end
    return { model = model.id, score = score, replica = serve.get_replica_context().replica_tag }
end

return { app = CustomerModel:bind() }
