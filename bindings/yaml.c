/*
 * tamarco.c.yaml: YAML text to Lua values with libyaml's event API, typed
 * like PyYAML's safe_load (YAML 1.1) and bounded against hostile input.
 * The Lua API, typing rules, options, aliases, limits and error
 * convention: docs/internals/yaml.md.
 */
#include "host.h"
#include "lua_class.h"

#include <yaml.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define YAML_MAX_DEPTH 512
#define YAML_MAX_NODES 1000000

#define SEQUENCE_MT "tamarco.yaml.sequence"
#define PARSER_MT "tamarco.yaml.parser"

#define TAG_PREFIX "tag:yaml.org,2002:"

/* ---- the document builder ---- */

typedef struct frame {
    int is_map;
    int index;         /* sequences: next index */
    int have_key;      /* maps: a key is on the stack above the table */
    int merge_slot;    /* maps: stack index of the merges list, 0 if none */
    int key_is_merge;  /* maps: the pending key is `<<` */
    int nodes_at_start;
    int height;        /* max height of the children so far */
    char *anchor;      /* owned: the anchor of this collection, or NULL */
    size_t path_len;   /* options.lines: length of this collection's path */
    int key_line;      /* options.lines: line of the pending key */
} frame;

typedef struct builder {
    lua_State *L;
    struct yaml_ctx *ctx;
    const char *source;
    int anchors;       /* stack index: anchor name -> {value, nodes, height} */
    int null_value;    /* stack index of options.null, 0 if none */
    int float_fn;      /* stack index of options.float, 0 if none */
    int lines;         /* stack index of the key -> line table, 0 if none */
    char path[1024];   /* options.lines: dotted path of the current collection */
    frame frames[YAML_MAX_DEPTH + 1];
    int depth;
    long nodes;
    int has_root;
    char error[512];
    size_t line, column;
} builder;

/* Everything that needs freeing lives in this userdata, so that a Lua error
 * (out of memory, stack overflow) thrown mid-parse leaks nothing: __gc frees. */
typedef struct yaml_ctx {
    yaml_parser_t parser;
    yaml_event_t event;
    int parser_ready;
    int event_ready;
    FILE *file;
    builder b;
} yaml_ctx;

static void free_frames(builder *b)
{
    for (int i = 0; i <= YAML_MAX_DEPTH; i++) {
        free(b->frames[i].anchor);
        b->frames[i].anchor = NULL;
    }
}

static void ctx_release(yaml_ctx *ctx)
{
    if (ctx->event_ready) {
        yaml_event_delete(&ctx->event);
        ctx->event_ready = 0;
    }
    if (ctx->parser_ready) {
        yaml_parser_delete(&ctx->parser);
        ctx->parser_ready = 0;
    }
    if (ctx->file) {
        fclose(ctx->file);
        ctx->file = NULL;
    }
    free_frames(&ctx->b);
}

static int ctx_gc(lua_State *L)
{
    ctx_release(luaL_checkudata(L, 1, PARSER_MT));
    return 0;
}

static yaml_ctx *ctx_new(lua_State *L)
{
    yaml_ctx *ctx = lua_newuserdata(L, sizeof *ctx);
    memset(ctx, 0, sizeof *ctx);
    luaL_getmetatable(L, PARSER_MT);
    lua_setmetatable(L, -2);
    return ctx;
}

/* ---- scalar resolution ---- */

enum { R_STRING, R_NULL, R_BOOL, R_NUMBER, R_FLOAT };

typedef struct resolved {
    int type;
    int boolean;
    double number;
} resolved;

static int one_of(const char *s, const char *const *words)
{
    for (; *words; words++)
        if (strcmp(s, *words) == 0)
            return 1;
    return 0;
}

static int resolve_null(const char *s, size_t len)
{
    static const char *const words[] = {"~", "null", "Null", "NULL", NULL};
    return len == 0 || one_of(s, words);
}

static int resolve_bool(const char *s, int *out)
{
    static const char *const yes[] = {"true", "True", "TRUE", "yes", "Yes", "YES",
                                      "on", "On", "ON", NULL};
    static const char *const no[] = {"false", "False", "FALSE", "no", "No", "NO",
                                     "off", "Off", "OFF", NULL};
    if (one_of(s, yes)) { *out = 1; return 1; }
    if (one_of(s, no)) { *out = 0; return 1; }
    return 0;
}

