-- The /debug/ page in a real browser (Debian's chromium, headless) against a
-- service under load: the tasks table and the inline flame graph render.
-- The screenshot is kept as <build>/debug-flamegraph.png (a CI artifact).
-- Needs a real redis-server (TAMARCO_TEST_REDIS_HOST/PORT) and chromium.
local cli = require "spec.support.cli"
local free_port = require("spec.support.net").free_port

local REDIS_HOST = os.getenv("TAMARCO_TEST_REDIS_HOST")
local REDIS_PORT = os.getenv("TAMARCO_TEST_REDIS_PORT")
if not REDIS_HOST or not REDIS_PORT then
    error("debug_browser_spec needs a real redis-server: first\n"
        .. "  eval \"$(TAMARCO_SERVICES=redis scripts/test-services.sh start)\"", 0)
end

local BUILD_DIR = cli.host:match("^(.*)/[^/]*$")
local SCREENSHOT = BUILD_DIR .. "/debug-flamegraph.png"

describe("the /debug/ page in headless chromium", function()
    it("shows the tasks table and, after the profile button's run, the flame graph", function()
        local port, report_port = free_port(), free_port()
        local api = "http://127.0.0.1:" .. port
        local page = "http://127.0.0.1:" .. report_port .. "/debug/?profile=3"
        local profile_dir = os.tmpname()
        os.remove(profile_dir)
        local dom = profile_dir .. ".dom"
        os.remove(SCREENSHOT)
        -- virtual time lets the page's profile request finish before the dump
        local chromium = "chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="
            .. profile_dir .. " --virtual-time-budget=30000 --window-size=1280,1000 "
        local code, out = cli.run_until({ "run", "spec/fixtures/services/debug_service.lua", "--debug" },
            "debug pages on", "TERM", {
                TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(port),
                TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = tostring(report_port),
                TAMARCO__SYSTEM__RESOURCES__CACHE__HOST = REDIS_HOST,
                TAMARCO__SYSTEM__RESOURCES__CACHE__PORT = REDIS_PORT,
                TAMARCO__SYSTEM__LOGGING__PROFILE = "PRODUCTION",
            }, {
                { run = table.concat({
                    "(for i in $(seq 1 300); do curl -s " .. api .. "/hello/load >/dev/null; done) & load=$!",
                    "curl -s " .. api .. "/burn?seconds=60 >/dev/null",
                    chromium .. "--dump-dom '" .. page .. "' > " .. dom .. " 2>/dev/null",
                    chromium .. "--screenshot=" .. SCREENSHOT .. " '" .. page .. "' >/dev/null 2>&1",
                    "wait $load",
                }, "\n"), wait = "debug pages on" },
            })
        local html = cli.read_all(dom)
        os.remove(dom)
        os.execute("rm -rf " .. profile_dir)
        assert.are.equal(0, code, out)

        -- the tasks table, with the service's task in it
        assert.matches('<table id="tasks">', html, 1, true)
        assert.matches("redis traffic", html, 1, true)
        -- the flame graph rendered inline from the profile the page ran
        assert.matches('<span id="profile-state">done</span>', html, 1, true)
        local _, frames = html:gsub('<g class="f"', "")
        assert.is_true(frames >= 3, "flame graph frames: " .. frames)
        assert.matches("debug_service.lua:burn_cpu", html, 1, true)
        local shot = io.open(SCREENSHOT, "rb")
        assert.is_not_nil(shot, "no screenshot at " .. SCREENSHOT)
        assert.are.equal("\137PNG", shot:read(4))
        shot:close()
    end)
end)
