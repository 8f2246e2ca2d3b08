-- A 1 GiB string in one C call: string.rep("x", 2^30).
-- expect: fail
local case = {}
function case.run(H)
  local s = string.rep("x", 2 ^ 30)
  return H.answer(#s)
end
