-- string.match with a backtracking pattern on a 200 KB subject, through the string methods
-- (subject:match): one C call that would take hours.
-- expect: fail
local case = {}
local subject = string.rep("a", 200 * 1024)
function case.run(H)
  local m = subject:match("(a-)(a-)(a-)b")
  return H.answer(m and #m or 0)
end
