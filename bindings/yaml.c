/* placeholder: being written */
#include "host.h"
int luaopen_tamarco_c_yaml(lua_State *L) { lua_newtable(L); return 1; }
