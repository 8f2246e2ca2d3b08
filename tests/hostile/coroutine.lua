-- Coroutine tricks: the sandbox does not offer `coroutine` (reading it is an error); if it ever
-- does, a coroutine that spins forever is resumed (a hook set on one thread may not fire on
-- another), and a yield is attempted across the engine's call boundary.
-- expect: fail
local case = {}
function case.run(H)
  local co = coroutine
  local spinner = co.create(function() while true do end end)
  co.resume(spinner)
  co.yield(H.default())
  return H.default()
end
