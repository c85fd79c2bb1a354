--- tamarco.ops.debug.routes: defines the /debug routes on a report server. Kept
-- apart from tamarco.ops.debug.pages so that a service pays nothing for them
-- until a /debug request comes (and they answer 404 unless turned on).
local routes = {}

routes.GET = { "/debug", "/debug/", "/debug/tasks", "/debug/profile", "/debug/heap", "/debug/settings" }
routes.PUT = { "/debug/loglevel" }

--- routes.define(server, svc): defines every /debug route on the report
-- server (they answer 404 until the tamarco_debug resource turns them on).
function routes.define(server, svc)
    for method, paths in pairs({ get = routes.GET, put = routes.PUT }) do
        for _, path in ipairs(paths) do
            server[method](server, path, function(req)
                return require("tamarco.ops.debug.pages").handle(svc, path, req)
            end)
        end
    end
end

return routes
