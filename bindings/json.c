/* The framework's JSON codec (bytes only; the policy and documentation live
 * in lua/tamarco/core/json.lua). Registered into tamarco.c.codec as json_decode
 * and json_encode.
 *
 * Decoding is strict RFC 8259: no hex, octal-looking leading zeros, NaN,
 * Infinity, numbers beyond a double's range, control characters or invalid
 * UTF-8 inside strings, trailing characters. It returns value | nil, message
 * and never raises on bad input. Arrays get the array metatable (the YAML
 * binding's sequence_mt, so settings from YAML and JSON agree) and objects
 * the object metatable, so that [] and {} survive a round trip. A number
 * written as a float whose value is integral (1.0, 2e3) cannot be told from
 * an integer in Lua: the decoder records its key in a weak table keyed by
 * its container, and the encoder writes it back with a decimal point while
 * it still holds an integral value. With the `floats` option every number
 * written as a float is boxed instead (the float metatable, field `value`).
 *
 * Encoding writes tables with the array metatable as arrays and those with
 * the object metatable as objects whatever their contents, plain tables with
 * keys exactly 1..n as arrays and other plain tables (the empty one too) as
 * objects; NaN, infinities, functions, userdata and unusual keys are errors;
 * invalid UTF-8 in strings is replaced by U+FFFD (\ufffd). */
#include "host.h"
#include "json.h"
#include "log_encode.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JSON_MAX_DEPTH 200
#define JSON_MAX_NUMBER_LEN 400
/* A reused encode buffer larger than this is released after the call. */
#define JSON_KEEP_BUFFER 65536

#define ARRAY_MT "tamarco.yaml.sequence"   /* shared with bindings/yaml.c */
#define OBJECT_MT "tamarco.json.object"
#define FLOAT_MT "tamarco.json.float"

/* The upvalues of json_decode and json_encode. */
enum { UV_ARRAY_MT = 1, UV_OBJECT_MT, UV_FLOAT_MT, UV_FLOAT_KEYS, UV_BUFFER };

/* ---------------------------------------------------------------- decode */

typedef struct decoder {
    lua_State *L;
    const char *start, *p, *end;
    tamarco_buf *scratch;   /* strings with escapes are built here */
    int box_floats;
    const char *error;          /* static text; the offset is added later */
    const char *error_at;
} decoder;

static int fail(decoder *d, const char *at, const char *what)
{
    if (!d->error) {
        d->error = what;
        d->error_at = at;
    }
    return -1;
}

static inline void skip_space(decoder *d)
{
    while (d->p < d->end && (*d->p == ' ' || *d->p == '\n' || *d->p == '\r' || *d->p == '\t'))
        d->p++;
}

static inline int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static void add_utf8(tamarco_buf *b, uint32_t cp)
{
    char out[4];
    size_t n;
    if (cp < 0x80) { out[0] = (char)cp; n = 1; }
    else if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        out[0] = (char)(0xF0 | (cp >> 18));
        out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    tamarco_buf_add(b, out, n);
}

/* Four hex digits at s, or -1. */
static long hex4(const char *s, const char *end)
{
    if (end - s < 4)
        return -1;
    long v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    return v;
}

