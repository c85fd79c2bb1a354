/* Log record and Lua value encoding: bytes only (see log_encode.h). No Lua errors raised. */
#include "log_encode.h"

#include <lauxlib.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ---- JSON strings ---- */

size_t tamarco_utf8_sequence(const unsigned char *s, size_t avail)
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

/* 1 for the bytes written as they are: printable ASCII but '"' and '\\'. */
static inline int plain_byte(unsigned char c)
{
    return c >= 0x20 && c < 0x7F && c != '"' && c != '\\';
}

void tamarco_log_json_string(tamarco_buf *b, const char *str, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, run = 0;   /* run: start of bytes copied as they are */
    while (i < len && plain_byte(s[i]))
        i++;
    if (i == len && tamarco_buf_reserve(b, len + 2)) {
        /* the common case: nothing to escape, one copy */
        char *out = b->data + b->len;
        out[0] = '"';
        memcpy(out + 1, str, len);
        out[len + 1] = '"';
        b->len += len + 2;
        return;
    }
    tamarco_buf_addc(b, '"');
    while (i < len) {
        unsigned char c = s[i];
        const char *esc = NULL;
        char ubuf[7];
        size_t step = 1;
        if (plain_byte(c)) {
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
                step = tamarco_utf8_sequence(s + i, len - i);
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
        tamarco_buf_add(b, str + run, i - run);
        tamarco_buf_adds(b, esc);
        i += step;
        run = i;
    }
    tamarco_buf_add(b, str + run, i - run);
    tamarco_buf_addc(b, '"');
}

/* ---- JSON numbers ---- */

/* snprintf honours LC_NUMERIC: keep a '.' whatever the locale is. */
static void fix_decimal_point(char *s)
{
    for (; *s; s++)
        if (*s == ',')
            *s = '.';
}

void tamarco_log_json_number(tamarco_buf *b, double n)
{
    char tmp[40];
    if (!isfinite(n)) {
        tamarco_buf_add(b, "null", 4);
        return;
    }
    if (n == floor(n) && fabs(n) < 9.2e18) {
        /* integral: exact, without ".0" or exponent ("-0" becomes "0");
         * digits by hand, snprintf costs more than the rest of a field */
        unsigned long long u = n < 0 ? (unsigned long long)-(long long)n : (unsigned long long)n;
        char *end = tmp + sizeof tmp, *p = end;
        do
            *--p = (char)('0' + u % 10);
        while ((u /= 10) != 0);
        if (n < 0)
            *--p = '-';
        tamarco_buf_add(b, p, (size_t)(end - p));
        return;
    } else {
        snprintf(tmp, sizeof tmp, "%.15g", n);
        fix_decimal_point(tmp);
        if (strtod(tmp, NULL) != n) {
            snprintf(tmp, sizeof tmp, "%.17g", n);
            fix_decimal_point(tmp);
        }
    }
    tamarco_buf_adds(b, tmp);
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

#define N_STANDARD 7

/* Position of a standard record field (see log_encode.h), or N_STANDARD.
 * Their lengths all differ, so one memcmp decides. */
static int standard_rank(const char *s, size_t len)
{
    static const struct { const char *name; int rank; } by_len[20] = {
        [5] = { "level", 1 }, [6] = { "logger", 2 }, [7] = { "message", 3 },
        [10] = { "@timestamp", 0 }, [11] = { "deploy_name", 5 },
        [12] = { "service_name", 4 }, [19] = { "service_instance_id", 6 },
    };
    if (len < 20 && by_len[len].name && memcmp(by_len[len].name, s, len) == 0)
        return by_len[len].rank;
    return N_STANDARD;
}

typedef struct json_key {
    const char *s;      /* the key string, or NULL when the text is in num */
    size_t len;
    int type;           /* LUA_TSTRING, LUA_TNUMBER or LUA_TBOOLEAN */
    int rank;           /* standard field order, or N_STANDARD for the rest */
    int value_idx;      /* stack slot of the value, 0: fetch it with rawget */
    lua_Number n;
    char num[40];
} json_key;

/* Not a pointer into num: sorting moves the structs. */
#define KEY_TEXT(k) ((k)->s ? (k)->s : (k)->num)

typedef struct encoder {
    tamarco_buf *b;
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

/* Records have a dozen keys: insertion sort beats qsort's call overhead. */
static void sort_keys(json_key *keys, size_t n)
{
    if (n > 24) {
        qsort(keys, n, sizeof *keys, key_cmp);
        return;
    }
    for (size_t i = 1; i < n; i++) {
        if (key_cmp(&keys[i - 1], &keys[i]) <= 0)
            continue;
        json_key k = keys[i];
        size_t j = i;
        do {
            keys[j] = keys[j - 1];
            j--;
        } while (j > 0 && key_cmp(&keys[j - 1], &k) > 0);
        keys[j] = k;
    }
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

/* Fills k from the key at stack slot key_idx; 0 for a key type we skip. */
static int read_key(lua_State *L, int key_idx, json_key *k, int top)
{
    k->type = lua_type(L, key_idx);
    if (k->type == LUA_TSTRING) {
        k->s = lua_tolstring(L, key_idx, &k->len);   /* a string: no conversion */
    } else if (k->type == LUA_TNUMBER) {
        tamarco_buf tmp;
        k->n = lua_tonumber(L, key_idx);
        tamarco_buf_init(&tmp);
        tamarco_log_json_number(&tmp, k->n);
        snprintf(k->num, sizeof k->num, "%s", tamarco_buf_cstr(&tmp));
        tamarco_buf_free(&tmp);
        k->s = NULL;
        k->len = strlen(k->num);
    } else if (k->type == LUA_TBOOLEAN) {
        k->s = lua_toboolean(L, key_idx) ? "true" : "false";
        k->len = strlen(k->s);
    } else {
        return 0;   /* tables, functions, ... as keys: skipped */
    }
    k->rank = top ? standard_rank(KEY_TEXT(k), k->len) : N_STANDARD;
    return 1;
}

/* Keys of tables up to this size are gathered in one lua_next pass that
 * leaves each key/value pair on the stack (no second lookup per key). */
#define SMALL_TABLE 48

int tamarco_log_each_field(lua_State *L, int idx, int top,
                           tamarco_log_field_fn fn, void *ud)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    int base = lua_gettop(L);
    json_key small[SMALL_TABLE];
    json_key *keys = small;
    size_t n = 0;

    /* One pass: every pair stays on the stack (k1 v1 k2 v2 ...), the key
     * copied on top for lua_next to continue from. */
    if (!lua_checkstack(L, 2 * SMALL_TABLE + 4))
        return -1;
    size_t pairs = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (++pairs > SMALL_TABLE)
            break;
        if (read_key(L, -2, &keys[n], top)) {
            keys[n].value_idx = lua_gettop(L);
            n++;
        }
        lua_pushvalue(L, -2);
    }
    if (pairs > SMALL_TABLE) {
        /* A big table: count, keep the keys in a userdata (collected if a
         * memory error unwinds us; string keys stay alive in the table)
         * and look each value up again. */
        lua_settop(L, base);
        size_t count = 0;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            count++;
            lua_pop(L, 1);
        }
        keys = lua_newuserdata(L, count * sizeof *keys);
        n = 0;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            lua_pop(L, 1);
            if (n < count && read_key(L, -1, &keys[n], top)) {
                keys[n].value_idx = 0;
                n++;
            }
        }
    }
    sort_keys(keys, n);
    for (size_t i = 0; i < n; i++) {
        int value_idx = keys[i].value_idx;
        if (value_idx == 0) {
            push_key(L, &keys[i]);
            lua_rawget(L, idx);
            value_idx = lua_gettop(L);
        }
        fn(ud, L, KEY_TEXT(&keys[i]), keys[i].len, value_idx);
        if (keys[i].value_idx == 0)
            lua_pop(L, 1);
    }
    lua_settop(L, base);
    return (int)n;
}

