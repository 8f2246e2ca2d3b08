-- streaming: a token generator relayed through an ingress as Server-Sent Events. The Generator
-- stands in for a language model: it "decodes" one token at a time, pausing between tokens as a
-- model would, and sends each one as it is made. The Ingress calls it through a handle with
-- stream = true and passes every token on to the client at once, as one SSE event.
local serve = require "moonserve"

local Generator = serve.deployment { name = "Generator", max_ongoing_requests = 32 }

function Generator:init()
    self.delay = 0.05
end

function Generator:reconfigure(user_config)
    self.delay = tonumber(user_config.token_delay_s) or self.delay
end

-- A deterministic "model": the prompt's words, then words derived from them, one per step.
function Generator:generate(prompt, max_tokens)
    local words = {}
    for w in tostring(prompt):gmatch("%S+") do
        words[#words + 1] = w
    end
    if #words == 0 then
        words[1] = "hello"
    end
    return serve.stream(function(send)
        for i = 1, max_tokens do
            serve.sleep(self.delay) -- the time one decoding step takes
            local w = words[(i - 1) % #words + 1]
            send({ index = i, token = i <= #words and w or w:reverse() })
        end
    end)
end

local Ingress = serve.deployment { name = "Ingress" }

function Ingress:init(generator)
    self.generator = generator
end

function Ingress:__call(req)
    local n = math.min(tonumber(req.query.max_tokens) or 16, 256)
    local tokens = self.generator.generate:options { stream = true }:remote(req.query.prompt or "", n)
    return serve.sse(function(send)
        send { comment = "generating " .. n .. " tokens" }
        for item in tokens do
            send { event = "token", id = item.index, data = item.token }
        end
        send { event = "done", data = { tokens = n } }
    end)
end

return { app = Ingress:bind(Generator:bind()) }