/* d->p is on the opening quote; pushes the string. */
static int decode_string(decoder *d)
{
    const char *s = ++d->p;
    const unsigned char *u = (const unsigned char *)s, *end = (const unsigned char *)d->end;
    /* fast path: no escape */
    while (u < end) {
        unsigned c = *u;
        if (c == '"') {
            lua_pushlstring(d->L, s, (size_t)((const char *)u - s));
            d->p = (const char *)u + 1;
            return 0;
        }
        if (c == '\\')
            break;
        if (c < 0x20)
            return fail(d, (const char *)u, "control character in a string");
        if (c < 0x80) {
            u++;
            continue;
        }
        size_t n = tamarco_utf8_sequence(u, (size_t)(end - u));
        if (!n)
            return fail(d, (const char *)u, "invalid UTF-8 in a string");
        u += n;
    }
    if (u >= end)
        return fail(d, s - 1, "unterminated string");

    tamarco_buf *b = d->scratch;
    b->len = 0;
    b->oom = 0;   /* an earlier failed growth must not fail this string */
    tamarco_buf_add(b, s, (size_t)((const char *)u - s));
    while (u < end) {
        unsigned c = *u;
        if (c == '"') {
            if (b->oom)
                return fail(d, s, "out of memory");
            lua_pushlstring(d->L, b->data ? b->data : "", b->len);
            d->p = (const char *)u + 1;
            return 0;
        }
        if (c < 0x20)
            return fail(d, (const char *)u, "control character in a string");
        if (c >= 0x80) {
            size_t n = tamarco_utf8_sequence(u, (size_t)(end - u));
            if (!n)
                return fail(d, (const char *)u, "invalid UTF-8 in a string");
            tamarco_buf_add(b, (const char *)u, n);
            u += n;
            continue;
        }
        if (c != '\\') {
            const unsigned char *run = u;
            while (u < end && *u >= 0x20 && *u < 0x80 && *u != '"' && *u != '\\')
                u++;
            tamarco_buf_add(b, (const char *)run, (size_t)(u - run));
            continue;
        }
        if (u + 1 >= end)
            return fail(d, (const char *)u, "unterminated string");
        char e = (char)u[1];
        const char *simple = NULL;
        switch (e) {
        case '"': simple = "\""; break;
        case '\\': simple = "\\"; break;
        case '/': simple = "/"; break;
        case 'b': simple = "\b"; break;
        case 'f': simple = "\f"; break;
        case 'n': simple = "\n"; break;
        case 'r': simple = "\r"; break;
        case 't': simple = "\t"; break;
        case 'u': break;
        default: return fail(d, (const char *)u, "invalid escape in a string");
        }
        if (simple) {
            tamarco_buf_addc(b, simple[0]);
            u += 2;
            continue;
        }
        long cp = hex4((const char *)u + 2, d->end);
        if (cp < 0)
            return fail(d, (const char *)u, "invalid \\u escape in a string");
        u += 6;
        if (cp >= 0xD800 && cp <= 0xDBFF && end - u >= 6 && u[0] == '\\' && u[1] == 'u') {
            long low = hex4((const char *)u + 2, d->end);
            if (low >= 0xDC00 && low <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                u += 6;
            }
        }
        if (cp >= 0xD800 && cp <= 0xDFFF)
            cp = 0xFFFD;   /* a lone surrogate is no character: replace it */
        add_utf8(b, (uint32_t)cp);
    }
    return fail(d, s - 1, "unterminated string");
}

/* The value of the valid JSON number [s, end) when it is exact in double
 * arithmetic (Clinger's fast path): at most 15 significant digits, so the
 * digits are an exact integer, and a power of ten up to 1e22, itself exact;
 * one correctly rounded multiplication or division then gives the same
 * double strtod would. 0 when strtod is needed. */
