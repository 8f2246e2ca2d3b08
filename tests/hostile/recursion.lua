-- Unbounded recursion: the Lua stack overflows.
-- expect: fail
local case = {}
local function deeper(n) return 1 + deeper(n + 1) end
function case.run(H)
  return deeper(1)
end
