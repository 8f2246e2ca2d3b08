-- The script raises nil: error(nil).
-- expect: fail
local case = {}
function case.run(H)
  error(nil)
end
