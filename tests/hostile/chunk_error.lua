-- The chunk itself raises while loading.
-- expect: load
local case = {}
error("the chunk refuses to load")
