/* Fuzz target: the log record encoder (host/log_encode.c): the host's
 * JSON lines and the logstash v0/v1 layouts, fed arbitrary records built
 * from the fuzz bytes (fuzz_push_value), and its JSON string escaping fed
 * the raw bytes. Whatever the record holds, the output must be JSON that
 * the strict decoder (tamarco.c.codec's json_decode) accepts, and a record
 * given in parts must encode as its table does. */
#include "fuzz_lua.h"
#include "log_encode.h"

#include <lauxlib.h>
#include <stdio.h>
#include <string.h>

typedef struct job {
    const uint8_t *data;
    size_t size;
} job;

static void must_decode(lua_State *L, tamarco_buf *b, const char *what)
{
    lua_getglobal(L, "json_decode");
    lua_pushlstring(L, b->data ? b->data : "", b->len);
    lua_call(L, 1, 2);
    if (lua_isnil(L, -2)) {
        lua_pushfstring(L, "%s: %s in %s", what, lua_tostring(L, -1), tamarco_buf_cstr(b));
        fuzz_fail("the log encoder wrote invalid JSON", lua_tostring(L, -1));
    }
    lua_pop(L, 2);
}

/* Reused by every run (its memory stays reachable, not leaked). */
static tamarco_logstash_layout layout;

/* Fails unless got (made from a record's parts) is whole (made from its table). */
static void must_match(tamarco_buf *got, tamarco_buf *whole, const char *what)
{
    if (got->oom || whole->oom)
        return;
    if (whole->len != got->len || memcmp(whole->data, got->data, got->len) != 0) {
        fprintf(stderr, "in parts: %s\n", tamarco_buf_cstr(got));
        fuzz_fail(what, tamarco_buf_cstr(whole));
    }
}

/* The table at 1 as the extra fields of a record given in parts: when an
 * encoder takes them, it must write the bytes the record's table gives. */
static void same_in_parts(lua_State *L, int with_source)
{
    int first = lua_gettop(L) + 1;
    lua_pushliteral(L, "2026-11-30T10:00:00.000Z");
    lua_pushliteral(L, "INFO");
    lua_pushliteral(L, "fuzz.logger");
    lua_pushliteral(L, "a message");
    lua_pushvalue(L, 1);
    if (with_source) {
        lua_pushliteral(L, "/srv/fuzz.lua");
        lua_pushinteger(L, 42);
    } else {
        lua_pushnil(L);
        lua_pushnil(L);
    }
    lua_pushliteral(L, "svc");
    lua_pushnil(L);   /* no deploy_name */
    lua_pushliteral(L, "i-1");
    tamarco_buf logstash, json;
    tamarco_buf_init(&logstash);
    tamarco_buf_init(&json);
    int in_parts = tamarco_log_logstash_parts(&logstash, L, first, &layout);
    if (tamarco_log_json_parts(&json, L, first) != in_parts)
        fuzz_fail("the encoders disagree on which parts need the table", "");
    if (in_parts) {
        /* the record: the extra fields, then the parts' own */
        static const char *const names[] = {
            "@timestamp", "level", "logger", "message", NULL, "source_path", "source_line",
            "service_name", "deploy_name", "service_instance_id",
        };
        lua_newtable(L);
        int record = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, 1)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, record);
        }
        for (int i = 0; i < 10; i++) {
            if (names[i]) {
                lua_pushvalue(L, first + i);
                lua_setfield(L, record, names[i]);
            }
        }
        tamarco_buf whole;
        tamarco_buf_init(&whole);
        tamarco_log_logstash(&whole, L, record, &layout);
        must_match(&logstash, &whole, "a record in parts encodes differently from its table (logstash)");
        whole.len = 0;
        tamarco_log_json_value(&whole, L, record, 1);
        must_match(&json, &whole, "a record in parts encodes differently from its table (json)");
        tamarco_buf_free(&whole);
    }
    tamarco_buf_free(&logstash);
    tamarco_buf_free(&json);
    lua_settop(L, first - 1);
}

/* Runs protected: memory errors of the Lua state unwind to lua_cpcall. */
static int encode_all(lua_State *L)
{
    job *j = lua_touserdata(L, 1);
    lua_settop(L, 0);
    int version = j->size ? j->data[0] & 1 : 0;
    fuzz_push_value(L, j->data, j->size);
    if (!lua_istable(L, 1)) {
        /* a record is a table: put the value in its message */
        lua_createtable(L, 0, 2);
        lua_pushvalue(L, 1);
        lua_setfield(L, -2, "message");
        lua_pushliteral(L, "INFO");
        lua_setfield(L, -2, "level");
        lua_replace(L, 1);
    }
    /* tags: the record's own `tags` when it is a table */
    lua_getfield(L, 1, "tags");
    int tags = lua_istable(L, 2) ? 2 : 0;

    tamarco_buf b;
    tamarco_buf_init(&b);
    tamarco_log_json_value(&b, L, 1, 1);
    if (!b.oom) must_decode(L, &b, "json record");
    b.len = 0;
    tamarco_log_json_value(&b, L, 1, 0);
    if (!b.oom) must_decode(L, &b, "json value");
    b.len = 0;
    /* the sink's host: mostly a plain name, sometimes bytes of the input
     * (invalid UTF-8 too: v0 escapes "<type>://<host>/" once, ahead) */
    const char *host = "fuzz-host";
    size_t host_len = 9;
    if (j->size > 2 && (j->data[0] & 2)) {
        host = (const char *)j->data + 1;
        host_len = j->data[1] % 8 < j->size - 1 ? j->data[1] % 8 : j->size - 1;
    }
    if (tamarco_logstash_layout_set(&layout, L, version, host, host_len, "logstash", 8, tags)) {
        tamarco_log_logstash(&b, L, 1, &layout);
        if (!b.oom) must_decode(L, &b, "logstash record");
        same_in_parts(L, j->size > 1 && (j->data[1] & 1));
    }
    b.len = 0;
    tamarco_log_json_string(&b, (const char *)j->data, j->size);
    if (!b.oom) must_decode(L, &b, "json string");
    tamarco_buf_free(&b);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lua_State *L = fuzz_lua_state();
    lua_getglobal(L, "json_decode");
    if (lua_isnil(L, -1)) {
        lua_getglobal(L, "require");
        lua_pushliteral(L, "tamarco.c.codec");
        lua_call(L, 1, 1);
        lua_getfield(L, -1, "json_decode");
        lua_setglobal(L, "json_decode");
    }
    lua_settop(L, 0);
    job j = { data, size };
    if (lua_cpcall(L, encode_all, &j) != 0) {
        const char *msg = lua_tostring(L, -1);
        if (!msg || !strstr(msg, "memory"))
            fuzz_fail("the log encoder raised", msg);
    }
    return 0;
}
