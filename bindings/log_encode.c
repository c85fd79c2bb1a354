/* Log record encoding: bytes only (see log_encode.h). No Lua errors raised. */
#include "log_encode.h"

#include <lauxlib.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- buffer ---- */

void tamarco_log_buf_init(tamarco_log_buf *b)
{
    b->data = NULL;
    b->len = b->cap = 0;
    b->oom = 0;
}

void tamarco_log_buf_free(tamarco_log_buf *b)
{
    free(b->data);
    tamarco_log_buf_init(b);
}

static int reserve(tamarco_log_buf *b, size_t extra)
{
    if (b->oom)
        return 0;
    if (b->len + extra + 1 <= b->cap)   /* +1: room for a terminating NUL */
        return 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) {
        if (cap > SIZE_MAX / 2) {
            b->oom = 1;
            return 0;
        }
        cap *= 2;
    }
    char *data = realloc(b->data, cap);
    if (!data) {
        b->oom = 1;
        return 0;
    }
    b->data = data;
    b->cap = cap;
    return 1;
}

void tamarco_log_buf_add(tamarco_log_buf *b, const char *s, size_t len)
{
    if (len == 0 || !reserve(b, len))
        return;
    memcpy(b->data + b->len, s, len);
    b->len += len;
}

void tamarco_log_buf_addc(tamarco_log_buf *b, char c)
{
    if (!reserve(b, 1))
        return;
    b->data[b->len++] = c;
}

void tamarco_log_buf_adds(tamarco_log_buf *b, const char *s)
{
    tamarco_log_buf_add(b, s, strlen(s));
}

const char *tamarco_log_buf_cstr(tamarco_log_buf *b)
{
    if (!reserve(b, 0))
        return "";
    b->data[b->len] = '\0';
    return b->data;
}

/* ---- JSON strings ---- */

/* Length of the valid UTF-8 sequence starting at s (1..4), or 0 if invalid. */
static size_t utf8_sequence(const unsigned char *s, size_t avail)
{
    unsigned char c = s[0];
    size_t n;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;   /* continuation byte, overlong lead (C0, C1) or > F4 */
    }
    if (avail < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

void tamarco_log_json_string(tamarco_log_buf *b, const char *str, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, run = 0;   /* run: start of bytes copied as they are */
    tamarco_log_buf_addc(b, '"');
    while (i < len) {
        unsigned char c = s[i];
        const char *esc = NULL;
        char ubuf[7];
        size_t step = 1;
        if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') {
            i++;
            continue;
        }
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        default:
            if (c < 0x20 || c == 0x7F) {
                ubuf[0] = '\\'; ubuf[1] = 'u'; ubuf[2] = '0'; ubuf[3] = '0';
                ubuf[4] = hex[c >> 4]; ubuf[5] = hex[c & 0xF]; ubuf[6] = '\0';
                esc = ubuf;
            } else {
                step = utf8_sequence(s + i, len - i);
                if (step == 0) {
                    esc = "\\ufffd";
                    step = 1;
                } else if (step == 3 && c == 0xE2 && s[i + 1] == 0x80 &&
                           (s[i + 2] == 0xA8 || s[i + 2] == 0xA9)) {
                    esc = s[i + 2] == 0xA8 ? "\\u2028" : "\\u2029";
                }
            }
        }
        if (!esc) {   /* valid multibyte sequence: keep it in the run */
            i += step;
            continue;
        }
        tamarco_log_buf_add(b, str + run, i - run);
        tamarco_log_buf_adds(b, esc);
        i += step;
        run = i;
    }
    tamarco_log_buf_add(b, str + run, i - run);
    tamarco_log_buf_addc(b, '"');
}

/* ---- JSON numbers ---- */

/* snprintf honours LC_NUMERIC: keep a '.' whatever the locale is. */
static void fix_decimal_point(char *s)
{
    for (; *s; s++)
        if (*s == ',')
            *s = '.';
}