static int fast_number(const char *s, const char *end, double *out)
{
    static const double powers[] = {
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
        1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
    };
    const char *p = s;
    int negative = *p == '-';
    p += negative;
    uint64_t mantissa = 0;
    int digits = 0, scale = 0;
    for (; p < end && is_digit(*p); p++) {
        if (mantissa || *p != '0')
            digits++;
        mantissa = mantissa * 10 + (uint64_t)(*p - '0');
        if (digits > 15)
            return 0;
    }
    if (p < end && *p == '.') {
        for (p++; p < end && is_digit(*p); p++) {
            if (mantissa || *p != '0')
                digits++;
            mantissa = mantissa * 10 + (uint64_t)(*p - '0');
            scale--;
            if (digits > 15)
                return 0;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        int exp_negative = *p == '-';
        if (*p == '-' || *p == '+')
            p++;
        int exponent = 0;
        for (; p < end && is_digit(*p); p++) {
            if (exponent > 1000)
                return 0;
            exponent = exponent * 10 + (*p - '0');
        }
        scale += exp_negative ? -exponent : exponent;
    }
    if (scale < -22 || scale > 22)
        return 0;
    double v = (double)mantissa;
    v = scale < 0 ? v / powers[-scale] : v * powers[scale];
    *out = negative ? -v : v;
    return 1;
}

/* Pushes the number at d->p; *is_float tells whether it was written with a
 * fraction or an exponent. */
static int decode_number(decoder *d, int *is_float)
{
    const char *s = d->p, *p = s, *end = d->end;
    *is_float = 0;
    if (p < end && *p == '-')
        p++;
    if (p >= end || !is_digit(*p))
        return fail(d, s, "invalid number");
    if (*p == '0') {
        p++;
        if (p < end && is_digit(*p))
            return fail(d, s, "leading zero in a number");
    } else {
        while (p < end && is_digit(*p))
            p++;
    }
    if (p < end && *p == '.') {
        *is_float = 1;
        p++;
        if (p >= end || !is_digit(*p))
            return fail(d, s, "digit expected after the decimal point");
        while (p < end && is_digit(*p))
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *is_float = 1;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || !is_digit(*p))
            return fail(d, s, "digit expected in the exponent");
        while (p < end && is_digit(*p))
            p++;
    }
    size_t len = (size_t)(p - s);
    double v;
    if (fast_number(s, p, &v)) {
        /* exact without strtod */
    } else {
        if (len > JSON_MAX_NUMBER_LEN)
            return fail(d, s, "number too long");
        char tmp[JSON_MAX_NUMBER_LEN + 1];
        memcpy(tmp, s, len);
        tmp[len] = '\0';
        v = strtod(tmp, NULL);
        if (!isfinite(v))
            return fail(d, s, "number out of range");
    }
    d->p = p;
    if (d->box_floats && *is_float) {
        lua_createtable(d->L, 0, 1);
        lua_pushnumber(d->L, v);
        lua_setfield(d->L, -2, "value");
        lua_pushvalue(d->L, lua_upvalueindex(UV_FLOAT_MT));
        lua_setmetatable(d->L, -2);
        *is_float = 0;   /* the box carries it */
        return 0;
    }
    lua_pushnumber(d->L, v);
    if (*is_float && v != floor(v))
        *is_float = 0;   /* 2.5 reads back as a float anyway */
    return 0;
}

static int decode_value(decoder *d, int depth, int *is_float);

/* The container is at the top of the stack, its key just below the value:
 * remember that key as an integral float. */
static void mark_float(decoder *d, int container, int key)
{
    lua_State *L = d->L;
    lua_pushvalue(L, container);
    lua_rawget(L, lua_upvalueindex(UV_FLOAT_KEYS));
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, container);
        lua_pushvalue(L, -2);
        lua_rawset(L, lua_upvalueindex(UV_FLOAT_KEYS));
    }
    lua_pushvalue(L, key);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

static int decode_array(decoder *d, int depth)
{
    lua_State *L = d->L;
    d->p++;
    lua_newtable(L);
    int t = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(UV_ARRAY_MT));
    lua_setmetatable(L, t);
    skip_space(d);
    if (d->p < d->end && *d->p == ']') {
        d->p++;
        return 0;
    }
    for (int n = 1;; n++) {
        int is_float;
        if (decode_value(d, depth + 1, &is_float) < 0)
            return -1;
        lua_rawseti(L, t, n);
        if (is_float) {
            lua_pushinteger(L, n);
            mark_float(d, t, lua_gettop(L));
            lua_pop(L, 1);
        }
        skip_space(d);
        if (d->p >= d->end)
            return fail(d, d->p, "unterminated array");
        if (*d->p == ']') {
            d->p++;
            return 0;
        }
        if (*d->p != ',')
            return fail(d, d->p, "',' or ']' expected");
        d->p++;
    }
}

