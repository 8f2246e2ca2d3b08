-- string.find with a backtracking pattern on a 200 KB subject: one C call that would take hours.
-- expect: fail
local case = {}
local subject = string.rep("a", 200 * 1024)
function case.run(H)
  local i = string.find(subject, ".-.-.-b")
  return H.answer(i or 0)
end