static int digit_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return 99;
}

/* Digits in `base` with optional `_` separators (not first); at least one digit. */
static int digits_value(const char *s, int base, double *out)
{
    double v = 0;
    int n = 0;
    for (; *s; s++) {
        if (*s == '_' && n > 0)
            continue;
        int d = digit_value(*s);
        if (d >= base)
            return 0;
        v = v * base + d;
        n++;
    }
    *out = v;
    return n > 0;
}

/* Copies s without `_` into buf (of size >= strlen(s) + 1). */
static void strip_underscores(const char *s, char *buf)
{
    for (; *s; s++)
        if (*s != '_')
            *buf++ = *s;
    *buf = '\0';
}

static int resolve_int(const char *s, size_t len, double *out)
{
    double sign = 1;
    if (*s == '+' || *s == '-') {
        sign = *s == '-' ? -1 : 1;
        s++;
        len--;
    }
    if (len == 0)
        return 0;
    int ok;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        ok = digits_value(s + 2, 16, out);
    else if (s[0] == '0' && s[1] == 'o')
        ok = digits_value(s + 2, 8, out);
    else if (s[0] == '0' && s[1] == 'b')
        ok = digits_value(s + 2, 2, out);
    else if (s[0] == '0' && len > 1)
        ok = digits_value(s + 1, 8, out);          /* YAML 1.1 octal: 0755 */
    else if (s[0] >= '0' && s[0] <= '9') {
        for (const char *p = s; *p; p++)
            if (!((*p >= '0' && *p <= '9') || *p == '_'))
                return 0;
        char *buf = malloc(len + 1);
        if (!buf)
            return 0;
        strip_underscores(s, buf);
        *out = strtod(buf, NULL);                  /* correctly rounded past 2^53 */
        free(buf);
        ok = 1;
    } else
        ok = 0;
    *out *= sign;
    return ok;
}

/* [-+]? ( [0-9][0-9_]* (\.[0-9_]*)? | \.[0-9][0-9_]* ) ([eE][-+]?[0-9]+)?
 * with at least a dot or an exponent; or .inf / .nan forms. */
static int resolve_float(const char *s, size_t len, double *out)
{
    static const char *const infs[] = {".inf", ".Inf", ".INF", NULL};
    static const char *const nans[] = {".nan", ".NaN", ".NAN", NULL};
    const char *p = s;
    double sign = 1;
    if (*p == '+' || *p == '-') {
        sign = *p == '-' ? -1 : 1;
        p++;
    }
    if (one_of(p, infs)) { *out = sign * HUGE_VAL; return 1; }
    if (p == s && one_of(p, nans)) { *out = NAN; return 1; }

    int int_digits = 0, frac_digits = 0, dot = 0, exp = 0;
    if (*p >= '0' && *p <= '9') {
        while ((*p >= '0' && *p <= '9') || *p == '_') { p++; int_digits++; }
    }
    if (*p == '.') {
        dot = 1;
        p++;
        if (int_digits == 0 && !(*p >= '0' && *p <= '9'))
            return 0;
        while ((*p >= '0' && *p <= '9') || *p == '_') { p++; frac_digits++; }
    }
    if (int_digits + frac_digits == 0)
        return 0;
    if (*p == 'e' || *p == 'E') {
        exp = 1;
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!(*p >= '0' && *p <= '9'))
            return 0;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    if (*p || !(dot || exp))
        return 0;
    char *buf = malloc(len + 1);
    if (!buf)
        return 0;
    strip_underscores(s, buf);
    *out = strtod(buf, NULL);
    free(buf);
    return 1;
}

/* How a plain, untagged scalar is typed. */
static resolved resolve_plain(const char *s, size_t len)
{
    resolved r = {R_STRING, 0, 0};
    if (strlen(s) != len)                 /* embedded NUL: a string */
        return r;
    if (resolve_null(s, len))
        r.type = R_NULL;
    else if (resolve_bool(s, &r.boolean))
        r.type = R_BOOL;
    else if (resolve_int(s, len, &r.number))
        r.type = R_NUMBER;
    else if (resolve_float(s, len, &r.number))
        r.type = R_FLOAT;
    return r;
}

