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
#define PLAIN(c) ((c) >= 0x20 && (c) < 0x7F && (c) != '"' && (c) != '\\')
#define PLAIN_16(c) PLAIN(c), PLAIN(c + 1), PLAIN(c + 2), PLAIN(c + 3), PLAIN(c + 4), \
    PLAIN(c + 5), PLAIN(c + 6), PLAIN(c + 7), PLAIN(c + 8), PLAIN(c + 9), PLAIN(c + 10), \
    PLAIN(c + 11), PLAIN(c + 12), PLAIN(c + 13), PLAIN(c + 14), PLAIN(c + 15)
static const unsigned char plain_bytes[256] = {
    PLAIN_16(0x00), PLAIN_16(0x10), PLAIN_16(0x20), PLAIN_16(0x30),
    PLAIN_16(0x40), PLAIN_16(0x50), PLAIN_16(0x60), PLAIN_16(0x70),
    PLAIN_16(0x80), PLAIN_16(0x90), PLAIN_16(0xA0), PLAIN_16(0xB0),
    PLAIN_16(0xC0), PLAIN_16(0xD0), PLAIN_16(0xE0), PLAIN_16(0xF0),
};

static inline int plain_byte(unsigned char c)
{
    return plain_bytes[c];
}

#define BYTES_OF(c) (0x0101010101010101ULL * (c))
#define HIGH_BITS BYTES_OF(0x80)

/* 1 when one of the 8 bytes in x may need escaping (a control character,
 * '"', '\\', DEL or a byte of a multibyte sequence). Never misses one;
 * may flag a word that holds none (the byte loop then decides). */
static inline int word_has_special(uint64_t x)
{
    uint64_t control = (x - BYTES_OF(0x20)) & ~x;
    uint64_t quote = x ^ BYTES_OF('"'), backslash = x ^ BYTES_OF('\\');
    uint64_t found = control | ((quote - BYTES_OF(1)) & ~quote) |
                     ((backslash - BYTES_OF(1)) & ~backslash) | (x + BYTES_OF(1)) | x;
    return (found & HIGH_BITS) != 0;
}

/* Length of the run of plain bytes s starts with: a word at a time, as
 * nearly every string of a record is plain; the last bytes of a string of
 * 8 or more in one more word, read back from its end. */
static inline size_t plain_prefix(const unsigned char *s, size_t len)
{
    size_t i = 0;
    uint64_t x;
    for (; i + 8 <= len; i += 8) {
        memcpy(&x, s + i, 8);
        if (word_has_special(x))
            goto bytes;
    }
    if (i == len)
        return len;
    if (len >= 8) {
        memcpy(&x, s + len - 8, 8);
        if (!word_has_special(x))
            return len;
    }
bytes:
    while (i < len && plain_byte(s[i]))
        i++;
    return i;
}

/* Appends the escaped bytes of s (no quotes); the first `plain` of them are
 * known to need no escaping. */
static void json_escape_from(tamarco_buf *b, const char *str, size_t len, size_t plain)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    size_t i = plain, run = 0;   /* run: start of bytes copied as they are */
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
}

void tamarco_log_json_string(tamarco_buf *b, const char *str, size_t len)
{
    size_t plain = plain_prefix((const unsigned char *)str, len);
    if (plain == len && tamarco_buf_reserve(b, len + 2)) {
        /* the common case: nothing to escape, one copy */
        char *out = b->data + b->len;
        out[0] = '"';
        memcpy(out + 1, str, len);
        out[len + 1] = '"';
        b->len += len + 2;
        return;
    }
    tamarco_buf_addc(b, '"');
    json_escape_from(b, str, len, plain);
    tamarco_buf_addc(b, '"');
}

