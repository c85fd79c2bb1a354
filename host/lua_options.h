/*
 * Readers of an options table (`{timeout_ms = 500, verify_tls = false}`),
 * one per unit, shared by every binding so that the same key is checked and
 * reported the same way everywhere.
 *
 * `t` is the table's stack index (0: no table, every key takes its default);
 * `what` names the call in the error ("request", "amqp.connect"). A missing
 * or nil key yields `def`; a wrong one raises
 * "<what>: '<key>' must be ..." (a Lua error: options are read before the
 * binding allocates anything). Strings are returned from the table, which
 * keeps them alive.
 */
#ifndef TAMARCO_LUA_OPTIONS_H
#define TAMARCO_LUA_OPTIONS_H

#include <lua.h>

const char *tamarco_opt_string(lua_State *L, int t, const char *what, const char *key,
                               const char *def);
/* Any number in [min, max]. */
double tamarco_opt_number(lua_State *L, int t, const char *what, const char *key,
                          double def, double min, double max);
/* A number in [min, max], truncated to an integer. */
long tamarco_opt_int(lua_State *L, int t, const char *what, const char *key,
                     long def, long min, long max);
/* A duration in milliseconds, >= 0 (fractions truncated). */
long tamarco_opt_ms(lua_State *L, int t, const char *what, const char *key, long def);
/* A duration in seconds, >= 0. */
double tamarco_opt_seconds(lua_State *L, int t, const char *what, const char *key, double def);
/* A size in bytes, >= 0. */
long tamarco_opt_bytes(lua_State *L, int t, const char *what, const char *key, long def);
/* Lua truthiness: any value but nil and false is true. */
int tamarco_opt_bool(lua_State *L, int t, const char *key, int def);

#endif
