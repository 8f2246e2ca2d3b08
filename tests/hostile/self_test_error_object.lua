-- A self_test that raises an object whose __tostring loops forever.
-- expect: load
local case = {}
function case.self_test()
  error(setmetatable({}, { __tostring = function() while true do end end }))
end
