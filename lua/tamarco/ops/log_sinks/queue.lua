--- tamarco.ops.log_sinks.queue: the bounded queue and sender task behind every
-- remote log sink.
--
-- Logging calls must never wait for a network: a sink's emit() only encodes
-- the record and appends it here. One task per sink takes records out in
-- batches and sends them.
--
-- A sink that cannot deliver says so: the first failure writes one line on
-- stderr and one WARNING in the service's log with the reason (connection
-- refused, NOAUTH/WRONGPASS, the HTTP status, ...), then at most one
-- reminder a minute while it keeps failing, and one line when it delivers
-- again. Its state is on /status (tamarco.log_sinks.report).
--
-- What happens to the records of a failed send depends on the failure:
--   - transient (the peer is down, a timeout, an HTTP 5xx): the batch is kept
--     and sent again with back-off (up to 5 s), so a sink that comes back
--     resumes where it stopped;
--   - refused (authentication, an HTTP 4xx, a Redis error reply): sending
--     the same records again cannot succeed; the batch is dropped.
-- Records are counted in `logging_dropped_records_total{sink=...}` when they
-- are dropped: queue full (10 000 records by default), refused, or still
-- undelivered when the sink is closed at stop.
local backoff = require "tamarco.c.backoff"
local metrics = require "tamarco.core.metrics"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local tasks = require "tamarco.core.tasks"

local queue = {}

queue.REPORT_INTERVAL_MS = 60000
-- A failed send waits 100 ms, doubling up to 5 s, before the next one.
local SEND_BACKOFF = { min_ms = 100, max_ms = 5000, factor = 2 }

local Queue = {}
Queue.__index = Queue

