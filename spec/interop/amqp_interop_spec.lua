-- tamarco-host next to Python Tamarco on one RabbitMQ: a peer that declares
-- and publishes exactly as tamarco-amqp does (spec/interop/tamarco_amqp_peer.py,
-- Debian's python3-pika) and tamarco-host's amqp resource share the names of
-- all three patterns, messages go both ways, and either side may declare
-- first. A failed declaration on either side shows here: the peer dies with
-- a channel error (no "ready"/"done" line), the resource is not STARTED.
local testing = require "tamarco.testing"
local amqp = require "tamarco.resources.amqp"
local tasks = require "tamarco.core.tasks"
local base = require "tamarco.core.resource"
local timer = require "tamarco.c.timer"
local cjson = require "cjson"

local STATUS = base.STATUS
local HOST = os.getenv("TAMARCO_TEST_AMQP_HOST")
local PORT = tonumber(os.getenv("TAMARCO_TEST_AMQP_PORT") or "")
local PYTHON = "/usr/bin/python3"
local PEER = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]+$") or "spec/interop") .. "/tamarco_amqp_peer.py"
local PREFIX = ("interop%d%d"):format(os.time() % 100000, math.random(1000, 9999))

local function sh(command)
    local ok, how, code = os.execute(command)
    if type(ok) == "number" then return ok == 0 end
    return ok == true and how == "exit" and code == 0
end

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function read_all(path)
    local f = io.open(path, "r")
    if not f then return "" end
    local text = f:read("*a")
    f:close()
    return text
end

-- the Python peer takes seconds to start: a longer default wait
local function eventually(cond, ms) return testing.wait_until(cond, ms or 15000, 25) end

local dir
local started = {}

-- A running peer: its output lines as tables.
local Peer = {}
Peer.__index = Peer

local function peer(role, name, arg)
    local n = #started + 1
    local out, err = ("%s/peer%d.out"):format(dir, n), ("%s/peer%d.err"):format(dir, n)
    local command = table.concat({ PYTHON, quote(PEER), HOST, tostring(PORT), PREFIX, role, name,
        arg and quote(arg) or "" }, " ")
    local pipe = io.popen(command .. " >" .. quote(out) .. " 2>" .. quote(err) .. " & echo $!")
    local pid = tonumber(pipe:read("*a"))
    pipe:close()
    local self = setmetatable({ pid = pid, out = out, err = err, role = role }, Peer)
    started[n] = self
    return self
end

