-- string.gsub with a backtracking pattern on a 200 KB subject: one C call that would take hours
-- (no Lua instruction runs inside it, so a count hook never fires).
-- expect: fail
local case = {}
local subject = string.rep("a", 200 * 1024)
function case.run(H)
  local s = string.gsub(subject, ".-.-.-b", "")
  return H.answer(#s)
end
