-- The answer carries a cyclic table (it holds itself, as an entry and as a field): a reader that
-- follows tables without remembering them never ends.
-- expect: fail policy app_policy judge tick
local case = {}
local cyclic = {}
cyclic[1] = cyclic
cyclic.self = cyclic
cyclic.pair = { cyclic }
function case.run(H)
  return H.answer(cyclic)
end
