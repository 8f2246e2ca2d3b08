-- Unbounded recursion where every level is a pcall that swallows the error of the level below and
-- recurses again: the stack overflow is caught, over and over.
-- expect: fail
local case = {}
local function deeper(n)
  pcall(deeper, n + 1)
  return deeper(n + 1)
end
function case.run(H)
  return deeper(1)
end
