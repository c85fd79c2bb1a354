local cjson = require "cjson"
local clog = require "tamarco.c.log"
local logging = require "tamarco.core.logging"

-- A stream that keeps what is written, in place of io.stdout.
local function capture()
    local stream = { lines = {}, flushes = 0, pending = "" }
    function stream:write(...)
        self.pending = self.pending .. table.concat({ ... })
        while true do
            local line, rest = self.pending:match("^(.-)\n(.*)$")
            if not line then break end
            self.lines[#self.lines + 1] = line
            self.pending = rest
        end
        return self
    end
    function stream:flush() self.flushes = self.flushes + 1 end
    return stream
end

local function configure_json(profile, extra_opts)
    local out = capture()
    local opts = {
        service_name = "hello", deploy_name = "staging", instance_id = "id-1",
        profile = profile or "DEVELOP", stdout_format = "json", stream = out, tty = false,
    }
    for k, v in pairs(extra_opts or {}) do opts[k] = v end
    logging.configure(opts)
    return out
end

local function read_file(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local data = f:read("*a")
    f:close()
    return data
end

local function count_lines(s)
    local n = 0
    for _ in (s or ""):gmatch("\n") do n = n + 1 end
    return n
end

describe("tamarco.c.log encode_json", function()
    it("writes one line that cjson parses back, standard fields first", function()
        local record = {
            ["@timestamp"] = "2026-11-29T10:00:00.123Z", level = "INFO", logger = "hello",
            message = "hi", service_name = "hello", deploy_name = "d", service_instance_id = "i",
            zeta = 1, alpha = "a", nested = { b = 2, a = { 1, 2, 3 } },
        }
        local line = clog.encode_json(record)
        assert.is_nil(line:find("\n"))
        assert.are.same(record, cjson.decode(line))
        assert.are.equal('{"@timestamp":"2026-11-29T10:00:00.123Z","level":"INFO","logger":"hello",' ..
            '"message":"hi","service_name":"hello","deploy_name":"d","service_instance_id":"i",' ..
            '"alpha":"a","nested":{"a":[1,2,3],"b":2},"zeta":1}', line)
    end)

    it("escapes quotes, backslashes, newlines, control characters and keeps unicode", function()
        local message = 'say "hi"\\ \n\r\t\b\f \1\31\127 é €  😀 \226\128\168'
        local line = clog.encode_json({ message = message })
        assert.is_nil(line:find("[%z\1-\31]"))
        assert.matches('\\"hi\\"', line, 1, true)
        assert.matches("\\n\\r\\t\\b\\f", line, 1, true)
        assert.matches("\\u0001\\u001f\\u007f", line, 1, true)
        assert.matches("\\u2028", line, 1, true)
        assert.are.equal(message, cjson.decode(line).message)
    end)

    it("replaces invalid UTF-8 with U+FFFD", function()
        -- each byte of an invalid sequence becomes one U+FFFD
        for _, bad in ipairs({ "\255", "\192\175", "\237\160\128", "\244\144\128\128", "\226\130" }) do
            local decoded = cjson.decode(clog.encode_json({ m = bad })).m
            assert.are.equal(string.rep("\239\191\189", #bad), decoded)
        end
        assert.are.equal('{"m":"a\\ufffdb"}', clog.encode_json({ m = "a\128b" }))
    end)

    it("writes integers without .0, floats round-trip, non-finite as null", function()
        assert.are.equal('{"a":1,"b":-42,"c":1.5,"d":0.1,"e":null,"f":null,"g":null,"h":9007199254740994,"i":0}',
            clog.encode_json({ a = 1, b = -42, c = 1.5, d = 0.1, e = 1 / 0, f = -1 / 0, g = 0 / 0,
                h = 2 ^ 53 + 2, i = -0.0 }))
        local x = 1 / 3
        assert.are.equal(x, cjson.decode(clog.encode_json({ x = x })).x)
        assert.are.equal('{"big":1e+300,"t":true,"u":false}', clog.encode_json({ big = 1e300, t = true, u = false }))
    end)

    it("handles arrays, empty and sparse tables, odd keys, cycles, depth and functions", function()
        local cyclic = { name = "c" }
        cyclic.self = cyclic
        local deep = {}
        local cur = deep
        for _ = 1, 40 do cur.next = {} cur = cur.next end
        local line = clog.encode_json({
            arr = { "x", "y" }, empty = {}, sparse = { [1] = "a", [3] = "c" },
            keys = { [true] = 1, [2.5] = 2 }, cyclic = cyclic, deep = deep, fn = print,
        })
        local back = cjson.decode(line)
        assert.are.same({ "x", "y" }, back.arr)
        assert.are.same({}, back.empty)
        assert.are.same({ ["1"] = "a", ["3"] = "c" }, back.sparse)
        assert.are.same({ ["true"] = 1, ["2.5"] = 2 }, back.keys)
        assert.are.same({ name = "c", self = "<cycle>" }, back.cyclic)
        assert.matches("<depth limit>", line, 1, true)
        assert.are.equal("<function>", back.fn)
        -- a table shared twice (no cycle) is written twice
        local shared = { 1 }
        assert.are.equal('{"a":[1],"b":[1]}', clog.encode_json({ a = shared, b = shared }))
    end)

    it("formats ISO 8601 UTC timestamps with milliseconds", function()
        assert.are.equal("2026-11-29T10:00:00.123Z", clog.timestamp(1795946400.123))
        assert.are.equal("1970-01-01T00:00:00.000Z", clog.timestamp(0))
        assert.are.equal("1970-01-01T00:00:01.999Z", clog.timestamp(1.9994))
        assert.are.equal("1970-01-01T00:00:02.000Z", clog.timestamp(1.9996))
    end)
end)

describe("tamarco.c.log encode_logstash", function()
    local record = {
        ["@timestamp"] = "2026-11-29T10:00:00.123Z", level = "ERROR", logger = "hello.redis",
        message = "boom", service_name = "hello", deploy_name = "d", service_instance_id = "i",
        user = "ana", traceback = "stack traceback:\n\tx.lua:1", host = "extra-host",
        source_path = "/srv/hello/service.lua", source_line = 42, tags = { "billing" },
    }

    it("writes the version 0 layout as Tamarco's formatter", function()
        local v0 = cjson.decode(clog.encode_logstash(record, 0, "box1"))
        assert.are.equal("2026-11-29T10:00:00.123Z", v0["@timestamp"])
        assert.are.equal("boom", v0["@message"])
        assert.are.equal("logstash://box1//srv/hello/service.lua", v0["@source"])
        assert.are.equal("box1", v0["@source_host"])
        assert.are.equal("/srv/hello/service.lua", v0["@source_path"])
        assert.are.same({ "billing" }, v0["@tags"])
        assert.are.equal("logstash", v0["@type"])
        local f = v0["@fields"]
        assert.are.equal("ERROR", f.levelname)
        assert.are.equal("hello.redis", f.logger)
        assert.are.equal("hello", f.service_name)
        assert.are.equal("d", f.deploy_name)
        assert.are.equal("i", f.service_instance_id)
        assert.are.equal("ana", f.user)
        assert.are.equal("stack traceback:\n\tx.lua:1", f.stack_trace)
        -- Tamarco's debug fields of an error record
        assert.are.equal(42, f.lineno)
        assert.are.equal(require("luv").os_getpid(), f.process)
        assert.are.equal("MainThread", f.thread_name)
        assert.is_nil(f.message)
        assert.is_nil(f.tags)
        assert.is_nil(f.source_path)
        assert.is_nil(f.source_line)
        assert.is_nil(v0.message)
    end)

    it("writes the version 1 layout with extra fields at the top level", function()
        local v1 = cjson.decode(clog.encode_logstash(record, 1, "box1", "tamarco", { "a", "b" }))
        assert.are.equal("2026-11-29T10:00:00.123Z", v1["@timestamp"])
        assert.are.equal("1", v1["@version"])
        assert.are.equal("boom", v1.message)
        assert.are.equal("box1", v1.host)
        assert.are.equal("extra-host", v1.extra_host)
        assert.are.equal("/srv/hello/service.lua", v1.path)
        -- the sink's tags, then the record's own
        assert.are.same({ "a", "b", "billing" }, v1.tags)
        assert.is_nil(v1.extra_tags)
        assert.are.equal("tamarco", v1.type)
        assert.are.equal("ERROR", v1.level)
        assert.are.equal("hello.redis", v1.logger_name)
        assert.are.equal("ana", v1.user)
        assert.are.equal("hello", v1.service_name)
        assert.are.equal("stack traceback:\n\tx.lua:1", v1.stack_trace)
        assert.are.equal(42, v1.lineno)
        assert.is_nil(v1.logger)
        assert.is_nil(v1.source_path)
    end)

    it("defaults: type logstash, empty tags, the logger name for a record without a source", function()
        local plain = { ["@timestamp"] = "2026-11-29T10:00:00.123Z", level = "INFO", logger = "hello",
            message = "m" }
        local line = clog.encode_logstash(plain, 1, "box1")
        assert.matches('"tags":[]', line, 1, true)
        local v1 = cjson.decode(line)
        assert.are.equal("logstash", v1.type)
        assert.are.equal("hello", v1.path)
        assert.is_nil(v1.lineno)   -- debug fields only with a traceback
        assert.is_nil(v1.process)
        assert.matches('"@tags":[]', clog.encode_logstash(plain, 0, "box1"), 1, true)
        -- one tag that is not an array is one tag
        plain.tags = "solo"
        assert.are.same({ "x", "solo" }, cjson.decode(clog.encode_logstash(plain, 1, "h", nil, { "x" })).tags)
    end)

    it("rejects unknown versions", function()
        assert.has_error(function() clog.encode_logstash(record, 2, "h") end)
    end)
end)

describe("tamarco.c.log format_text", function()
    local record = {
        ["@timestamp"] = "2026-11-29T10:00:00.123Z", level = "INFO", logger = "hello",
        message = "started", service_name = "hello", deploy_name = "d", service_instance_id = "i",
        port = 8080, mode = "fast lane", tags = { "a" },
    }

    it("writes a human line without color", function()
        assert.are.equal('2026-11-29 10:00:00.123 INFO    [hello] started mode="fast lane" port=8080 tags=["a"]',
            clog.format_text(record, false))
    end)

    it("colors the level when asked", function()
        local line = clog.format_text(record, true)
        assert.matches("\27[32mINFO\27[0m", line, 1, true)
        local crit = clog.format_text({ ["@timestamp"] = record["@timestamp"], level = "CRITICAL",
            logger = "x", message = "m" }, true)
        assert.matches("\27[1;31mCRITICAL\27[0m [x] m", crit, 1, true)
    end)

    it("puts the traceback on the following lines and neutralises escapes", function()
        local line = clog.format_text({ ["@timestamp"] = record["@timestamp"], level = "ERROR",
            logger = "x", message = "bad \27[2J", traceback = "stack traceback:\n\tf.lua:3" }, false)
        assert.are.equal("2026-11-29 10:00:00.123 ERROR   [x] bad \\x1b[2J\nstack traceback:\n\tf.lua:3", line)
    end)
end)

describe("tamarco.c.log rotating file", function()
    local base
    before_each(function()
        base = os.tmpname()
        os.remove(base)
    end)
    after_each(function()
        os.remove(base)
        for i = 1, 5 do os.remove(base .. "." .. i) end
    end)

    it("rotates at max_bytes and keeps backup_count files", function()
        local f = assert(clog.open_file(base, 100, 2))
        local line = string.rep("x", 29)   -- 30 bytes with the newline
        for _ = 1, 10 do assert.is_true(f:write(line)) end
        f:close()
        -- 10 lines of 30 bytes, 3 per file: current has 1, .1 and .2 have 3
        assert.are.equal(1, count_lines(read_file(base)))
        assert.are.equal(3, count_lines(read_file(base .. ".1")))
        assert.are.equal(3, count_lines(read_file(base .. ".2")))
        assert.is_nil(read_file(base .. ".3"))
        for _, p in ipairs({ base, base .. ".1", base .. ".2" }) do
            assert.is_true(#read_file(p) <= 100)
        end
    end)

    it("truncates when backup_count is 0 and appends to an existing file", function()
        local f = assert(clog.open_file(base, 50, 0))
        for i = 1, 5 do assert.is_true(f:write("line " .. i .. string.rep(".", 13))) end
        f:close()
        assert.are.equal("line 5" .. string.rep(".", 13) .. "\n", read_file(base))
        assert.is_nil(read_file(base .. ".1"))
        local g = assert(clog.open_file(base, 0, 0))
        assert.are.equal(20, g:size())
        assert.is_true(g:write("more"))
        g:close()
        assert.are.equal(2, count_lines(read_file(base)))
    end)

    it("reports failures as nil, message", function()
        local f, err = clog.open_file("/nonexistent-dir/x.log", 100, 1)
        assert.is_nil(f)
        assert.matches("nonexistent", err)
        local g = assert(clog.open_file(base, 100, 1))
        g:close()
        local ok, werr = g:write("late")
        assert.is_nil(ok)
        assert.matches("closed", werr)
        g:close()   -- twice is fine
    end)
end)

describe("tamarco.logging", function()
    after_each(function() logging.close() end)

    it("writes records with every standard field and the extra fields", function()
        local out = configure_json("DEVELOP")
        logging.get_logger("hello.redis"):info("connected", { host = "127.0.0.1", port = 6379 })
        assert.are.equal(1, #out.lines)
        local r = cjson.decode(out.lines[1])
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", r["@timestamp"])
        assert.are.equal("INFO", r.level)
        assert.are.equal("hello.redis", r.logger)
        assert.are.equal("connected", r.message)
        assert.are.equal("hello", r.service_name)
        assert.are.equal("staging", r.deploy_name)
        assert.are.equal("id-1", r.service_instance_id)
        assert.are.equal("127.0.0.1", r.host)
        assert.are.equal(6379, r.port)
        assert.is_nil(r.traceback)
        assert.are.equal(0, out.flushes)   -- not a tty: no flush per record
        logging.flush()
        assert.are.equal(1, out.flushes)
    end)

    it("filters by the profile's level and follows a live profile change", function()
        local out = configure_json("PRODUCTION")
        local log = logging.get_logger("hello")
        log:debug("d1")
        log:info("i1")
        logging.set_profile("DEVELOP")
        log:debug("d2")
        logging.set_profile("PRODUCTION")
        log:debug("d3")
        log:warning("w1")
        log:error("e1")
        log:critical("c1")
        local messages = {}
        for i, line in ipairs(out.lines) do messages[i] = cjson.decode(line).message end
        assert.are.same({ "i1", "d2", "w1", "e1", "c1" }, messages)
        assert.is_false(logging.is_enabled("DEBUG"))
        configure_json("TESTING")
        assert.is_true(logging.is_enabled("DEBUG"))
    end)

    it("refuses an unknown profile with a settings error", function()
        local ok, err = pcall(logging.configure, { profile = "STAGING" })
        assert.is_false(ok)
        assert.are.equal("settings", err.kind)
        assert.matches("unknown logging profile \"STAGING\"", tostring(err))
        ok, err = pcall(logging.set_profile, "LOUD")
        assert.is_false(ok)
        assert.matches("LOUD", tostring(err))
    end)

    it("does not build a record when the level is disabled", function()
        configure_json("PRODUCTION")
        local touched = false
        local message = setmetatable({}, { __tostring = function() touched = true return "m" end })
        logging.get_logger("x"):debug(message)
        assert.is_false(touched)
        logging.get_logger("x"):info(message)
        assert.is_true(touched)
    end)

    it("masks secrets, nested too, without changing the caller's table", function()
        local out = configure_json("DEVELOP")
        local extra = {
            user = "ana", password = "p", DB_PASSWD = "p", client_secret = "s", Token = "t",
            Authorization = "Bearer x", ["api-key"] = "k",
            conf = { redis = { password = "p", host = "h" }, list = { { api_key = "k" } } },
        }
        logging.get_logger("x"):info("login", extra)
        local r = cjson.decode(out.lines[1])
        assert.are.equal("ana", r.user)
        for _, k in ipairs({ "password", "DB_PASSWD", "client_secret", "Token", "Authorization", "api-key" }) do
            assert.are.equal("***", r[k])
        end
        assert.are.same({ redis = { password = "***", host = "h" }, list = { { api_key = "***" } } }, r.conf)
        assert.are.equal("p", extra.conf.redis.password)
        assert.is_nil(out.lines[1]:find('"p"', 1, true))
    end)

    it("never lets extra fields override the standard ones", function()
        local out = configure_json("DEVELOP")
        logging.get_logger("real"):info("real message", {
            level = "CRITICAL", logger = "fake", message = "fake", service_name = "evil",
            ["@timestamp"] = "never", service_instance_id = "x", deploy_name = "y",
        })
        local r = cjson.decode(out.lines[1])
        assert.are.equal("INFO", r.level)
        assert.are.equal("real", r.logger)
        assert.are.equal("real message", r.message)
        assert.are.equal("hello", r.service_name)
        assert.are.equal("CRITICAL", r.extra_level)
        assert.are.equal("fake", r.extra_logger)
        assert.are.equal("evil", r.extra_service_name)
        assert.are.equal("never", r.extra_timestamp or r["extra_@timestamp"])
    end)

    it("logs exceptions with their traceback, or extra.traceback", function()
        local out = configure_json("PRODUCTION")
        local log = logging.get_logger("hello")
        local ok, err = pcall(error, "db down")
        assert.is_false(ok)
        log:exception("query failed", err, "stack traceback:\n\tdb.lua:10", { query = "q" })
        log:error("plain", { traceback = "stack traceback:\n\tt.lua:1" })
        log:exception("no traceback given", "oops")
        local r1 = cjson.decode(out.lines[1])
        assert.are.equal("ERROR", r1.level)
        assert.are.equal("query failed", r1.message)
        assert.matches("db down", r1.error)
        assert.are.equal("q", r1.query)
        assert.are.equal("stack traceback:\n\tdb.lua:10", r1.traceback)
        assert.are.equal("stack traceback:\n\tt.lua:1", cjson.decode(out.lines[2]).traceback)
        assert.matches("stack traceback", cjson.decode(out.lines[3]).traceback)
    end)

    it("writes colored text in DEVELOP when asked", function()
        local out = capture()
        logging.configure { service_name = "hello", profile = "DEVELOP", stream = out, tty = true, color = true }
        logging.get_logger("hello"):warning("careful", { n = 1 })
        assert.matches("\27[33mWARNING\27[0m [hello] careful", out.lines[1], 1, true)
        assert.is_true(out.flushes >= 1)   -- a tty is flushed on each record
        -- DEVELOP on a pipe: JSON lines, as every other profile (the README's word)
        out = capture()
        logging.configure { service_name = "hello", deploy_name = "dev", instance_id = "id-9", profile = "DEVELOP",
            stream = out, tty = false }
        logging.get_logger("hello"):info("piped")
        local piped = cjson.decode(out.lines[1])
        assert.are.equal("piped", piped.message)
        assert.are.equal("dev", piped.deploy_name)
        assert.are.equal("id-9", piped.service_instance_id)
        -- text when asked for (system.logging.stdout_format: text)
        out = capture()
        logging.configure { service_name = "hello", profile = "DEVELOP", stream = out, tty = false,
            stdout_format = "text" }
        logging.get_logger("hello"):info("plain")
        assert.matches("^%d+%-%d+%-%d+ [%d:.]+ INFO    %[hello%] plain$", out.lines[1])
        out = capture()
        logging.configure { service_name = "hello", profile = "TESTING", stream = out, tty = false }
        logging.get_logger("hello"):info("json")
        assert.are.equal("json", cjson.decode(out.lines[1]).message)
    end)

    it("keeps an extra field named like a record field under extra_<name>, in every output", function()
        local out = configure_json("DEVELOP")
        logging.get_logger("hello"):info("the record's message", { message = "the user's", level = "mine" })
        local record = cjson.decode(out.lines[1])
        assert.are.equal("the record's message", record.message)
        assert.are.equal("the user's", record.extra_message)
        assert.are.equal("mine", record.extra_level)
        local made = logging.make_record("hello", "INFO", "m", { message = "the user's" })
        assert.matches('extra_message="the user\'s"', clog.format_text(made, false), 1, true)
        assert.are.equal("the user's", cjson.decode(clog.encode_logstash(made, 1, "h")).extra_message)
        assert.are.equal("the user's", cjson.decode(clog.encode_logstash(made, 0, "h"))["@fields"].extra_message)
    end)

    it("disables a sink that raises and keeps logging to the others", function()
        local out = configure_json("DEVELOP")
        local calls = 0
        local bad = { name = "bad", emit = function() calls = calls + 1 error("sink exploded") end }
        local good_records = {}
        local good = { name = "good", emit = function(_, r) good_records[#good_records + 1] = r end,
            flush = function() error("flush exploded") end }
        logging.add_sink(bad)
        logging.add_sink(good)
        local log = logging.get_logger("x")
        log:info("one")
        log:info("two")
        assert.are.equal(1, calls)
        assert.are.equal(2, #good_records)
        assert.are.equal(2, #out.lines)
        logging.flush()   -- good's flush raises: disabled as well, no error here
        log:info("three")
        assert.are.equal(2, #good_records)
        assert.are.equal(3, #out.lines)
        local names = {}
        for _, s in ipairs(logging.sinks()) do names[#names + 1] = s.name end
        assert.are.same({ "stdout" }, names)
    end)

    it("keeps added sinks across configure and removes them on request", function()
        local records = {}
        local sink = { name = "mem", emit = function(_, r) records[#records + 1] = r end }
        configure_json("DEVELOP")
        logging.add_sink(sink)
        configure_json("PRODUCTION")
        logging.get_logger("x"):info("kept")
        assert.are.equal(1, #records)
        assert.is_true(logging.remove_sink(sink))
        logging.get_logger("x"):info("gone")
        assert.are.equal(1, #records)
    end)

    it("writes JSON lines to a rotating file sink", function()
        local path = os.tmpname()
        os.remove(path)
        configure_json("DEVELOP", { stdout = false, file_path = path, file_max_bytes = 400, file_backup_count = 1 })
        local log = logging.get_logger("file")
        for i = 1, 10 do log:info("line " .. i) end
        logging.close()
        local current, older = read_file(path), read_file(path .. ".1")
        assert.is_truthy(current and older)
        local last
        for line in current:gmatch("[^\n]+") do last = cjson.decode(line) end
        assert.are.equal("line 10", last.message)
        assert.are.equal("hello", last.service_name)
        os.remove(path)
        os.remove(path .. ".1")
        local ok, err = pcall(logging.configure, { file_path = "/nonexistent-dir/x.log", stdout = false })
        assert.is_false(ok)
        assert.matches("file_path", tostring(err))
    end)

    it("writes an ERROR record to the file at once, INFO within the loop turn", function()
        local path = os.tmpname()
        os.remove(path)
        local sink = assert(logging.file_sink { path = path })
        local function lines() return select(2, (read_file(path) or ""):gsub("\n", "")) end
        sink:emit(logging.make_record("file", "INFO", "buffered"))
        assert.are.equal(0, lines())      -- a loop turn has not ended yet
        sink:emit(logging.make_record("file", "ERROR", "at once"))
        assert.are.equal(2, lines())      -- the error, and what was before it
        sink:close()
        os.remove(path)
    end)

    it("writes an ERROR record given in parts to the file at once, INFO within the loop turn", function()
        local path = os.tmpname()
        os.remove(path)
        local sink = assert(logging.file_sink { path = path })
        local function lines() return select(2, (read_file(path) or ""):gsub("\n", "")) end
        local ts = "2026-11-30T10:00:00.000Z"
        assert.is_true(sink:emit_parts(ts, "INFO", "file", "buffered", { n = 1 }))
        assert.are.equal(0, lines())      -- a loop turn has not ended yet
        assert.is_true(sink:emit_parts(ts, "ERROR", "file", "at once", nil, "/x.lua", 3, "svc"))
        assert.are.equal(2, lines())      -- the error, and what was before it
        -- parts a table would hold differently are refused, not written
        assert.is_false(sink:emit_parts(ts, "INFO", "file", "no", { level = "x" }))
        sink:close()
        assert.are.equal(2, lines())
        os.remove(path)
    end)

    it("writes the same stdout and file lines whether records reach the sinks in parts or as tables", function()
        local many = {}
        for i = 1, 60 do many["k" .. i] = i end   -- more keys than the encoder keeps on the stack
        local cases = {   -- message, extra
            { "plain", { user = "alice", n = 7, path = "/hello", ok = true, ratio = 1.5, tags = "t" } },
            { "no extra fields" },
            { "escapes \"q\"\n", { quote = 'a"b', utf = "caf\195\169", bad = "\255", zz = "\226\128\168" } },
            { "many fields", many },
            { "sorted with the source fields", { source_pat = 1, source_paths = 2, sourc = 3, t = 4 } },
            { "a table value", { tags = { "a", "b" } } },
            { "secret", { password = "hunter2" } },
            { "url http://user:pw@db/x" },
            { "standard names", { message = "m2", level = "x", deploy_name = "d" } },
            { "source fields", { source_path = "mine", source_line = 1 } },
            { "traceback field", { traceback = "tb" } },
            { "number key", { [1] = "one" } },
            { 42, { n = 1 } },
        }
        local function run(with_table_sink, with_source)
            local path = os.tmpname()
            os.remove(path)
            local out = configure_json("TESTING", { file_path = path })
            local in_parts = 0
            for _, sink in ipairs(logging.sinks()) do
                local emit_parts = sink.emit_parts
                sink.emit_parts = function(...)
                    local done = emit_parts(...)
                    if done then in_parts = in_parts + 1 end
                    return done
                end
            end
            -- a sink that wants the caller's file in the records, and one that needs tables
            local extra_sinks = {}
            if with_source then
                extra_sinks[#extra_sinks + 1] = logging.add_sink { name = "source", wants_source = true,
                    emit = function() end, emit_parts = function() return true end }
            end
            if with_table_sink then
                extra_sinks[#extra_sinks + 1] = logging.add_sink { name = "tables", emit = function() end }
            end
            local log = logging.get_logger("hello.parts")
            for _, case in ipairs(cases) do log:info(case[1], case[2]) end
            log:exception("failed", "boom", "stack traceback:\n\tx.lua:1")
            for _, sink in ipairs(extra_sinks) do logging.remove_sink(sink) end
            logging.close()
            local file_lines = {}
            for line in read_file(path):gmatch("[^\n]+") do file_lines[#file_lines + 1] = line end
            os.remove(path)
            local function same_time(lines)
                for i, line in ipairs(lines) do lines[i] = line:gsub('^{"@timestamp":"[^"]*"', '{"@timestamp":"T"') end
                return lines
            end
            return same_time(out.lines), same_time(file_lines), in_parts
        end
        for _, with_source in ipairs({ false, true }) do
            local out_parts, file_parts, in_parts = run(false, with_source)
            local out_tables, file_tables, none_in_parts = run(true, with_source)
            assert.are.equal(#cases + 1, #file_parts)
            assert.are.equal(2 * 5, in_parts)   -- the 5 plain cases, by stdout and the file
            assert.are.equal(0, none_in_parts)
            assert.are.same(out_tables, out_parts)
            assert.are.same(file_tables, file_parts)
            assert.are.same(file_parts, out_parts)
            if with_source then assert.matches('"source_path":"', file_parts[1], 1, true) end
        end
    end)

    it("configures from a settings view with Tamarco's keys", function()
        local asked = {}
        local values = { ["logging.profile"] = "PRODUCTION", ["logging.stdout"] = false }
        local view = { get = function(_, key, default)
            asked[#asked + 1] = key
            local v = values[key]
            if v == nil then return default end
            return v
        end }
        logging.configure_from_settings(view, { service_name = "svc", deploy_name = "dep", instance_id = "u" })
        assert.are.equal("PRODUCTION", logging.profile())
        assert.are.same({}, logging.sinks())   -- stdout = false, no file
        local records = {}
        logging.add_sink({ name = "mem", emit = function(_, r) records[#records + 1] = r end })
        logging.get_logger("svc"):debug("hidden")
        logging.get_logger("svc"):info("shown")
        assert.are.equal(1, #records)
        assert.are.equal("dep", records[1].deploy_name)
        assert.are.equal("u", records[1].service_instance_id)
        table.sort(asked)
        assert.are.same({ "logging.file_backup_count", "logging.file_max_bytes", "logging.file_path",
            "logging.profile", "logging.stdout", "logging.stdout_format" }, asked)
    end)

    it("has a provisional stdout logger before settings", function()
        logging.provisional("early")
        local sinks = logging.sinks()
        assert.are.equal(1, #sinks)
        assert.are.equal("stdout", sinks[1].name)
        assert.are.equal("early", logging.get_logger().name)
        assert.is_false(logging.is_enabled("DEBUG"))
        assert.is_true(logging.is_enabled("INFO"))
    end)
end)