static void object_field(void *ud, lua_State *L, const char *key, size_t len, int value_idx)
{
    encoder *e = ud;
    if (!e->first)
        tamarco_buf_addc(e->b, ',');
    e->first = 0;
    tamarco_log_json_string(e->b, key, len);
    tamarco_buf_addc(e->b, ':');
    encode_value(e, value_idx, 0);
    e->first = 0;   /* a nested object may have left it set */
}

/* 1 when the keys of the table at idx are exactly 1..n (n >= 1); *count
 * gets n. Stops at the first key that is not an index (most objects). */
static int is_array(lua_State *L, int idx, size_t *count)
{
    size_t n = 0, max_int = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_Number k;
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER || (k = lua_tonumber(L, -1)) < 1 ||
            k != floor(k) || k > 1e15) {
            lua_pop(L, 1);
            return 0;
        }
        n++;
        if ((size_t)k > max_int)
            max_int = (size_t)k;
    }
    *count = n;
    return n > 0 && max_int == n;
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

    size_t count = 0;
    if (is_array(L, idx, &count)) {
        e->path[e->depth++] = p;
        tamarco_buf_addc(e->b, '[');
        for (size_t i = 1; i <= count; i++) {
            if (i > 1)
                tamarco_buf_addc(e->b, ',');
            lua_rawgeti(L, idx, (int)i);
            encode_value(e, lua_gettop(L), 0);
            lua_pop(L, 1);
        }
        tamarco_buf_addc(e->b, ']');
        e->depth--;
        return;
    }

    e->path[e->depth++] = p;
    tamarco_buf_addc(e->b, '{');
    e->first = 1;
    tamarco_log_each_field(L, idx, top, object_field, e);
    tamarco_buf_addc(e->b, '}');
    e->depth--;
}
static void encode_value(encoder *e, int idx, int top)
{
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        tamarco_buf_add(e->b, "null", 4);
        break;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx))
            tamarco_buf_add(e->b, "true", 4);
        else
            tamarco_buf_add(e->b, "false", 5);
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

