-- wrk script of scripts/tools/bench.sh's instruction counts: after WRK_REQUESTS responses the
-- thread stops sending and creates the file WRK_DONE; the script then interrupts wrk (SIGINT, on
-- which wrk prints its summary), so a run is a fixed request count rather than a fixed time.
-- Run with one thread.
local limit = tonumber(os.getenv("WRK_REQUESTS"))
local seen = 0
function response()
  seen = seen + 1
  if seen == limit then
    local f = io.open(os.getenv("WRK_DONE"), "w")
    f:close()
    wrk.thread:stop()
  end
end
