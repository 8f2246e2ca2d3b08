-- compose: a two-step graph. The Ingress receives the HTTP request, asks the Preprocessor to
-- normalise the text, then asks the Model to score it; both calls go through handles (the bound
-- nodes passed to Ingress:bind become handles in Ingress:init).
local serve = require "moonserve"

local Preprocessor = serve.deployment { name = "Preprocessor", num_replicas = 1 }

function Preprocessor:__call(req)
    local text = req:json().text or ""
    return { text = text:lower():gsub("%s+", " "):match("^%s*(.-)%s*$") }
end

local Model = serve.deployment {
    name = "Model",
    num_replicas = 2,
    max_ongoing_requests = 8,
    user_config = { positive = { "good", "great", "love" } },
}

function Model:init(threshold)
    self.threshold = threshold
    self.positive = {}
end

function Model:reconfigure(user_config)
    self.positive = {}
    for _, w in ipairs(user_config.positive or {}) do
        self.positive[w] = true
    end
end

function Model:__call(req)
    local hits = 0
    for word in req:json().text:gmatch("%a+") do
        if self.positive[word] then
            hits = hits + 1
        end
    end
    return { score = hits, label = hits >= self.threshold and "positive" or "neutral" }
end

local Ingress = serve.deployment { name = "Ingress" }

function Ingress:init(handles)
    self.pre = handles.preprocessor
    self.model = handles.model
end

function Ingress:__call(req)
    local clean = self.pre:remote(req):result()   -- forwards the request (method, headers, body)
    local result = self.model:remote(clean):result() -- a table is sent as a JSON body
    result.text = clean.text
    return result
end

-- A builder: `args` from the config choose the model's threshold.
return {
    app = function(args)
        local model = Model:bind(tonumber(args.threshold) or 1)
        return Ingress:bind { preprocessor = Preprocessor:bind(), model = model }
    end,
}
