-- An infinite loop.
-- expect: fail
local case = {}
function case.run(H)
  while true do end
end
