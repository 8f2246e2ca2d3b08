-- A string doubled in a loop until memory runs out, each failure swallowed by pcall.
-- expect: fail
local case = {}
function case.run(H)
  local s = "x"
  while true do
    local ok, bigger = pcall(function() return s .. s end)
    if ok then s = bigger end
  end
end
