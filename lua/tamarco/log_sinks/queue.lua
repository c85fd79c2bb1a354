--- tamarco.log_sinks.queue: the bounded queue and sender task behind every
-- remote log sink.
--
-- Logging calls must never wait for a network: a sink's emit() only encodes
-- the record and appends it here. When the queue is full (10 000 records by
-- default) the record is dropped and counted in the metric
-- `logging_dropped_records_total{sink=...}`. One task per sink takes records
-- out in batches and sends them; when sending fails it keeps the batch,
-- waits (back-off up to 5 s) and tries again, so a sink that comes back
-- resumes where it stopped.
local metrics = require "tamarco.metrics"
local scheduler = require "tamarco.c.scheduler"
local tasks = require "tamarco.tasks"

local queue = {}

local Queue = {}
Queue.__index = Queue

--- queue.new{ name, capacity = 10000, batch = 100, send = function(lines) -> true | nil, err,
--             max_delay_ms = 0, on_error = function(message) }
-- send(lines) runs in the sender task and may yield. max_delay_ms > 0 waits
-- for more records (up to `batch`) before sending (HTTP batching).
function queue.new(options)
    local self = setmetatable({
        name = options.name,
        capacity = options.capacity or 10000,
        batch = options.batch or 100,
        send = options.send,
        max_delay_ms = options.max_delay_ms or 0,
        on_error = options.on_error or function() end,
        items = {}, head = 1, tail = 0,
        dropped = metrics.counter("logging_dropped_records_total", {
            help = "Log records dropped because a remote sink's queue was full",
            labels = { sink = options.name },
        }),
        sent = 0,
    }, Queue)
    return self
end

function Queue:length()
    return self.tail - self.head + 1
end

--- push(line) -> true, or false when the queue is full (the line is dropped).
function Queue:push(line)
    if self:length() >= self.capacity then
        self.dropped:inc()
        return false
    end
    self.tail = self.tail + 1
    self.items[self.tail] = line
    if self.sender and self.idle then
        self.idle = false
        scheduler.wake(self.sender)
    end
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

function Queue:run()
    local backoff = 100
    local pending
    while true do
        if not pending then
            if self:length() == 0 then
                self.idle = true
                scheduler.suspend()
                tasks.checkpoint()
            end
            if self.max_delay_ms > 0 and self:length() < self.batch then
                tasks.sleep(self.max_delay_ms)
            end
            pending = self:take(self.batch)
        end
        if #pending > 0 then
            local ok, err = self.send(pending)
            tasks.checkpoint()
            if ok then
                self.sent = self.sent + #pending
                pending, backoff = nil, 100
            else
                self.on_error(tostring(err))
                tasks.sleep(backoff)
                backoff = math.min(backoff * 2, 5000)
            end
        else
            pending = nil
        end
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

--- Stops the sender task; what is still queued is lost (the caller may
-- flush first).
function Queue:stop()
    if self.sender then tasks.cancel(self.sender) end
    self.sender = nil
end

--- flush(timeout_ms): inside a task, waits until the queue is empty or the
-- timeout passed. Returns true when everything was sent.
function Queue:flush(timeout_ms)
    local deadline = require("tamarco.c.timer").now() + (timeout_ms or 1000)
    while self:length() > 0 or (self.sender and not self.idle) do
        if require("tamarco.c.timer").now() >= deadline then return false end
        require("tamarco.c.timer").sleep(10)
    end
    return true
end

return queue
