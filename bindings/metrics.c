/* tamarco.c.metrics: metrics encoding (bytes only; the registry, sorting
 * and quantiles are Lua's, see lua/tamarco/core/metrics/init.lua).
 *
 *   format_value(v) -> the sample value as the text format wants it
 *   encode(entries) -> the Prometheus text exposition (format 0.0.4)
 *
 * entries is a list of families, each a list { name, help, kind, series
 * [, les] }: name the exposed name, help the raw help text, kind "counter",
 * "gauge", "histogram" or "summary", series a list of series tables in
 * output order with the fields the Lua registry keeps: label_str
 * ('{a="x"}' or ''), and value (counter, gauge); counts, sum, count
 * (histogram: counts per finite bucket, not cumulative); qvalues,
 * quantile_labels, sum, count (summary). les (histograms) lists the le
 * label values, the last "+Inf". Entries of unexpected types are skipped,
 * never raised on. */
#include "host.h"
#include "log_encode.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- numbers ---- */

/* Writes v into out (>= 40 bytes): integral values exactly without exponent
 * (up to 2^63), +Inf, -Inf, NaN, other values in the shortest of %.15g,
 * %.16g, %.17g that reads back to the same double. Returns the length. */
static size_t format_value(char *out, double v)
{
    if (isnan(v)) {
        memcpy(out, "NaN", 4);
        return 3;
    }
    if (isinf(v)) {
        memcpy(out, v > 0 ? "+Inf" : "-Inf", 5);
        return 4;
    }
    if (v == floor(v) && fabs(v) < 9.2e18) {
        char tmp[24];
        int64_t i = (int64_t)v;
        uint64_t u = i < 0 ? (uint64_t)0 - (uint64_t)i : (uint64_t)i;
        size_t n = 0;
        do {
            tmp[n++] = (char)('0' + u % 10);
            u /= 10;
        } while (u);
        size_t len = 0;
        if (i < 0)
            out[len++] = '-';
        while (n)
            out[len++] = tmp[--n];
        out[len] = '\0';
        return len;
    }
    static const char *const formats[] = {"%.15g", "%.16g", "%.17g"};
    int len = 0;
    for (int f = 0; f < 3; f++) {
        len = snprintf(out, 40, formats[f], v);
        for (char *p = out; *p; p++)   /* whatever LC_NUMERIC says */
            if (*p == ',')
                *p = '.';
        if (f == 2 || strtod(out, NULL) == v)
            break;
    }
    return (size_t)len;
}

static void add_value(tamarco_buf *b, double v)
{
    char tmp[40];
    tamarco_buf_add(b, tmp, format_value(tmp, v));
}

static int l_format_value(lua_State *L)
{
    char tmp[40];
    size_t len = format_value(tmp, luaL_checknumber(L, 1));
    lua_pushlstring(L, tmp, len);
    return 1;
}

/* ---- exposition ---- */

static void add_help(tamarco_buf *b, const char *s, size_t len)
{
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '\\' || c == '\n') {
            tamarco_buf_add(b, s + run, i - run);
            tamarco_buf_add(b, c == '\\' ? "\\\\" : "\\n", 2);
            run = i + 1;
        }
    }
    tamarco_buf_add(b, s + run, len - run);
}

/* The string field `key` of the table at idx (s, len), or "" when absent. */
static const char *string_field(lua_State *L, int idx, const char *key, size_t *len)
{
    lua_getfield(L, idx, key);
    const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, len) : (*len = 0, "");
    lua_pop(L, 1);   /* the string stays alive in the table */
    return s;
}

static double number_field(lua_State *L, int idx, const char *key)
{
    lua_getfield(L, idx, key);
    double v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0.0;
    lua_pop(L, 1);
    return v;
}

static const char *string_at(lua_State *L, int idx, int i, size_t *len)
{
    lua_rawgeti(L, idx, i);
    const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, len) : (*len = 0, "");
    lua_pop(L, 1);
    return s;
}

/* One sample line: name suffix labels value. */
static void add_line(tamarco_buf *b, const char *name, size_t name_len, const char *suffix,
                     const char *labels, size_t labels_len, double v)
{
    tamarco_buf_add(b, name, name_len);
    if (suffix)
        tamarco_buf_adds(b, suffix);
    tamarco_buf_add(b, labels, labels_len);
    tamarco_buf_addc(b, ' ');
    add_value(b, v);
    tamarco_buf_addc(b, '\n');
}

enum { KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM, KIND_SUMMARY, KIND_UNKNOWN };

static int kind_of(const char *s)
{
    if (strcmp(s, "counter") == 0) return KIND_COUNTER;
    if (strcmp(s, "gauge") == 0) return KIND_GAUGE;
    if (strcmp(s, "histogram") == 0) return KIND_HISTOGRAM;
    if (strcmp(s, "summary") == 0) return KIND_SUMMARY;
    return KIND_UNKNOWN;
}

/* The series table at idx of a family of the given kind. */
/* The le label values of a histogram family, read once per family. */
#define LE_CACHE 64
typedef struct le_values {
    int idx;                    /* the les table on the stack */
    int n;                      /* entries, the last "+Inf" */
    const char *s[LE_CACHE];    /* first LE_CACHE values */
    size_t len[LE_CACHE];
} le_values;