static int fail_at(builder *b, yaml_mark_t mark, const char *fmt, const char *arg)
{
    char problem[300];
    snprintf(problem, sizeof problem, fmt, arg ? arg : "");
    b->line = mark.line + 1;
    b->column = mark.column + 1;
    snprintf(b->error, sizeof b->error, "%s:%zu:%zu: %s", b->source, b->line,
             b->column, problem);
    return -1;
}

static int is_sequence_table(lua_State *L, int index)
{
    if (!lua_getmetatable(L, index))
        return 0;
    luaL_getmetatable(L, SEQUENCE_MT);
    int same = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return same;
}

/* Pushes a deep copy of the value at `index` (tables copied with their
 * metatable). The caller bounded the depth. */
static void deep_copy(lua_State *L, int index)
{
    if (index < 0)
        index = lua_gettop(L) + index + 1;
    if (lua_type(L, index) != LUA_TTABLE) {
        lua_pushvalue(L, index);
        return;
    }
    luaL_checkstack(L, 6, "yaml: nesting too deep");
    lua_newtable(L);
    int copy = lua_gettop(L);
    if (lua_getmetatable(L, index))
        lua_setmetatable(L, copy);
    lua_pushnil(L);
    while (lua_next(L, index)) {
        lua_pushvalue(L, -2);
        deep_copy(L, -2);
        lua_rawset(L, copy);
        lua_pop(L, 1);
    }
}

static void register_anchor(builder *b, const char *anchor, int nodes, int height)
{
    lua_State *L = b->L;
    lua_createtable(L, 3, 0);
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, 1);
    lua_pushnumber(L, nodes);
    lua_rawseti(L, -2, 2);
    lua_pushnumber(L, height);
    lua_rawseti(L, -2, 3);
    lua_setfield(L, b->anchors, anchor);
}

static int merge_into(builder *b, int map, int source, yaml_mark_t mark);

/* options.lines: writes "<path of the collection>.<key>" into b->path, the
 * collection's path being its first `parent_len` bytes, and returns its
 * length; 0 when the key is not a string or number or the path is too long.
 * The key (at `key`, a copy: tostring converts numbers in place) stays. */
static size_t extend_path(builder *b, size_t parent_len, int key)
{
    int type = lua_type(b->L, key);
    if (type != LUA_TSTRING && type != LUA_TNUMBER)
        return 0;
    size_t key_len;
    const char *text = lua_tolstring(b->L, key, &key_len);
    size_t len = parent_len + (parent_len ? 1 : 0) + key_len;
    if (len >= sizeof b->path)
        return 0;
    if (parent_len)
        b->path[parent_len] = '.';
    memcpy(b->path + len - key_len, text, key_len);
    return len;
}

/* The value on top of the stack is complete: put it into its parent (or keep
 * it as the root), popping it. `height` is the height of its subtree. */
static int add_value(builder *b, int height, yaml_mark_t mark)
{
    lua_State *L = b->L;
    if (b->depth == 0) {
        b->has_root = 1;           /* stays on the stack */
        return 0;
    }
    frame *f = &b->frames[b->depth];
    if (height > f->height)
        f->height = height;
    if (!f->is_map) {
        f->index++;
        lua_rawseti(L, -2, f->index);      /* nil leaves a hole */
        return 0;
    }
    if (!f->have_key) {
        /* a key: scalars only */
        if (lua_isnil(L, -1))
            return fail_at(b, mark, "null mapping keys are not supported", NULL);
        if (lua_type(L, -1) == LUA_TTABLE)
            return fail_at(b, mark, "mappings and sequences cannot be mapping keys", NULL);
        if (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) != lua_tonumber(L, -1))
            return fail_at(b, mark, "NaN cannot be a mapping key", NULL);
        f->have_key = 1;
        f->key_line = (int)mark.line + 1;
        return 0;
    }
    /* stack: map, [merges], key, value */
    f->have_key = 0;
    if (f->key_is_merge) {
        f->key_is_merge = 0;
        if (lua_type(L, -1) != LUA_TTABLE)
            return fail_at(b, mark, "a merge key (<<) needs a mapping or a sequence of mappings", NULL);
        if (!f->merge_slot) {
            /* first merge of this map: the merges list takes the key's slot */
            lua_newtable(L);
            lua_replace(L, -3);
            f->merge_slot = lua_gettop(L) - 1;
            lua_pushvalue(L, -1);
            lua_rawseti(L, f->merge_slot, 1);
            lua_pop(L, 1);
        } else {
            lua_rawseti(L, f->merge_slot, (int)lua_objlen(L, f->merge_slot) + 1);
            lua_pop(L, 1);                  /* the key */
        }
        return 0;
    }
    if (b->lines) {
        lua_pushvalue(L, -2);
        size_t len = extend_path(b, f->path_len, lua_gettop(L));
        lua_pop(L, 1);
        if (len) {
            lua_pushlstring(L, b->path, len);
            lua_pushinteger(L, f->key_line);
            lua_rawset(L, b->lines);
        }
    }
    int map = lua_gettop(L) - 2 - (f->merge_slot ? 1 : 0);
    lua_rawset(L, map);
    return 0;
}

