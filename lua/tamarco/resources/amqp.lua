--- tamarco.resources.amqp: an AMQP 0-9-1 (RabbitMQ) client resource with
-- Tamarco's three messaging patterns.
--
--   local amqp = require "tamarco.resources.amqp"
--   local svc = tamarco.service { name = "worker", resources = { amqp = amqp.client() } }
--   svc.amqp:pull("jobs", function(msg, meta) ... end)    -- push/pull: durable queue,
--   svc.amqp:push("jobs", { n = 1 })                      --   competing consumers
--   svc.amqp:subscribe("events", function(msg) end)       -- publish/subscribe: fanout
--   svc.amqp:publish("events", { kind = "x" })
--   svc.amqp:respond("prices", function(msg) return { price = 3 } end)   -- request/response
--   local reply, err = svc.amqp:request("prices", { item = "a" }, { timeout = 5000 })
--
-- NAMES (`<queues_prefix>.` is left out when the prefix is empty):
--   push/pull          durable queue `<queues_prefix>.push_pull.<name>`, persistent
--                      messages; every pull()er of a name competes for its messages.
--   publish/subscribe  fanout exchange `<queues_prefix>.publish_subscribe.<name>` (not
--                      durable); each subscriber gets its own exclusive queue bound to it.
--   request/response   queue `<queues_prefix>.request_response.<name>` (not durable); the
--                      requester waits on RabbitMQ's direct reply-to (amq.rabbitmq.reply-to)
--                      and matches replies by correlation_id. A request carries its
--                      timeout as the message expiration, so a request nobody answered in
--                      time is dropped by the broker instead of being served late.
--
-- DELIVERY: every message runs its handler `handler(value, meta)` in its own
-- task (meta: properties, delivery_tag, redelivered, exchange, routing_key,
-- body, queue). It is acked only after the handler returns. A handler error
-- is logged with its traceback and the message is retried (option
-- `on_error = "requeue"`, the default) or dead-lettered at once (`on_error =
-- "dead_letter"`: rejected without requeue, so the queue's dead-letter
-- exchange gets it, or the broker drops it when the queue has none).
-- Retries are bounded: a failed message waits redelivery_backoff_ms x
-- 2^(failures-1) (at most redelivery_backoff_max_ms, holding its prefetch
-- slot), then goes back to its queue; after max_redeliveries retries (the
-- max_redeliveries + 1-th failure) it is rejected - dead-lettered when the
-- queue has a dead-letter exchange, else dropped - with one ERROR line. The
-- count is the broker's x-delivery-count header on quorum queues; on
-- classic queues (which have none, and whose redelivered flag a connection
-- loss sets too) the message goes back as a copy with the header
-- x-tamarco-retries and the original is acked once the copy is confirmed.
-- meta.failures is that count, meta.redelivered is true when it is > 0.
-- Identical tracebacks (same queue, error and traceback) are logged once
-- per repeated_error_log_ms; the others are counted. Metrics, labelled
-- queue: amqp_handler_errors_total, amqp_handler_error_logs_suppressed_total,
-- amqp_messages_given_up_total. A
-- payload the codec cannot decode is logged and rejected without requeue
-- (dead-lettered when configured); the consumer goes on. A responder's error
-- is sent back to the requester (`nil, "remote error: ..."`). Delivery is
-- at-least-once: a message whose handler was running when the connection was
-- lost is redelivered by the broker, and its late ack is not sent (delivery
-- tags belong to their connection).
--
-- Options of pull/subscribe/respond: codec ("json" | "yaml" | "raw" | a codec
-- table), prefetch (per consumer; default setting `prefetch`), on_error,
-- dead_letter = true (push/pull: declares `<queue>.dead_letter` and routes
-- rejected messages there), dead_letter_exchange = "x" (push/pull: the
-- queue's x-dead-letter-exchange), queue_arguments = { ... } (x-arguments).
-- Every declaration uses exactly tamarco-amqp's arguments (see DECLARE), so
-- Python Tamarco services share the same names in any start order. A
-- consumer's declaration the broker refuses (406 PRECONDITION_FAILED: the
-- name exists with other arguments; 403: no permission) makes the resource
-- FAILED with one ERROR line naming the queue or exchange and the broker's
-- reason, and is retried with back-off (reconnect_backoff_ms doubling to
-- reconnect_backoff_max_ms) until it succeeds. A publisher only needs the
-- name to exist: push/publish to a queue or exchange that exists with other
-- arguments goes on with one warning.
--
-- CONTENT TYPE: messages are sent with the codec's content type
-- (application/json for json). Consumers decode with their codec whatever
-- the content type says, so tamarco-amqp's text/plain JSON is read as JSON,
-- and tamarco-amqp (which ignores the content type) reads ours.
--
-- PUBLISHING: `push(name, value[, opts])` publishes a persistent message and
-- returns when the broker has confirmed it (publisher confirms): true, or
-- nil, err. `publish(name, value[, opts])` is fire-and-forget (true once
-- handed to the connection) unless opts.confirm; opts.persistent makes it
-- persistent. Both take opts.codec, opts.headers (flat), opts.priority,
-- opts.wait_ms (see publish_wait_ms). `request(name, value[, opts])` ->
-- decoded reply | nil, "timeout" | nil, err; opts.timeout in ms.
--
-- SETTINGS under system.resources.<name> (later wins: default, the options
-- given to amqp.client{...}, settings):
--   hosts (see CLUSTER), host (127.0.0.1), port (5672), vhost ("/"), user ("guest"), password
--   ("guest"), connection_timeout (seconds, 10: TCP connect, login and each
--   broker round trip), heartbeat (seconds, 30; 0 disables), queues_prefix
--   (""), prefetch (10), codec ("json"), reconnect_backoff_ms (200, doubled
--   per failed attempt up to reconnect_backoff_max_ms, 5000),
--   publish_wait_ms (0: while disconnected publishes fail at once with
--   "not connected ..."; > 0: they wait that long for the connection),
--   request_timeout_ms (5000), drain_timeout_ms (10000: how long stop waits
--   for running handlers), queue_type ("classic" | "quorum": push/pull
--   queues, and their dead-letter queues, are declared with
--   x-queue-type=quorum; classic, tamarco-amqp's, is the default),
--   max_redeliveries (5), redelivery_backoff_ms (200),
--   redelivery_backoff_max_ms (10000), repeated_error_log_ms (10000); the
--   first three may also be given per consumer in pull/subscribe options;
--   confirm_timeout_ms (30000; 0: none): when the broker confirms none of
--   the outstanding publishes for that long (the connection alive, heartbeats
--   flowing), the connection is dropped and re-made, so waiting pushes fail
--   (and may be retried) instead of waiting forever.
--
-- STATUS: CONNECTING until the first connection is set up (queues declared,
-- consumers started), then STARTED. When the broker goes away: FAILED, then
-- CONNECTING at the next attempt, STARTED again once everything is declared
-- and consuming again. A broker that cannot be reached at start does not
-- stop the service: start waits up to connection_timeout per node (the
-- resource stays CONNECTING, /status 503), then the service starts and the
-- resource keeps trying in the background, FAILED/CONNECTING meanwhile. A
-- stop requested during that wait ends it at once (cancel_start), and a stop
-- while the broker accepts the TCP connection but never answers the
-- handshake interrupts it. A refused login (403 ACCESS_REFUSED, 530
-- NOT_ALLOWED for the vhost) is FAILED at once with one ERROR line naming
-- the user and vhost; it is retried every reconnect_backoff_max_ms, in case
-- the broker's users are being set up. status() never shows the password.
--
-- CLUSTER: `hosts` lists the nodes ("h:p", "h" with `port`, or {host, port};
-- a comma-separated string from the environment works too). The first
-- attempt goes to a node picked at random (so a fleet spreads over the
-- cluster), then each failed attempt or lost connection moves to the next
-- node in turn, with the usual back-off; the resource re-declares and
-- resumes consuming on whichever node answers. `host`/`port` are used when
-- `hosts` is not set.
--
-- The connection runs on its own I/O thread (see bindings/amqp.c for why).
local backoff = require "tamarco.c.backoff"
local base = require "tamarco.core.resource"
local codecs = require "tamarco.core.codecs"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local tasks = require "tamarco.core.tasks"

local STATUS = base.STATUS
local REPLY_TO = "amq.rabbitmq.reply-to"

local amqp = { codecs = codecs }

local Client = base.class("amqp")
amqp.Client = Client

local DEFAULTS = {
    host = "127.0.0.1",
    port = 5672,
    vhost = "/",
    user = "guest",
    password = "guest",
    connection_timeout = 10,
    heartbeat = 30,
    queues_prefix = "",
    prefetch = 10,
    codec = "json",
    reconnect_backoff_ms = 200,
    reconnect_backoff_max_ms = 5000,
    publish_wait_ms = 0,
    request_timeout_ms = 5000,
    drain_timeout_ms = 10000,
    queue_type = "classic",
    confirm_timeout_ms = 30000,
    max_redeliveries = 5,
    redelivery_backoff_ms = 200,
    redelivery_backoff_max_ms = 10000,
    repeated_error_log_ms = 10000,
}
Client.defaults = DEFAULTS

local ON_ERROR = { requeue = true, dead_letter = true }

--- amqp.client([options]) -> a new AMQP client resource. options: any
-- setting above (used when the settings do not set it), depends_on.
function amqp.client(options)
    return Client.new(options)
end

local c_module
local function c()
    if not c_module then c_module = require "tamarco.c.amqp" end
    return c_module
end

function Client:init(options)
    base.Resource.init(self, options)
    self.manages_status = true
    self.consumers = {}
    self.by_tag = {}
    self.epoch = 0
    self.conn_state = "new"
    self.declared = {}
    self.declaring = {}
    self.rpc_waits = {}
    self.ready_waiters = {}
    self.in_flight = 0
    self.drain_waiters = {}
    self.next_id = 0
    self.counters = { handled = 0, handler_errors = 0, rejected = 0, requests = 0, timeouts = 0, redelivered = 0,
        gave_up = 0 }
    self.backoff_waiters = {}
end

function Client:log()
    if not self.logger then self.logger = require("tamarco.core.logging").get_logger("amqp") end
    return self.logger
end

--- The broker-side name of a pattern's queue or exchange.
function Client:queue_name(pattern, name)
    local prefix = self:setting("queues_prefix")
    if prefix ~= nil and prefix ~= "" then return prefix .. "." .. pattern .. "." .. name end
    return pattern .. "." .. name
end

local function check_name(name, what)
    if type(name) ~= "string" or name == "" then error("amqp:" .. what .. ": name must be a non-empty string", 3) end
end

-- ---------------------------------------------------------------------
-- waiting helpers
-- ---------------------------------------------------------------------

-- Suspends the running task until wake_all(waiters, ...) or `ms` passed
-- (-> nil, "timeout"); `what` names the wait in /debug/tasks. A waiter is a record, so that a stray wake-up of the
-- coroutine (someone else's stale wake) does not end the wait early.
local function suspend_for(ms, waiters, what)
    local me = scheduler.current()
    if not me then error("amqp: this call yields: run it inside a task, hook or handler", 3) end
    local w = { co = me }
    waiters[#waiters + 1] = w
    local guard
    if ms then
        guard = scheduler.spawn(function()
            timer.sleep(ms)
            if not w.done then
                w.done, w.values = true, { n = 2, nil, "timeout" }
                scheduler.wake(me)
            end
        end)
    end
    while not w.done do
        scheduler.suspend(what or "amqp")
        tasks.checkpoint()
    end
    if guard then scheduler.interrupt(guard) end
    for i, other in ipairs(waiters) do
        if other == w then table.remove(waiters, i) break end
    end
    return unpack(w.values, 1, w.values.n)
end

local function wake_all(waiters, ...)
    local list = {}
    for i, w in ipairs(waiters) do list[i] = w end
    for i = #waiters, 1, -1 do waiters[i] = nil end
    local values = { n = select("#", ...), ... }
    for _, w in ipairs(list) do
        if not w.done then
            w.done, w.values = true, values
            scheduler.wake(w.co)
        end
    end
end

function Client:not_connected_error()
    if not self.conn then return "the amqp resource '" .. tostring(self.name) .. "' is not started" end
    local info = self.conn:info()
    local text = ("not connected to the AMQP broker %s:%s"):format(info.host, info.port)
    if self.last_error then text = text .. " (" .. self.last_error .. ")" end
    return text
end

-- true when connected, after waiting up to wait_ms for it; else nil, err.
function Client:wait_connected(wait_ms)
    if self.conn and self.conn_state == "connected" then return true end
    wait_ms = wait_ms or self:setting("publish_wait_ms")
    if self.conn and not self.stopping and wait_ms and wait_ms > 0 then
        suspend_for(wait_ms, self.ready_waiters, "amqp connection")
        if self.conn and self.conn_state == "connected" then return true end
    end
    return nil, self:not_connected_error()
end

-- Runs fn() once per connection for `key`; concurrent callers share the result.
function Client:once(key, fn)
    if self.declared[key] == self.epoch then return true end
    local waiting = self.declaring[key]
    if waiting then
        local ok, err = suspend_for(nil, waiting, "amqp declaration " .. key)
        return ok, err
    end
    waiting = {}
    self.declaring[key] = waiting
    local epoch = self.epoch
    local ok, err = fn()
    if self.declaring[key] == waiting then self.declaring[key] = nil end
    if ok and epoch == self.epoch then self.declared[key] = epoch end
    wake_all(waiting, ok, err)
    return ok, err
end

-- ---------------------------------------------------------------------
-- declarations
-- ---------------------------------------------------------------------

local function is_precondition(err)
    return type(err) == "string" and err:find("406", 1, true) ~= nil
end

-- What every pattern declares, argument for argument as tamarco-amqp
-- (aioamqp's defaults fill what it leaves out), so that both can declare the
-- same names on one broker in any order:
--   push/pull queue          durable, not exclusive, not auto-delete
--   publish/subscribe        fanout exchange, NOT durable, not auto-delete;
--                            each subscriber: a server-named exclusive queue
--                            (not durable, not auto-delete) bound with key ""
--   request/response queue   not durable, not exclusive, not auto-delete
local DECLARE = {
    push_pull = { durable = true, exclusive = false, auto_delete = false },
    exchange = { durable = false, auto_delete = false },
    subscriber = { durable = false, exclusive = true, auto_delete = false },
    request_response = { durable = false, exclusive = false, auto_delete = false },
}
amqp.DECLARE = DECLARE

local function with(flags, extra)
    local out = {}
    for k, v in pairs(flags) do out[k] = v end
    for k, v in pairs(extra or {}) do out[k] = v end
    return out
end

-- Declares `queue` with `flags`. A consumer needs its queue exactly so: a
-- refusal is an error. A publisher (`publisher` true) only needs the queue to
-- exist: when it exists with other arguments (406, declared by someone else)
-- it is used as it is, with one warning.
function Client:declare(queue, flags, publisher)
    local conn = self.conn
    local name, err = conn:declare_queue(queue, flags)
    if name then return name end
    if publisher and is_precondition(err) then
        self:warn_once("queue:" .. queue, "queue '" .. queue
            .. "' exists with other arguments; publishing to it as it is (" .. err .. ")", { queue = queue })
        name, err = conn:declare_queue(queue, { passive = true })
        if name then return name end
    end
    return nil, "cannot declare queue '" .. queue .. "': " .. tostring(err)
end

function Client:warn_once(key, text, fields)
    self.warned = self.warned or {}
    if self.warned[key] then return end
    self.warned[key] = true
    self:log():warning(text, fields)
end

-- The x-arguments of a push/pull queue from a consumer's options.
local function queue_arguments(queue, options, quorum)
    local args
    if options.queue_arguments then
        args = {}
        for k, v in pairs(options.queue_arguments) do args[k] = v end
    end
    if options.dead_letter then
        args = args or {}
        args["x-dead-letter-exchange"] = ""
        args["x-dead-letter-routing-key"] = queue .. ".dead_letter"
    elseif options.dead_letter_exchange then
        args = args or {}
        args["x-dead-letter-exchange"] = options.dead_letter_exchange
    end
    if quorum then
        args = args or {}
        if args["x-queue-type"] == nil then args["x-queue-type"] = "quorum" end
    end
    return args
end
amqp.queue_arguments = queue_arguments

function Client:declare_push_pull(queue, options, publisher)
    options = options or {}
    local quorum = self:setting("queue_type") == "quorum"
    if options.dead_letter then
        local ok, err = self:declare(queue .. ".dead_letter",
            with(DECLARE.push_pull, { arguments = quorum and { ["x-queue-type"] = "quorum" } or nil }), publisher)
        if not ok then return nil, err end
    end
    return self:declare(queue, with(DECLARE.push_pull, { arguments = queue_arguments(queue, options, quorum) }),
        publisher)
end

-- The options a local consumer of `queue` declared it with (so that a push
-- declares the same queue the same way).
function Client:local_options(queue)
    for _, cons in ipairs(self.consumers) do
        if cons.kind == "push_pull" and self:queue_name("push_pull", cons.name) == queue then return cons.options end
    end
    return nil
end

function Client:ensure_queue(queue)
    return self:once("queue:" .. queue, function()
        local options = self:local_options(queue)
        return self:declare_push_pull(queue, options, options == nil)
    end)
end

-- publisher: see Client:declare (an exchange that exists with other
-- arguments is still an exchange to publish to).
function Client:ensure_exchange(exchange, publisher)
    return self:once("exchange:" .. exchange .. (publisher and ":p" or ""), function()
        local ok, err = self.conn:declare_exchange(exchange, "fanout", DECLARE.exchange)
        if ok then return true end
        if publisher and is_precondition(err) then
            self:warn_once("exchange:" .. exchange, "exchange '" .. exchange
                .. "' exists with other arguments; publishing to it as it is (" .. err .. ")", { exchange = exchange })
            ok, err = self.conn:declare_exchange(exchange, "fanout", { passive = true })
            if ok then return true end
        end
        return nil, "cannot declare exchange '" .. exchange .. "' (fanout, durable=false): " .. tostring(err)
    end)
end

-- ---------------------------------------------------------------------
-- consumers
-- ---------------------------------------------------------------------

function Client:setup_consumer(cons, epoch)
    cons.setting_up = true
    local ok, err = self:setup_consumer_now(cons, epoch)
    cons.setting_up = nil
    return ok, err
end

function Client:setup_consumer_now(cons, epoch)
    local conn = self.conn
    if not conn or epoch ~= self.epoch then return nil, "stale connection" end
    -- names and codec from the settings in force now (a service's resources
    -- get their settings after the service file declared the consumers)
    cons.queue = self:queue_name(cons.kind, cons.name)
    cons.exchange = cons.kind == "publish_subscribe" and cons.queue or nil
    cons.codec = codecs.get(cons.options.codec or self:setting("codec"))
    local queue, err
    if cons.kind == "push_pull" then
        queue, err = self:declare_push_pull(cons.queue, cons.options)
    elseif cons.kind == "publish_subscribe" then
        local ok
        ok, err = self:ensure_exchange(cons.exchange)
        if ok then
            queue, err = conn:declare_queue("", DECLARE.subscriber)
            if not queue then
                err = "cannot declare the subscriber queue of '" .. cons.exchange .. "': " .. tostring(err)
            else
                ok, err = conn:bind_queue(queue, cons.exchange, "")
                if not ok then
                    queue, err = nil, "cannot bind a queue to exchange '" .. cons.exchange .. "': " .. tostring(err)
                end
            end
        end
    else
        queue, err = self:declare(cons.queue, DECLARE.request_response)
    end
    if not queue then return nil, err end
    if epoch ~= self.epoch then return nil, "stale connection" end
    local tag = ("tamarco.%d.%d"):format(cons.id, epoch)
    local got
    got, err = conn:consume(epoch, queue, tag, cons.prefetch or self:setting("prefetch"), false, false)
    if not got then return nil, err end
    cons.tag, cons.epoch, cons.bound_queue = tag, epoch, queue
    self.by_tag[tag] = cons
    return true
end

-- Sets up every consumer not set up on this connection yet; -> the list of
-- those that failed, each with cons.setup_error.
function Client:setup_pending(epoch)
    local failed = {}
    for _, cons in ipairs(self.consumers) do
        if epoch ~= self.epoch then return failed end
        if not (cons.tag and cons.epoch == epoch) and not cons.setting_up then
            local ok, err = self:setup_consumer(cons, epoch)
            if not ok and epoch == self.epoch then
                cons.setup_error = tostring(err)
                failed[#failed + 1] = cons
            else
                cons.setup_error = nil
            end
        end
    end
    return failed
end

-- Sets up the consumers of connection `epoch`; a declaration the broker
-- refuses makes the resource FAILED (one log line naming the queue or
-- exchange and the broker's reason) and is retried with back-off until it
-- succeeds or the connection goes. -> true once all consume.
function Client:setup_all(epoch)
    if self.setup_epoch == epoch then
        self.setup_again = true   -- the loop already running takes it
        return false
    end
    self.setup_epoch = epoch
    local ok = self:setup_loop(epoch)
    if self.setup_epoch == epoch then self.setup_epoch = nil end
    return ok
end

function Client:setup_loop(epoch)
    local delays = backoff.new { min_ms = self:setting("reconnect_backoff_ms"),
                                 max_ms = self:setting("reconnect_backoff_max_ms") }
    local attempt = 0
    while true do
        self.setup_again = false
        local failed = self:setup_pending(epoch)
        if epoch ~= self.epoch or self.conn_state ~= "connected" or self.stopping then return false end
        while #failed == 0 and self.setup_again and epoch == self.epoch do
            self.setup_again = false
            failed = self:setup_pending(epoch)
        end
        if #failed == 0 then
            if attempt > 0 then
                self:log():info("the AMQP declarations succeeded after " .. attempt .. " failed attempts")
            end
            self.setup_error = nil
            return true
        end
        attempt = attempt + 1
        local first = failed[1]
        self.setup_error = first.setup_error
        self.last_error = first.setup_error
        self:set_status(STATUS.FAILED)
        local delay = delays:next()
        local text = ("%s (%s '%s'); the amqp resource is FAILED, retrying in %d ms"):format(first.setup_error,
            first.kind, first.name, delay)
        if attempt == 1 or first.setup_error ~= self.logged_setup_error then
            self:log():error(text, { queue = first.queue, exchange = first.exchange, pattern = first.kind,
                failed_consumers = #failed })
        else
            self:log():debug(text)
        end
        self.logged_setup_error = first.setup_error
        wake_all(self.ready_waiters, nil, first.setup_error)
        suspend_for(delay, self.ready_waiters, "amqp declaration retry")   -- stop ends the wait
        if epoch ~= self.epoch or self.conn_state ~= "connected" or self.stopping then return false end
        -- declarations are made afresh (a refused one may have been fixed)
        self.declared = {}
    end
end

function Client:add_consumer(kind, name, handler, options, what)
    check_name(name, what)
    if type(handler) ~= "function" then error("amqp:" .. what .. ": handler must be a function", 3) end
    options = options or {}
    if options.on_error ~= nil and not ON_ERROR[options.on_error] then
        error("amqp:" .. what .. ": on_error must be 'requeue' or 'dead_letter'", 3)
    end
    if options.codec ~= nil then codecs.get(options.codec) end   -- raises on an unknown name now
    for _, key in ipairs({ "max_redeliveries", "redelivery_backoff_ms", "redelivery_backoff_max_ms" }) do
        local v = options[key]
        if v ~= nil and (type(v) ~= "number" or v < 0 or v ~= v) then
            error("amqp:" .. what .. ": " .. key .. " must be a number >= 0", 3)
        end
    end
    self.next_id = self.next_id + 1
    local cons = {
        id = self.next_id,
        kind = kind,
        name = name,
        handler = handler,
        prefetch = options.prefetch,
        on_error = options.on_error or "requeue",
        options = options,
    }
    self.consumers[#self.consumers + 1] = cons
    -- declared before start: set up at start. While running: now.
    if self.conn and self.conn_state == "connected" and not self.stopping then
        local function setup()
            local ok, err = self:setup_consumer(cons, self.epoch)
            if not ok then
                cons.setup_error = tostring(err)
                -- FAILED and retried with back-off like at connection time
                local epoch = self.epoch
                scheduler.spawn(function()
                    if self:setup_all(epoch) and epoch == self.epoch and not self.stopping then
                        self:set_status(STATUS.STARTED)
                    end
                end)
            end
            return ok, err
        end
        if scheduler.current() then return setup() end
        scheduler.spawn(setup)
    end
    return true
end

--- pull(name, handler[, options]): consume the push/pull queue `name`.
function Client:pull(name, handler, options)
    return self:add_consumer("push_pull", name, handler, options, "pull")
end

--- subscribe(name, handler[, options]): receive what is published on `name`.
function Client:subscribe(name, handler, options)
    return self:add_consumer("publish_subscribe", name, handler, options, "subscribe")
end

--- respond(name, handler[, options]): answer requests on `name`; the
-- handler's return value is the reply.
function Client:respond(name, handler, options)
    return self:add_consumer("request_response", name, handler, options, "respond")
end

-- ---------------------------------------------------------------------
-- deliveries
-- ---------------------------------------------------------------------

local function capture(err)
    return { error = err, traceback = debug.traceback("", 2) }
end

function Client:handler_done()
    self.in_flight = self.in_flight - 1
    if self.in_flight == 0 and #self.drain_waiters > 0 then wake_all(self.drain_waiters) end
end

function Client:reply(cons, props, body, is_error)
    local reply_to = props.reply_to
    if not reply_to or reply_to == "" then return end
    local ok, err = self.conn:publish("", reply_to, body, {
        correlation_id = props.correlation_id,
        content_type = is_error and "text/plain" or cons.codec.content_type,
        type = is_error and "error" or nil,
    }, false)
    if not ok then
        self:log():warning("cannot send the reply to a request on '" .. cons.queue .. "': " .. tostring(err))
    end
end

local RETRIES_HEADER = "x-tamarco-retries"

local function meter(self, id, help, queue)
    self.meters = self.meters or {}
    local key = id .. "\0" .. queue
    local m = self.meters[key]
    if not m then
        m = require("tamarco.core.metrics").counter(id, { help = help, labels = { queue = queue } })
        self.meters[key] = m
    end
    return m
end

-- How many times this message failed before: the broker's count on quorum
-- queues (x-delivery-count), else the count carried by our own retries.
-- The redelivered flag is no count (a connection loss sets it too).
local function previous_failures(props)
    local headers = props.headers
    if not headers then return 0, nil end
    local n = tonumber(headers["x-delivery-count"])
    if n then return n, "x-delivery-count" end
    return tonumber(headers[RETRIES_HEADER]) or 0, RETRIES_HEADER
end

function Client:on_delivery(tag, body, props, dtag, redelivered, epoch, exchange, routing_key)
    local conn = self.conn
    if not conn then return end
    if tag == self.reply_tag then
        local cid = props.correlation_id
        local w = cid and self.rpc_waits[cid]
        if w then
            self.rpc_waits[cid] = nil
            w.done, w.body, w.props = true, body, props
            scheduler.wake(w.co)
        end
        return
    end
    local cons = self.by_tag[tag]
    if not cons or epoch ~= self.epoch or self.stopping then
        conn:nack(epoch, dtag, true)   -- not ours (any more): back to the queue
        return
    end
    self.in_flight = self.in_flight + 1
    local value, derr = cons.codec.decode(body)
    if derr ~= nil then
        self.counters.rejected = self.counters.rejected + 1
        self:log():error(("cannot decode a message from '%s' with the %s codec: %s; rejected"):format(
            cons.queue, tostring(cons.codec.name), tostring(derr)),
            { queue = cons.queue, delivery_tag = dtag, size = #body })
        if cons.kind == "request_response" then self:reply(cons, props, "cannot decode the request: " .. tostring(derr), true) end
        conn:nack(epoch, dtag, false)
        self:handler_done()
        return
    end
    local failures = previous_failures(props)
    local meta = {
        properties = props, delivery_tag = dtag, redelivered = redelivered or failures > 0, exchange = exchange,
        routing_key = routing_key, body = body, queue = cons.queue, failures = failures,
    }
    local ok, result = xpcall(cons.handler, capture, value, meta)
    if ok then
        self.counters.handled = self.counters.handled + 1
        if cons.kind == "request_response" then
            local encoded, eerr = cons.codec.encode(result)
            if encoded then
                self:reply(cons, props, encoded, false)
            else
                self:reply(cons, props, "cannot encode the reply: " .. tostring(eerr), true)
            end
        end
        conn:ack(epoch, dtag)
    elseif result.error == tasks.CANCELLED then
        conn:nack(epoch, dtag, true)
    else
        self:handler_failed(cons, result, body, props, dtag, redelivered, epoch)
    end
    self:handler_done()
end

-- ---------------------------------------------------------------------
-- failed handlers: bounded redelivery
-- ---------------------------------------------------------------------

function Client:option(cons, key)
    local v = cons.options[key]
    if v == nil then v = self:setting(key) end
    return v
end

-- Logs a handler's failure with its traceback, at most once per
-- repeated_error_log_ms for the same queue, error and traceback; the others
-- are counted (amqp_handler_error_logs_suppressed_total) and the next line
-- says how many were left out.
function Client:log_failure(cons, result, text, fields)
    local key = cons.queue .. "\0" .. tostring(result.error) .. "\0" .. tostring(result.traceback)
    self.error_logs = self.error_logs or { n = 0, by_key = {} }
    local logs = self.error_logs
    local entry = logs.by_key[key]
    local now = timer.hrtime() / 1e6
    if entry and now - entry.at < self:setting("repeated_error_log_ms") then
        entry.suppressed = entry.suppressed + 1
        meter(self, "amqp_handler_error_logs_suppressed_total",
            "Handler failures whose identical traceback was not logged again", cons.queue):inc()
        return
    end
    if not entry then
        if logs.n >= 1000 then logs.by_key, logs.n = {}, 0 end   -- bounded
        entry = { suppressed = 0 }
        logs.by_key[key] = entry
        logs.n = logs.n + 1
    end
    if entry.suppressed > 0 then
        text = text .. (" (%d identical failures not logged since the last line)"):format(entry.suppressed)
        fields.suppressed = entry.suppressed
    end
    entry.at, entry.suppressed = now, 0
    self:log():exception(text, result.error, result.traceback, fields)
end

function Client:handler_failed(cons, result, body, props, dtag, redelivered, epoch)
    local conn = self.conn
    self.counters.handler_errors = self.counters.handler_errors + 1
    meter(self, "amqp_handler_errors_total", "Message handlers that raised an error", cons.queue):inc()
    local fields = { queue = cons.queue, delivery_tag = dtag, redelivered = redelivered }
    local what = ("handler for '%s' failed: %s"):format(cons.queue, tostring(result.error))
    if cons.kind == "request_response" or cons.on_error == "dead_letter" then
        self:log_failure(cons, result, what .. " (message rejected)", fields)
        if cons.kind == "request_response" then self:reply(cons, props, tostring(result.error), true) end
        conn:nack(epoch, dtag, false)
        return
    end
    -- on_error = "requeue": again after a back-off, at most max_redeliveries times
    local before, source = previous_failures(props)
    local failures = before + 1
    local max = self:option(cons, "max_redeliveries")
    fields.failures = failures
    if failures > max then
        self.counters.gave_up = self.counters.gave_up + 1
        meter(self, "amqp_messages_given_up_total", "Messages rejected after failing max_redeliveries + 1 times",
            cons.queue):inc()
        local dead = cons.options.dead_letter and (cons.queue .. ".dead_letter") or cons.options.dead_letter_exchange
        local fate = dead and ("dead-lettered to '" .. dead .. "'")
            or "rejected (dropped unless a broker policy dead-letters it)"
        self:log():error(("a message from '%s' failed %d times (max_redeliveries %d); %s. Last error: %s")
            :format(cons.queue, failures, max, fate, tostring(result.error)), fields)
        conn:nack(epoch, dtag, false)
        return
    end
    local delay = math.min(self:option(cons, "redelivery_backoff_ms") * 2 ^ (failures - 1),
        self:option(cons, "redelivery_backoff_max_ms"))
    self:log_failure(cons, result, ("%s (attempt %d of %d; retried in %d ms)"):format(what, failures, max + 1,
        delay), fields)
    -- the message stays unacknowledged meanwhile: it holds one prefetch slot,
    -- so a poison message slows its consumer down instead of spinning
    if not self.stopping and not pcall(suspend_for, delay, self.backoff_waiters) then
        conn:nack(epoch, dtag, true)   -- the task was cancelled: back to the queue now
        return
    end
    if epoch ~= self.epoch or not self.conn then return end   -- the broker redelivers it
    self.counters.redelivered = self.counters.redelivered + 1
    if source == "x-delivery-count" then
        conn:nack(epoch, dtag, true)   -- the broker counts
        return
    end
    -- a classic queue has no count: the message goes back to the queue as a
    -- copy carrying ours, then the original is acked (nacked to the queue
    -- if the copy was not confirmed)
    local copy = {}
    for k, v in pairs(props) do copy[k] = v end
    copy.user_id = nil   -- the broker refuses one that is not our own user
    copy.persistent = props.delivery_mode == 2
    copy.delivery_mode = nil
    copy.headers = {}
    for k, v in pairs(props.headers or {}) do copy.headers[k] = v end
    copy.headers[RETRIES_HEADER] = failures
    local ok = conn:publish("", cons.bound_queue or cons.queue, body, copy, true)
    if ok and epoch == self.epoch then
        conn:ack(epoch, dtag)
    else
        conn:nack(epoch, dtag, true)
    end
end

-- ---------------------------------------------------------------------
-- connection states
-- ---------------------------------------------------------------------

function Client:fail_requests(why)
    for cid, w in pairs(self.rpc_waits) do
        self.rpc_waits[cid] = nil
        w.done, w.err = true, why
        scheduler.wake(w.co)
    end
end

function Client:on_state(state, epoch, err)
    if self.stopping or not self.conn then return end
    if state == "connecting" then
        self.conn_state = "connecting"
        self:set_status(STATUS.CONNECTING)
    elseif state == "failed" then
        local was = self.conn_state
        self.conn_state = "failed"
        self.last_error = err
        local refusal = amqp.login_refusal(err)
        -- while start-up waits for the first connection the resource is
        -- still connecting (/status 503); a refused login is a failure
        self:set_status((self.starting and not refusal) and STATUS.CONNECTING or STATUS.FAILED)
        if refusal then
            -- wrong credentials or vhost: said loudly (once per distinct
            -- reason), start-up does not wait for it; retried at the slowest
            -- back-off in case the broker's users are being set up
            if self.logged_refusal ~= err then
                local info = self.conn:info()
                self:log():error(("the AMQP broker %s:%s refused user '%s' on vhost '%s': %s; check the user, "
                    .. "password and vhost permissions (retrying every %d ms)"):format(info.host, info.port,
                    info.user, info.vhost, refusal, self:setting("reconnect_backoff_max_ms")),
                    { user = info.user, vhost = info.vhost, error = err })
                self.logged_refusal = err
            end
            self.warned_failure = true
            wake_all(self.ready_waiters, nil, err)
            self:fail_requests("connection lost: " .. tostring(err))
            return
        end
        if was == "connected" then
            self:log():warning("AMQP connection lost: " .. tostring(err) .. "; reconnecting", { error = err })
        elseif not self.warned_failure then
            self:log():warning("cannot connect to the AMQP broker: " .. tostring(err) .. "; retrying", { error = err })
        else
            self:log():debug("AMQP connect attempt failed: " .. tostring(err))
        end
        self.warned_failure = true
        self:fail_requests("connection lost: " .. tostring(err))
    elseif state == "connected" then
        self.epoch = epoch
        self.conn_state = "connected"
        self.declared = {}
        self.by_tag = {}
        self.reply_tag = nil
        if not self:setup_all(epoch) then return end
        if epoch ~= self.epoch or self.conn_state ~= "connected" or self.stopping then return end
        self.last_error = nil
        self.warned_failure = false
        self.logged_refusal = nil
        self:set_status(STATUS.STARTED)
        local info = self.conn:info()
        self:log():info((epoch == 1 and "connected to the AMQP broker %s:%s" or "reconnected to the AMQP broker %s:%s")
            :format(info.host, info.port),
            { epoch = epoch, consumers = #self.consumers })
        wake_all(self.ready_waiters, true)
    elseif state == "cancelled" then
        -- the broker cancelled a consumer (its queue was deleted): set it up
        -- again after a pause
        local cons = self.by_tag[err]
        if not cons then return end
        self.by_tag[err] = nil
        cons.tag = nil
        self:log():warning("the broker cancelled the consumer of '" .. cons.queue .. "'; consuming again in 1 s",
            { queue = cons.queue })
        tasks.sleep(1000)
        if epoch == self.epoch and self.conn_state == "connected" and not self.stopping then
            self.declared = {}
            if self:setup_all(epoch) and epoch == self.epoch and not self.stopping then
                self:set_status(STATUS.STARTED)
            end
        end
    end
end

-- ---------------------------------------------------------------------
-- phases
-- ---------------------------------------------------------------------

function Client:start()
    if self.conn then return end
    self:check_settings { port = base.PORT, connection_timeout = base.DURATION, heartbeat = base.COUNT,
        prefetch = base.COUNT, reconnect_backoff_ms = base.DURATION, reconnect_backoff_max_ms = base.DURATION,
        publish_wait_ms = base.DURATION, request_timeout_ms = base.DURATION, drain_timeout_ms = base.DURATION,
        max_redeliveries = base.COUNT, redelivery_backoff_ms = base.DURATION, redelivery_backoff_max_ms = base.DURATION,
        repeated_error_log_ms = base.DURATION, confirm_timeout_ms = base.DURATION }
    local queue_type = self:setting("queue_type")
    if queue_type ~= "classic" and queue_type ~= "quorum" then
        self:settings_error("queue_type", "must be \"classic\" or \"quorum\", not " .. tostring(queue_type))
    end
    self.stopping = false
    self.start_cancelled = false
    local timeout_s = self:setting("connection_timeout")
    local svc_name = self.service and self.service.name or "tamarco"
    local hosts = self:hosts()
    self.conn = c().connect {
        hosts = hosts,
        vhost = tostring(self:setting("vhost")),
        user = tostring(self:setting("user")),
        password = tostring(self:setting("password")),
        heartbeat = tonumber(self:setting("heartbeat")),
        timeout_ms = math.floor(tonumber(timeout_s) * 1000),
        backoff_ms = tonumber(self:setting("reconnect_backoff_ms")),
        backoff_max_ms = tonumber(self:setting("reconnect_backoff_max_ms")),
        confirm_timeout_ms = math.floor(tonumber(self:setting("confirm_timeout_ms"))),
        name = svc_name .. "." .. tostring(self.name or "amqp"),
        on_state = function(...) return self:on_state(...) end,
        on_delivery = function(...) return self:on_delivery(...) end,
    }
    self:set_status(STATUS.CONNECTING)
    -- wait for the first connection (and its consumers), bounded; a stop
    -- requested meanwhile (cancel_start) or a refused login end the wait
    if self.status_code ~= STATUS.STARTED and not self.start_cancelled then
        self.starting = true
        suspend_for(math.floor(tonumber(timeout_s) * 1000) * #hosts + 1000, self.ready_waiters, "amqp connection")
        self.starting = false
        if self.conn_state == "failed" then self:set_status(STATUS.FAILED) end
    end
    if self.start_cancelled then return end
    if self.status_code ~= STATUS.STARTED and not amqp.login_refusal(self.last_error) and not self.setup_error then
        self:log():warning("the AMQP broker is not reachable yet (" .. tostring(self.last_error)
            .. "); the service starts and the connection is retried in the background")
    end
end

--- A stop was requested while the service starts: stop waiting for the broker.
function Client:cancel_start()
    self.start_cancelled = true
    wake_all(self.ready_waiters, nil, "start-up cancelled")
end

--- The broker's reason when it refused the login (wrong user or password:
-- 403 ACCESS_REFUSED; a vhost that does not exist or is not permitted: 530
-- NOT_ALLOWED), else nil.
function amqp.login_refusal(err)
    if type(err) ~= "string" or not err:find("^login to ") then return nil end
    return err:match("(403 ACCESS_REFUSED.*)$") or err:match("(530 NOT_ALLOWED.*)$")
end

-- "h", "h:p" or {host = h, port = p} -> { host = h, port = p }
local function parse_node(self, node, default_port)
    local host, port
    if type(node) == "table" then
        host, port = node.host, node.port or default_port
    elseif type(node) == "string" then
        host, port = node:match("^%[(.+)%]:(%d+)$")
        if not host then host, port = node:match("^([^:]+):(%d+)$") end
        local _, colons = node:gsub(":", "")
        if not host and colons ~= 1 then host, port = node, default_port end   -- a name, or a bare IPv6
    end
    port = tonumber(port)
    if type(host) ~= "string" or host == "" or not port or port < 1 or port > 65535 or port % 1 ~= 0 then
        self:settings_error("hosts", "each node must be \"host\", \"host:port\" or {host = ..., port = ...}, not "
            .. tostring(node))
    end
    return { host = host, port = port }
end

--- The broker nodes to connect to, from `hosts` (a list, or a comma-separated
-- string) or else `host`/`port`; a list starts at a random node so that the
-- instances of a service spread over the cluster.
function Client:hosts()
    local default_port = tonumber(self:setting("port"))
    local list = self:setting("hosts")
    if list == nil or list == "" then
        return { { host = tostring(self:setting("host")), port = default_port } }
    end
    if type(list) == "string" then
        local parts = {}
        for part in list:gmatch("[^,%s]+") do parts[#parts + 1] = part end
        list = parts
    end
    if type(list) ~= "table" or #list == 0 then
        self:settings_error("hosts", "must be a non-empty list of nodes (\"host:port\")")
    end
    local nodes = {}
    for i, node in ipairs(list) do nodes[i] = parse_node(self, node, default_port) end
    local start = math.floor(timer.hrtime() / 1000) % #nodes
    local shuffled = {}
    for i = 1, #nodes do shuffled[i] = nodes[(start + i - 1) % #nodes + 1] end
    return shuffled
end

--- Hot reload: keeps the connection and the consumers; takes the new
-- code's handlers when it consumes the same queues in the same way
-- (otherwise the resource is replaced). Deliveries already handed to a
-- handler finish on the old one.
function Client:adopt(new)
    if #new.consumers ~= #self.consumers then return nil end
    for i, cons in ipairs(self.consumers) do
        local other = new.consumers[i]
        if other.kind ~= cons.kind or other.name ~= cons.name then return nil end
    end
    local saved = {}
    for i, cons in ipairs(self.consumers) do
        saved[i] = { cons.handler, cons.on_error }
        cons.handler, cons.on_error = new.consumers[i].handler, new.consumers[i].on_error
    end
    return function()
        for i, cons in ipairs(self.consumers) do cons.handler, cons.on_error = saved[i][1], saved[i][2] end
    end
end

function Client:stop()
    local conn = self.conn
    if not conn then return end
    self.stopping = true
    if self.conn_state == "connected" then
        for _, cons in ipairs(self.consumers) do
            if cons.tag and cons.epoch == self.epoch then conn:cancel(cons.epoch, cons.tag) end
        end
    end
    wake_all(self.backoff_waiters)   -- failed messages waiting for their retry go back now
    if self.in_flight > 0 then
        local ok = suspend_for(self:setting("drain_timeout_ms"), self.drain_waiters, "amqp drain")
        if not ok then
            self:log():warning(("%d message handlers still running after %d ms; their messages will be redelivered")
                :format(self.in_flight, self:setting("drain_timeout_ms")))
        end
    end
    self:fail_requests("the amqp resource is stopping")
    wake_all(self.ready_waiters)
    conn:close()
    self.conn = nil
    self.conn_state = "closed"
    self.by_tag = {}
end

--- status(): Tamarco's status dict plus the connection (no password).
function Client:status()
    local out = { status = self.status_code, consumers = #self.consumers, in_flight = self.in_flight,
        error = self.setup_error }
    for k, v in pairs(self.counters) do out[k] = v end
    if self.conn then
        local info = self.conn:info()
        out.connection = {
            host = info.host, port = info.port, vhost = info.vhost, user = info.user,
            state = info.state, epoch = info.epoch, last_error = info.last_error,
            reconnects = info.reconnects, published = info.published, delivered = info.delivered,
            acked = info.acked, nacked = info.nacked, stale_settlements = info.stale_settlements,
        }
    else
        out.connection = { state = self.conn_state }
    end
    return out
end

-- ---------------------------------------------------------------------
-- publishing
-- ---------------------------------------------------------------------

local function encode(self, value, opts)
    local codec = codecs.get(opts.codec or self:setting("codec"))
    local body, err = codec.encode(value)
    if body == nil then return nil, "cannot encode the message with the " .. tostring(codec.name) .. " codec: " .. tostring(err) end
    return body, codec
end

local function props_for(codec, opts, persistent)
    return {
        content_type = codec.content_type, persistent = persistent, headers = opts.headers,
        priority = opts.priority, message_id = opts.message_id, correlation_id = opts.correlation_id,
        type = opts.type,
    }
end

--- push(name, value[, opts]) -> true | nil, err. Persistent, confirmed.
function Client:push(name, value, opts)
    check_name(name, "push")
    opts = opts or {}
    local body, codec = encode(self, value, opts)
    if not body then return nil, codec end
    local ok, err = self:wait_connected(opts.wait_ms)
    if not ok then return nil, err end
    local queue = self:queue_name("push_pull", name)
    ok, err = self:ensure_queue(queue)
    if not ok then return nil, err end
    ok, err = self.conn:publish("", queue, body, props_for(codec, opts, true), true)
    tasks.checkpoint()
    if not ok then return nil, err end
    return true
end

--- publish(name, value[, opts]) -> true | nil, err. To every subscriber.
function Client:publish(name, value, opts)
    check_name(name, "publish")
    opts = opts or {}
    local body, codec = encode(self, value, opts)
    if not body then return nil, codec end
    local ok, err = self:wait_connected(opts.wait_ms)
    if not ok then return nil, err end
    local exchange = self:queue_name("publish_subscribe", name)
    ok, err = self:ensure_exchange(exchange, true)
    if not ok then return nil, err end
    ok, err = self.conn:publish(exchange, "", body, props_for(codec, opts, opts.persistent or false),
        opts.confirm or false)
    if opts.confirm then tasks.checkpoint() end
    if not ok then return nil, err end
    return true
end

function Client:ensure_reply_consumer()
    return self:once("reply-to", function()
        local epoch = self.epoch
        local tag = ("tamarco.reply.%d"):format(epoch)
        local got, err = self.conn:consume(epoch, REPLY_TO, tag, 0, true, false)
        if not got then return nil, err end
        if epoch == self.epoch then self.reply_tag = tag end
        return true
    end)
end

--- request(name, value[, opts]) -> reply | nil, "timeout" | nil, err.
function Client:request(name, value, opts)
    check_name(name, "request")
    opts = opts or {}
    local timeout = opts.timeout or self:setting("request_timeout_ms")
    local body, codec = encode(self, value, opts)
    if not body then return nil, codec end
    local ok, err = self:wait_connected(opts.wait_ms)
    if not ok then return nil, err end
    ok, err = self:ensure_reply_consumer()
    if not ok then return nil, "cannot consume replies: " .. tostring(err) end
    self.next_id = self.next_id + 1
    self.counters.requests = self.counters.requests + 1
    local cid = ("%s.%d"):format(self.service and self.service.instance_id or "tamarco", self.next_id)
    local w = { co = scheduler.current() }
    self.rpc_waits[cid] = w
    local props = props_for(codec, opts, false)
    props.reply_to = REPLY_TO
    props.correlation_id = cid
    props.expiration = tostring(math.max(1, math.floor(timeout)))
    ok, err = self.conn:publish("", self:queue_name("request_response", name), body, props, false)
    if not ok then
        self.rpc_waits[cid] = nil
        return nil, err
    end
    local guard = scheduler.spawn(function()
        timer.sleep(timeout)
        if self.rpc_waits[cid] == w then
            self.rpc_waits[cid] = nil
            w.done, w.err = true, "timeout"
            scheduler.wake(w.co)
        end
    end)
    while not w.done do
        scheduler.suspend("amqp rpc " .. name)
        if tasks.is_cancelled(w.co) then
            self.rpc_waits[cid] = nil
            scheduler.interrupt(guard)
            tasks.checkpoint()
        end
    end
    scheduler.interrupt(guard)
    local rbody, rprops = w.body, w.props
    if rbody == nil then
        if w.err == "timeout" then self.counters.timeouts = self.counters.timeouts + 1 end
        return nil, w.err
    end
    if rprops.type == "error" then return nil, "remote error: " .. rbody end
    local reply, derr = codec.decode(rbody)
    if derr ~= nil then return nil, "cannot decode the reply: " .. tostring(derr) end
    return reply
end

--- Administrative helpers (yield): the broker's view of a pattern's queue.
function Client:purge(pattern, name)
    local ok, err = self:wait_connected()
    if not ok then return nil, err end
    return self.conn:purge_queue(self:queue_name(pattern, name))
end

function Client:delete_queue(pattern, name)
    local ok, err = self:wait_connected()
    if not ok then return nil, err end
    local queue = self:queue_name(pattern, name)
    self.declared["queue:" .. queue] = nil
    -- our own consumers of that queue go first (no "cancelled by the broker")
    for i = #self.consumers, 1, -1 do
        local cons = self.consumers[i]
        if cons.queue == queue then
            table.remove(self.consumers, i)
            if cons.tag then
                self.by_tag[cons.tag] = nil
                self.conn:cancel(cons.epoch, cons.tag)
            end
        end
    end
    return self.conn:delete_queue(queue)
end

--- queue_info(pattern, name) -> { messages, consumers } | nil, err
function Client:queue_info(pattern, name)
    local ok, err = self:wait_connected()
    if not ok then return nil, err end
    local queue, messages, consumers = self.conn:declare_queue(self:queue_name(pattern, name), { passive = true })
    if not queue then return nil, messages end
    return { queue = queue, messages = messages, consumers = consumers }
end

return amqp
