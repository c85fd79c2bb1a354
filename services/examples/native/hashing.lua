--- The native example's three ways to SHA-256 a string, same results:
--   hashing.lua(s)      pure Lua (sha256.lua), on the loop
--   hashing.ffi(s)      the C function native_hash_sha256 through LuaJIT's FFI, on the loop
--   hashing.offload(s)  the C module's sha256_offload: a libuv pool thread hashes
--                       while the calling task yields (call it inside a task)
local ffi = require "ffi"
local sha256 = require "sha256"
local native = require "native_hash"   -- <build>/native_hash.so (or the host's lua_modules)

ffi.cdef [[
void native_hash_sha256(const unsigned char *data, size_t len, unsigned char out[32]);
]]

-- The module is already loaded by require: ffi.load of the same file shares it.
local lib = ffi.load(assert(package.searchpath("native_hash", package.cpath),
    "native_hash.so not found on package.cpath"))
local digest = ffi.new("unsigned char[32]")
local hex = ffi.new("char[64]")
local HEX = "0123456789abcdef"
local hex_digits = ffi.new("char[16]", HEX)

local hashing = {}

function hashing.lua(s)
    return sha256.hex(s)
end

function hashing.ffi(s)
    lib.native_hash_sha256(s, #s, digest)
    for i = 0, 31 do
        local b = digest[i]
        hex[2 * i] = hex_digits[bit.rshift(b, 4)]
        hex[2 * i + 1] = hex_digits[bit.band(b, 15)]
    end
    return ffi.string(hex, 64)
end

hashing.c = native.sha256
hashing.offload = native.sha256_offload

return hashing
