/*
 * JSON and logstash encoding of log records and Lua values, into the
 * runtime's byte buffer (byte_buffer.h): bytes only, no policy, no Lua
 * errors. A library, not a binding: it exposes nothing to Lua itself; the
 * log binding (bindings/log.c), the metrics exposition (bindings/metrics.c)
 * and the JSON codec (bindings/json.c) build on it, and so do the C unit
 * test spec/c/test_log_encode.c and the fuzz target fuzz/fuzz_log_encode.c.
 */
#ifndef TAMARCO_LOG_ENCODE_H
#define TAMARCO_LOG_ENCODE_H

#include <stddef.h>
#include <lua.h>

#include "byte_buffer.h"

/* Length of the valid UTF-8 sequence starting at s (1..4, of at most avail
 * bytes), or 0 when it is not valid UTF-8 (overlong, surrogate, > U+10FFFF,
 * cut short). The JSON encoders and the strict JSON decoder share it. */
size_t tamarco_utf8_sequence(const unsigned char *s, size_t avail);

/* Nesting depth past which a table is written as the string "<depth limit>". */
#define TAMARCO_LOG_MAX_DEPTH 16

/* Appends s as a quoted JSON string: escapes '"', '\\', control characters
 * (\b \f \n \r \t, else \u00XX), DEL, U+2028/U+2029; each byte of an invalid
 * UTF-8 sequence (overlong, surrogate, > U+10FFFF, truncated) becomes \ufffd. */
void tamarco_log_json_string(tamarco_buf *b, const char *s, size_t len);

/* Appends n as a JSON number: integral values without ".0" (exactly, up to
 * 2^63), others with the shortest of %.15g / %.17g that reads back to the same
 * double; NaN and infinities as null. */
void tamarco_log_json_number(tamarco_buf *b, double n);

/* Writes "YYYY-MM-DDTHH:MM:SS.mmmZ" (UTC, milliseconds rounded) into out,
 * which must hold at least 32 bytes. Returns the length, or -1. */
int tamarco_log_iso8601(char *out, size_t size, double seconds);

/* Appends the Lua value at idx as JSON. Tables whose keys are exactly 1..n
 * become arrays, others objects with keys sorted bytewise (number and boolean
 * keys written as strings, other key types skipped). When `top` is set, the
 * standard record fields come first (@timestamp, level, logger, message,
 * service_name, deploy_name, service_instance_id). Cycles become "<cycle>",
 * tables deeper than TAMARCO_LOG_MAX_DEPTH "<depth limit>", functions and
 * other unencodable values "<function>" etc. Never raises except on memory
 * errors of the Lua state; the caller owns b (see log.c for an error-safe
 * holder). */
void tamarco_log_json_value(tamarco_buf *b, lua_State *L, int idx, int top);

/* Calls fn for each field of the table at idx in the order of
 * tamarco_log_json_value (keys as strings, value at value_idx). Returns the
 * number of fields, or -1 when the Lua stack cannot grow. */
typedef void (*tamarco_log_field_fn)(void *ud, lua_State *L, const char *key,
                                     size_t len, int value_idx);
int tamarco_log_each_field(lua_State *L, int idx, int top,
                           tamarco_log_field_fn fn, void *ud);

/* The string field `name` of the record at idx (its length in *len), or
 * def (may be NULL) when it is missing or not a string. Never converts. */
const char *tamarco_log_string_field(lua_State *L, int idx, const char *name,
                                     const char *def, size_t *len);

/* 1 when key is one of the standard record fields listed above. */
int tamarco_log_is_standard_field(const char *key, size_t len);

/* What every record of one logstash sink shares (its layout version, host,
 * message type and own tags), JSON-encoded once when the sink is made:
 * a record then costs only its own fields. */
typedef struct tamarco_logstash_layout {
    int version;            /* 0 or 1 */
    int sink_tags;          /* how many tags the sink puts before the record's */
    tamarco_buf text;       /* the parts (see log_encode.c), back to back */
    size_t ends[6];         /* end offset of each part in text */
} tamarco_logstash_layout;

/* An empty layout: set it before use, free it after. */
void tamarco_logstash_layout_init(tamarco_logstash_layout *layout);

/* (Re)fills layout for version 0 or 1, host, type and the tags table at
 * tags_idx (0: none), reusing its memory. Returns 0 when out of memory.
 * Encoding the tags may raise a memory error of the Lua state: the layout
 * keeps what it holds, for its owner to free. */
int tamarco_logstash_layout_set(tamarco_logstash_layout *layout, lua_State *L,
                                int version, const char *host, size_t host_len,
                                const char *type, size_t type_len, int tags_idx);
void tamarco_logstash_layout_free(tamarco_logstash_layout *layout);

/* Appends the record at idx in Tamarco's logstash layout, version 0 or 1
 * (python-logstash's formatters; see encode_logstash in log.c). */
void tamarco_log_logstash(tamarco_buf *b, lua_State *L, int idx,
                          const tamarco_logstash_layout *layout);

/* Records in parts: the logging module hands a record whose fields need no
 * masking to the encoders without building its table. The values at
 * first .. first + 9 are its @timestamp, level, logger and message
 * (strings), its extra fields (a table or nil), source_path, source_line,
 * service_name, deploy_name and service_instance_id (each may be nil). The
 * extra fields are taken as the record has them: the caller has masked
 * what needed it. Each encoder writes the bytes it writes for the record's
 * table, or returns 0, writing nothing, for parts the table would hold
 * differently (an extra key that is not a string or names a standard
 * field, traceback or a source field): encode the table then. */
int tamarco_log_logstash_parts(tamarco_buf *b, lua_State *L, int first,
                               const tamarco_logstash_layout *layout);
int tamarco_log_json_parts(tamarco_buf *b, lua_State *L, int first);

#endif
