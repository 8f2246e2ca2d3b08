-- torch-classifier: a PyTorch model served as process replicas (docs/process-replicas.md) behind
-- a Lua ingress that validates every request, so the replicas only ever see well-formed images.
--
--   curl -d '{"image": [0,0,7,16,14,3,0,0, ...64 values 0..16...]}' http://127.0.0.1:8000/
--   -> {"label": 2, "probabilities": [...10 floats...]}
--   bad input -> 422 {"error": "...", "request_id": "..."} from this file; server.py never sees it
local serve = require "moonserve"

-- Its replicas are server.py itself; serve.yaml's process block (which wins) adds cwd.
local Classifier = serve.deployment {
    name = "Classifier",
    process = { command = { "/usr/bin/python3", "server.py" }, ready_path = "/healthz",
                health_path = "/healthz" },
}

local Ingress = serve.deployment { name = "Ingress", max_ongoing_requests = 64 }

function Ingress:init(classifier)
    self.classifier = classifier
end

local WIDTH = 64

-- Returns the image of a {"image": [64 numbers 0..16]} body, or nil and what is wrong with it.
local function image_of(req)
    local ok, body = pcall(req.json, req)
    if not ok then
        return nil, "the body is not JSON"
    end
    -- decode marks arrays with a metatable; a JSON object decodes to a plain table.
    if type(body) ~= "table" or getmetatable(body) ~= nil then
        return nil, 'expected a JSON object {"image": [64 numbers 0..16]}'
    end
    local image = body.image
    if type(image) ~= "table" or getmetatable(image) == nil then
        return nil, '"image" must be an array of 64 numbers 0..16'
    end
    if #image ~= WIDTH then
        return nil, string.format('"image" has %d values, expected %d', #image, WIDTH)
    end
    for i = 1, WIDTH do
        local v = image[i]
        if type(v) ~= "number" then
            return nil, string.format('image[%d] is not a number', i - 1)
        end
        if v < 0 or v > 16 then
            return nil, string.format('image[%d] is %s, outside 0..16', i - 1, tostring(v))
        end
    end
    return image
end

function Ingress:__call(req)
    if req.method ~= "POST" then
        return serve.response { status = 405, headers = { allow = "POST" },
                                body = { error = "POST a JSON body", request_id = req.id } }
    end
    local image, problem = image_of(req)
    if not image then
        return serve.response { status = 422, body = { error = problem, request_id = req.id } }
    end
    -- A table argument is POSTed to the replica's "/" as JSON; server.py treats "/" as /predict.
    return self.classifier:remote({ image = image }):result()
end

return { app = Ingress:bind(Classifier:bind()) }
