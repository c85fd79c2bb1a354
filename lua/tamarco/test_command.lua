--- `tamarco-host test`: busted inside the host.
local test_command = {}

function test_command.main(args)
    local busted_args = { [0] = "busted" }
    for i, a in ipairs(args) do
        busted_args[i] = (a == "--busted-help") and "--help" or a
    end
    _G.arg = busted_args
    -- busted exits the process itself with failures + errors when any; it
    -- returns here when everything passed.
    require "busted.runner" ({ standalone = false })
    return 0
end

return test_command
