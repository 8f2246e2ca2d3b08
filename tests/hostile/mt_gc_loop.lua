-- Every table the engine shares gets a metatable whose __gc loops forever, and garbage carrying it
-- is left for the collector (a finalizer would run whenever the collector runs, inside a call
-- or not).
-- expect: survive
local case = {}
local trap = { __gc = function() while true do end end }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, trap) end
  for _ = 1, 100 do setmetatable({}, trap) end
  return H.default()
end
