-- The script's own error handler loops forever, and the loop around it swallows whatever the
-- budget raises inside the handler.
-- expect: fail
local case = {}
local function handler() while true do end end
function case.run(H)
  while true do
    xpcall(function() error("again") end, handler)
  end
end