static int decode_object(decoder *d, int depth)
{
    lua_State *L = d->L;
    d->p++;
    lua_newtable(L);
    int t = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(UV_OBJECT_MT));
    lua_setmetatable(L, t);
    skip_space(d);
    if (d->p < d->end && *d->p == '}') {
        d->p++;
        return 0;
    }
    for (;;) {
        if (d->p >= d->end)
            return fail(d, d->p, "unterminated object");
        if (*d->p != '"')
            return fail(d, d->p, "string key expected");
        if (decode_string(d) < 0)
            return -1;
        skip_space(d);
        if (d->p >= d->end || *d->p != ':')
            return fail(d, d->p, "':' expected");
        d->p++;
        int is_float;
        if (decode_value(d, depth + 1, &is_float) < 0)
            return -1;
        if (is_float) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);   /* key, key, value */
            lua_rawset(L, t);
            mark_float(d, t, lua_gettop(L));
            lua_pop(L, 1);
        } else {
            lua_rawset(L, t);
        }
        skip_space(d);
        if (d->p >= d->end)
            return fail(d, d->p, "unterminated object");
        if (*d->p == '}') {
            d->p++;
            return 0;
        }
        if (*d->p != ',')
            return fail(d, d->p, "',' or '}' expected");
        d->p++;
        skip_space(d);
    }
}

static int literal(decoder *d, const char *word, size_t len)
{
    if ((size_t)(d->end - d->p) < len || memcmp(d->p, word, len) != 0)
        return fail(d, d->p, "unexpected character");
    d->p += len;
    return 0;
}

/* Pushes the value at d->p (after spaces). */
static int decode_value(decoder *d, int depth, int *is_float)
{
    *is_float = 0;
    if (depth > JSON_MAX_DEPTH)
        return fail(d, d->p, "nesting deeper than 200");
    if (!lua_checkstack(d->L, 8))
        return fail(d, d->p, "out of stack space");
    skip_space(d);
    if (d->p >= d->end)
        return fail(d, d->p, "value expected");
    switch (*d->p) {
    case '{': return decode_object(d, depth);
    case '[': return decode_array(d, depth);
    case '"': return decode_string(d);
    case 't':
        if (literal(d, "true", 4) < 0) return -1;
        lua_pushboolean(d->L, 1);
        return 0;
    case 'f':
        if (literal(d, "false", 5) < 0) return -1;
        lua_pushboolean(d->L, 0);
        return 0;
    case 'n':
        if (literal(d, "null", 4) < 0) return -1;
        lua_pushlightuserdata(d->L, NULL);
        return 0;
    default:
        if (*d->p == '-' || is_digit(*d->p))
            return decode_number(d, is_float);
        return fail(d, d->p, "unexpected character");
    }
}

/* json_decode(text[, options]) -> value | nil, message.
 * options.floats: box every number written as a float. */
