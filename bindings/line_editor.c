/*
 * tamarco.c.line_editor: line editing and history for `tamarco-host
 * console`, through Debian's libedit (its readline interface). A loadable
 * module: only the console client pays for libedit.
 *
 *   readline(prompt) -> line | nil at end of input (Ctrl-D)
 *   add_history(line)
 *   read_history(path) -> true | nil, message
 *   write_history(path) -> true | nil, message
 *   stifle_history(max)
 */
#include <lua.h>
#include <lauxlib.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <editline/readline.h>

static int l_readline(lua_State *L)
{
    const char *prompt = luaL_optstring(L, 1, "> ");
    char *line = readline(prompt);
    if (!line)
        return 0;
    lua_pushstring(L, line);
    free(line);
    return 1;
}

static int l_add_history(lua_State *L)
{
    add_history(luaL_checkstring(L, 1));
    return 0;
}

static int history_result(lua_State *L, int rc)
{
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, strerror(rc > 0 ? rc : errno));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_read_history(lua_State *L)
{
    return history_result(L, read_history(luaL_checkstring(L, 1)));
}

static int l_write_history(lua_State *L)
{
    return history_result(L, write_history(luaL_checkstring(L, 1)));
}

static int l_stifle_history(lua_State *L)
{
    stifle_history((int)luaL_checkinteger(L, 1));
    return 0;
}

int luaopen_tamarco_c_line_editor(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"readline", l_readline},
        {"add_history", l_add_history},
        {"read_history", l_read_history},
        {"write_history", l_write_history},
        {"stifle_history", l_stifle_history},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
