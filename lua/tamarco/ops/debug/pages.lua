--- tamarco.ops.debug.pages: the `/debug` pages of the report server.
--
--   GET /debug/                 HTML page: tasks table, heap figures, "profile 10 s"
--   GET /debug/tasks            JSON (?format=text: a goroutine-style dump;
--                               ?tracebacks=0: without tracebacks, cheaper;
--                               ?limit=N: the N longest-waiting (1000; 0: all))
--   GET /debug/profile?seconds=N[&mode=f|l][&format=folded]   flame graph SVG
--   GET /debug/heap             JSON (?format=text)
--   GET /debug/settings         JSON (?format=text; ?key=prefix)
--   PUT /debug/loglevel         body {"level": "DEBUG", "logger": "hello.api"}
--                               (no logger: the whole service)
--
-- The routes are always defined (they move with the report server on a hot
-- reload) and answer 404 until the tamarco_debug resource turns them on.
-- With a token, every request needs `Authorization: Bearer <token>`
-- (compared in constant time), else 401.
local tamarco_json = require "tamarco.core.json"
local debug_tasks = require "tamarco.ops.debug.tasks"
local flamegraph = require "tamarco.ops.debug.flamegraph"
local heap = require "tamarco.ops.debug.heap"
local log_levels = require "tamarco.ops.debug.log_levels"
local profile = require "tamarco.ops.debug.profile"
local settings_view = require "tamarco.ops.debug.settings_view"

local pages = {}

local HTML = "text/html; charset=utf-8"
local TEXT = "text/plain; charset=utf-8"
local SVG = "image/svg+xml"

local band, bor, bxor = bit.band, bit.bor, bit.bxor

