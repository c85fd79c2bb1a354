/* C unit test of the log encoder: JSON string escaping, number formatting,
 * timestamps and the Lua value walk (through tamarco.c.log). */
#include "host.h"
#include "log_encode.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int failures;

static void expect_eq(const char *what, const char *got, const char *want)
{
    if (strcmp(got, want) != 0) {
        fprintf(stderr, "FAIL %s\n  got:  %s\n  want: %s\n", what, got, want);
        failures++;
    }
}

static void check_string(const char *in, size_t len, const char *want)
{
    tamarco_buf b;
    tamarco_buf_init(&b);
    tamarco_log_json_string(&b, in, len);
    expect_eq("json string", tamarco_buf_cstr(&b), want);
    tamarco_buf_free(&b);
}
#define STR(lit, want) check_string(lit, sizeof(lit) - 1, want)

static void check_number(double n, const char *want)
{
    tamarco_buf b;
    tamarco_buf_init(&b);
    tamarco_log_json_number(&b, n);
    expect_eq("json number", tamarco_buf_cstr(&b), want);
    tamarco_buf_free(&b);
}

static void check_lua(lua_State *L, const char *chunk, const char *want)
{
    if (luaL_dostring(L, chunk) != 0) {
        fprintf(stderr, "FAIL lua chunk %s: %s\n", chunk, lua_tostring(L, -1));
        failures++;
        lua_settop(L, 0);
        return;
    }
    expect_eq(chunk, lua_tostring(L, -1), want);
    lua_settop(L, 0);
}

int main(void)
{
    /* escaping */
    STR("plain", "\"plain\"");
    STR("", "\"\"");
    STR("a\"b\\c/d", "\"a\\\"b\\\\c/d\"");
    STR("\n\r\t\b\f", "\"\\n\\r\\t\\b\\f\"");
    STR("\x01\x1f\x7f", "\"\\u0001\\u001f\\u007f\"");
    STR("nul\0byte", "\"nul\\u0000byte\"");
    STR("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");
    STR("\xe2\x80\xa8\xe2\x80\xa9", "\"\\u2028\\u2029\"");
    /* invalid UTF-8: lone continuation, overlong, surrogate, > U+10FFFF, truncated */
    STR("a\x80z", "\"a\\ufffdz\"");
    STR("\xc0\xaf", "\"\\ufffd\\ufffd\"");
    STR("\xed\xa0\x80", "\"\\ufffd\\ufffd\\ufffd\"");
    STR("\xf4\x90\x80\x80", "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");
    STR("\xe2\x82", "\"\\ufffd\\ufffd\"");
    STR("\xff", "\"\\ufffd\"");

    /* numbers */
    check_number(0, "0");
    check_number(-0.0, "0");
    check_number(1, "1");
    check_number(-42, "-42");
    check_number(1e15, "1000000000000000");
    check_number(9007199254740993.0, "9007199254740992");
    check_number(1.5, "1.5");
    check_number(0.1, "0.1");
    check_number(-2.25, "-2.25");
    check_number(1.0 / 3.0, "0.33333333333333331");
    check_number(1e300, "1e+300");
    check_number(1e-7, "1e-07");
    check_number(INFINITY, "null");
    check_number(-INFINITY, "null");
    check_number(NAN, "null");

    /* timestamps */
    char ts[40];
    tamarco_log_iso8601(ts, sizeof ts, 1795946400.123);
    expect_eq("timestamp", ts, "2026-11-29T10:00:00.123Z");
    tamarco_log_iso8601(ts, sizeof ts, 0.9996);
    expect_eq("timestamp rounding", ts, "1970-01-01T00:00:01.000Z");
    if (tamarco_log_iso8601(ts, sizeof ts, NAN) != -1) {
        fprintf(stderr, "FAIL timestamp of NaN should fail\n");
        failures++;
    }

    /* the Lua value walk, through the binding */
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_pushcfunction(L, luaopen_tamarco_c_log);
    lua_call(L, 0, 1);
    lua_setglobal(L, "clog");
    check_lua(L, "return clog.encode_json{ message = 'm', level = 'INFO', z = 1, a = { 1, 2 } }",
              "{\"level\":\"INFO\",\"message\":\"m\",\"a\":[1,2],\"z\":1}");
    check_lua(L, "return clog.encode_json{ [1] = 'a', [3] = 'c', [2.5] = 'h', [true] = 't' }",
              "{\"1\":\"a\",\"2.5\":\"h\",\"3\":\"c\",\"true\":\"t\"}");
    check_lua(L, "local t = {} t.t = t return clog.encode_json(t)", "{\"t\":\"<cycle>\"}");
    check_lua(L, "return clog.encode_json{ e = {}, f = print, x = { y = {} }, n = 0/0 }",
              "{\"e\":{},\"f\":\"<function>\",\"n\":null,\"x\":{\"y\":{}}}");
    check_lua(L, "return clog.encode_json{ a = { b = { } , c = 1 } }", "{\"a\":{\"b\":{},\"c\":1}}");
    check_lua(L, "return clog.encode_json{ a = { [print] = 1 }, b = { { x = 1 } }, c = 2 }",
              "{\"a\":{},\"b\":[{\"x\":1}],\"c\":2}");

    /* logstash layouts: Tamarco's fields, in a fixed order */
    check_lua(L, "return clog.encode_logstash({ ['@timestamp'] = 'T', level = 'INFO', logger = 'svc',"
                 " message = 'm', service_name = 'svc', source_path = '/s.lua', source_line = 7,"
                 " tags = { 'u' }, path = 'p', n = 1 }, 1, 'h', nil, { 'c' })",
              "{\"@timestamp\":\"T\",\"@version\":\"1\",\"message\":\"m\",\"host\":\"h\","
              "\"path\":\"/s.lua\",\"tags\":[\"c\",\"u\"],\"type\":\"logstash\",\"level\":\"INFO\","
              "\"logger_name\":\"svc\",\"service_name\":\"svc\",\"n\":1,\"extra_path\":\"p\"}");
    check_lua(L, "return clog.encode_logstash({ ['@timestamp'] = 'T', level = 'ERROR', logger = 'svc',"
                 " message = 'm', source_line = 7, traceback = 'tb', process = 1, thread_name = 'w' }, 0, 'h', 'record')",
              "{\"@timestamp\":\"T\",\"@message\":\"m\",\"@source\":\"record://h/svc\","
              "\"@source_host\":\"h\",\"@source_path\":\"svc\",\"@tags\":[],\"@type\":\"record\","
              "\"@fields\":{\"levelname\":\"ERROR\",\"logger\":\"svc\",\"process\":1,"
              "\"thread_name\":\"w\",\"stack_trace\":\"tb\",\"lineno\":7}}");
    lua_close(L);

    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("test_log_encode: ok\n");
    return 0;
}
