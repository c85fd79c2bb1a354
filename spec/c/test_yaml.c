/* C unit test of tamarco.c.yaml: opened directly on a bare Lua state. */
#include "host.h"

#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>

static int failures;

#define CHECK(cond, what)                                                   \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "%s:%d: FAIL: %s\n", __FILE__, __LINE__, what); \
            failures++;                                                     \
        }                                                                   \
    } while (0)

/* Calls yaml.<fn>(arg) leaving its results on the stack; returns their count. */
static int call(lua_State *L, const char *fn, const char *arg)
{
    int base = lua_gettop(L);
    lua_getglobal(L, "yaml");
    lua_getfield(L, -1, fn);
    lua_remove(L, -2);
    lua_pushstring(L, arg);
    if (lua_pcall(L, 1, LUA_MULTRET, 0) != 0) {
        fprintf(stderr, "error: %s\n", lua_tostring(L, -1));
        failures++;
        return -1;
    }
    return lua_gettop(L) - base;
}

static void test_scalars(lua_State *L)
{
    int n = call(L, "parse", "{a: 1, b: 0x10, c: yes, d: '7', e: ~, f: 1e3, g: text}");
    CHECK(n == 1 && lua_istable(L, -1), "parse returns a table");
    lua_getfield(L, -1, "a");
    CHECK(lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) == 1, "a = 1");
    lua_getfield(L, -2, "b");
    CHECK(lua_tonumber(L, -1) == 16, "b = 0x10");
    lua_getfield(L, -3, "c");
    CHECK(lua_type(L, -1) == LUA_TBOOLEAN && lua_toboolean(L, -1), "c = true");
    lua_getfield(L, -4, "d");
    CHECK(lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "7") == 0, "d = '7'");
    lua_getfield(L, -5, "e");
    CHECK(lua_isnil(L, -1), "e = null");
    lua_getfield(L, -6, "f");
    CHECK(lua_tonumber(L, -1) == 1000, "f = 1e3");
    lua_getfield(L, -7, "g");
    CHECK(strcmp(lua_tostring(L, -1), "text") == 0, "g = text");
    lua_settop(L, 0);
}

static void test_sequence_mt(lua_State *L)
{
    int n = call(L, "parse", "[]");
    CHECK(n == 1 && lua_istable(L, -1), "[] is a table");
    CHECK(lua_getmetatable(L, -1), "[] has a metatable");
    lua_getglobal(L, "yaml");
    lua_getfield(L, -1, "sequence_mt");
    CHECK(lua_rawequal(L, -1, -3), "it is yaml.sequence_mt");
    lua_settop(L, 0);
}

static void test_error(lua_State *L)
{
    lua_getglobal(L, "yaml");
    lua_getfield(L, -1, "parse");
    lua_pushstring(L, "a: b: c");
    lua_pushstring(L, "settings.yml");
    CHECK(lua_pcall(L, 2, 4, 0) == 0, "parse does not raise on bad YAML");
    CHECK(lua_isnil(L, -4), "nil on error");
    CHECK(strcmp(lua_tostring(L, -3), "settings.yml:1:5: mapping values are not allowed in this context") == 0,
          "message with name, line and column");
    CHECK(lua_tointeger(L, -2) == 1 && lua_tointeger(L, -1) == 5, "line 1, column 5");
    lua_settop(L, 0);

    /* argument mistakes raise */
    lua_getglobal(L, "yaml");
    lua_getfield(L, -1, "parse");
    lua_newtable(L);
    CHECK(lua_pcall(L, 1, 1, 0) != 0, "parse({}) raises");
    lua_settop(L, 0);
}

static void test_limits(lua_State *L)
{
    char deep[2 * 600 + 1];
    memset(deep, '[', 600);
    memset(deep + 600, ']', 600);
    deep[1200] = '\0';
    int n = call(L, "parse", deep);
    CHECK(n == 4 && lua_isnil(L, -4), "deep nesting is an error");
    CHECK(n == 4 && strstr(lua_tostring(L, -3), "nesting deeper"), "deep nesting message");
    lua_settop(L, 0);

    const char *bomb =
        "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
        "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
        "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
        "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
        "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\n";
    n = call(L, "parse", bomb);
    CHECK(n == 4 && lua_isnil(L, -4), "alias bomb is an error");
    CHECK(n == 4 && strstr(lua_tostring(L, -3), "nodes"), "alias bomb message");
    lua_settop(L, 0);
}

static void test_load_file(lua_State *L)
{
    char path[] = "/tmp/tamarco-yaml-test-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd < 0)
        return;
    const char *text = "system:\n  port: 8080\n  list: [a, b]\n";
    CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text), "write");
    close(fd);
    int n = call(L, "load_file", path);
    CHECK(n == 1 && lua_istable(L, -1), "load_file returns a table");
    lua_getfield(L, -1, "system");
    lua_getfield(L, -1, "port");
    CHECK(lua_tonumber(L, -1) == 8080, "system.port");
    lua_settop(L, 0);
    unlink(path);

    n = call(L, "load_file", path);
    CHECK(n == 2 && lua_isnil(L, -2), "a missing file is nil, message");
    CHECK(n == 2 && strstr(lua_tostring(L, -1), path), "the message names the path");
    lua_settop(L, 0);
}

int main(void)
{
    lua_State *L = luaL_newstate();
    if (!L)
        return 1;
    luaL_openlibs(L);
    lua_pushcfunction(L, luaopen_tamarco_c_yaml);
    lua_call(L, 0, 1);
    lua_setglobal(L, "yaml");

    test_scalars(L);
    test_sequence_mt(L);
    test_error(L);
    test_limits(L);
    test_load_file(L);

    lua_close(L);
    if (failures) {
        fprintf(stderr, "test_yaml: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_yaml: ok\n");
    return 0;
}
