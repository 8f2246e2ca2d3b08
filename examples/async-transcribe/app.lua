-- async-transcribe: asynchronous inference through Redis. The Api ingress takes a job and
-- answers its task id at once; the Transcriber consumes the "transcribe" queue, doing slow work
-- in steps and reporting progress; the status endpoint reads how a job is going. A job whose
-- audio cannot be read fails every attempt and ends in the dead-letter queue
-- (transcribe-failed). Needs a redis-server on 127.0.0.1:6379 (config.yaml).
--
--   curl -d '{"url": "s3://bucket/talk.wav"}' http://127.0.0.1:8000/jobs/transcribe
--   curl http://127.0.0.1:8000/jobs/status/TASK_ID
--   curl -X POST http://127.0.0.1:8000/jobs/cancel/TASK_ID
--
-- The same queue is reachable without any ingress code: POST /-/tasks/transcribe with
-- {"name": "transcribe", "args": ["s3://bucket/talk.wav"]} (docs/tasks.md, "Endpoints").
local serve = require "moonserve"
local routes = serve.routes

local QUEUE = "transcribe"

-- The consumer: one task handler. Each "chunk" stands for a slice of audio run through a
-- speech model; the chunk count and pace come from the config (user_config).
local Transcriber = serve.deployment { name = "Transcriber", max_ongoing_requests = 2 }

function Transcriber:init()
    self.chunks, self.chunk_s = 5, 0.2
end

function Transcriber:reconfigure(config)
    self.chunks = tonumber(config.chunks) or self.chunks
    self.chunk_s = tonumber(config.chunk_s) or self.chunk_s
end

Transcriber.transcribe = serve.task_handler(function(self, url)
    if type(url) ~= "string" or url:find("broken", 1, true) then
        error("cannot read audio at " .. tostring(url), 0) -- retried, then dead-lettered
    end
    local words = {}
    for i = 1, self.chunks do
        serve.sleep(self.chunk_s)
        words[i] = string.format("chunk%d", i)
        serve.task_progress({ chunks_done = i, chunks = self.chunks })
    end
    return { url = url, text = table.concat(words, " "), chunks = self.chunks }
end)

-- The ingress: submit, status, cancel, through serve.tasks.
local app = serve.app()
local Api = serve.ingress(app, serve.deployment { name = "Api" })

app:get("/", function()
    return { routes = { "POST /transcribe", "GET /status/:task_id", "POST /cancel/:task_id" },
             queue = QUEUE }
end)

app:post("/transcribe", function(self, req)
    local body = req:json()
    if type(body) ~= "table" or type(body.url) ~= "string" then
        routes.abort(422, "expected {\"url\": \"...\"}")
    end
    return { task_id = serve.tasks.enqueue(QUEUE, "transcribe", { body.url }) }
end, { status = 202 })

app:get("/status/:task_id", function(self, req, params)
    local ok, st = pcall(serve.tasks.status, QUEUE, params.task_id)
    if not ok then
        routes.abort(tostring(st):find("404", 1, true) and 404 or 503, tostring(st))
    end
    return st
end)

app:post("/cancel/:task_id", function(self, req, params)
    local ok, st = pcall(serve.tasks.cancel, QUEUE, params.task_id)
    if not ok then
        routes.abort(409, tostring(st))
    end
    return st
end)

return { app = Api:bind(), consumer = Transcriber:bind() }
