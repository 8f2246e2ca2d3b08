-- Text that is not UTF-8 wherever a valid answer may carry text: the judge's refusal and clamp
-- reasons, the keys and values of kept states. Nothing need fail, but the status document and
-- the 422 body must stay valid JSON.
-- expect: survive
local case = {}
local bad = "\255\254 bad \192\128 \237\160\128 text"
local calls = 0
function case.run(H)
  calls = calls + 1
  if H.kind == "judge" and calls % 2 == 1 then return "refuse", bad end
  if H.kind == "judge" then return "clamp", 1, bad end
  return H.keep({ [bad] = bad, list = { bad } })
end
