/* Class registration (see lua_class.h). */
#include "lua_class.h"

void tamarco_class_register(lua_State *L, const char *name, const luaL_Reg *methods,
                            lua_CFunction gc, lua_CFunction tostring)
{
    if (luaL_newmetatable(L, name)) {
        if (methods) {
            lua_newtable(L);
            luaL_register(L, NULL, methods);
            lua_setfield(L, -2, "__index");
        }
        if (gc) {
            lua_pushcfunction(L, gc);
            lua_setfield(L, -2, "__gc");
        }
        if (tostring) {
            lua_pushcfunction(L, tostring);
            lua_setfield(L, -2, "__tostring");
        }
    }
    lua_pop(L, 1);
}

void tamarco_module_new(lua_State *L, const luaL_Reg *funcs)
{
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
}
