-- tamarco.json, the framework's one JSON codec: strict decoding, round trips
-- that keep [] / {} / 1.0, and the same behaviour through every path that
-- carries JSON: the HTTP server (req:json() and responses), the HTTP client,
-- the message codecs (AMQP, Redis) against a real Redis and RabbitMQ, and
-- etcd values against a real etcd.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local json = require "tamarco.core.json"
local codecs = require "tamarco.core.codecs"
local etcd = require "tamarco.clients.etcd"
local yaml = require "tamarco.c.yaml"
local net = require "spec.support.net"

-- what a Python Tamarco service sends (json.dumps)
local PYTHON_BODY = '{"items": [], "nested": {"l": [], "o": {}}, "one": 1.0, "half": 0.5, "n": 3}'

-- Bodies that are not JSON, each with the reason the decoder must give.
local NOT_JSON = {
    { "0x10", "trailing characters" },
    { "01", "leading zero" },
    { "NaN", "unexpected character" },
    { "inf", "unexpected character" },
    { "-Infinity", "invalid number" },
    { "1e400", "out of range" },
    { "[1, 2,]", "unexpected character" },
    { '{"a": 1} x', "trailing characters" },
    { '{"a" 1}', "':' expected" },
    { "{'a': 1}", "string key expected" },
    { '"tab\there"', "control character" },
    { '"\255"', "invalid UTF-8" },
    { '"\\x41"', "invalid escape" },
    { "[1, 2", "at the end of the text" },
    { "", "value expected" },
}

-- The structure of PYTHON_BODY, checked on a decoded value.
local function assert_python_shape(v)
    assert.is_true(json.is_array(v.items))
    assert.is_nil(next(v.items))
    assert.is_true(json.is_array(v.nested.l))
    assert.are.equal(json.object_mt, getmetatable(v.nested.o))
    assert.are.equal(1, v.one)
    assert.are.equal(0.5, v.half)
    assert.are.equal(3, v.n)
end