void tamarco_log_json_number(tamarco_log_buf *b, double n)
{
    char tmp[40];
    if (!isfinite(n)) {
        tamarco_log_buf_add(b, "null", 4);
        return;
    }
    if (n == floor(n) && fabs(n) < 9.2e18) {
        /* integral: exact, without ".0" or exponent ("-0" becomes "0") */
        snprintf(tmp, sizeof tmp, "%lld", (long long)n);
    } else {
        snprintf(tmp, sizeof tmp, "%.15g", n);
        fix_decimal_point(tmp);
        if (strtod(tmp, NULL) != n) {
            snprintf(tmp, sizeof tmp, "%.17g", n);
            fix_decimal_point(tmp);
        }
    }
    tamarco_log_buf_adds(b, tmp);
}

/* ---- timestamps ---- */

int tamarco_log_iso8601(char *out, size_t size, double seconds)
{
    if (!isfinite(seconds) || fabs(seconds) > 1e14)
        return -1;
    long long total_ms = llround(seconds * 1000.0);
    long long secs = total_ms / 1000;
    long long ms = total_ms % 1000;
    if (ms < 0) {   /* before 1970: floor, not truncation */
        ms += 1000;
        secs -= 1;
    }
    time_t t = (time_t)secs;
    struct tm tm;
    if (!gmtime_r(&t, &tm))
        return -1;
    int n = snprintf(out, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                     tm.tm_min, tm.tm_sec, (int)ms);
    return (n < 0 || (size_t)n >= size) ? -1 : n;
}

/* ---- Lua values ---- */

static const char *const standard_fields[] = {
    "@timestamp", "level", "logger", "message",
    "service_name", "deploy_name", "service_instance_id",
};
#define N_STANDARD (sizeof standard_fields / sizeof standard_fields[0])

typedef struct json_key {
    const char *s;      /* the key string, or NULL when the text is in num */
    size_t len;
    int type;           /* LUA_TSTRING, LUA_TNUMBER or LUA_TBOOLEAN */
    lua_Number n;
    int rank;           /* standard field order, or N_STANDARD for the rest */
    char num[40];
} json_key;

/* Not a pointer into num: qsort moves the structs. */
#define KEY_TEXT(k) ((k)->s ? (k)->s : (k)->num)

typedef struct encoder {
    tamarco_log_buf *b;
    lua_State *L;
    const void *path[TAMARCO_LOG_MAX_DEPTH + 1];   /* tables being encoded */
    int depth;
    int first;          /* no comma before the next object member */
} encoder;

static void encode_value(encoder *e, int idx, int top);

static int key_cmp(const void *pa, const void *pb)
{
    const json_key *a = pa, *b = pb;
    if (a->rank != b->rank)
        return a->rank < b->rank ? -1 : 1;
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(KEY_TEXT(a), KEY_TEXT(b), n);
    if (c)
        return c;
    return a->len < b->len ? -1 : a->len > b->len;
}

static int standard_rank(const char *s, size_t len)
{
    for (size_t i = 0; i < N_STANDARD; i++)
        if (strlen(standard_fields[i]) == len && memcmp(standard_fields[i], s, len) == 0)
            return (int)i;
    return (int)N_STANDARD;
}

static void push_key(lua_State *L, const json_key *k)
{
    if (k->type == LUA_TSTRING)
        lua_pushlstring(L, k->s, k->len);
    else if (k->type == LUA_TNUMBER)
        lua_pushnumber(L, k->n);
    else
        lua_pushboolean(L, k->s[0] == 't');
}

int tamarco_log_each_field(lua_State *L, int idx, int top,
                           tamarco_log_field_fn fn, void *ud)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    if (!lua_checkstack(L, 4))
        return -1;
    size_t count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        count++;
        lua_pop(L, 1);
    }
    if (count == 0)
        return 0;
    /* The keys live in a userdata, collected by the GC if a memory error
     * unwinds us; string keys stay alive since the table holds them. */
    json_key *keys = lua_newuserdata(L, count * sizeof *keys);
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (n == count)
            continue;   /* the table grew under us: ignore the extra keys */
        json_key *k = &keys[n];
        k->type = lua_type(L, -1);
        if (k->type == LUA_TSTRING) {
            k->s = lua_tolstring(L, -1, &k->len);   /* a string: no conversion */
        } else if (k->type == LUA_TNUMBER) {
            tamarco_log_buf tmp;
            k->n = lua_tonumber(L, -1);
            tamarco_log_buf_init(&tmp);
            tamarco_log_json_number(&tmp, k->n);
            snprintf(k->num, sizeof k->num, "%s", tamarco_log_buf_cstr(&tmp));
            tamarco_log_buf_free(&tmp);
            k->s = NULL;
            k->len = strlen(k->num);
        } else if (k->type == LUA_TBOOLEAN) {
            k->s = lua_toboolean(L, -1) ? "true" : "false";
            k->len = strlen(k->s);
        } else {
            continue;   /* tables, functions, ... as keys: skipped */
        }
        k->rank = top ? standard_rank(KEY_TEXT(k), k->len) : (int)N_STANDARD;
        n++;
    }
    qsort(keys, n, sizeof *keys, key_cmp);
    for (size_t i = 0; i < n; i++) {
        push_key(L, &keys[i]);
        lua_rawget(L, idx);
        fn(ud, L, KEY_TEXT(&keys[i]), keys[i].len, lua_gettop(L));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);   /* keys */
    return (int)n;
}

