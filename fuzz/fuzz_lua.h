/* Shared by the fuzz targets: one Lua state per process, and a small
 * interpreter that builds an arbitrary Lua value from fuzz bytes. */
#ifndef TAMARCO_FUZZ_LUA_H
#define TAMARCO_FUZZ_LUA_H

#include <stddef.h>
#include <stdint.h>
#include <lua.h>

/* The process's Lua state (standard libraries, tamarco.c.codec and
 * tamarco.c.yaml preloaded), its stack emptied; a full collection now and
 * then keeps memory flat over millions of inputs. */
lua_State *fuzz_lua_state(void);

/* Pushes one value built from data: nested tables with any keys and values
 * (strings of any bytes, NaN and infinities, booleans, json null, functions,
 * array/object/float markers, tables that contain themselves). */
void fuzz_push_value(lua_State *L, const uint8_t *data, size_t size);

/* Aborts with a message on stderr (a finding for libFuzzer). */
void fuzz_fail(const char *what, const char *detail);

#endif