function Peer:lines()
    local list = {}
    for line in read_all(self.out):gmatch("[^\n]+") do list[#list + 1] = cjson.decode(line) end
    return list
end

function Peer:has(key)
    for _, l in ipairs(self:lines()) do if l[key] ~= nil then return l end end
    return nil
end

function Peer:wait(key)
    local line = eventually(function() return self:has(key) end)
    assert(line, ("the python peer (%s) printed no %q line; stdout:\n%s\nstderr:\n%s"):format(self.role, key,
        read_all(self.out), read_all(self.err)))
    return line
end

function Peer:messages()
    local list = {}
    for _, l in ipairs(self:lines()) do if l.message ~= nil then list[#list + 1] = l end end
    return list
end

local function client()
    return amqp.client { host = HOST, port = PORT, queues_prefix = PREFIX, connection_timeout = 5 }
end

local function started_client(setup)
    local cl = client()
    if setup then setup(cl) end
    cl:start()
    assert.are.equal(STATUS.STARTED, cl:status().status, cjson.encode(cl:status()))
    return cl
end

describe("amqp interop with tamarco-amqp (python3-pika peer)", function()
    setup(function()
        assert(HOST and PORT, "TAMARCO_TEST_AMQP_HOST and TAMARCO_TEST_AMQP_PORT must be set")
        assert(sh("test -x " .. PYTHON .. " && " .. PYTHON .. " -c 'import pika'"),
            PYTHON .. " with pika is needed (Debian package python3-pika)")
        testing.timeout_ms = 90000
        dir = os.tmpname()
        os.remove(dir)
        assert(sh("mkdir -p " .. quote(dir)))
    end)

    teardown(function()
        for _, p in ipairs(started) do
            if p.pid then sh("kill -KILL " .. p.pid .. " 2>/dev/null") end
        end
        pcall(testing.run, function()
            local cl = client()
            cl:start()
            for _, name in ipairs({ "py_first", "host_first" }) do
                cl:delete_queue("push_pull", name)
                cl:delete_queue("request_response", name)
            end
            cl:stop()
        end)
        if dir then sh("rm -rf " .. quote(dir)) end
    end)

    describe("push/pull", function()
        it("python declares first: host pushes to python, then pulls what python pushes", function()
            testing.run(function()
                local py = peer("pull", "py_first", "2")
                py:wait("ready")
                local cl = client()
                cl:start()
                assert.is_true(cl:push("py_first", { n = 1, items = { "a" } }))
                assert.is_true(cl:push("py_first", { n = 2 }))
                py:wait("done")
                local got = py:messages()
                assert.are.same({ n = 1, items = { "a" } }, got[1].message)
                assert.are.equal(2, got[2].message.n)
                assert.are.equal("application/json", got[1].content_type)
                -- now tamarco-host consumes the queue python declared
                local seen = {}
                cl:pull("py_first", function(msg, meta) seen[#seen + 1] = { msg, meta.properties.content_type } end)
                assert.truthy(eventually(function() return cl:status().status == STATUS.STARTED end))
                peer("push", "py_first", '{"n": 3, "text": "from python"}'):wait("done")
                assert.truthy(eventually(function() return #seen == 1 end))
                assert.are.same({ n = 3, text = "from python" }, seen[1][1])
                assert.are.equal("text/plain", seen[1][2])
                cl:stop()
            end)
        end)

        it("host declares first: python pushes to the host, then pulls what the host pushes", function()
            testing.run(function()
                local seen = {}
                local cl = started_client(function(c)
                    c:pull("host_first", function(msg) seen[#seen + 1] = msg end)
                end)
                peer("push", "host_first", '{"n": 1}'):wait("done")
                assert.truthy(eventually(function() return #seen == 1 end))
                assert.are.equal(1, seen[1].n)
                cl:stop()
                -- python declares the queue tamarco-host declared, and consumes
                local py = peer("pull", "host_first", "1")
                py:wait("ready")
                local pusher = started_client()
                assert.is_true(pusher:push("host_first", { n = 2 }))
                py:wait("done")
                assert.are.equal(2, py:messages()[1].message.n)
                pusher:stop()
            end)
        end)
    end)

    describe("publish/subscribe", function()
        it("python declares first: host publishes to python, then subscribes to what python publishes", function()
            testing.run(function()
                local py = peer("subscribe", "py_first", "1")
                py:wait("ready")
                local cl = started_client()
                assert.is_true(cl:publish("py_first", { kind = "from host" }, { confirm = true }))
                py:wait("done")
                assert.are.same({ kind = "from host" }, py:messages()[1].message)
                local seen = {}
                cl:subscribe("py_first", function(msg) seen[#seen + 1] = msg end)
                assert.truthy(eventually(function() return cl:status().status == STATUS.STARTED end))
                peer("publish", "py_first", '{"kind": "from python"}'):wait("done")
                assert.truthy(eventually(function() return #seen == 1 end))
                assert.are.same({ kind = "from python" }, seen[1])
                cl:stop()
            end)
        end)

        it("host declares first: python subscribes next to the host and both get what the other publishes",
            function()
            testing.run(function()
                local seen = {}
                local cl = started_client(function(c)
                    c:subscribe("host_first", function(msg) seen[#seen + 1] = msg end)
                end)
                local py = peer("subscribe", "host_first", "2")
                py:wait("ready")
                peer("publish", "host_first", '{"kind": "from python"}'):wait("done")
                assert.truthy(eventually(function() return #seen == 1 end))
                assert.are.same({ kind = "from python" }, seen[1])
                assert.is_true(cl:publish("host_first", { kind = "from host" }, { confirm = true }))
                py:wait("done")
                local got = py:messages()
                assert.are.same({ kind = "from python" }, got[1].message)
                assert.are.same({ kind = "from host" }, got[2].message)
                cl:stop()
            end)
        end)
    end)

    describe("request/response", function()
        it("python declares first: python answers the host, then the host answers python", function()
            testing.run(function()
                local py = peer("respond", "py_first", "1")
                py:wait("ready")
                local cl = started_client()
                local reply, err = cl:request("py_first", { item = "a" }, { timeout = 15000 })
                assert.is_nil(err)
                assert.are.same({ echo = { item = "a" }, from = "python" }, reply)
                py:wait("done")
                cl:respond("py_first", function(msg) return { echo = msg, from = "host" } end)
                assert.truthy(eventually(function() return cl:status().status == STATUS.STARTED end))
                local asker = peer("request", "py_first", '{"item": "b"}')
                local line = asker:wait("reply")
                assert.are.same({ echo = { item = "b" }, from = "host" }, line.reply)
                cl:stop()
            end)
        end)

        it("host declares first: the host answers python, then python answers the host", function()
            testing.run(function()
                local cl = started_client(function(c)
                    c:respond("host_first", function(msg) return { echo = msg, from = "host" } end)
                end)
                local line = peer("request", "host_first", '{"item": 1}'):wait("reply")
                assert.are.same({ echo = { item = 1 }, from = "host" }, line.reply)
                cl:stop()
                local py = peer("respond", "host_first", "1")
                py:wait("ready")
                local asker = started_client()
                local reply, err = asker:request("host_first", { item = 2 }, { timeout = 15000 })
                assert.is_nil(err)
                assert.are.same({ echo = { item = 2 }, from = "python" }, reply)
                asker:stop()
            end)
        end)
    end)
end)
