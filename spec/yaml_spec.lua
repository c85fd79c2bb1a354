local yaml = require "tamarco.c.yaml"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
local fixtures = here .. "/fixtures/settings/"

local function load(name)
    local value, err = yaml.load_file(fixtures .. name)
    assert(value, err)
    return value
end

describe("yaml.parse", function()
    describe("scalars, typed like PyYAML's safe_load", function()
        local doc = load("types.yml")

        it("reads integers: decimal, hex, octal, binary, separators", function()
            local i = doc.integers
            assert.are.equal(42, i.decimal)
            assert.are.equal(-17, i.negative)
            assert.are.equal(1000000, i.underscores)
            assert.are.equal(31, i.hex)
            assert.are.equal(15, i.octal)
            assert.are.equal(493, i.octal_yaml11)
            assert.are.equal(5, i.binary)
            assert.are.equal("number", type(i.big))
        end)

        it("reads floats, infinities and NaN", function()
            local f = doc.floats
            assert.are.equal(1.5, f.simple)
            assert.are.equal(1000, f.exponent)
            assert.are.equal(-0.025, f.negative_exponent)
            assert.are.equal(0.5, f.leading_dot)
            assert.are.equal(math.huge, f.inf)
            assert.are.equal(-math.huge, f.minus_inf)
            assert.is_true(f.nan ~= f.nan)
        end)

        it("reads YAML 1.1 booleans", function()
            assert.are.same({ true, false, true, false, true, false, true, false }, doc.booleans)
        end)

        it("reads nulls as absent keys", function()
            assert.is_nil(doc.nulls.tilde)
            assert.is_nil(doc.nulls.word)
            assert.is_nil(doc.nulls.empty)
            assert.are.same({ kept = "here" }, doc.nulls)
        end)

        it("keeps quoted scalars and non-numbers as strings", function()
            local s = doc.strings
            assert.are.equal("hello world", s.plain)
            assert.are.equal("42", s.quoted_number)
            assert.are.equal("yes", s.single_quoted_bool)
            assert.are.equal("09", s.not_octal)
            assert.are.equal("1.2.3", s.version)
            assert.are.equal("12:30", s.time)
            assert.are.equal("2001-12-14", s.date)
            assert.are.equal("line one\nline two\n", s.block)
            assert.are.equal("folded text\n", s.folded)
        end)

        it("honours explicit tags", function()
            local t = doc.tags
            assert.are.equal("123", t.str)
            assert.are.equal(42, t.int)
            assert.are.equal(3, t.float)
            assert.are.equal(true, t.bool)
            assert.is_nil(t.null_tag)
            assert.are.equal("12", t.nonspecific)
        end)

        it("types mapping keys like values", function()
            assert.are.equal("http", doc.keys[8080])
            assert.are.equal("one and a half", doc.keys[1.5])
            assert.are.equal("yes key", doc.keys[true])
            assert.are.equal("quoted key", doc.keys["8081"])
        end)

        it("marks sequences, empty ones too, so that [] and {} differ", function()
            assert.are.equal(yaml.sequence_mt, getmetatable(doc.empty_list))
            assert.is_true(yaml.is_sequence(doc.list))
            assert.is_true(yaml.is_sequence(doc.empty_list))
            assert.is_false(yaml.is_sequence(doc.empty_map))
            assert.is_nil(getmetatable(doc.empty_map))
            assert.are.equal(0, #doc.empty_list)
            assert.is_nil(next(doc.empty_map))
            assert.are.same({ 1, "two", 3 }, doc.list)
        end)
    end)

    it("rejects invalid explicit tags and unknown tags", function()
        local v, err = yaml.parse("a: !!int nope", "t.yml")
        assert.is_nil(v)
        assert.matches("t.yml:1:4: invalid !!int value 'nope'", err, 1, true)
        v, err = yaml.parse("a: !!python/object x")
        assert.is_nil(v)
        assert.matches("unsupported tag", err)
    end)

    describe("anchors, aliases, merge keys", function()
        local doc = load("anchors.yml")

        it("merges with explicit keys winning", function()
            assert.are.same({ host = "localhost", port = 5432, options = { "a", "b" }, database = "dev" },
                doc.development)
            assert.are.same({ host = "db.example.com", port = 5432, options = { "a", "b" }, database = "prod" },
                doc.production)
        end)

        it("merges a list of mappings, earlier ones winning", function()
            assert.are.equal(5432, doc.both.port)
            assert.are.equal(true, doc.both.extra)
            assert.are.equal("both", doc.both.database)
        end)

        it("resolves aliases of sequences and scalars", function()
            assert.are.same({ "a", "b" }, doc.options_copy)
            assert.is_true(yaml.is_sequence(doc.options_copy))
            assert.are.equal("shared", doc.scalar_copy)
        end)

        it("gives each alias its own copy", function()
            assert.are_not.equal(doc.base.options, doc.options_copy)
            assert.are_not.equal(doc.development.options, doc.production.options)
            doc.options_copy[1] = "changed"
            assert.are.equal("a", doc.base.options[1])
        end)

        it("reports an undefined alias", function()
            local v, err, line, col = yaml.parse("a: 1\nb: *nope\n")
            assert.is_nil(v)
            assert.matches("undefined alias 'nope'", err)
            assert.are.equal(2, line)
            assert.are.equal(4, col)
        end)

        it("rejects a recursive alias", function()
            local v, err = yaml.parse("a: &x [1, *x]")
            assert.is_nil(v)
            assert.matches("undefined alias", err)
        end)
    end)

    describe("errors", function()
        it("returns nil, message, line, column on a syntax error", function()
            local v, err, line, col = yaml.parse("system:\n  a: 1\n  b: c: d\n", "settings.yml")
            assert.is_nil(v)
            assert.are.equal("settings.yml:3:7: mapping values are not allowed in this context", err)
            assert.are.equal(3, line)
            assert.are.equal(7, col)
        end)

        it("names the file in load_file errors", function()
            local v, err, line, col = yaml.load_file(fixtures .. "syntax_error.yml")
            assert.is_nil(v)
            assert.matches("syntax_error.yml:4:17: mapping values are not allowed", err, 1, true)
            assert.are.same({ 4, 17 }, { line, col })
        end)

        it("reports a missing file with its path", function()
            local v, err = yaml.load_file("/nonexistent/dir/settings.yml")
            assert.is_nil(v)
            assert.matches("/nonexistent/dir/settings.yml: No such file", err, 1, true)
        end)

        it("raises on argument mistakes", function()
            assert.has_error(function() yaml.parse() end)
            assert.has_error(function() yaml.parse({}) end)
            assert.has_error(function() yaml.load_file(nil) end)
        end)

        it("rejects collections, nulls and NaN as keys", function()
            assert.is_nil((yaml.parse("? [a]\n: 1\n")))
            assert.is_nil((yaml.parse("~: 1\n")))
            assert.is_nil((yaml.parse(".nan: 1\n")))
        end)
    end)

    describe("documents", function()
        it("returns nil without error for an empty stream or document", function()
            assert.are.equal(1, select("#", yaml.parse("")))
            assert.is_nil(yaml.parse(""))
            assert.is_nil(yaml.parse("# only a comment\n"))
            assert.is_nil(yaml.parse("---\n...\n"))
        end)

        it("returns the first of several documents", function()
            assert.are.same({ a = 1 }, yaml.parse("a: 1\n---\nb: 2\n"))
        end)

        it("returns a top-level scalar or sequence", function()
            assert.are.equal(5, yaml.parse("5"))
            assert.are.equal("x", yaml.parse("'x'"))
            assert.are.same({ 1, 2 }, yaml.parse("[1, 2]"))
        end)

        it("lets the last of duplicate keys win", function()
            assert.are.same({ a = 2 }, yaml.parse("a: 1\na: 2\n"))
        end)

        it("leaves holes for nulls in sequences", function()
            local t = yaml.parse("[1, ~, 3]")
            assert.are.equal(1, t[1])
            assert.is_nil(t[2])
            assert.are.equal(3, t[3])
        end)
    end)

    describe("options for tools that keep every type", function()
        local NULL = {}
        local function float(n) return { float = n } end

        it("keeps nulls as options.null in mappings and sequences", function()
            local t = yaml.parse("a: ~\nb: null\nc:\nlist: [1, ~, 3]\n", "t", { null = NULL })
            assert.are.equal(NULL, t.a)
            assert.are.equal(NULL, t.b)
            assert.are.equal(NULL, t.c)
            assert.are.equal(NULL, t.list[2])
            assert.are.equal(3, #t.list)
        end)

        it("passes floats, not integers, through options.float", function()
            local t = yaml.parse("whole: 1.0\nexp: 1e3\ntagged: !!float 2\nint: 1\nhex: 0x10\n"
                .. "half: .5\n1.5: key stays a number\n", "t", { float = float })
            assert.are.same({ float = 1 }, t.whole)
            assert.are.same({ float = 1000 }, t.exp)
            assert.are.same({ float = 2 }, t.tagged)
            assert.are.same({ float = 0.5 }, t.half)
            assert.are.equal(1, t.int)
            assert.are.equal(16, t.hex)
            assert.are.equal("key stays a number", t[1.5])
        end)

        it("still rejects null keys and checks the options", function()
            local v, err = yaml.parse("~: x\n", "t", { null = NULL })
            assert.is_nil(v)
            assert.matches("null mapping keys", err)
            assert.has_error(function() yaml.parse("a: 1", "t", { float = 3 }) end)
            assert.are.same({ a = 1 }, yaml.parse("a: 1", "t"))
        end)
    end)

    describe("limits against hostile input", function()
        it("accepts nesting up to max_depth and rejects deeper", function()
            local ok = yaml.parse(string.rep("[", yaml.max_depth) .. string.rep("]", yaml.max_depth))
            assert.is_table(ok)
            local v, err = yaml.parse(string.rep("[", yaml.max_depth + 1) .. string.rep("]", yaml.max_depth + 1))
            assert.is_nil(v)
            assert.matches("nesting deeper than 512 levels", err)
            v, err = yaml.parse(string.rep("[", 100000))
            assert.is_nil(v)
            assert.matches("nesting deeper", err)
        end)

        it("rejects deep nesting made through aliases", function()
            local deep = string.rep("[", 300) .. string.rep("]", 300)
            local v, err = yaml.parse("a: &d " .. deep .. "\nb: " .. string.rep("[", 300) .. "*d" .. string.rep("]", 300))
            assert.is_nil(v)
            assert.matches("nesting deeper", err)
        end)

        it("stops an alias bomb (billion laughs) past max_nodes", function()
            local lines = { "a: &a [x, x, x, x, x, x, x, x, x, x]" }
            local prev = "a"
            for i = 1, 9 do
                local name = string.char(("a"):byte() + i)
                lines[#lines + 1] = ("%s: &%s [*%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s]")
                    :format(name, name, prev, prev, prev, prev, prev, prev, prev, prev, prev, prev)
                prev = name
            end
            local started = os.clock()
            local v, err = yaml.parse(table.concat(lines, "\n"))
            assert.is_nil(v)
            assert.matches("more than 1000000 nodes", err)
            assert.is_true(os.clock() - started < 5)
        end)
    end)

    describe("resolve", function()
        it("types a plain scalar", function()
            assert.are.equal(5, yaml.resolve("5"))
            assert.are.equal(true, yaml.resolve("yes"))
            assert.is_nil(yaml.resolve(""))
            assert.are.equal("a: b", yaml.resolve("a: b"))
            assert.are.equal("PRODUCTION", yaml.resolve("PRODUCTION"))
        end)
    end)
end)