static int l_json_decode(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    decoder d = {
        .L = L, .start = text, .p = text, .end = text + len,
        .scratch = lua_touserdata(L, lua_upvalueindex(UV_BUFFER)),
    };
    if (lua_istable(L, 2)) {
        lua_getfield(L, 2, "floats");
        d.box_floats = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    int top = lua_gettop(L), is_float;
    int rc = decode_value(&d, 1, &is_float);
    if (rc == 0) {
        skip_space(&d);
        if (d.p < d.end)
            rc = fail(&d, d.p, "trailing characters after the value");
    }
    if (d.scratch->cap > JSON_KEEP_BUFFER) {
        tamarco_buf_free(d.scratch);
        tamarco_buf_init(d.scratch);
    }
    if (rc < 0) {
        lua_settop(L, top);
        lua_pushnil(L);
        char message[160];
        size_t offset = (size_t)(d.error_at - d.start);
        unsigned char c = d.error_at < d.end ? (unsigned char)*d.error_at : 0;
        if (d.error_at >= d.end)
            snprintf(message, sizeof message, "invalid JSON: %s at the end of the text", d.error);
        else if (c >= 0x20 && c < 0x7F)
            snprintf(message, sizeof message, "invalid JSON: %s at character %zu ('%c')", d.error, offset + 1, c);
        else
            snprintf(message, sizeof message, "invalid JSON: %s at character %zu (byte 0x%02x)", d.error, offset + 1, c);
        lua_pushstring(L, message);
        return 2;
    }
    return 1;
}

/* ---------------------------------------------------------------- encode */

typedef struct encoder {
    lua_State *L;
    tamarco_buf *b;
    const char *error;
    char detail[64];
} encoder;

static int encode_fail(encoder *e, const char *what)
{
    if (!e->error)
        e->error = what;
    return -1;
}

static void add_float(encoder *e, double v)
{
    size_t from = e->b->len;
    tamarco_log_json_number(e->b, v);
    if (e->b->oom)
        return;
    for (size_t i = from; i < e->b->len; i++)
        if (e->b->data[i] == '.' || e->b->data[i] == 'e' || e->b->data[i] == 'E')
            return;
    tamarco_buf_add(e->b, ".0", 2);
}

/* What each byte needs in a JSON string: 0 copied as it is, 1 escaped,
 * 2 the lead of a UTF-8 sequence to check. */
static const unsigned char string_class[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,   /* '"' */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,   /* '\\' */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
};

/* Appends s as a JSON string; a byte that does not start a valid UTF-8
 * sequence is written as \ufffd. */
static void add_string(tamarco_buf *b, const char *str, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str, *end = s + len;
    if (!tamarco_buf_reserve(b, 1))
        return;
    b->data[b->len++] = '"';
    while (s < end) {
        /* a chunk at a time, with room for its worst case (every byte
         * written as six, a UTF-8 sequence overlapping the chunk's end),
         * so that the loop writes without checking; a long string never
         * asks for six times its size at once */
        size_t chunk = (size_t)(end - s) < 4096 ? (size_t)(end - s) : 4096;
        if (!tamarco_buf_reserve(b, (chunk + 4) * 6))
            return;
        const unsigned char *chunk_end = s + chunk;
        char *out = b->data + b->len;
        while (s < chunk_end) {
            unsigned c = *s;
            if (string_class[c] == 0) {
                *out++ = (char)c;
                s++;
            } else if (string_class[c] == 2) {
                size_t n = tamarco_utf8_sequence(s, (size_t)(end - s));
                if (n) {
                    memcpy(out, s, n);
                    out += n;
                    s += n;
                } else {
                    memcpy(out, "\\ufffd", 6);
                    out += 6;
                    s++;
                }
            } else {
                *out++ = '\\';
                switch (c) {
                case '"': *out++ = '"'; break;
                case '\\': *out++ = '\\'; break;
                case '\n': *out++ = 'n'; break;
                case '\r': *out++ = 'r'; break;
                case '\t': *out++ = 't'; break;
                case '\b': *out++ = 'b'; break;
                case '\f': *out++ = 'f'; break;
                default:
                    memcpy(out, "u00", 3);
                    out[3] = hex[c >> 4];
                    out[4] = hex[c & 15];
                    out += 5;
                }
                s++;
            }
        }
        b->len = (size_t)(out - b->data);
    }
    tamarco_buf_addc(b, '"');
}

static int encode_number(encoder *e, double v, int as_float)
{
    if (!isfinite(v))
        return encode_fail(e, v != v ? "cannot encode NaN as JSON" : "cannot encode an infinity as JSON");
    if (as_float)
        add_float(e, v);
    else
        tamarco_log_json_number(e->b, v);
    return 0;
}

static int encode_value(encoder *e, int idx, int depth, int as_float);

/* Table at idx: 1 when it is a plain sequence 1..n (n > 0), with *n set. */
static int plain_sequence(lua_State *L, int idx, size_t *n)
{
    /* without t[1] (length 0) it is no sequence: objects skip the key walk */
    if (lua_objlen(L, idx) == 0)
        return 0;
    size_t count = 0;
    double max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER) {
            lua_pop(L, 1);
            return 0;
        }
        double k = lua_tonumber(L, -1);
        if (k < 1 || k != floor(k) || k > 1e15) {
            lua_pop(L, 1);
            return 0;
        }
        if (k > max)
            max = k;
        count++;
    }
    *n = count;
    return count > 0 && (double)count == max;
}