/* Applies the map's merges: keys already present win; earlier merges win. */
static int finish_merges(builder *b, int map, yaml_mark_t mark)
{
    lua_State *L = b->L;
    frame *f = &b->frames[b->depth];
    if (!f->merge_slot)
        return 0;
    int n = (int)lua_objlen(L, f->merge_slot);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, f->merge_slot, i);
        int source = lua_gettop(L);
        if (is_sequence_table(L, source)) {
            int m = (int)lua_objlen(L, source);
            for (int j = 1; j <= m; j++) {
                lua_rawgeti(L, source, j);
                if (lua_type(L, -1) != LUA_TTABLE || is_sequence_table(L, -1))
                    return fail_at(b, mark, "a merge key (<<) needs a mapping or a sequence of mappings", NULL);
                if (merge_into(b, map, lua_gettop(L), mark))
                    return -1;
                lua_pop(L, 1);
            }
        } else if (merge_into(b, map, source, mark))
            return -1;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);                          /* the merges list */
    f->merge_slot = 0;
    return 0;
}

static int merge_into(builder *b, int map, int source, yaml_mark_t mark)
{
    lua_State *L = b->L;
    lua_pushnil(L);
    while (lua_next(L, source)) {
        lua_pushvalue(L, -2);
        lua_rawget(L, map);
        int present = !lua_isnil(L, -1);
        lua_pop(L, 1);
        if (!present) {
            lua_pushvalue(L, -2);
            lua_pushvalue(L, -2);
            lua_rawset(L, map);
        }
        lua_pop(L, 1);
    }
    return 0;
}

static int count_node(builder *b, long n, yaml_mark_t mark)
{
    b->nodes += n;
    if (b->nodes > YAML_MAX_NODES)
        return fail_at(b, mark, "document too large: more than %s nodes (alias expansion included)",
                       "1000000");
    return 0;
}

static int tag_is(const char *tag, const char *name)
{
    size_t n = sizeof TAG_PREFIX - 1;
    return strncmp(tag, TAG_PREFIX, n) == 0 && strcmp(tag + n, name) == 0;
}

/* Pushes the Lua value of a scalar event. */
static int push_scalar(builder *b, yaml_event_t *ev)
{
    lua_State *L = b->L;
    const char *value = (const char *)ev->data.scalar.value;
    size_t len = ev->data.scalar.length;
    const char *tag = (const char *)ev->data.scalar.tag;
    int plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
    resolved r = {R_STRING, 0, 0};

    if (!tag || strcmp(tag, "!") == 0) {
        if (plain && !tag)
            r = resolve_plain(value, len);
    } else if (tag_is(tag, "str") || tag_is(tag, "timestamp")) {
        /* a string */
    } else if (tag_is(tag, "null")) {
        r.type = R_NULL;
    } else if (tag_is(tag, "bool")) {
        if (!resolve_bool(value, &r.boolean))
            return fail_at(b, ev->start_mark, "invalid !!bool value '%s'", value);
        r.type = R_BOOL;
    } else if (tag_is(tag, "int")) {
        if (strlen(value) != len || !resolve_int(value, len, &r.number))
            return fail_at(b, ev->start_mark, "invalid !!int value '%s'", value);
        r.type = R_NUMBER;
    } else if (tag_is(tag, "float")) {
        if (strlen(value) != len ||
            !(resolve_float(value, len, &r.number) || resolve_int(value, len, &r.number)))
            return fail_at(b, ev->start_mark, "invalid !!float value '%s'", value);
        r.type = R_FLOAT;
    } else {
        return fail_at(b, ev->start_mark, "unsupported tag %s", tag);
    }

    frame *f = b->depth ? &b->frames[b->depth] : NULL;
    int is_key = f && f->is_map && !f->have_key;
    switch (r.type) {
    case R_NULL:
        if (b->null_value && !is_key)
            lua_pushvalue(L, b->null_value);
        else
            lua_pushnil(L);
        break;
    case R_BOOL: lua_pushboolean(L, r.boolean); break;
    case R_FLOAT:
        if (b->float_fn && !is_key) {
            lua_pushvalue(L, b->float_fn);
            lua_pushnumber(L, r.number);
            lua_call(L, 1, 1);
        } else {
            lua_pushnumber(L, r.number);
        }
        break;
    case R_NUMBER: lua_pushnumber(L, r.number); break;
    default: lua_pushlstring(L, value, len); break;
    }
    return 0;
}

