-- The chunk itself loops forever while loading.
-- expect: load
local case = {}
while true do end
