-- ingress: an HTTP API with routes, as Ray Serve's FastAPI ingress (`@serve.ingress(app)`), in
-- the asynchronous-task style: POST /submit queues a job and answers its id at once; GET
-- /status/:task_id tells how it is going and, once done, its result.
--
--   curl -d '{"text": "the moon is a harsh mistress"}' http://127.0.0.1:8000/tasks/submit
--   curl http://127.0.0.1:8000/tasks/status/<task_id>
--
-- The work runs in the Worker deployment; the ingress makes the call and does not wait for it
-- (a call still running when its request ends is left to complete), so it answers at once.
local serve = require "moonserve"
local routes = serve.routes

-- The worker keeps the tasks: one replica, so every status query sees every task.
local Worker = serve.deployment { name = "Worker", num_replicas = 1, max_ongoing_requests = 64 }

function Worker:init(work_s)
    self.work_s = work_s
    self.tasks = {}
end

function Worker:enqueue(id, text)
    self.tasks[id] = { status = "pending", text = text }
end

function Worker:run(id)
    local task = self.tasks[id]
    serve.sleep(self.work_s) -- the slow part of a real job (a model, a download...)
    local words = 0
    for _ in task.text:gmatch("%S+") do words = words + 1 end
    task.status, task.result = "done", { words = words, upper = task.text:upper() }
end

function Worker:status(id)
    local task = self.tasks[id]
    return task and { status = task.status, result = task.result }
end

local app = serve.app()
local Api = serve.ingress(app, serve.deployment { name = "Api", num_replicas = 1 })

function Api:init(worker)
    self.worker = worker
    self.n = 0
end

app:get("/", function(self)
    return { routes = { "POST /submit", "GET /status/:task_id" } }
end)

app:post("/submit", function(self, req)
    local body = req:json() -- malformed JSON answers 400
    if type(body) ~= "table" or type(body.text) ~= "string" then
        routes.abort(422, "expected {\"text\": \"...\"}")
    end
    self.n = self.n + 1
    local id = string.format("%s-%d", serve.get_replica_context().replica_id, self.n)
    self.worker.enqueue:remote(id, body.text):result()
    self.worker.run:remote(id) -- not waited for
    return { task_id = id }
end, { status = 202 })

app:get("/status/:task_id", function(self, req, params)
    local st = self.worker.status:remote(params.task_id):result()
    if not st then
        routes.abort(404, "no task " .. params.task_id)
    end
    return { task_id = params.task_id, status = st.status, result = st.result }
end)

-- args.work_s (config) is how long each job takes.
return { app = function(args) return Api:bind(Worker:bind(args.work_s or 0.5)) end }