static int start_collection(builder *b, yaml_event_t *ev, int is_map)
{
    lua_State *L = b->L;
    const char *tag = (const char *)(is_map ? ev->data.mapping_start.tag
                                            : ev->data.sequence_start.tag);
    const char *anchor = (const char *)(is_map ? ev->data.mapping_start.anchor
                                               : ev->data.sequence_start.anchor);
    if (tag && strcmp(tag, "!") != 0 && !tag_is(tag, is_map ? "map" : "seq"))
        return fail_at(b, ev->start_mark, "unsupported tag %s", tag);
    if (b->depth > 0 && b->frames[b->depth].is_map && !b->frames[b->depth].have_key)
        return fail_at(b, ev->start_mark, "mappings and sequences cannot be mapping keys", NULL);
    if (b->depth >= YAML_MAX_DEPTH)
        return fail_at(b, ev->start_mark, "nesting deeper than %s levels", "512");
    if (count_node(b, 1, ev->start_mark))
        return -1;
    luaL_checkstack(L, 8, "yaml: nesting too deep");
    lua_newtable(L);
    if (!is_map) {
        luaL_getmetatable(L, SEQUENCE_MT);
        lua_setmetatable(L, -2);
    }
    size_t path_len = 0;
    if (b->lines && b->depth > 0) {
        frame *parent = &b->frames[b->depth];
        if (parent->is_map)
            lua_pushvalue(L, -2);              /* the key, below the new table */
        else
            lua_pushinteger(L, parent->index + 1);
        path_len = extend_path(b, parent->path_len, lua_gettop(L));
        lua_pop(L, 1);
    }
    frame *f = &b->frames[++b->depth];
    memset(f, 0, sizeof *f);
    f->path_len = path_len;
    f->is_map = is_map;
    f->nodes_at_start = (int)b->nodes;
    if (anchor) {
        f->anchor = strdup(anchor);
        if (!f->anchor)
            return fail_at(b, ev->start_mark, "out of memory", NULL);
    }
    return 0;
}

static int end_collection(builder *b, yaml_mark_t mark)
{
    lua_State *L = b->L;
    frame *f = &b->frames[b->depth];
    if (f->is_map) {
        int map = lua_gettop(L) - (f->merge_slot ? 1 : 0);
        if (finish_merges(b, map, mark))
            return -1;
    }
    int height = f->height + 1;
    int nodes = (int)(b->nodes - f->nodes_at_start) + 1;
    char *anchor = f->anchor;
    f->anchor = NULL;
    b->depth--;
    if (anchor) {
        register_anchor(b, anchor, nodes, height);
        free(anchor);
    }
    return add_value(b, height, mark);
}

