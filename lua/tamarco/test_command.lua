--- `tamarco-host test`: busted inside the host.
local test_command = {}

function test_command.main(args)
    local busted_args = { [0] = "busted" }
    for i, a in ipairs(args) do
        busted_args[i] = (a == "--busted-help") and "--help" or a
    end
    _G.arg = busted_args
    -- busted returns when everything passed; on failures it ends with a bare
    -- error() (its Lua 5.1 way of exiting non-zero), after printing them.
    local ok, err = pcall(require "busted.runner", { standalone = false })
    if ok then return 0 end
    if err == nil then return 1 end
    error(err, 0)
end

return test_command