/* Pushes the float keys of the table at idx (or nil). */
static void push_float_keys(lua_State *L, int idx)
{
    lua_pushvalue(L, idx);
    lua_rawget(L, lua_upvalueindex(UV_FLOAT_KEYS));
}

static int is_marked(lua_State *L, int marks, int key)
{
    if (!marks)
        return 0;
    lua_pushvalue(L, key);
    lua_rawget(L, marks);
    int marked = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return marked;
}

static int encode_array(encoder *e, int t, size_t n, int depth)
{
    lua_State *L = e->L;
    int marks = 0, marks_checked = 0;
    tamarco_buf_addc(e->b, '[');
    for (size_t i = 1; i <= n; i++) {
        if (i > 1)
            tamarco_buf_addc(e->b, ',');
        lua_rawgeti(L, t, (int)i);
        int as_float = 0;
        if (lua_type(L, -1) == LUA_TNUMBER) {
            if (!marks_checked) {
                marks_checked = 1;
                push_float_keys(L, t);
                if (lua_isnil(L, -1))
                    lua_pop(L, 1);
                else {
                    lua_insert(L, -2);
                    marks = lua_gettop(L) - 1;
                }
            }
            if (marks) {
                lua_pushinteger(L, (lua_Integer)i);
                as_float = is_marked(L, marks, lua_gettop(L));
                lua_pop(L, 1);
            }
        }
        if (encode_value(e, lua_gettop(L), depth + 1, as_float) < 0)
            return -1;
        lua_pop(L, 1);
    }
    if (marks)
        lua_remove(L, marks);
    tamarco_buf_addc(e->b, ']');
    return 0;
}

static int encode_key(encoder *e, int key)
{
    lua_State *L = e->L;
    size_t len;
    if (lua_type(L, key) == LUA_TSTRING) {
        const char *s = lua_tolstring(L, key, &len);
        add_string(e->b, s, len);
        return 0;
    }
    if (lua_type(L, key) == LUA_TNUMBER) {
        double k = lua_tonumber(L, key);
        if (!isfinite(k))
            return encode_fail(e, "cannot encode a NaN or infinite table key as JSON");
        tamarco_buf_addc(e->b, '"');
        tamarco_log_json_number(e->b, k);
        tamarco_buf_addc(e->b, '"');
        return 0;
    }
    snprintf(e->detail, sizeof e->detail, "cannot encode a %s table key as JSON",
             lua_typename(L, lua_type(L, key)));
    return encode_fail(e, e->detail);
}

static int encode_object(encoder *e, int t, int depth)
{
    lua_State *L = e->L;
    int marks = 0, marks_checked = 0, first = 1;
    tamarco_buf_addc(e->b, '{');
    lua_pushnil(L);
    while (lua_next(L, t)) {
        int value = lua_gettop(L), key = value - 1;
        if (!first)
            tamarco_buf_addc(e->b, ',');
        first = 0;
        if (encode_key(e, key) < 0)
            return -1;
        tamarco_buf_addc(e->b, ':');
        int as_float = 0;
        if (lua_type(L, value) == LUA_TNUMBER) {
            if (!marks_checked) {
                marks_checked = 1;
                push_float_keys(L, t);
                if (lua_isnil(L, -1)) {
                    lua_pop(L, 1);
                } else {
                    /* keep the marks below the key so that lua_next goes on */
                    lua_insert(L, key);
                    marks = key;
                    key++;
                    value++;
                }
            }
            as_float = is_marked(L, marks, key);
        }
        if (encode_value(e, value, depth + 1, as_float) < 0)
            return -1;
        lua_pop(L, 1);
    }
    if (marks)
        lua_remove(L, marks);
    tamarco_buf_addc(e->b, '}');
    return 0;
}