static void add_series(tamarco_buf *b, lua_State *L, int idx, int kind,
                       const char *name, size_t name_len, le_values *les)
{
    size_t labels_len;
    const char *labels = string_field(L, idx, "label_str", &labels_len);
    if (kind == KIND_COUNTER || kind == KIND_GAUGE) {
        add_line(b, name, name_len, NULL, labels, labels_len, number_field(L, idx, "value"));
        return;
    }
    double sum = number_field(L, idx, "sum");
    double count = number_field(L, idx, "count");
    if (kind == KIND_HISTOGRAM) {
        /* the le label is spliced into the series' labels: {a="x",le="1"} */
        lua_getfield(L, idx, "counts");
        int counts = lua_gettop(L);
        int nbounds = les->n - 1;
        if (lua_istable(L, counts)) {
            double acc = 0;
            size_t open = labels_len ? labels_len - 1 : 0;   /* without the '}' */
            for (int i = 1; i <= nbounds + 1; i++) {
                if (i <= nbounds) {
                    lua_rawgeti(L, counts, i);
                    acc += lua_tonumber(L, -1);
                    lua_pop(L, 1);
                } else {
                    acc = count;
                }
                size_t le_len;
                const char *le = i <= LE_CACHE ? (le_len = les->len[i - 1], les->s[i - 1])
                                               : string_at(L, les->idx, i, &le_len);
                tamarco_buf_add(b, name, name_len);
                tamarco_buf_add(b, "_bucket", 7);
                if (open) {
                    tamarco_buf_add(b, labels, open);
                    tamarco_buf_add(b, ",le=\"", 5);
                } else {
                    tamarco_buf_add(b, "{le=\"", 5);
                }
                tamarco_buf_add(b, le, le_len);
                tamarco_buf_add(b, "\"} ", 3);
                add_value(b, acc);
                tamarco_buf_addc(b, '\n');
            }
        }
        lua_pop(L, 1);
    } else {
        lua_getfield(L, idx, "qvalues");
        lua_getfield(L, idx, "quantile_labels");
        int values = lua_gettop(L) - 1, qls = values + 1;
        if (lua_istable(L, values) && lua_istable(L, qls)) {
            int n = (int)lua_objlen(L, qls);
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, values, i);
                double v = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : NAN;
                lua_pop(L, 1);
                size_t ql_len;
                const char *ql = string_at(L, qls, i, &ql_len);
                add_line(b, name, name_len, NULL, ql, ql_len, v);
            }
        }
        lua_pop(L, 2);
    }
    add_line(b, name, name_len, "_sum", labels, labels_len, sum);
    add_line(b, name, name_len, "_count", labels, labels_len, count);
}

static tamarco_buf *holder_of(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

/* encode(entries) -> text */
static int l_encode(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    tamarco_buf *b = holder_of(L);
    b->len = 0;
    b->oom = 0;
    luaL_checkstack(L, 8, "metrics.encode");
    int nentries = (int)lua_objlen(L, 1);
    for (int e = 1; e <= nentries; e++) {
        lua_rawgeti(L, 1, e);
        int entry = lua_gettop(L);
        if (!lua_istable(L, entry)) {
            lua_pop(L, 1);
            continue;
        }
        size_t name_len, help_len, kind_len;
        const char *name = string_at(L, entry, 1, &name_len);
        const char *help = string_at(L, entry, 2, &help_len);
        const char *kind_name = string_at(L, entry, 3, &kind_len);
        int kind = kind_of(kind_name);
        lua_rawgeti(L, entry, 4);
        int series = lua_gettop(L);
        lua_rawgeti(L, entry, 5);
        int les = lua_gettop(L);
        le_values le = {.idx = les, .n = 0};
        if (kind == KIND_HISTOGRAM) {
            if (!lua_istable(L, les)) {
                kind = KIND_UNKNOWN;
            } else {
                le.n = (int)lua_objlen(L, les);
                for (int i = 1; i <= le.n && i <= LE_CACHE; i++)
                    le.s[i - 1] = string_at(L, les, i, &le.len[i - 1]);
            }
        }
        if (kind == KIND_UNKNOWN || name_len == 0 || !lua_istable(L, series)) {
            lua_settop(L, entry - 1);
            continue;
        }
        tamarco_buf_add(b, "# HELP ", 7);
        tamarco_buf_add(b, name, name_len);
        tamarco_buf_addc(b, ' ');
        add_help(b, help, help_len);
        tamarco_buf_add(b, "\n# TYPE ", 8);
        tamarco_buf_add(b, name, name_len);
        tamarco_buf_addc(b, ' ');
        tamarco_buf_add(b, kind_name, kind_len);
        tamarco_buf_addc(b, '\n');
        int nseries = (int)lua_objlen(L, series);
        for (int s = 1; s <= nseries; s++) {
            lua_rawgeti(L, series, s);
            if (lua_istable(L, -1))
                add_series(b, L, lua_gettop(L), kind, name, name_len, &le);
            lua_pop(L, 1);
        }
        lua_settop(L, entry - 1);
    }
    if (b->oom)
        return luaL_error(L, "metrics.encode: out of memory");
    lua_pushlstring(L, b->data ? b->data : "", b->len);
    /* keep a moderate buffer for the next scrape, drop a huge one */
    if (b->cap > (16u << 20))
        tamarco_buf_free(b);
    return 1;
}

static int holder_gc(lua_State *L)
{
    tamarco_buf_free(lua_touserdata(L, 1));
    return 0;
}

int luaopen_tamarco_c_metrics(lua_State *L)
{
    lua_newtable(L);
    lua_pushcfunction(L, l_format_value);
    lua_setfield(L, -2, "format_value");
    tamarco_buf *b = lua_newuserdata(L, sizeof *b);
    tamarco_buf_init(b);
    lua_newtable(L);
    lua_pushcfunction(L, holder_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_pushcclosure(L, l_encode, 1);
    lua_setfield(L, -2, "encode");
    return 1;
}