/* The inside of a JSON string: escaped bytes without the quotes. */
static void json_string_body(tamarco_buf *b, const char *str, size_t len)
{
    json_escape_from(b, str, len, plain_prefix((const unsigned char *)str, len));
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
    if (fabs(n) < 9.2e18 && (double)(long long)n == n) {
        /* integral: exact, without ".0" or exponent ("-0" becomes "0");
         * digits by hand, snprintf costs more than the rest of a field */
        long long i = (long long)n;
        unsigned long long u = i < 0 ? (unsigned long long)-i : (unsigned long long)i;
        char *end = tmp + sizeof tmp, *p = end;
        do
            *--p = (char)('0' + u % 10);
        while ((u /= 10) != 0);
        if (i < 0)
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
    int role;           /* what the field is to a logstash layout */
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

/* The keys of one table, in the order lua_next gave them. */
typedef struct field_list {
    json_key *keys;
    size_t n;
    json_key small[SMALL_TABLE + 2];   /* + the source fields of a record in parts */
} field_list;

/* Gathers the keys of the table at idx (an absolute index) into f. The
 * values of a small table stay on the stack (value_idx); those of a big one
 * are looked up again (value_idx 0, see field_value). The caller restores
 * the stack top. 0 when the Lua stack cannot grow. */
static int gather_fields(lua_State *L, int idx, int top, field_list *f)
{
    int base = lua_gettop(L);
    json_key *keys = f->small;
    size_t n = 0;

    /* One pass: every pair stays on the stack (k1 v1 k2 v2 ...), the key
     * copied on top for lua_next to continue from. */
    if (!lua_checkstack(L, 2 * SMALL_TABLE + 4))
        return 0;
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
    f->keys = keys;
    f->n = n;
    return 1;
}

/* The stack index of the value of key k of the table at idx: where
 * gather_fields left it, or pushed now (the caller pops it). */
static int field_value(lua_State *L, int idx, const json_key *k)
{
    if (k->value_idx)
        return k->value_idx;
    push_key(L, k);
    lua_rawget(L, idx);
    return lua_gettop(L);
}

int tamarco_log_each_field(lua_State *L, int idx, int top,
                           tamarco_log_field_fn fn, void *ud)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    int base = lua_gettop(L);
    field_list f;
    if (!gather_fields(L, idx, top, &f))
        return -1;
    sort_keys(f.keys, f.n);
    for (size_t i = 0; i < f.n; i++) {
        int top_before = lua_gettop(L);
        fn(ud, L, KEY_TEXT(&f.keys[i]), f.keys[i].len, field_value(L, idx, &f.keys[i]));
        lua_settop(L, top_before);
    }
    lua_settop(L, base);
    return (int)f.n;
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

/* ---- logstash layouts (Tamarco's formatters, versions 0 and 1) ----
 *
 * version 1: {"@timestamp":T,"@version":"1","message":M,"host":H,"path":P,
 *             "tags":[...],"type":Y,"level":L,"logger_name":N, extra fields}
 * version 0: {"@timestamp":T,"@message":M,"@source":"Y://H/P",
 *             "@source_host":H,"@source_path":P,"@tags":[...],"@type":Y,
 *             "@fields":{"levelname":L,"logger":N, extra fields}}
 * A layout holds the text between the record's own values, encoded once:
 * its parts, written in this order around the record's values. */
enum {
    PART_HEAD,      /* after @timestamp, up to the message */
    PART_SOURCE,    /* v0: ,"@source":" and the escaped "<type>://<host>/" */
    PART_HOST,      /* up to the path */
    PART_TAGS,      /* the tags' key and the sink's own tags */
    PART_TYPE,      /* after the tags, up to the level */
    PART_LOGGER,    /* up to the logger name */
    N_PARTS
};

static void part(tamarco_buf *b, const tamarco_logstash_layout *l, int which)
{
    size_t start = which ? l->ends[which - 1] : 0;
    tamarco_buf_add(b, l->text.data + start, l->ends[which] - start);
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

void tamarco_logstash_layout_init(tamarco_logstash_layout *layout)
{
    memset(layout, 0, sizeof *layout);
    tamarco_buf_init(&layout->text);
}

void tamarco_logstash_layout_free(tamarco_logstash_layout *layout)
{
    tamarco_buf_free(&layout->text);
}

int tamarco_logstash_layout_set(tamarco_logstash_layout *layout, lua_State *L,
                                int version, const char *host, size_t host_len,
                                const char *type, size_t type_len, int tags_idx)
{
    tamarco_buf *t = &layout->text;
    if (tags_idx < 0 && tags_idx > LUA_REGISTRYINDEX)
        tags_idx = lua_gettop(L) + tags_idx + 1;
    t->len = 0;
    t->oom = 0;
    layout->version = version;
    layout->sink_tags = 0;
    if (version == 0) {
        tamarco_buf_adds(t, ",\"@message\":");
        layout->ends[PART_HEAD] = t->len;
        /* "<type>://<host>/" escaped: it ends in '/', so the escaping of the
         * path after it is the same as that of the whole */
        tamarco_buf_adds(t, ",\"@source\":\"");
        json_string_body(t, type, type_len);
        tamarco_buf_add(t, "://", 3);
        json_string_body(t, host, host_len);
        tamarco_buf_addc(t, '/');
        layout->ends[PART_SOURCE] = t->len;
        tamarco_buf_adds(t, ",\"@source_host\":");
        tamarco_log_json_string(t, host, host_len);
        tamarco_buf_adds(t, ",\"@source_path\":");
        layout->ends[PART_HOST] = t->len;
        tamarco_buf_adds(t, ",\"@tags\":[");
    } else {
        tamarco_buf_adds(t, ",\"@version\":\"1\",\"message\":");
        layout->ends[PART_HEAD] = t->len;
        layout->ends[PART_SOURCE] = t->len;
        tamarco_buf_adds(t, ",\"host\":");
        tamarco_log_json_string(t, host, host_len);
        tamarco_buf_adds(t, ",\"path\":");
        layout->ends[PART_HOST] = t->len;
        tamarco_buf_adds(t, ",\"tags\":[");
    }
    if (tags_idx != 0 && lua_istable(L, tags_idx))
        layout->sink_tags = append_elements(t, L, tags_idx, 0);
    layout->ends[PART_TAGS] = t->len;
    tamarco_buf_adds(t, version == 0 ? "],\"@type\":" : "],\"type\":");
    tamarco_log_json_string(t, type, type_len);
    tamarco_buf_adds(t, version == 0 ? ",\"@fields\":{\"levelname\":" : ",\"level\":");
    layout->ends[PART_TYPE] = t->len;
    tamarco_buf_adds(t, version == 0 ? ",\"logger\":" : ",\"logger_name\":");
    layout->ends[PART_LOGGER] = t->len;
    if (!t->oom)
        return 1;
    tamarco_buf_free(t);
    return 0;
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

/* What a record field is to the layout. */
enum {
    FIELD_EXTRA,        /* an extra field, written as it is */
    FIELD_TIMESTAMP,    /* placed by the layout (not an extra field) ... */
    FIELD_MESSAGE,
    FIELD_LEVEL,
    FIELD_LOGGER,
    FIELD_SOURCE_PATH,
    FIELD_SOURCE_LINE,
    FIELD_TAGS,         /* ... up to here */
    FIELD_TRACEBACK,    /* an extra field written as stack_trace */
    FIELD_LINENO,       /* extra fields that replace a debug field */
    FIELD_PROCESS,
    FIELD_THREAD_NAME,
};

#define NAME_IS(key, len, lit) ((len) == sizeof(lit) - 1 && memcmp((key), (lit), (len)) == 0)

static int field_role(const json_key *k)
{
    if (k->type != LUA_TSTRING)
        return FIELD_EXTRA;
    const char *s = k->s;
    switch (k->len) {
    case 4: return NAME_IS(s, 4, "tags") ? FIELD_TAGS : FIELD_EXTRA;
    case 5: return NAME_IS(s, 5, "level") ? FIELD_LEVEL : FIELD_EXTRA;
    case 6:
        if (NAME_IS(s, 6, "logger"))
            return FIELD_LOGGER;
        return NAME_IS(s, 6, "lineno") ? FIELD_LINENO : FIELD_EXTRA;
    case 7:
        if (NAME_IS(s, 7, "message"))
            return FIELD_MESSAGE;
        return NAME_IS(s, 7, "process") ? FIELD_PROCESS : FIELD_EXTRA;
    case 9: return NAME_IS(s, 9, "traceback") ? FIELD_TRACEBACK : FIELD_EXTRA;
    case 10: return NAME_IS(s, 10, "@timestamp") ? FIELD_TIMESTAMP : FIELD_EXTRA;
    case 11:
        if (NAME_IS(s, 11, "source_path"))
            return FIELD_SOURCE_PATH;
        if (NAME_IS(s, 11, "source_line"))
            return FIELD_SOURCE_LINE;
        return NAME_IS(s, 11, "thread_name") ? FIELD_THREAD_NAME : FIELD_EXTRA;
    default: return FIELD_EXTRA;
    }
}

/* Extra field names the layout uses itself: they get an extra_ prefix. */
static int is_reserved_logstash(int version, const char *key, size_t len)
{
    if (version == 0)
        return NAME_IS(key, len, "levelname") || NAME_IS(key, len, "stack_trace");
    switch (len) {
    case 4: return NAME_IS(key, len, "host") || NAME_IS(key, len, "path") || NAME_IS(key, len, "type");
    case 5: return NAME_IS(key, len, "level");
    case 7: return NAME_IS(key, len, "message");
    case 8: return NAME_IS(key, len, "@version");
    case 10: return NAME_IS(key, len, "@timestamp");
    case 11: return NAME_IS(key, len, "logger_name") || NAME_IS(key, len, "stack_trace");
    default: return 0;
    }
}

/* The string value at value_idx (its length in *len), or def. */
static const char *string_value(lua_State *L, int value_idx, const char *def, size_t *len)
{
    if (value_idx && lua_type(L, value_idx) == LUA_TSTRING)
        return lua_tolstring(L, value_idx, len);
    *len = def ? strlen(def) : 0;
    return def;
}

/* A field's value as JSON: strings and numbers straight, the rest through
 * the value walk (the same bytes either way). */
static void field_json(tamarco_buf *b, lua_State *L, int value_idx)
{
    switch (lua_type(L, value_idx)) {
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, value_idx, &len);
        tamarco_log_json_string(b, s, len);
        break;
    }
    case LUA_TNUMBER:
        tamarco_log_json_number(b, lua_tonumber(L, value_idx));
        break;
    default:
        tamarco_log_json_value(b, L, value_idx, 0);
    }
}

/* The tags after the sink's own (n of them): the record's `tags` (an array
 * is spliced in, any other value is one more tag), as Tamarco takes the
 * tags of a record from its extra fields. */
static void record_tags(tamarco_buf *b, lua_State *L, int value_idx, int n)
{
    if (lua_istable(L, value_idx) && lua_objlen(L, value_idx) > 0) {
        append_elements(b, L, value_idx, n);
        return;
    }
    if (lua_istable(L, value_idx)) {
        int top = lua_gettop(L);
        lua_pushnil(L);
        int empty_table = !lua_next(L, value_idx);
        lua_settop(L, top);
        if (empty_table)
            return;
    }
    if (n)
        tamarco_buf_addc(b, ',');
    tamarco_log_json_value(b, L, value_idx, 0);
}

#define N_ROLES (FIELD_THREAD_NAME + 1)
#define N_IDENTITY 3

/* The keys of the identity fields of a record in parts, in their order. */
static const char *const identity_members[N_IDENTITY] = {
    ",\"service_name\":", ",\"deploy_name\":", ",\"service_instance_id\":",
};

/* Writes a record: the values the layout places at the stack indexes in at
 * (0: missing), the identity fields at identity (when given: the record
 * is in parts, see tamarco_log_logstash_parts), then the first `extras`
 * keys of f, whose values are in the table at idx. */
static void write_record(tamarco_buf *b, lua_State *L, const tamarco_logstash_layout *l,
                         const int at[N_ROLES], const int *identity,
                         field_list *f, size_t extras, int idx)
{
    size_t ts_len, msg_len, level_len, logger_len, path_len;
    char now[40];
    const char *ts = string_value(L, at[FIELD_TIMESTAMP], NULL, &ts_len);
    if (!ts) {
        struct timeval tv;
        gettimeofday(&tv, NULL);
        if (tamarco_log_iso8601(now, sizeof now, (double)tv.tv_sec + tv.tv_usec / 1e6) < 0)
            snprintf(now, sizeof now, "1970-01-01T00:00:00.000Z");
        ts = now;
        ts_len = strlen(now);
    }
    const char *message = string_value(L, at[FIELD_MESSAGE], "", &msg_len);
    const char *level = string_value(L, at[FIELD_LEVEL], "INFO", &level_len);
    const char *logger = string_value(L, at[FIELD_LOGGER], "", &logger_len);
    /* the source file of the logging call; the logger name when unknown */
    const char *path = string_value(L, at[FIELD_SOURCE_PATH], NULL, &path_len);
    if (!path) {
        path = logger;
        path_len = logger_len;
    }

    tamarco_buf_add(b, "{\"@timestamp\":", 14);
    tamarco_log_json_string(b, ts, ts_len);
    part(b, l, PART_HEAD);
    tamarco_log_json_string(b, message, msg_len);
    if (l->version == 0) {
        part(b, l, PART_SOURCE);
        json_string_body(b, path, path_len);
        tamarco_buf_addc(b, '"');
    }
    part(b, l, PART_HOST);
    tamarco_log_json_string(b, path, path_len);
    part(b, l, PART_TAGS);
    if (at[FIELD_TAGS])
        record_tags(b, L, at[FIELD_TAGS], l->sink_tags);
    part(b, l, PART_TYPE);
    tamarco_log_json_string(b, level, level_len);
    part(b, l, PART_LOGGER);
    tamarco_log_json_string(b, logger, logger_len);

    /* the extra fields (@fields in v0, the top level in v1): a record in
     * parts has its identity fields apart, and they sort first anyway */
    for (int i = 0; identity && i < N_IDENTITY; i++) {
        if (identity[i]) {
            tamarco_buf_adds(b, identity_members[i]);
            field_json(b, L, identity[i]);
        }
    }
    sort_keys(f->keys, extras);
    for (size_t i = 0; i < extras; i++) {
        const json_key *k = &f->keys[i];
        const char *key = KEY_TEXT(k);
        tamarco_buf_addc(b, ',');
        if (k->role == FIELD_TRACEBACK) {
            tamarco_buf_add(b, "\"stack_trace\"", 13);
        } else if (is_reserved_logstash(l->version, key, k->len)) {
            char prefixed[32];   /* reserved names are short */
            memcpy(prefixed, "extra_", 6);
            memcpy(prefixed + 6, key, k->len);
            tamarco_log_json_string(b, prefixed, k->len + 6);
        } else {
            tamarco_log_json_string(b, key, k->len);
        }
        tamarco_buf_addc(b, ':');
        int top = lua_gettop(L);
        field_json(b, L, field_value(L, idx, k));
        lua_settop(L, top);
    }

    /* Tamarco's debug fields of a record with an exception: the line of the
     * logging call, the process id and the thread's name (unless the record
     * has fields of those names already) */
    if (at[FIELD_TRACEBACK]) {
        if (!at[FIELD_LINENO] && at[FIELD_SOURCE_LINE] &&
            lua_type(L, at[FIELD_SOURCE_LINE]) == LUA_TNUMBER) {
            tamarco_buf_add(b, ",\"lineno\":", 10);
            tamarco_log_json_number(b, lua_tonumber(L, at[FIELD_SOURCE_LINE]));
        }
        if (!at[FIELD_PROCESS]) {
            tamarco_buf_add(b, ",\"process\":", 11);
            tamarco_log_json_number(b, (double)getpid());
        }
        if (!at[FIELD_THREAD_NAME])
            tamarco_buf_adds(b, ",\"thread_name\":\"MainThread\"");
    }
    tamarco_buf_add(b, l->version == 0 ? "}}" : "}", l->version == 0 ? 2 : 1);
}

void tamarco_log_logstash(tamarco_buf *b, lua_State *L, int idx,
                          const tamarco_logstash_layout *l)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    int base = lua_gettop(L);
    field_list f;
    /* room for the values of a big record looked up below, and a walk */
    if (!lua_checkstack(L, 16) || !gather_fields(L, idx, 1, &f)) {
        b->oom = 1;
        return;
    }
    /* One look at each key: the fields the layout places are noted, the
     * extra ones are kept (in place) to be sorted and written. */
    int at[N_ROLES] = { 0 };
    size_t extras = 0;
    for (size_t i = 0; i < f.n; i++) {
        int role = field_role(&f.keys[i]);
        if (role != FIELD_EXTRA)
            at[role] = field_value(L, idx, &f.keys[i]);
        if (role == FIELD_EXTRA || role >= FIELD_TRACEBACK) {
            f.keys[i].role = role;
            f.keys[extras++] = f.keys[i];
        }
    }
    write_record(b, L, l, at, NULL, &f, extras, idx);
    lua_settop(L, base);
}

/* ---- records in parts ----
 *
 * The logging module hands a record whose fields need no masking to the
 * encoders in parts, without building its table: the values at first ..
 * first + 9 are its @timestamp, level, logger and message (strings), its
 * extra fields (a table or nil), source_path, source_line, service_name,
 * deploy_name and service_instance_id (each may be nil). */
enum { ARG_TS, ARG_LEVEL, ARG_LOGGER, ARG_MESSAGE, ARG_EXTRA, ARG_SOURCE_PATH,
       ARG_SOURCE_LINE, ARG_IDENTITY };

/* Gathers the extra fields (the table at idx, or nil) into f with their
 * roles. 0 when a key would not be that same field in the record's table
 * (a key that is not a string, names a standard field, traceback or a
 * source field): such parts need the table. The caller restores the stack. */
static int gather_extra(lua_State *L, int idx, field_list *f)
{
    f->keys = f->small;
    f->n = 0;
    if (lua_isnil(L, idx))
        return 1;
    if (!lua_istable(L, idx) || !lua_checkstack(L, 16) || !gather_fields(L, idx, 1, f))
        return 0;
    for (size_t i = 0; i < f->n; i++) {
        json_key *k = &f->keys[i];
        k->role = field_role(k);
        if (k->type != LUA_TSTRING || k->rank != N_STANDARD || k->role == FIELD_TRACEBACK ||
            (k->role >= FIELD_TIMESTAMP && k->role <= FIELD_SOURCE_LINE))
            return 0;
    }
    return 1;
}

static int parts_are_strings(lua_State *L, int first)
{
    for (int i = ARG_TS; i <= ARG_MESSAGE; i++)
        if (lua_type(L, first + i) != LUA_TSTRING)
            return 0;
    return 1;
}

/* The stack indexes of the identity values (0: nil). */
static void identity_parts(lua_State *L, int first, int identity[N_IDENTITY])
{
    for (int i = 0; i < N_IDENTITY; i++)
        identity[i] = lua_isnil(L, first + ARG_IDENTITY + i) ? 0 : first + ARG_IDENTITY + i;
}

int tamarco_log_logstash_parts(tamarco_buf *b, lua_State *L, int first,
                               const tamarco_logstash_layout *l)
{
    int base = lua_gettop(L);
    field_list f;
    if (!parts_are_strings(L, first) || !gather_extra(L, first + ARG_EXTRA, &f)) {
        lua_settop(L, base);
        return 0;
    }
    int at[N_ROLES] = { 0 };
    at[FIELD_TIMESTAMP] = first + ARG_TS;
    at[FIELD_LEVEL] = first + ARG_LEVEL;
    at[FIELD_LOGGER] = first + ARG_LOGGER;
    at[FIELD_MESSAGE] = first + ARG_MESSAGE;
    if (!lua_isnil(L, first + ARG_SOURCE_PATH))
        at[FIELD_SOURCE_PATH] = first + ARG_SOURCE_PATH;
    int identity[N_IDENTITY];
    identity_parts(L, first, identity);
    /* the user's tags are placed by the layout, the rest are extra fields */
    size_t extras = 0;
    for (size_t i = 0; i < f.n; i++) {
        if (f.keys[i].role == FIELD_TAGS)
            at[FIELD_TAGS] = field_value(L, first + ARG_EXTRA, &f.keys[i]);
        else
            f.keys[extras++] = f.keys[i];
    }
    write_record(b, L, l, at, identity, &f, extras, first + ARG_EXTRA);
    lua_settop(L, base);
    return 1;
}

/* A field made up for a record in parts, its value at value_idx. */
static void add_part_field(field_list *f, const char *name, int value_idx)
{
    json_key *k = &f->keys[f->n++];
    k->s = name;
    k->len = strlen(name);
    k->type = LUA_TSTRING;
    k->rank = N_STANDARD;
    k->role = FIELD_EXTRA;
    k->value_idx = value_idx;
}

int tamarco_log_json_parts(tamarco_buf *b, lua_State *L, int first)
{
    int base = lua_gettop(L);
    field_list f;
    if (!parts_are_strings(L, first) || !gather_extra(L, first + ARG_EXTRA, &f)) {
        lua_settop(L, base);
        return 0;
    }
    /* A big table's keys are in a userdata of their exact number: the
     * source fields need a bigger one. */
    if (f.keys != f.small) {
        json_key *keys = lua_newuserdata(L, (f.n + 2) * sizeof *keys);
        memcpy(keys, f.keys, f.n * sizeof *keys);
        f.keys = keys;
    }
    if (!lua_isnil(L, first + ARG_SOURCE_PATH))
        add_part_field(&f, "source_path", first + ARG_SOURCE_PATH);
    if (!lua_isnil(L, first + ARG_SOURCE_LINE))
        add_part_field(&f, "source_line", first + ARG_SOURCE_LINE);
    int identity[N_IDENTITY];
    identity_parts(L, first, identity);

    /* as tamarco_log_json_value writes the record's table: the standard
     * fields in their order, then the rest sorted */
    static const char *const standard[] = { "{\"@timestamp\":", ",\"level\":", ",\"logger\":", ",\"message\":" };
    for (int i = ARG_TS; i <= ARG_MESSAGE; i++) {
        size_t len;
        const char *s = lua_tolstring(L, first + i, &len);
        tamarco_buf_adds(b, standard[i]);
        tamarco_log_json_string(b, s, len);
    }
    for (int i = 0; i < N_IDENTITY; i++) {
        if (identity[i]) {
            tamarco_buf_adds(b, identity_members[i]);
            field_json(b, L, identity[i]);
        }
    }
    sort_keys(f.keys, f.n);
    for (size_t i = 0; i < f.n; i++) {
        tamarco_buf_addc(b, ',');
        tamarco_log_json_string(b, KEY_TEXT(&f.keys[i]), f.keys[i].len);
        tamarco_buf_addc(b, ':');
        int top = lua_gettop(L);
        field_json(b, L, field_value(L, first + ARG_EXTRA, &f.keys[i]));
        lua_settop(L, top);
    }
    tamarco_buf_addc(b, '}');
    lua_settop(L, base);
    return 1;
}
