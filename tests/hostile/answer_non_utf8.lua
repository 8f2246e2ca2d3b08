-- The answer is text that is not UTF-8 (invalid bytes, an overlong encoding, a lone surrogate)
-- where a number or a verdict belongs, and (application policy, tick) also names a deployment
-- that does not exist in such text; for a router, the whole answer is that text. An engine that
-- quotes the bad value in its message must keep its JSON status and its log valid.
-- expect: fail
local case = {}
local bad = "\255\254 bad \192\128 \237\160\128 answer"
function case.run(H)
  if H.kind == "router" then return bad end
  local answer = H.answer(bad)
  if type(answer) == "table" then answer[bad] = 1 end
  return answer
end
