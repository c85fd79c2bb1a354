-- CPU work three ways: SHA-256 of the request body in pure Lua, through
-- LuaJIT's FFI into C, and in C offloaded to libuv's thread pool (the loop
-- keeps serving other requests meanwhile).
--   POST /hash/lua  /hash/ffi  /hash/offload   body -> {"sha256": "<hex>", "way": ...}
-- Run: tamarco-host run services/examples/native/service.lua
--      curl -d @somefile http://127.0.0.1:8081/hash/offload
-- The C module is c/native_hash.c, built by the host's build (into
-- <build>/lua_modules) or by `tamarco-host test` in this directory (into ./build).
local tamarco = require "tamarco"
local http = require "tamarco.resources.http"
local hashing = require "hashing"

local svc = tamarco.service {
    name = "native",
    resources = { api = http.server { port = 8081 } },
}

for _, way in ipairs({ "lua", "ffi", "offload" }) do
    local hash = hashing[way]
    svc.api:post("/hash/" .. way, function(req)
        return 200, { sha256 = hash(req.body or ""), way = way }
    end)
end

return svc