--- Compares two strings in time that depends only on the expected length.
function pages.same_secret(given, expected)
    if type(given) ~= "string" or type(expected) ~= "string" then return false end
    local diff = bxor(#given, #expected)
    for i = 1, #expected do
        local g = given:byte(((i - 1) % math.max(#given, 1)) + 1) or 0
        diff = bor(diff, bxor(g, expected:byte(i)))
    end
    return band(diff, 0xffffffff) == 0
end

local function escape(s) return flamegraph.escape(s) end

local function json(body)
    return 200, assert(tamarco_json.encode(body)), { ["Content-Type"] = tamarco_json.content_type }
end

-- The debug state of a service: { enabled, token } set by the resource.
local function state_of(svc)
    local resource = svc.resources.tamarco_debug
    return resource and resource.pages_on and resource or nil
end

local function guard(svc, handler)
    return function(req)
        local state = state_of(svc)
        if not state then return 404, { error = "not found" } end
        if state.token then
            local auth = req:header("authorization") or ""
            local given = auth:match("^[Bb]earer%s+(.+)$")
            if not pages.same_secret(given, state.token) then
                return 401, { error = "debug pages need Authorization: Bearer <debug_token>" },
                    { ["WWW-Authenticate"] = 'Bearer realm="tamarco debug"' }
            end
        end
        return handler(req, state)
    end
end

-- How many coroutines a page lists by default (?limit=N, 0 for all): the
-- ones that have waited longest, the others counted by what they wait on.
local TASKS_LIMIT = 1000

local function tasks_limit(req, default)
    local limit = tonumber(req.query.limit)
    if limit == 0 then return nil end
    return limit and math.max(1, math.floor(limit)) or default
end

local function tasks_page(svc, req)
    -- ?tracebacks=0: the cheap listing (no traceback string per task)
    local entries, omitted = debug_tasks.snapshot(svc, { tracebacks = req.query.tracebacks ~= "0",
        limit = tasks_limit(req, TASKS_LIMIT) })
    if req.query.format == "text" then
        return 200, debug_tasks.to_text(entries, omitted), { ["Content-Type"] = TEXT }
    end
    local list = {}
    for i, e in ipairs(entries) do
        e.traceback_lines = tamarco_json.array()
        for line in (e.traceback or ""):gmatch("[^\n]+") do
            if line ~= "stack traceback:" then e.traceback_lines[#e.traceback_lines + 1] = line:gsub("^%s+", "") end
        end
        e.traceback = nil
        list[i] = e
    end
    return json({ service = svc.name, count = #list + (omitted and omitted.count or 0),
        tasks = tamarco_json.array(list), omitted = omitted })
end

local function profile_page(svc, req)
    local seconds, mode = profile.check(req.query.seconds or 10, req.query.mode)
    if not seconds then return 400, { error = mode } end
    local result, err = profile.run(svc, seconds, mode)
    if not result then
        return 409, { error = "a profile is already running (" .. tostring(err) .. "); try again when it ends" }
    end
    if req.query.format == "folded" then
        return 200, profile.folded_text(result), { ["Content-Type"] = TEXT }
    end
    local title = ("%s: %d samples every %d ms over %g s (mode %s)"):format(svc.name, result.samples,
        result.interval_ms, seconds, mode)
    return 200, flamegraph.svg(result.folded, title), { ["Content-Type"] = SVG }
end

local function heap_page(svc, req)
    local figures = heap.figures(svc)
    if req.query.format == "text" then return 200, heap.to_text(figures), { ["Content-Type"] = TEXT } end
    return json(figures)
end

local function settings_page(svc, req)
    local store = svc.settings and svc.settings.store
    if not store then return 404, { error = "no settings" } end
    local entries = settings_view.entries(store, req.query.key)
    if req.query.format == "text" then return 200, settings_view.to_text(entries), { ["Content-Type"] = TEXT } end
    return json({ settings = tamarco_json.array(entries) })
end

local function loglevel_page(svc, req)
    local ok, body = pcall(req.json, req)
    if not ok or type(body) ~= "table" then
        return 400, { error = 'the body must be JSON: {"level": "DEBUG", "logger": "hello.api"}' }
    end
    local who = "PUT /debug/loglevel from " .. tostring(req.remote_addr)
    local old, new = log_levels.set(svc, body.logger, body.level, "http", who)
    if not old then return 400, { error = new } end
    return 200, { logger = body.logger or log_levels.SERVICE, old = old, new = new }
end

local STYLE = [[
body{font:14px sans-serif;margin:1em 2em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#eee} pre{margin:0;font-size:12px} .num{text-align:right}
button{font-size:14px} nav a{margin-right:1em} #flame svg{max-width:100%;height:auto}
]]

local function html_page(svc, req, state)
    local entries, omitted = debug_tasks.snapshot(svc, { limit = tasks_limit(req, TASKS_LIMIT) })
    local figures = heap.figures(svc)
    local out = {
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>" .. escape(svc.name) .. " — debug</title>",
        "<style>" .. STYLE .. "</style></head><body>",
        "<h1>" .. escape(svc.name) .. " <small>" .. escape(svc.instance_id or "") .. "</small></h1>",
        "<nav><a href='tasks'>tasks (JSON)</a><a href='tasks?format=text'>tasks (text)</a>"
            .. "<a href='heap'>heap</a><a href='settings?format=text'>settings</a>"
            .. "<a href='profile?seconds=10'>profile 10 s (SVG)</a>"
            .. "<a href='profile?seconds=10&amp;format=folded'>profile 10 s (folded)</a></nav>",
        "<h2>Profile</h2><p><button id='profile'>profile 10 s</button> <span id='profile-state'></span></p>",
        "<div id='flame'></div>",
        "<h2>Heap</h2><table id='heap'>",
    }
    local function row(name, value) out[#out + 1] = "<tr><th>" .. escape(name) .. "</th><td class='num'>"
        .. escape(tostring(value)) .. "</td></tr>" end
    row("Lua heap (kB)", ("%.0f"):format(figures.lua.heap_kb))
    row("GC cycles", figures.lua.gc_cycles or "-")
    row("JIT live traces", figures.jit.live_traces or "-")
    row("JIT trace aborts", figures.jit.traces_aborted or "-")
    row("RSS (kB)", figures.process.rss_kb or "-")
    row("open fds", figures.process.open_fds or "-")
    local kinds = {}
    for kind, n in pairs(figures.libuv_handles) do kinds[#kinds + 1] = kind .. " " .. n end
    table.sort(kinds)
    row("libuv handles", table.concat(kinds, ", "))
    row("pending waits", figures.scheduler.waits)
    row("ready to resume", figures.scheduler.ready)
    out[#out + 1] = "</table>"
    out[#out + 1] = ("<h2>Tasks (%d)</h2>"):format(#entries + (omitted and omitted.count or 0))
    if omitted then out[#out + 1] = "<p id='omitted'>" .. escape(debug_tasks.describe_omitted(omitted)) .. "</p>" end
    out[#out + 1] = "<table id='tasks'><tr><th>kind</th><th>name</th><th>state</th>"
        .. "<th>waits on</th><th>for (ms)</th><th>traceback</th></tr>"
    for _, e in ipairs(entries) do
        out[#out + 1] = ("<tr class='task'><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td class='num'>%s</td>"
            .. "<td><pre>%s</pre></td></tr>"):format(escape(e.kind), escape(e.name), escape(e.state),
            escape(e.wait and debug_tasks.describe_wait(e) or (e.detail or "")), escape(e.waited_ms or ""),
            escape(((e.traceback or ""):gsub("^stack traceback:\n", ""):gsub("\t", ""))))
    end
    out[#out + 1] = "</table>"
    out[#out + 1] = "<script>" .. (state.token and ("window.tamarcoAuth = { Authorization: %s };")
        :format(assert(tamarco_json.encode("Bearer " .. state.token))) or "") .. flamegraph.SCRIPT .. [[
(function () {
  var button = document.getElementById('profile'), state = document.getElementById('profile-state');
  function run(seconds) {
    button.disabled = true;
    state.textContent = 'profiling for ' + seconds + ' s...';
    fetch('profile?seconds=' + seconds, { credentials: 'same-origin', headers: window.tamarcoAuth || {} })
      .then(function (r) { return r.text().then(function (t) { return { ok: r.ok, status: r.status, text: t }; }); })
      .then(function (r) {
        button.disabled = false;
        if (!r.ok) { state.textContent = 'profile failed: ' + r.status + ' ' + r.text; return; }
        var flame = document.getElementById('flame');
        flame.innerHTML = r.text.replace(/<script>[\s\S]*<\/script>/, '');
        tamarcoFlame(flame.querySelector('svg'));
        state.textContent = 'done';
      }, function (e) { button.disabled = false; state.textContent = 'profile failed: ' + e; });
  }
  button.addEventListener('click', function () { run(10); });
  var auto = /[?&]profile=(\d+(\.\d+)?)/.exec(location.search);
  if (auto) run(auto[1]);
})();
</script></body></html>]]
    return 200, table.concat(out, "\n"), { ["Content-Type"] = HTML }
end

--- The handlers by route (tamarco.ops.debug.routes defines them lazily).
pages.handlers = {
    ["/debug"] = function() return 301, "", { Location = "/debug/" } end,
    ["/debug/"] = html_page,
    ["/debug/tasks"] = tasks_page,
    ["/debug/profile"] = profile_page,
    ["/debug/heap"] = heap_page,
    ["/debug/settings"] = settings_page,
    ["/debug/loglevel"] = loglevel_page,
}

--- pages.handle(svc, path, req) -> status, body, headers (auth checked).
function pages.handle(svc, path, req)
    return guard(svc, function(r, state) return pages.handlers[path](svc, r, state) end)(req)
end

return pages
