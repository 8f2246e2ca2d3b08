-- coordinated: a two-stage pipeline whose stages are scaled together by one application-level
-- policy (../policies/coordinated.lua): the Model always gets twice the Preprocessor's replicas.
local serve = require "moonserve"

local Model = serve.deployment { name = "Model", max_ongoing_requests = 4 }

function Model:__call(req)
    local features = req:json() -- a table passed to remote() arrives as a JSON body
    serve.sleep(0.05) -- stands in for inference
    return { label = (#features.text % 2 == 0) and "even" or "odd" }
end

local Preprocessor = serve.deployment { name = "Preprocessor", max_ongoing_requests = 8 }

function Preprocessor:init(model)
    self.model = model
end

function Preprocessor:__call(req)
    local text = (req.query.text or req.body or ""):lower()
    return self.model:remote({ text = text }):result()
end

return { app = Preprocessor:bind(Model:bind()) }