void tamarco_log_json_value(tamarco_buf *b, lua_State *L, int idx, int top)
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

/* ---- logstash layouts (Tamarco's formatters, versions 0 and 1) ---- */

typedef struct logstash_ctx {
    tamarco_buf *b;
    int version;
} logstash_ctx;

static int key_is(const char *key, size_t len, const char *name)
{
    return strlen(name) == len && memcmp(name, key, len) == 0;
}

static int is_reserved_logstash(int version, const char *key, size_t len)
{
    static const char *const v0[] = { "levelname", "stack_trace", NULL };
    static const char *const v1[] = {
        "@timestamp", "@version", "message", "host", "path", "type",
        "level", "logger_name", "stack_trace", NULL,
    };
    for (const char *const *r = version == 0 ? v0 : v1; *r; r++)
        if (key_is(key, len, *r))
            return 1;
    return 0;
}

/* Record fields the layout places itself (or drops): the first four
 * standard fields, the caller's source (path, lineno) and the user's tags. */
static int placed_by_layout(const char *key, size_t len)
{
    return standard_rank(key, len) <= 3 || key_is(key, len, "source_path") ||
           key_is(key, len, "source_line") || key_is(key, len, "tags");
}

/* Every record field but the ones the layout places itself goes to the extra
 * fields (@fields in v0, the top level in v1); traceback is stack_trace. */
