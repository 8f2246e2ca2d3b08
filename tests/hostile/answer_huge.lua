-- The answer carries a table of a million entries (built once, at load, under the load budget).
-- expect: fail policy app_policy judge tick
local case = {}
local huge = {}
for i = 1, 1e6 do huge[i] = i end
function case.run(H)
  return H.answer(huge)
end