static int push_alias(builder *b, yaml_event_t *ev)
{
    lua_State *L = b->L;
    const char *name = (const char *)ev->data.alias.anchor;
    lua_getfield(L, b->anchors, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return fail_at(b, ev->start_mark, "found undefined alias '%s'", name);
    }
    int info = lua_gettop(L);
    lua_rawgeti(L, info, 2);
    long nodes = (long)lua_tonumber(L, -1);
    lua_rawgeti(L, info, 3);
    int height = (int)lua_tonumber(L, -1);
    lua_pop(L, 2);
    if (count_node(b, nodes, ev->start_mark))
        return -1;
    if (b->depth + height > YAML_MAX_DEPTH)
        return fail_at(b, ev->start_mark, "nesting deeper than %s levels (through an alias)", "512");
    lua_rawgeti(L, info, 1);
    deep_copy(L, -1);
    lua_replace(L, info);
    lua_pop(L, 1);
    return height;
}

static const char *problem_of(yaml_parser_t *p)
{
    switch (p->error) {
    case YAML_MEMORY_ERROR: return "out of memory";
    case YAML_READER_ERROR:
    case YAML_SCANNER_ERROR:
    case YAML_PARSER_ERROR: return p->problem ? p->problem : "syntax error";
    default: return "unknown error";
    }
}

/* Parses the first document of the parser's input. Pushes the value (nil if
 * empty) and returns 0, or returns -1 with b->error set. */
static int build(builder *b)
{
    lua_State *L = b->L;
    yaml_ctx *ctx = b->ctx;


    for (;;) {
        if (!yaml_parser_parse(&ctx->parser, &ctx->event)) {
            yaml_parser_t *p = &ctx->parser;
            yaml_mark_t mark = p->error == YAML_READER_ERROR ? p->mark : p->problem_mark;
            return fail_at(b, mark, "%s", problem_of(p));
        }
        ctx->event_ready = 1;
        yaml_event_t *ev = &ctx->event;
        int rc = 0, done = 0;
        switch (ev->type) {
        case YAML_STREAM_START_EVENT:
            break;
        case YAML_DOCUMENT_START_EVENT:

            break;
        case YAML_DOCUMENT_END_EVENT:
        case YAML_STREAM_END_EVENT:
            done = 1;
            break;
        case YAML_SCALAR_EVENT: {
            int key_is_merge = 0;
            frame *f = b->depth ? &b->frames[b->depth] : NULL;
            if (f && f->is_map && !f->have_key && ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
                strcmp((const char *)ev->data.scalar.value, "<<") == 0 &&
                (!ev->data.scalar.tag || tag_is((const char *)ev->data.scalar.tag, "merge")))
                key_is_merge = 1;
            if (key_is_merge) {
                lua_pushboolean(L, 1);           /* placeholder key */
            } else if ((rc = push_scalar(b, ev)) != 0) {
                break;
            }
            if ((rc = count_node(b, 1, ev->start_mark)) != 0)
                break;
            if (ev->data.scalar.anchor)
                register_anchor(b, (const char *)ev->data.scalar.anchor, 1, 0);
            rc = add_value(b, 0, ev->start_mark);
            if (key_is_merge)
                f->key_is_merge = 1;
            break;
        }
        case YAML_ALIAS_EVENT: {
            int height = push_alias(b, ev);
            if (height < 0) { rc = -1; break; }
            rc = add_value(b, height, ev->start_mark);
            break;
        }
        case YAML_SEQUENCE_START_EVENT:
            rc = start_collection(b, ev, 0);
            break;
        case YAML_MAPPING_START_EVENT:
            rc = start_collection(b, ev, 1);
            break;
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
            rc = end_collection(b, ev->start_mark);
            break;
        default:
            break;
        }
        yaml_event_delete(ev);
        ctx->event_ready = 0;
        if (rc)
            return -1;
        if (done)
            break;
    }
    if (!b->has_root)
        lua_pushnil(L);
    return 0;
}

/* Reads the options table at `index` (none when it is nil) into the builder:
 * the values stay at their stack slots during the parse. */
static void read_options(lua_State *L, int index, builder *b)
{
    if (lua_isnoneornil(L, index))
        return;
    luaL_checktype(L, index, LUA_TTABLE);
    lua_getfield(L, index, "null");
    b->null_value = lua_isnil(L, -1) ? 0 : lua_gettop(L);
    lua_getfield(L, index, "float");
    if (!lua_isnil(L, -1))
        luaL_checktype(L, -1, LUA_TFUNCTION);
    b->float_fn = lua_isnil(L, -1) ? 0 : lua_gettop(L);
    lua_getfield(L, index, "lines");
    int lines = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (lines) {
        lua_newtable(L);
        b->lines = lua_gettop(L);
    }
}