static void logstash_extra(void *ud, lua_State *L, const char *key, size_t len, int value_idx)
{
    logstash_ctx *c = ud;
    if (placed_by_layout(key, len))
        return;
    tamarco_buf_addc(c->b, ',');
    if (key_is(key, len, "traceback")) {
        tamarco_buf_adds(c->b, "\"stack_trace\"");
    } else if (is_reserved_logstash(c->version, key, len)) {
        char prefixed[32];   /* reserved names are short */
        memcpy(prefixed, "extra_", 6);
        memcpy(prefixed + 6, key, len);
        tamarco_log_json_string(c->b, prefixed, len + 6);
    } else {
        tamarco_log_json_string(c->b, key, len);
    }
    tamarco_buf_addc(c->b, ':');
    tamarco_log_json_value(c->b, L, value_idx, 0);
}

static void add_member(tamarco_buf *b, const char *key, const char *value, size_t len, int comma)
{
    if (comma)
        tamarco_buf_addc(b, ',');
    tamarco_log_json_string(b, key, strlen(key));
    tamarco_buf_addc(b, ':');
    tamarco_log_json_string(b, value, len);
}

const char *tamarco_log_string_field(lua_State *L, int idx, const char *name,
                                     const char *def, size_t *len)
{
    const char *s = def;
    lua_getfield(L, idx, name);
    if (lua_type(L, -1) == LUA_TSTRING)
        s = lua_tolstring(L, -1, len);   /* kept alive by the record */
    else
        *len = def ? strlen(def) : 0;
    lua_pop(L, 1);
    return s;
}

/* Appends the elements of the array at idx (n elements written so far). */
static int append_elements(tamarco_buf *b, lua_State *L, int idx, int n)
{
    int count = (int)lua_objlen(L, idx);
    for (int i = 1; i <= count; i++) {
        if (n++)
            tamarco_buf_addc(b, ',');
        lua_rawgeti(L, idx, i);
        tamarco_log_json_value(b, L, lua_gettop(L), 0);
        lua_pop(L, 1);
    }
    return n;
}

/* The tags array: the sink's own tags, then the record's `tags` (an array
 * is spliced in, any other value is one more tag), as Tamarco takes the
 * tags of a record from its extra fields. */
static void logstash_tags(tamarco_buf *b, lua_State *L, int idx, int tags_idx)
{
    int n = 0;
    tamarco_buf_addc(b, '[');
    if (tags_idx != 0 && lua_istable(L, tags_idx))
        n = append_elements(b, L, tags_idx, n);
    lua_getfield(L, idx, "tags");
    int top = lua_gettop(L);
    if (lua_istable(L, top) && lua_objlen(L, top) > 0) {
        append_elements(b, L, top, n);
    } else if (!lua_isnil(L, top)) {
        int empty_table = 0;
        if (lua_istable(L, top)) {
            lua_pushnil(L);
            empty_table = !lua_next(L, top);
            lua_settop(L, top);
        }
        if (!empty_table) {
            if (n)
                tamarco_buf_addc(b, ',');
            tamarco_log_json_value(b, L, top, 0);
        }
    }
    lua_pop(L, 1);
    tamarco_buf_addc(b, ']');
}

static int has_field(lua_State *L, int idx, const char *name)
{
    lua_getfield(L, idx, name);
    int present = !lua_isnil(L, -1);
    lua_pop(L, 1);
    return present;
}

/* Tamarco's debug fields of a record with an exception: the line of the
 * logging call, the process id and the thread's name (unless the record
 * has fields of those names already). */
static void logstash_debug_fields(tamarco_buf *b, lua_State *L, int idx)
{
    char num[24];
    if (!has_field(L, idx, "lineno")) {
        lua_getfield(L, idx, "source_line");
        if (lua_type(L, -1) == LUA_TNUMBER) {
            tamarco_buf_adds(b, ",\"lineno\":");
            tamarco_log_json_number(b, lua_tonumber(L, -1));
        }
        lua_pop(L, 1);
    }
    if (!has_field(L, idx, "process")) {
        snprintf(num, sizeof num, "%ld", (long)getpid());
        tamarco_buf_adds(b, ",\"process\":");
        tamarco_buf_adds(b, num);
    }
    if (!has_field(L, idx, "thread_name"))
        tamarco_buf_adds(b, ",\"thread_name\":\"MainThread\"");
}

