/*
 * Class registration for the userdata types bindings hand to Lua (a
 * connection, a stream, a thread handle): one metatable in the registry
 * under `name`, methods behind __index, an optional finalizer and
 * tostring. Registered once per state; loading the module again reuses it.
 */
#ifndef TAMARCO_LUA_CLASS_H
#define TAMARCO_LUA_CLASS_H

#include <lua.h>
#include <lauxlib.h>

/* methods may be NULL (no __index); gc and tostring may be NULL. Leaves
 * the stack as it found it. */
void tamarco_class_register(lua_State *L, const char *name, const luaL_Reg *methods,
                            lua_CFunction gc, lua_CFunction tostring);

/* Pushes a new table holding funcs: a module's table. */
void tamarco_module_new(lua_State *L, const luaL_Reg *funcs);

#endif