static int encode_table(encoder *e, int t, int depth)
{
    lua_State *L = e->L;
    if (depth > JSON_MAX_DEPTH)
        return encode_fail(e, "cannot encode tables nested deeper than 200 (or a table that contains itself) as JSON");
    if (!lua_checkstack(L, 8))
        return encode_fail(e, "out of stack space");
    if (lua_getmetatable(L, t)) {
        int kind = lua_rawequal(L, -1, lua_upvalueindex(UV_ARRAY_MT)) ? 1
                 : lua_rawequal(L, -1, lua_upvalueindex(UV_OBJECT_MT)) ? 2
                 : lua_rawequal(L, -1, lua_upvalueindex(UV_FLOAT_MT)) ? 3 : 0;
        lua_pop(L, 1);
        if (kind == 1)
            return encode_array(e, t, lua_objlen(L, t), depth);
        if (kind == 2)
            return encode_object(e, t, depth);
        if (kind == 3) {
            lua_getfield(L, t, "value");
            if (lua_type(L, -1) != LUA_TNUMBER)
                return encode_fail(e, "a JSON float box without a number");
            int rc = encode_number(e, lua_tonumber(L, -1), 1);
            lua_pop(L, 1);
            return rc;
        }
    }
    size_t n;
    if (plain_sequence(L, t, &n))
        return encode_array(e, t, n, depth);
    return encode_object(e, t, depth);
}

static int encode_value(encoder *e, int idx, int depth, int as_float)
{
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        tamarco_buf_add(e->b, "null", 4);
        return 0;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx))
            tamarco_buf_add(e->b, "true", 4);
        else
            tamarco_buf_add(e->b, "false", 5);
        return 0;
    case LUA_TNUMBER:
        return encode_number(e, lua_tonumber(L, idx), as_float);
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        add_string(e->b, s, len);
        return 0;
    }
    case LUA_TTABLE:
        return encode_table(e, idx, depth);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) {
            tamarco_buf_add(e->b, "null", 4);
            return 0;
        }
        /* fall through */
    default:
        snprintf(e->detail, sizeof e->detail, "cannot encode a %s as JSON", lua_typename(L, lua_type(L, idx)));
        return encode_fail(e, e->detail);
    }
}

/* json_encode(value) -> text | nil, message */
static int l_json_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    encoder e = { .L = L, .b = lua_touserdata(L, lua_upvalueindex(UV_BUFFER)) };
    e.b->len = 0;
    e.b->oom = 0;
    int rc = encode_value(&e, 1, 1, 0);
    if (rc == 0 && e.b->oom)
        rc = encode_fail(&e, "out of memory");
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, e.error);
    } else {
        lua_pushlstring(L, e.b->data ? e.b->data : "", e.b->len);
    }
    if (e.b->cap > JSON_KEEP_BUFFER) {
        tamarco_buf_free(e.b);
        tamarco_buf_init(e.b);
    }
    return rc < 0 ? 2 : 1;
}

static int buffer_gc(lua_State *L)
{
    tamarco_buf_free(lua_touserdata(L, 1));
    return 0;
}

static void push_upvalues(lua_State *L)
{
    luaL_newmetatable(L, ARRAY_MT);
    luaL_newmetatable(L, OBJECT_MT);
    luaL_newmetatable(L, FLOAT_MT);
    /* float keys: weak keys, so a decoded table is not kept alive by them */
    lua_getfield(L, LUA_REGISTRYINDEX, "tamarco.json.float_keys");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "k");
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, "tamarco.json.float_keys");
    }
    tamarco_buf *b = lua_newuserdata(L, sizeof *b);
    tamarco_buf_init(b);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, buffer_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
}

void tamarco_json_register(lua_State *L, int module)
{
    if (module < 0 && module > LUA_REGISTRYINDEX)
        module = lua_gettop(L) + module + 1;
    push_upvalues(L);
    lua_pushcclosure(L, l_json_decode, 5);
    lua_setfield(L, module, "json_decode");
    push_upvalues(L);
    lua_pushcclosure(L, l_json_encode, 5);
    lua_setfield(L, module, "json_encode");
    luaL_getmetatable(L, ARRAY_MT);
    lua_setfield(L, module, "json_array_mt");
    luaL_getmetatable(L, OBJECT_MT);
    lua_setfield(L, module, "json_object_mt");
    luaL_getmetatable(L, FLOAT_MT);
    lua_setfield(L, module, "json_float_mt");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, module, "json_null");
}