--- queue.dropped_counter(sink_name) -> the counter
-- logging_dropped_records_total{sink=sink_name} (every remote sink's).
function queue.dropped_counter(sink_name)
    return metrics.counter("logging_dropped_records_total", {
        help = "Log records a remote sink dropped: queue full, refused by the peer, or undelivered at stop",
        labels = { sink = sink_name },
    })
end

--- queue.new{ name, capacity = 10000, batch = 100, send = function(lines) -> true | nil, err[, refused],
--             max_delay_ms = 0, report = function(level, message, fields) }
-- send(lines) runs in the sender task and may yield; it returns a third
-- value true when the peer refused the records (see above). max_delay_ms >
-- 0 waits for more records (up to `batch`) before sending (HTTP batching).
-- report(level, message, fields) says what goes wrong (see log_sinks).
function queue.new(options)
    local self = setmetatable({
        name = options.name,
        capacity = options.capacity or 10000,
        batch = options.batch or 100,
        send = options.send,
        max_delay_ms = options.max_delay_ms or 0,
        report = options.report or function() end,
        items = {}, head = 1, tail = 0,
        dropped = queue.dropped_counter(options.name),
        sent = 0,
        dropped_here = 0,
        state = "delivering",   -- or "failing"
        failures = 0,           -- failed sends since the last delivery
        last_error = nil,
    }, Queue)
    return self
end

function Queue:length()
    return self.tail - self.head + 1
end

function Queue:drop(count)
    if count <= 0 then return end
    self.dropped:inc(count)
    self.dropped_here = self.dropped_here + count
end

-- Wakes the sender when it waits for records or for its batching delay.
function Queue:wake_sender()
    if self.sender and self.waiting then
        self.waiting = false
        scheduler.wake(self.sender)
    end
end

--- push(line) -> true, or false when the queue is full (the line is dropped).
function Queue:push(line)
    if self:length() >= self.capacity then
        self:drop(1)
        return false
    end
    self.tail = self.tail + 1
    self.items[self.tail] = line
    if self.idle or (self.batching and self:length() >= self.batch) then self:wake_sender() end
    return true
end

function Queue:take(n)
    local out = {}
    local last = math.min(self.tail, self.head + n - 1)
    for i = self.head, last do
        out[#out + 1] = self.items[i]
        self.items[i] = nil
    end
    self.head = last + 1
    if self.head > self.tail then self.head, self.tail = 1, 0 end
    return out
end

-- Suspends the sender until wake_sender() or, with ms, until ms passed.
function Queue:wait(ms)
    local me = scheduler.current()
    local guard
    if ms then
        guard = scheduler.spawn(function()
            tasks.sleep(ms)
            if self.waiting then
                self.waiting = false
                scheduler.wake(me)
            end
        end)
    end
    self.waiting = true
    scheduler.suspend("log sink queue")
    self.waiting = false
    if guard then tasks.cancel(guard) end
    tasks.checkpoint()
end

function Queue:failed(err, refused, count)
    self.failures = self.failures + 1
    self.last_error = err
    local now = timer.now()
    if refused then self:drop(count) end
    local fields = { sink = self.name, reason = err, queued = self:length() + (refused and 0 or count),
                     dropped = self.dropped_here }
    if self.state ~= "failing" then
        self.state = "failing"
        self.last_report = now
        self.report("warning", ("log sink %s cannot deliver: %s (%s)"):format(self.name, err,
            refused and "records dropped" or "records kept and retried"), fields)
    elseif now - self.last_report >= queue.REPORT_INTERVAL_MS then
        self.last_report = now
        self.report("warning", ("log sink %s still cannot deliver after %d attempts: %s"):format(
            self.name, self.failures, err), fields)
    end
end

function Queue:delivered(count)
    self.sent = self.sent + count
    if self.state == "failing" then
        self.report("info", ("log sink %s delivers again after %d failed attempts"):format(
            self.name, self.failures), { sink = self.name })
    end
    self.state, self.failures = "delivering", 0
end

function Queue:run()
    local delays = backoff.new(SEND_BACKOFF)
    local pending
    while true do
        if not pending then
            if self:length() == 0 then
                self.idle = true
                self:wait()
                self.idle = false
            end
            -- batching: wait for a full batch or max_delay_ms, but never
            -- while a flush waits for the queue to empty
            if self.max_delay_ms > 0 and self:length() < self.batch and not self.flushing then
                self.batching = true
                self:wait(self.max_delay_ms)
                self.batching = false
            end
            pending = self:take(self.batch)
            self.in_flight = #pending
        end
        if #pending > 0 then
            local ok, err, refused = self.send(pending)
            tasks.checkpoint()
            if ok then
                self:delivered(#pending)
                pending = nil
                delays:reset()
            else
                self:failed(tostring(err), refused, #pending)
                if refused then pending = nil end
                local delay = delays:next()
                self.backing_off = true
                self:wait(self.flushing and 100 or delay)
                self.backing_off = false
            end
        else
            pending = nil
        end
        if not pending then self.in_flight = 0 end
    end
end

--- Starts the sender task (from anywhere).
function Queue:start()
    if self.sender then return end
    self.idle = false
    self.sender = scheduler.spawn(function()
        local ok, err = pcall(self.run, self)
        if not ok and err ~= tasks.CANCELLED then error(err, 0) end
    end)
end

--- Stops the sender task. What is still queued is dropped and counted, and
-- said on stderr and in the log (the caller flushes first).
function Queue:stop()
    if self.sender then tasks.cancel(self.sender) end
    self.sender = nil
    local left = self:length() + (self.in_flight or 0)
    if left > 0 then
        self:take(self:length())
        self.in_flight = 0
        self:drop(left)
        self.report("error", ("log sink %s: %d records not delivered at stop%s"):format(self.name, left,
            self.last_error and (": " .. self.last_error) or ""), { sink = self.name, dropped = left })
    end
end

--- flush(timeout_ms): inside a task, sends everything queued now, whatever
-- the batching delay, and waits until the queue is empty or the timeout
-- passed. Gives up early after 3 failed sends in a row (a dead peer must
-- not take the whole stop budget). Returns true when everything was sent.
function Queue:flush(timeout_ms)
    local deadline = timer.now() + (timeout_ms or 1000)
    self.flushing = true
    local failures_before = self.failures
    if self.batching or self.backing_off then self:wake_sender() end
    local done = true
    while self:length() > 0 or (self.sender and not self.idle) do
        if timer.now() >= deadline or self.failures - failures_before >= 3 or not self.sender then
            done = false
            break
        end
        tasks.sleep(10)
    end
    self.flushing = false
    return done
end

--- The sink's state for /status.
function Queue:status()
    return {
        state = self.state,
        reason = self.state == "failing" and self.last_error or nil,
        queued = self:length() + (self.in_flight or 0),
        delivered = self.sent,
        dropped = self.dropped_here,
    }
end

return queue
