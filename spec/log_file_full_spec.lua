-- The file log sink on a full filesystem: records are dropped and counted,
-- writing is retried with back-off and resumes on its own once there is
-- space again. A real full filesystem: a 64 KiB tmpfs mounted by the spec
-- under its own temporary directory (needs root, as the test command runs).
local cjson = require "cjson"
local logging = require "tamarco.core.logging"
local testing = require "tamarco.testing"
local timer = require "tamarco.c.timer"

local function sh(cmd)
    local ok = os.execute(cmd .. " >/dev/null 2>&1")
    return ok == true or ok == 0
end

local function read_file(path)
    local f = io.open(path, "rb")
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
end

local function lines_of(path)
    local out = {}
    for line in read_file(path):gmatch("[^\n]+") do out[#out + 1] = line end
    return out
end

-- Fills the filesystem holding `path` to the last byte.
local function fill(path)
    local f = assert(io.open(path, "wb"))
    f:setvbuf("no")
    local block = string.rep("x", 1024)
    while f:write(block) do end
    for _ = 1, 1024 do if not f:write("x") then break end end
    f:close()
end

describe("file log sink on a full filesystem", function()
    local dir, mounted

    before_each(function()
        dir = os.tmpname()
        os.remove(dir)
        assert(sh("mkdir " .. dir))
        mounted = sh("mount -t tmpfs -o size=64k tamarco-spec " .. dir)
    end)

    after_each(function()
        logging.close()
        -- lazy: detached even when a failed case left the log file open
        if mounted then sh("umount -l " .. dir) end
        sh("rm -rf " .. dir)
    end)

    it("drops and counts while the disk is full, and resumes on its own once space is freed", function()
        if not mounted then
            pending("mounting a tmpfs needs root")
            return
        end
        local path = dir .. "/service.log"
        logging.configure { profile = "DEVELOP", stdout = false, file_path = path,
                            service_name = "full-disk" }
        local sink = logging.sinks()[1]
        assert.are.equal("file", sink.name)
        local log = logging.get_logger("full")

        testing.run(function()
            log:info("before")
            timer.sleep(1)
            fill(dir .. "/filler")
            -- about 2 000 records/s for half a second against the full disk
            for i = 1, 50 do
                for j = 1, 20 do log:info("while full", { i = i, j = j }) end
                timer.sleep(10)
            end
            assert.is_true(sink:dropped() > 0)
            local before_free = #lines_of(path)
            log:info("still full")
            timer.sleep(20)
            assert.are.equal(before_free, #lines_of(path))

            os.remove(dir .. "/filler")
            -- keep logging; the sink must come back within its back-off (5 s at most)
            local deadline, n = timer.now() + 15000, 0
            repeat
                n = n + 1
                log:info("after " .. n)
                timer.sleep(20)
            until read_file(path):find('"after ', 1, true) or timer.now() > deadline
        end)

        local lines = lines_of(path)
        local resumed, after, torn = nil, 0, 0
        for i, line in ipairs(lines) do
            local ok, record = pcall(cjson.decode, line)
            if not ok then
                torn = torn + 1   -- at most the line the full disk cut
            elseif record.message == "file sink resumed" then
                resumed = record
                assert.are.equal("WARNING", record.level)
                for k = i + 1, #lines do assert.is_truthy(pcall(cjson.decode, lines[k])) end
            elseif record.message:find("^after ") then
                after = after + 1
            end
        end
        assert.is_truthy(resumed, "no 'file sink resumed' record in the file")
        assert.is_true(resumed.dropped_records > 0)
        -- the tiny disk may fill again after the resume: the sink's count can
        -- only have grown since
        assert.is_true(resumed.dropped_records <= sink:dropped())
        assert.matches("space", resumed.error)
        assert.is_true(after >= 1)
        assert.is_true(torn <= 1)
        assert.are.equal("before", cjson.decode(lines[1]).message)

        -- the ERROR-at-once guarantee holds after the recovery
        local count = #lines_of(path)
        log:error("right away")
        assert.are.equal(count + 1, #lines_of(path))
        local metrics = require "tamarco.core.metrics"
        assert.matches('logging_dropped_records_total{sink="file"} ' .. sink:dropped(),
            metrics.exposition(), 1, true)
    end)

    it("keeps ERROR records going straight to the disk while others back off", function()
        if not mounted then
            pending("mounting a tmpfs needs root")
            return
        end
        local path = dir .. "/service.log"
        logging.configure { profile = "DEVELOP", stdout = false, file_path = path }
        local sink = logging.sinks()[1]
        local log = logging.get_logger("full")
        testing.run(function()
            fill(dir .. "/filler")
            log:info("lost")
            timer.sleep(5)   -- the turn's write fails: the sink backs off
            assert.are.equal(1, sink:dropped())
            os.remove(dir .. "/filler")
            log:info("skipped during the back-off")
            assert.are.equal(2, sink:dropped())
            log:error("written at once")   -- tried although backing off
            local lines = lines_of(path)
            assert.are.equal(1, #lines)
            assert.are.equal("written at once", cjson.decode(lines[1]).message)
            timer.sleep(1)   -- the resume notice is an ordinary record: within the turn
            lines = lines_of(path)
            assert.are.equal("file sink resumed", cjson.decode(lines[2]).message)
            assert.are.equal(2, cjson.decode(lines[2]).dropped_records)
        end)
    end)
end)
