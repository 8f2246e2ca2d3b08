-- The metatables the engine put on its tables (the router instance's, the request's lazy fields,
-- ctx's lazy raw_metrics, ...) are fetched with getmetatable and changed in place: every
-- metamethod now loops forever.
-- expect: survive
local case = {}
local function spin() while true do end end
local EVENTS = { "__index", "__newindex", "__len", "__eq", "__lt", "__le", "__tostring",
                 "__concat", "__call", "__gc" }
function case.run(H)
  for _, t in ipairs(H.shared) do
    local mt = getmetatable(t)
    if type(mt) == "table" then
      for _, e in ipairs(EVENTS) do rawset(mt, e, spin) end
    end
  end
  return H.default()
end
