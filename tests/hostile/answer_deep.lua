-- The answer carries tables nested 100,000 deep: a recursive reader of the answer overflows the
-- C stack.
-- expect: fail policy app_policy judge tick
local case = {}
local deep = {}
for _ = 1, 1e5 do deep = { deep } end
function case.run(H)
  return H.answer(deep)
end