static void object_field(void *ud, lua_State *L, const char *key, size_t len, int value_idx)
{
    encoder *e = ud;
    if (!e->first)
        tamarco_log_buf_addc(e->b, ',');
    e->first = 0;
    tamarco_log_json_string(e->b, key, len);
    tamarco_log_buf_addc(e->b, ':');
    encode_value(e, value_idx, 0);
    e->first = 0;   /* a nested object may have left it set */
}

static void encode_table(encoder *e, int idx, int top)
{
    lua_State *L = e->L;
    const void *p = lua_topointer(L, idx);
    for (int i = 0; i < e->depth; i++) {
        if (e->path[i] == p) {
            tamarco_log_json_string(e->b, "<cycle>", 7);
            return;
        }
    }
    if (e->depth >= TAMARCO_LOG_MAX_DEPTH || !lua_checkstack(L, 6)) {
        tamarco_log_json_string(e->b, "<depth limit>", 13);
        return;
    }

    /* First pass: count the keys and see whether they are exactly 1..n. */
    size_t count = 0, max_int = 0;
    int array = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        count++;
        if (array) {
            lua_Number k;
            if (lua_type(L, -2) != LUA_TNUMBER || (k = lua_tonumber(L, -2)) < 1 ||
                k != floor(k) || k > 1e15)
                array = 0;
            else if ((size_t)k > max_int)
                max_int = (size_t)k;
        }
        lua_pop(L, 1);
    }
    if (count == 0) {
        tamarco_log_buf_add(e->b, "{}", 2);
        return;
    }

    e->path[e->depth++] = p;
    if (array && max_int == count) {
        tamarco_log_buf_addc(e->b, '[');
        for (size_t i = 1; i <= count; i++) {
            if (i > 1)
                tamarco_log_buf_addc(e->b, ',');
            lua_rawgeti(L, idx, (int)i);
            encode_value(e, lua_gettop(L), 0);
            lua_pop(L, 1);
        }
        tamarco_log_buf_addc(e->b, ']');
        e->depth--;
        return;
    }

    tamarco_log_buf_addc(e->b, '{');
    e->first = 1;
    tamarco_log_each_field(L, idx, top, object_field, e);
    tamarco_log_buf_addc(e->b, '}');
    e->depth--;
}

static void encode_value(encoder *e, int idx, int top)
{
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        tamarco_log_buf_add(e->b, "null", 4);
        break;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx))
            tamarco_log_buf_add(e->b, "true", 4);
        else
            tamarco_log_buf_add(e->b, "false", 5);
        break;
    case LUA_TNUMBER:
        tamarco_log_json_number(e->b, lua_tonumber(L, idx));
        break;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        tamarco_log_json_string(e->b, s, len);
        break;
    }
    case LUA_TTABLE:
        encode_table(e, idx, top);
        break;
    default: {
        char tmp[32];
        int len = snprintf(tmp, sizeof tmp, "<%s>", lua_typename(L, lua_type(L, idx)));
        tamarco_log_json_string(e->b, tmp, (size_t)len);
        break;
    }
    }
}

void tamarco_log_json_value(tamarco_log_buf *b, lua_State *L, int idx, int top)
{
    encoder e;
    e.b = b;
    e.L = L;
    e.depth = 0;
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    encode_value(&e, idx, top);
}

int tamarco_log_is_standard_field(const char *key, size_t len)
{
    return standard_rank(key, len) < (int)N_STANDARD;
}
