--- tamarco.ops.debug.tasks: every live task, timer, handler coroutine and
-- thread of a service, with what it waits on and its traceback (the
-- `/debug/tasks` page and the console's `tasks`).
--
-- Reads the scheduler's book-keeping (tamarco.c.scheduler.list) and takes
-- tracebacks with debug.traceback(co): no coroutine is resumed or woken.
-- Handler coroutines carry no name of their own (naming them would cost
-- every request); their name is read from their stack when asked: the
-- route of an HTTP request, the queue of an AMQP delivery, the channel of a
-- Redis message.
local scheduler = require "tamarco.c.scheduler"
local tasks_module = require "tamarco.core.tasks"

local debug_tasks = {}

-- locals of the frame at `level` of co, by name (first occurrence)
local function frame_locals(co, level)
    local locals = {}
    for i = 1, 60 do
        local name, value = debug.getlocal(co, level, i)
        if name == nil then break end
        if locals[name] == nil then locals[name] = value end
    end
    return locals
end

-- Framework files whose frames name a handler, and how.
local HANDLER_FRAMES = {
    { suffix = "resources/http_server.lua", name = function(l)
        if type(l.route) == "table" and l.route.pattern then
            return "http " .. tostring(l.method or l.route.method or "?") .. " " .. l.route.pattern
        end
    end },
    { suffix = "resources/amqp.lua", name = function(l)
        if type(l.cons) == "table" and l.cons.queue then
            return "amqp " .. tostring(l.cons.kind or "consumer") .. " " .. tostring(l.cons.queue)
        end
    end },
    { suffix = "resources/redis.lua", name = function(l)
        if l.kind == "message" or l.kind == "pmessage" then return "redis pubsub " .. tostring(l.a) end
    end },
}

local getinfo, find = debug.getinfo, string.find

-- One walk down co's stack: the handler it serves ("http GET /x"), else
-- where its outermost Lua function was defined ("file.lua:12").
local function name_of(co)
    -- in the running coroutine getlocal counts the frame of frame_locals too
    local shift = co == coroutine.running() and 1 or 0
    local deepest_src, deepest_line
    for level = 0, 200 do
        local info = getinfo(co, level, "S")
        if not info then break end
        local source = info.source
        if info.what ~= "C" then deepest_src, deepest_line = info.short_src, info.linedefined end
        for _, frame in ipairs(HANDLER_FRAMES) do
            if find(source, frame.suffix, -#frame.suffix, true) then
                local name = frame.name(frame_locals(co, level + shift))
                if name then return "handler", name end
            end
        end
    end
    if deepest_src then return "coroutine", deepest_src .. ":" .. tostring(deepest_line) end
    return "coroutine", "?"
end

local function round(ms)
    if ms == nil then return nil end
    return math.floor(ms + 0.5)
end

-- The `limit` items that have waited longest (a stuck task is what one
-- looks for), and a count by wait of the others: naming a coroutine walks
-- its stack, and 10 000 walks would hold the loop for a noticeable time.
local function longest_waiting(items, limit)
    if not limit or #items <= limit then return items, nil end
    table.sort(items, function(a, b) return (a.waited_ms or -1) > (b.waited_ms or -1) end)
    local shown, omitted = {}, { count = #items - limit, by_wait = {} }
    for i, item in ipairs(items) do
        if i <= limit then
            shown[i] = item
        else
            local wait = item.wait or item.state
            omitted.by_wait[wait] = (omitted.by_wait[wait] or 0) + 1
        end
    end
    return shown, omitted
end

--- debug_tasks.snapshot(svc[, options]) -> list of entries, sorted by kind
-- and name: { id, kind ("task" | "timer" | "handler" | "coroutine" |
-- "thread"), name, state, wait, detail, waited_ms, remaining_ms, traceback },
-- and nil or what was left out: { count, by_wait = { wait = count } }.
-- options.tracebacks = false leaves the tracebacks out; options.limit
-- lists only that many coroutines (those that have waited longest).
function debug_tasks.snapshot(svc, options)
    options = options or {}
    local with_tracebacks = options.tracebacks ~= false
    local names = tasks_module.names
    local task_kinds = svc and svc.task_names or {}
    local entries = {}
    local items, omitted = longest_waiting(scheduler.list(), options.limit)
    for _, item in ipairs(items) do
        local co = item.co
        local name, kind = names[co], nil
        if name then
            kind = task_kinds[name] == "task_timer" and "timer" or "task"
        else
            kind, name = name_of(co)
        end
        entries[#entries + 1] = {
            id = tostring(co):match("0x%x+") or tostring(co),
            kind = kind,
            name = name,
            state = item.state,
            wait = item.wait,
            detail = item.detail,
            waited_ms = round(item.waited_ms),
            remaining_ms = round(item.remaining_ms),
            traceback = with_tracebacks and debug.traceback(co) or nil,
        }
    end
    for thread_name, handle in pairs(svc and svc.threads or {}) do
        entries[#entries + 1] = {
            id = "thread " .. thread_name,
            kind = "thread",
            name = thread_name,
            state = handle:status(),
            detail = handle:detached() and "detached (did not stop in time)" or nil,
        }
    end
    table.sort(entries, function(a, b)
        if a.kind ~= b.kind then return a.kind < b.kind end
        if a.name ~= b.name then return a.name < b.name end
        return a.id < b.id
    end)
    return entries, omitted
end

--- A line saying what a limited snapshot left out, or nil.
function debug_tasks.describe_omitted(omitted)
    if not omitted then return nil end
    local waits = {}
    for wait, n in pairs(omitted.by_wait) do waits[#waits + 1] = ("%s %d"):format(wait, n) end
    table.sort(waits)
    return ("%d more not listed (waiting shortest): %s"):format(omitted.count, table.concat(waits, ", "))
end

--- A one-line description of what an entry waits on.
function debug_tasks.describe_wait(entry)
    if not entry.wait then return entry.state end
    local parts = { entry.wait }
    if entry.detail then parts[#parts + 1] = entry.detail end
    if entry.remaining_ms then parts[#parts + 1] = ("(%d ms left)"):format(entry.remaining_ms) end
    return table.concat(parts, " ")
end

--- Text form, like Go's goroutine dump: one block per entry (and a line for
-- what a limited snapshot left out).
function debug_tasks.to_text(entries, omitted)
    local out = { ("%d live tasks, handlers and threads"):format(#entries + (omitted and omitted.count or 0)), "" }
    if omitted then
        out[#out + 1] = debug_tasks.describe_omitted(omitted)
        out[#out + 1] = ""
    end
    for _, e in ipairs(entries) do
        local head = ("%s %s [%s] %s"):format(e.kind, e.name, e.id, e.state)
        if e.wait then
            head = head .. ": " .. debug_tasks.describe_wait(e) .. (" for %d ms"):format(e.waited_ms or 0)
        elseif e.detail then
            head = head .. ": " .. e.detail
        end
        out[#out + 1] = head
        if e.traceback then
            for line in e.traceback:gmatch("[^\n]+") do
                if line ~= "stack traceback:" then out[#out + 1] = "    " .. line:gsub("^%s+", "") end
            end
        end
        out[#out + 1] = ""
    end
    return table.concat(out, "\n")
end

return debug_tasks
