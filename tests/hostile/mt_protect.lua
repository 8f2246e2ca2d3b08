-- Every table the engine shares gets a protected metatable (__metatable set): the engine can no
-- longer replace it through setmetatable, nor see it through getmetatable.
-- expect: survive
local case = {}
local locked = { __metatable = "locked by the script" }
function case.run(H)
  for _, t in ipairs(H.shared) do setmetatable(t, locked) end
  return H.default()
end
