-- `tamarco-host new service`: generates projects with the just-built,
-- uninstalled host, then runs `tamarco-host test` inside them (building the
-- C extension against the host's build tree); checks the generated
-- deployment files and the errors that must touch nothing.
local cli = require "spec.support.cli"
local new_command = require "tamarco.cli.new"
local yaml = require "tamarco.c.yaml"

local function shell_quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function read(path)
    local f = assert(io.open(path, "r"))
    local text = f:read("*a")
    f:close()
    return text
end

local function tmpdir()
    local p = io.popen("mktemp -d \"${TMPDIR:-/tmp}/tamarco-new.XXXXXX\"")
    local dir = p:read("*l")
    p:close()
    return dir
end

-- runs `tamarco-host <args>` in dir -> code, output
local function host_in(dir, args)
    local parts = { "cd", shell_quote(dir), "&&", shell_quote(cli.host) }
    for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
    local p = io.popen(table.concat(parts, " ") .. " 2>&1; echo \"exit=$?\"")
    local output = p:read("*a")
    p:close()
    return tonumber(output:match("exit=(%d+)%s*$")), output
end

local function listing(dir)
    local p = io.popen("cd " .. shell_quote(dir) .. " && find . | sort")
    local out = p:read("*a")
    p:close()
    return out
end

describe("tamarco-host new service", function()
    local base
    setup(function() base = tmpdir() end)
    teardown(function() os.execute("rm -rf " .. shell_quote(base)) end)

    it("generates a project whose spec passes with `tamarco-host test`", function()
        local code, output = cli.run({ "new", "service", "orders", "--dir", base .. "/orders" })
        assert.are.equal(0, code, output)
        for _, file in ipairs({ "service.lua", "settings.yml", "spec/orders_spec.lua", "README.md", ".gitignore",
            "Dockerfile", "deploy/orders.service", "deploy/kubernetes.yml" }) do
            assert.is_truthy(io.open(base .. "/orders/" .. file), file .. " missing")
        end
        assert.is_falsy(io.open(base .. "/orders/c/CMakeLists.txt"))
        assert.is_nil(read(base .. "/orders/service.lua"):find("{{", 1, true))
        local test_code, test_output = host_in(base .. "/orders", { "test" })
        assert.are.equal(0, test_code, test_output)
        assert.matches("1 success / 0 failures / 0 errors / 0 pending", test_output)
    end)

    it("with --with-c-extension builds the C module against the uninstalled host and tests it", function()
        local code, output = cli.run({ "new", "service", "img-resizer", "--dir", base .. "/img", "--with-c-extension" })
        assert.are.equal(0, code, output)
        assert.is_truthy(io.open(base .. "/img/c/CMakeLists.txt"))
        assert.is_truthy(io.open(base .. "/img/c/img_resizer_native.c"))
        assert.matches("find_package%(TamarcoHost REQUIRED%)", read(base .. "/img/c/CMakeLists.txt"))
        assert.matches("tamarco_add_extension%(img_resizer_native", read(base .. "/img/c/CMakeLists.txt"))
        local test_code, test_output = host_in(base .. "/img", { "test" })
        assert.are.equal(0, test_code, test_output)
        assert.matches("4 successes / 0 failures / 0 errors / 0 pending", test_output)
        assert.is_truthy(io.open(base .. "/img/build/img_resizer_native.so"))
    end)

    it("writes a Kubernetes Deployment with probes on /status and Prometheus annotations", function()
        assert.are.equal(0, (cli.run({ "new", "service", "k8s_demo", "--dir", base .. "/k8s" })))
        local doc = yaml.parse(read(base .. "/k8s/deploy/kubernetes.yml"))
        assert.are.equal("apps/v1", doc.apiVersion)
        assert.are.equal("Deployment", doc.kind)
        assert.are.equal("k8s-demo", doc.metadata.name)   -- DNS-1123: '_' became '-'
        local template = doc.spec.template
        assert.are.same(doc.spec.selector.matchLabels, template.metadata.labels)
        local annotations = template.metadata.annotations
        assert.are.equal("true", annotations["prometheus.io/scrape"])
        assert.are.equal("5747", annotations["prometheus.io/port"])
        assert.are.equal("/metrics", annotations["prometheus.io/path"])
        local container = template.spec.containers[1]
        for _, probe in ipairs({ "livenessProbe", "readinessProbe" }) do
            assert.are.equal("/status", container[probe].httpGet.path, probe)
            assert.are.equal(5747, container[probe].httpGet.port, probe)
        end
        -- etcd's members from the namespace's ConfigMap; the pod's IP registered
        local configmap = yaml.parse(read(base .. "/k8s/deploy/etcd.yml"))
        assert.are.equal("ConfigMap", configmap.kind)
        assert.is_string(configmap.data.endpoints)
        local env = {}
        for _, e in ipairs(container.env) do env[e.name] = e end
        assert.are.equal(configmap.metadata.name, env.TAMARCO_ETCD_ENDPOINTS.valueFrom.configMapKeyRef.name)
        assert.are.equal("endpoints", env.TAMARCO_ETCD_ENDPOINTS.valueFrom.configMapKeyRef.key)
        assert.are.equal("status.podIP", env.POD_IP.valueFrom.fieldRef.fieldPath)
        assert.are.equal("$(POD_IP)", env.TAMARCO__SYSTEM__RESOURCES__REGISTRY__HOST.value)
        local unit = read(base .. "/k8s/deploy/k8s_demo.service")
        assert.matches("\nType=notify\n", unit)
        assert.matches("ExecStart=/usr/bin/tamarco%-host run /srv/k8s_demo/service.lua", unit)
        local dockerfile = read(base .. "/k8s/Dockerfile")
        assert.matches("\nFROM debian:12\n", dockerfile)
        assert.matches("tamarco%-host_%*%.deb", dockerfile)
        local settings = yaml.parse(read(base .. "/k8s/settings.yml"))
        assert.are.equal(8080, settings.system.resources.api.port)
        assert.are.equal(5747, settings.system.resources.tamarco_http_report_server.port)
        assert.is_table(settings.system.microservices.k8s_demo)
    end)

    it("rejects invalid names with exit code 2 and writes nothing", function()
        for _, name in ipairs({ "Orders", "1orders", "or ders", "orders-", "a/b", "ørders", ("x"):rep(51) }) do
            local before = listing(base)
            local code, output = cli.run({ "new", "service", name, "--dir", base .. "/invalid" })
            assert.are.equal(2, code, name)
            assert.matches("invalid service name", output, 1, true)
            assert.are.equal(before, listing(base))
        end
        local code, output = cli.run({ "new", "service" })
        assert.are.equal(2, code)
        assert.matches("missing the service NAME", output)
        code, output = cli.run({ "new", "widget", "x" })
        assert.are.equal(2, code)
        assert.matches("unknown kind 'widget'", output)
    end)

    it("never touches an existing target directory", function()
        os.execute("mkdir -p " .. shell_quote(base .. "/existing") .. " && echo keep > " .. shell_quote(base .. "/existing/service.lua"))
        local before = listing(base)
        local code, output = cli.run({ "new", "service", "existing", "--dir", base .. "/existing" })
        assert.are.equal(2, code)
        assert.matches("already exists", output)
        assert.are.equal("keep\n", read(base .. "/existing/service.lua"))
        assert.are.equal(before, listing(base))
    end)

    it("reports unwritable paths with exit code 2 and leaves nothing behind", function()
        local file = base .. "/a-file"
        os.execute("touch " .. shell_quote(file))
        local before = listing(base)
        local code, output = cli.run({ "new", "service", "x", "--dir", file .. "/x" })
        assert.are.equal(2, code)
        assert.matches("is not a directory", output)
        code, output = cli.run({ "new", "service", "x", "--dir", base .. "/missing/parent/x" })
        assert.are.equal(2, code)
        assert.matches("does not exist", output)
        -- a read-only directory (root ignores modes: /sys is read-only for everyone)
        local readonly = base .. "/ro"
        os.execute("mkdir " .. shell_quote(readonly) .. " && chmod 555 " .. shell_quote(readonly))
        before = listing(base)
        local target = io.popen("id -u"):read("*l") == "0" and "/sys/tamarco-x" or readonly .. "/x"
        code, output = cli.run({ "new", "service", "x", "--dir", target })
        assert.are.equal(2, code, output)
        assert.matches("not writable", output)
        assert.are.equal(before, listing(base))
        os.execute("chmod 755 " .. shell_quote(readonly))
    end)

    it("renders placeholders and optional blocks", function()
        local flags = { c = false }
        assert.are.equal("a x b\nend", new_command.render("a {{name}} b\n{{#c}}\nonly c\n{{/c}}\nend", { name = "x" }, flags))
        assert.are.equal("a x b\nonly c\nend", new_command.render("a {{name}} b\n{{#c}}\nonly c\n{{/c}}\nend", { name = "x" }, { c = true }))
        assert.has_error(function() new_command.render("{{nope}}", {}, {}) end)
    end)
end)