/* Runs the builder over ctx's parser (input already set) and returns the Lua
 * results: value, or nil, message, line, column. */
static int run_parse(lua_State *L, yaml_ctx *ctx, const char *source, int options)
{
    builder *b = &ctx->b;
    b->L = L;
    b->ctx = ctx;
    b->source = source;
    read_options(L, options, b);
    lua_newtable(L);
    b->anchors = lua_gettop(L);
    int top = b->anchors;
    if (build(b)) {
        lua_settop(L, top);
        lua_pushnil(L);
        lua_pushstring(L, b->error);
        lua_pushinteger(L, (lua_Integer)b->line);
        lua_pushinteger(L, (lua_Integer)b->column);
        ctx_release(ctx);
        return 4;
    }
    ctx_release(ctx);
    if (b->lines) {
        lua_pushvalue(L, b->lines);
        return 2;
    }
    return 1;
}

/* parse(text[, source_name]) */
static int l_parse(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    const char *source = luaL_optstring(L, 2, "<string>");
    lua_settop(L, 3);                      /* options at 3, even when absent */
    yaml_ctx *ctx = ctx_new(L);
    if (!yaml_parser_initialize(&ctx->parser))
        return luaL_error(L, "out of memory");
    ctx->parser_ready = 1;
    yaml_parser_set_input_string(&ctx->parser, (const unsigned char *)text, len);
    return run_parse(L, ctx, source, 3);
}

/* load_file(path) */
static int l_load_file(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_settop(L, 2);                      /* options at 2, even when absent */
    yaml_ctx *ctx = ctx_new(L);
    ctx->file = fopen(path, "rb");
    if (!ctx->file) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    /* Read it whole, so that a later error cannot leave the file half read. */
    luaL_Buffer buf;
    luaL_buffinit(L, &buf);
    for (;;) {
        char *p = luaL_prepbuffer(&buf);
        size_t n = fread(p, 1, LUAL_BUFFERSIZE, ctx->file);
        luaL_addsize(&buf, n);
        if (n < LUAL_BUFFERSIZE)
            break;
    }
    int failed = ferror(ctx->file);
    int err = errno;
    fclose(ctx->file);
    ctx->file = NULL;
    luaL_pushresult(&buf);
    if (failed) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(err));
        return 2;
    }
    size_t len;
    const char *text = lua_tolstring(L, -1, &len);
    if (!yaml_parser_initialize(&ctx->parser))
        return luaL_error(L, "out of memory");
    ctx->parser_ready = 1;
    yaml_parser_set_input_string(&ctx->parser, (const unsigned char *)text, len);
    return run_parse(L, ctx, path, 2);
}

/* resolve(text) -> the value of `text` as a plain scalar. */
static int l_resolve(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    resolved r = resolve_plain(text, len);
    switch (r.type) {
    case R_NULL: lua_pushnil(L); break;
    case R_BOOL: lua_pushboolean(L, r.boolean); break;
    case R_NUMBER:
    case R_FLOAT: lua_pushnumber(L, r.number); break;
    default: lua_pushvalue(L, 1); break;
    }
    return 1;
}

static int l_is_sequence(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_pushboolean(L, lua_type(L, 1) == LUA_TTABLE && is_sequence_table(L, 1));
    return 1;
}

int luaopen_tamarco_c_yaml(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"parse", l_parse},
        {"load_file", l_load_file},
        {"resolve", l_resolve},
        {"is_sequence", l_is_sequence},
        {NULL, NULL},
    };
    tamarco_class_register(L, PARSER_MT, NULL, ctx_gc, NULL);
    luaL_newmetatable(L, SEQUENCE_MT);
    lua_pushliteral(L, "yaml.sequence");
    lua_setfield(L, -2, "__yaml");
    lua_pop(L, 1);

    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    luaL_getmetatable(L, SEQUENCE_MT);
    lua_setfield(L, -2, "sequence_mt");
    lua_pushinteger(L, YAML_MAX_DEPTH);
    lua_setfield(L, -2, "max_depth");
    lua_pushinteger(L, YAML_MAX_NODES);
    lua_setfield(L, -2, "max_nodes");
    return 1;
}
