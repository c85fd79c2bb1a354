-- Tamarco's concurrency example: a task, a timer and a thread.
-- Run: tamarco-host run services/examples/concurrency/service.lua (Ctrl-C stops it)
local tamarco = require "tamarco"

local svc = tamarco.service { name = "concurrency_service" }
svc.ticks = 0

-- A task: a coroutine started after the start phase, cancelled on stop.
svc:task("heartbeat", function(self)
    while true do
        self.logger:info("heartbeat task is alive")
        tamarco.sleep(5000)
    end
end)

-- A timer: runs at once (autostart), then every second.
svc:task_timer({ interval = 1000, autostart = true }, "tick", function(self)
    self.ticks = self.ticks + 1
    self.logger:info("tick", { ticks = self.ticks })
end)

-- A thread: its own OS thread and Lua state; it talks to the service by
-- messages. It must not capture upvalues: it requires what it needs.
svc:thread("summer", function(ctx)
    local total, n = 0, 0
    while not ctx:should_stop() do
        n = n + 1
        for i = 1, 100000 do total = total + i % 7 end
        ctx:send({ round = n, total = total })
        ctx:sleep(1000)
    end
end)

function svc:post_start()
    local summer = self.threads.summer
    summer:on_message(function(msg)
        self.last_sum = msg
        self.logger:info("thread reported", msg)
    end)
end

return svc
