-- pipeline: Ray Serve's Pipeline(Preprocessor, Model) composition written as it reads in Python:
--
--     tokens = await self.preprocessor.remote(text)
--     return await self.model.remote(tokens)
--
-- The Preprocessor turns text into a list of tokens (a Lua table, passed as a value); the Model
-- scores the tokens against a word list it is configured with (user_config).
local serve = require "moonserve"

local Preprocessor = serve.deployment { name = "Preprocessor" }
function Preprocessor:__call(text)
    local tokens = {}
    for word in text:lower():gmatch("%a+") do
        tokens[#tokens + 1] = word
    end
    return tokens
end

local Model = serve.deployment { name = "Model", user_config = { positive = { "good", "great" } } }
function Model:reconfigure(config)
    self.positive = {}
    for _, w in ipairs(config.positive or {}) do
        self.positive[w] = true
    end
end
function Model:__call(tokens)
    local hits = 0
    for _, t in ipairs(tokens) do
        if self.positive[t] then
            hits = hits + 1
        end
    end
    return { tokens = #tokens, positive = hits, label = hits > 0 and "positive" or "neutral" }
end

local Pipeline = serve.deployment { name = "Pipeline" }
function Pipeline:init(preprocessor, model)
    self.preprocessor, self.model = preprocessor, model
end
function Pipeline:__call(req)
    local tokens = self.preprocessor:remote(req.body):result()
    return self.model:remote(tokens):result()
end

return { app = Pipeline:bind(Preprocessor:bind(), Model:bind()) }