-- The text the codec gives back for PYTHON_BODY, member by member (member
-- order is the table's, so each member is looked for on its own).
local function assert_python_text(text)
    for _, member in ipairs({ '"items":[]', '"l":[]', '"o":{}', '"one":1.0', '"half":0.5', '"n":3' }) do
        assert.truthy(text:find(member, 1, true), member .. " in " .. text)
    end
end

describe("tamarco.json", function()
    it("keeps empty arrays, empty objects and floats through a round trip", function()
        local v = assert(json.decode(PYTHON_BODY))
        assert_python_shape(v)
        local text = assert(json.encode(v))
        assert_python_text(text)
        assert_python_text(json.encode(assert(json.decode(text))))
        assert.are.equal("[1.0,2,2.5,1000.0,[],{}]", json.encode(json.decode("[1.0, 2, 2.5, 1e3, [], {}]")))
    end)

    it("keeps a float key a float when the handler changes its value", function()
        local v = assert(json.decode('{"price": 10.0, "qty": 2}'))
        v.price = v.price * 3
        v.qty = v.qty + 1
        local back = json.encode(v)
        assert.truthy(back:find('"price":30.0', 1, true))
        assert.truthy(back:find('"qty":3', 1, true))
    end)

    it("gives values built in Lua markers for what a Lua table cannot say", function()
        assert.are.equal('{"items":[]}', json.encode({ items = json.array() }))
        assert.are.equal('{"meta":{}}', json.encode({ meta = json.object() }))
        assert.are.equal('{"items":{}}', json.encode({ items = {} }))   -- plain empty table: an object
        assert.are.equal('[1,2,3]', json.encode({ 1, 2, 3 }))
        assert.are.equal('{"f":3.0}', json.encode({ f = json.float(3) }))
        assert.are.equal('{"1":"a"}', json.encode(json.object({ "a" })))
        assert.are.equal('["a"]', json.encode(json.array({ "a" })))
        local sparse = json.encode({ [1] = "a", [3] = "c" })
        assert.truthy(sparse == '{"1":"a","3":"c"}' or sparse == '{"3":"c","1":"a"}', sparse)
        assert.are.equal("null", json.encode(json.null))
        assert.are.equal(json.null, json.decode("null"))
        assert.are.equal(require("cjson").null, json.null)
        -- the YAML binding's sequences are JSON arrays
        assert.are.equal(yaml.sequence_mt, json.array_mt)
        assert.are.equal("[]", json.encode(yaml.parse("[]")))
    end)

    it("refuses what is not JSON, saying what and where", function()
        for _, case in ipairs(NOT_JSON) do
            local v, err = json.decode(case[1])
            assert.is_nil(v, case[1])
            assert.is_string(err)
            assert.truthy(err:find("invalid JSON", 1, true), err)
            assert.truthy(err:find(case[2], 1, true), ("%q: %s"):format(case[1], err))
        end
        local _, err = json.decode("[1, 0x10]")
        assert.truthy(err:find("character 6", 1, true), err)
    end)

    it("decodes escapes, surrogate pairs and the edges of numbers", function()
        assert.are.equal("é😀\n/", json.decode('"\\u00e9\\ud83d\\ude00\\n\\/"'))
        assert.are.equal("\239\191\189", json.decode('"\\ud800"'))   -- a lone surrogate is replaced
        assert.are.equal(-0.5, json.decode("-5e-1"))
        assert.are.equal(0, json.decode("1e-400"))   -- underflow is a number, overflow is not
        assert.are.equal(2 ^ 53, json.decode("9007199254740992"))
        -- short numbers take an exact shortcut, long ones strtod: both read as Lua reads them
        for _, text in ipairs({ "0.1", "0.30000000000000004", "1e22", "1e23", "123.456e-7", "5e-324",
                "2.2250738585072014e-308", "1.7976931348623157e308", "-1234567890.12345e-10",
                "100000000000000000000000e-22", "9007199254740993", "12345678901234567890" }) do
            assert.are.equal(tonumber(text), json.decode(text), text)
        end
        assert.are.same({ 1, { 2 } }, { json.decode(" [1, [2]] ")[1], { json.decode("[1, [2]]")[2][1] } })
    end)

    it("never writes invalid UTF-8 and refuses what JSON cannot hold", function()
        assert.are.equal('"\\ufffdok\\ufffd"', json.encode("\255ok\192"))
        assert.are.equal('{"k\\ufffd":1}', json.encode({ ["k\255"] = 1 }))
        for _, bad in ipairs({ 0 / 0, math.huge, -math.huge, print, coroutine.create(print) }) do
            local text, err = json.encode({ v = bad })
            assert.is_nil(text)
            assert.truthy(err:find("cannot encode", 1, true), err)
        end
        local loop = {}
        loop.self = loop
        local text, err = json.encode(loop)
        assert.is_nil(text)
        assert.truthy(err:find("contains itself", 1, true), err)
        assert.is_nil((json.encode({ [true] = 1 })))
    end)

    it("limits nesting to 200 levels both ways", function()
        assert.is_table(json.decode(("["):rep(200) .. ("]"):rep(200)))
        local v, err = json.decode(("["):rep(201) .. ("]"):rep(201))
        assert.is_nil(v)
        assert.truthy(err:find("deeper than 200", 1, true), err)
        local deep = {}
        for _ = 1, 250 do deep = { deep } end
        assert.is_nil((json.encode(deep)))
    end)

    it("boxes floats on demand (etcd read and write-yml keep 1.0 apart from 1)", function()
        local v = assert(json.decode('{"a": 1.0, "b": 1, "c": [2.5]}', { floats = true }))
        assert.is_true(json.is_float(v.a))
        assert.are.equal(1, v.a.value)
        assert.are.equal(1, v.b)
        assert.is_true(json.is_float(v.c[1]))
        assert.are.equal("[1.0]", json.encode(json.array({ json.float(1) })))
        assert.are.equal(etcd.float, json.float)
    end)

    it("lets the yaml codec keep the [] and {} of decoded JSON", function()
        local v = assert(json.decode('{"a": [], "b": {}, "c": [1, {}, []]}'))
        local text = assert(codecs.yaml.encode(v))
        local back = assert(codecs.yaml.decode(text))
        assert.is_true(json.is_array(back.a), text)
        assert.are.equal("{}", json.encode(back.b))
        assert.are.equal("[1,{},[]]", json.encode(back.c))
    end)

    it("is the codec of tamarco.codecs", function()
        local v, err = codecs.json.decode(PYTHON_BODY)
        assert.is_nil(err)
        assert_python_shape(v)
        assert_python_text(assert(codecs.json.encode(v)))
        for _, case in ipairs(NOT_JSON) do
            local value, derr = codecs.json.decode(case[1])
            assert.is_nil(value)
            assert.truthy(derr:find(case[2], 1, true), derr)
        end
    end)
end)

describe("JSON over HTTP", function()
    local running, port
    local http = require "tamarco.resources.http"
    local c = require "tamarco.c.http_client"

    setup(function()
        port = net.free_port()
        local svc = tamarco.service { name = "jsonspec", report_server = false,
            resources = { api = http.server({ port = port, host = "127.0.0.1" }) } }
        svc.api:post("/echo", function(req) return 200, req:json() end)
        svc.api:get("/hello/{name}", function(req) return 200, { message = "hello " .. req.params.name } end)
        svc.api:get("/items", function() return 200, { items = json.array(), meta = json.object() } end)
        svc.api:get("/nan", function() return 200, { v = 0 / 0 } end)
        local err
        running, err = testing.start_service(svc)
        assert(running, err)
    end)

    teardown(function()
        if running then testing.run(function() running:stop() end) end
    end)

    local function request(method, path, body)
        return testing.run(function()
            local status, text = c.request { method = method, url = ("http://127.0.0.1:%d%s"):format(port, path),
                body = body, headers = { ["Content-Type"] = "application/json" } }
            return status, text
        end)
    end

    it("returns what req:json() read unchanged ([] {} 1.0 stay)", function()
        local status, body = request("POST", "/echo", PYTHON_BODY)
        assert.are.equal(200, status)
        assert_python_text(body)
        assert_python_shape(assert(json.decode(body)))
    end)

    it("answers 400 with the reason for each body that is not JSON, and keeps serving", function()
        for _, case in ipairs(NOT_JSON) do
            local status, body = request("POST", "/echo", case[1])
            assert.are.equal(400, status, case[1])
            local answer = assert(json.decode(body))
            assert.truthy(answer.error:find("invalid JSON body", 1, true), answer.error)
            if case[1] ~= "" then
                assert.truthy(answer.error:find(case[2], 1, true), answer.error)
            end
        end
        local status, body = request("POST", "/echo", '{"still": "serving"}')
        assert.are.equal(200, status)
        assert.are.equal('{"still":"serving"}', body)
    end)

    it("never sends raw invalid UTF-8 in a JSON response", function()
        local status, body = request("GET", "/hello/%ff%c0")
        assert.are.equal(200, status)
        assert.are.equal('{"message":"hello \\ufffd\\ufffd"}', body)
        assert.is_table(json.decode(body))
    end)

    it("writes json.array() and json.object() built by a handler as [] and {}", function()
        local status, body = request("GET", "/items")
        assert.are.equal(200, status)
        assert.truthy(body:find('"items":[]', 1, true), body)
        assert.truthy(body:find('"meta":{}', 1, true), body)
    end)

    it("turns a body JSON cannot hold into a 500, not a half-written answer", function()
        local status, body = request("GET", "/nan")
        assert.are.equal(500, status)
        assert.are.equal('{"error":"internal server error"}', body)
    end)

    it("lets the HTTP client decode with the same rules", function()
        local http_client = require "tamarco.resources.http_client"
        local v = assert(http_client.resp_json(200, PYTHON_BODY, {}))
        assert_python_shape(v)
        local nope, err = http_client.resp_json(200, "NaN", {})
        assert.is_nil(nope)
        assert.truthy(err:find("invalid JSON", 1, true), err)
    end)
end)

describe("JSON through Redis (the json codec on a real server)", function()
    local HOST = os.getenv("TAMARCO_TEST_REDIS_HOST")
    local PORT = tonumber(os.getenv("TAMARCO_TEST_REDIS_PORT") or "")

    it("stores and reads back [] {} and 1.0, and refuses a stored value that is not JSON", function()
        assert(HOST and PORT, "TAMARCO_TEST_REDIS_HOST and TAMARCO_TEST_REDIS_PORT must be set")
        local redis = require "tamarco.resources.redis"
        testing.run(function()
            local cache = assert(redis.client():connect_to({ host = HOST, port = PORT }))
            local codec = codecs.get("json")
            local value = assert(codec.decode(PYTHON_BODY))
            local bytes = assert(codec.encode(value))
            assert.are.equal("OK", cache:set("spec:json:v", bytes))
            local back, err = codec.decode(cache:get("spec:json:v"))
            assert.is_nil(err)
            assert_python_shape(back)
            assert_python_text(assert(codec.encode(back)))
            assert.are.equal("OK", cache:set("spec:json:bad", "NaN"))
            local bad, berr = codec.decode(cache:get("spec:json:bad"))
            assert.is_nil(bad)
            assert.truthy(berr:find("invalid JSON", 1, true), berr)
            cache:call("DEL", "spec:json:v", "spec:json:bad")
            cache:close()
        end)
    end)
end)

describe("JSON values in etcd", function()
    local HOST = os.getenv("TAMARCO_TEST_ETCD_HOST")
    local PORT = tonumber(os.getenv("TAMARCO_TEST_ETCD_PORT") or "")

    it("keeps [] {} and 1.0 through a write and a read", function()
        assert(HOST and PORT, "TAMARCO_TEST_ETCD_HOST and TAMARCO_TEST_ETCD_PORT must be set")
        testing.run(function()
            local client = etcd.new { host = HOST, port = PORT }
            local key = ("/spec/json/%d"):format(math.random(1, 1e9))
            local value = assert(etcd.decode_json(PYTHON_BODY))
            assert(client:put(key, etcd.encode_json(value)))
            local text = assert(client:get(key))
            assert_python_text(text)
            assert_python_shape(assert(etcd.decode_json(text)))
            assert(client:delete(key))
        end)
    end)
end)

describe("JSON over AMQP (the json codec on a real broker)", function()
    local HOST = os.getenv("TAMARCO_TEST_AMQP_HOST")
    local PORT = tonumber(os.getenv("TAMARCO_TEST_AMQP_PORT") or "")

    it("delivers [] {} 1.0 unchanged and rejects each body that is not JSON", function()
        assert(HOST and PORT, "TAMARCO_TEST_AMQP_HOST and TAMARCO_TEST_AMQP_PORT must be set")
        local amqp = require "tamarco.resources.amqp"
        local prefix = ("jsonspec%d"):format(math.random(1, 1e9))
        testing.run(function()
            local cl = amqp.client({ host = HOST, port = PORT, queues_prefix = prefix, connection_timeout = 5 })
            local raw = amqp.client({ host = HOST, port = PORT, queues_prefix = prefix, connection_timeout = 5 })
            local good, dead = {}, {}
            cl:pull("strict", function(msg) good[#good + 1] = msg end, { dead_letter = true })
            cl:pull("strict.dead_letter", function(msg) dead[#dead + 1] = msg end, { codec = "raw" })
            cl:start(); raw:start()
            assert.is_true(raw:push("strict", PYTHON_BODY, { codec = "raw" }))
            for _, case in ipairs(NOT_JSON) do
                assert.is_true(raw:push("strict", case[1], { codec = "raw" }))
            end
            assert.is_true(raw:push("strict", '{"last": true}', { codec = "raw" }))
            for _ = 1, 250 do
                if #good == 2 and #dead == #NOT_JSON then break end
                tamarco.sleep(20)
            end
            assert.are.equal(2, #good)
            assert_python_shape(good[1])
            assert_python_text(assert(json.encode(good[1])))
            assert.is_true(good[2].last)
            assert.are.equal(#NOT_JSON, #dead)
            assert.are.equal(#NOT_JSON, cl.counters.rejected)
            cl:stop(); raw:stop()
        end)
    end)
end)
