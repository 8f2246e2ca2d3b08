-- The script raises an object whose __tostring loops forever: an engine that turns the error
-- into a message (luaL_tolstring) outside the budget spins.
-- expect: fail
local case = {}
local loud = setmetatable({}, { __tostring = function() while true do end end })
function case.run(H)
  error(loud)
end
