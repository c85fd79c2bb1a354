/* The JSON codec (bindings/json.c), registered into tamarco.c.codec. */
#ifndef TAMARCO_JSON_H
#define TAMARCO_JSON_H

#include <lua.h>

/* Sets json_decode, json_encode, json_array_mt, json_object_mt,
 * json_float_mt and json_null in the table at index `module`. */
void tamarco_json_register(lua_State *L, int module);

#endif