void tamarco_log_logstash(tamarco_buf *b, lua_State *L, int idx, int version,
                          const char *host, size_t host_len,
                          const char *type, size_t type_len, int tags_idx)
{
    size_t ts_len, msg_len, level_len, logger_len, path_len;
    char now[40];
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    if (tags_idx < 0 && tags_idx > LUA_REGISTRYINDEX)
        tags_idx = lua_gettop(L) + tags_idx + 1;
    const char *ts = tamarco_log_string_field(L, idx, "@timestamp", NULL, &ts_len);
    if (!ts) {
        struct timeval tv;
        gettimeofday(&tv, NULL);
        if (tamarco_log_iso8601(now, sizeof now, (double)tv.tv_sec + tv.tv_usec / 1e6) < 0)
            snprintf(now, sizeof now, "1970-01-01T00:00:00.000Z");
        ts = now;
        ts_len = strlen(now);
    }
    const char *message = tamarco_log_string_field(L, idx, "message", "", &msg_len);
    const char *level = tamarco_log_string_field(L, idx, "level", "INFO", &level_len);
    const char *logger = tamarco_log_string_field(L, idx, "logger", "", &logger_len);
    /* the source file of the logging call; the logger name when unknown */
    const char *path = tamarco_log_string_field(L, idx, "source_path", NULL, &path_len);
    if (!path) {
        path = logger;
        path_len = logger_len;
    }
    int has_traceback = has_field(L, idx, "traceback");

    logstash_ctx ctx = { b, version };
    tamarco_buf_addc(b, '{');
    add_member(b, "@timestamp", ts, ts_len, 0);
    if (version == 0) {
        /* @source is "<type>://<host>/<path>" */
        char small[256];
        size_t n = type_len + 3 + host_len + 1 + path_len;
        char *source = n <= sizeof small ? small : malloc(n);
        if (!source) {
            b->oom = 1;
            return;
        }
        memcpy(source, type, type_len);
        memcpy(source + type_len, "://", 3);
        memcpy(source + type_len + 3, host, host_len);
        source[type_len + 3 + host_len] = '/';
        memcpy(source + type_len + 4 + host_len, path, path_len);
        add_member(b, "@message", message, msg_len, 1);
        add_member(b, "@source", source, n, 1);
        if (source != small)
            free(source);
        add_member(b, "@source_host", host, host_len, 1);
        add_member(b, "@source_path", path, path_len, 1);
        tamarco_buf_adds(b, ",\"@tags\":");
    } else {
        tamarco_buf_adds(b, ",\"@version\":\"1\"");
        add_member(b, "message", message, msg_len, 1);
        add_member(b, "host", host, host_len, 1);
        add_member(b, "path", path, path_len, 1);
        tamarco_buf_adds(b, ",\"tags\":");
    }
    logstash_tags(b, L, idx, tags_idx);
    if (version == 0) {
        add_member(b, "@type", type, type_len, 1);
        tamarco_buf_adds(b, ",\"@fields\":{");
        add_member(b, "levelname", level, level_len, 0);
        add_member(b, "logger", logger, logger_len, 1);
        tamarco_log_each_field(L, idx, 1, logstash_extra, &ctx);
        if (has_traceback)
            logstash_debug_fields(b, L, idx);
        tamarco_buf_addc(b, '}');
    } else {
        add_member(b, "type", type, type_len, 1);
        add_member(b, "level", level, level_len, 1);
        add_member(b, "logger_name", logger, logger_len, 1);
        tamarco_log_each_field(L, idx, 1, logstash_extra, &ctx);
        if (has_traceback)
            logstash_debug_fields(b, L, idx);
    }
    tamarco_buf_addc(b, '}');
}
