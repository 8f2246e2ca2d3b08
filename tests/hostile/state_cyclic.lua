-- The kept state is cyclic (it holds itself, directly and through another table).
-- expect: survive
local case = {}
local state = { n = 1 }
state.self = state
state.other = { back = state }
state[1] = state.other
function case.run(H)
  return H.keep(state)
end
