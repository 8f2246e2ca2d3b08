-- digits: a trained classifier served end to end. The model (an MLP 64 -> 32 -> 10 that
-- train.py fits on scikit-learn's bundled 8x8 digits) runs in the built-in dense-model runtime,
-- serve.nn (docs/nn.md): weights.safetensors is read once per replica, on the GPU when the
-- replica has one, else through OpenBLAS.
--
--   curl -d '{"pixels":[0,0,5,13,9,1,0,0, ...64 values 0..16...]}' http://127.0.0.1:8000/
--   -> {"label": 0}
local serve = require "moonserve"

local Digits = serve.deployment { name = "Digits", num_replicas = 1, max_ongoing_requests = 64 }

function Digits:init(weights)
    -- A relative path is read from this file's folder.
    self.model = serve.nn.load(weights or "weights.safetensors", { device = "auto" })
    self.width = self.model:info().input
end

-- The model call, batched (docs/batching.md): each request passes its own row, the replica
-- gathers the rows of concurrent requests (up to 32, waiting at most 2 ms after the first) and
-- runs one forward pass for all of them. user_config can change both at run time.
Digits.predict_batch = serve.batch({ max_batch_size = 32, batch_wait_timeout_s = 0.002 },
    function(self, rows)
        return self.model:predict(rows)
    end)

function Digits:reconfigure(config)
    if config.max_batch_size then
        self.predict_batch:set_max_batch_size(config.max_batch_size)
    end
    if config.batch_wait_timeout_s then
        self.predict_batch:set_batch_wait_timeout_s(config.batch_wait_timeout_s)
    end
end

local function bad_request(req, message)
    return serve.response { status = 400, body = { error = message, request_id = req.id } }
end

-- Checks the body is {"pixels": [width numbers]}; returns the pixels or nil and a message.
function Digits:pixels(req)
    local ok, body = pcall(req.json, req)
    if not ok or type(body) ~= "table" or type(body.pixels) ~= "table" then
        return nil, string.format('expected a JSON body {"pixels": [%d numbers]}', self.width)
    end
    local pixels = body.pixels
    if #pixels ~= self.width then
        return nil, string.format("pixels has %d values, the model takes %d", #pixels, self.width)
    end
    for i = 1, self.width do
        if type(pixels[i]) ~= "number" then
            return nil, string.format("pixels[%d] is a %s, not a number", i, type(pixels[i]))
        end
    end
    return pixels
end

function Digits:__call(req)
    local pixels, err = self:pixels(req)
    if not pixels then
        return bad_request(req, err)
    end
    return { label = self:predict_batch(pixels) }
end

return { app = Digits:bind() }
