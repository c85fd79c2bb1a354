/* tamarco.c.log: the bytes of logging. Record encodings (JSON line, logstash
 * v0/v1, human text), the ISO 8601 timestamp and a rotating file. Levels,
 * masking, sinks and every other policy live in lua/tamarco/logging.lua. */
#include "host.h"
#include "log_encode.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define BUF_MT "tamarco.log.buf"
#define FILE_MT "tamarco.log.file"

/* ---- an encoding buffer freed by the GC if a Lua error unwinds us ---- */

static int buf_gc(lua_State *L)
{
    tamarco_log_buf_free(lua_touserdata(L, 1));
    return 0;
}

static tamarco_log_buf *new_buf(lua_State *L)
{
    tamarco_log_buf *b = lua_newuserdata(L, sizeof *b);
    tamarco_log_buf_init(b);
    luaL_getmetatable(L, BUF_MT);
    lua_setmetatable(L, -2);
    return b;
}

/* Pushes the buffer's bytes as the result string and frees them. */
static int push_buf(lua_State *L, tamarco_log_buf *b)
{
    if (b->oom) {
        tamarco_log_buf_free(b);
        return luaL_error(L, "tamarco.c.log: out of memory while encoding a record");
    }
    lua_pushlstring(L, b->data ? b->data : "", b->len);
    tamarco_log_buf_free(b);
    return 1;
}

/* The string field `name` of the table at idx, or def. Never converts. */
static const char *string_field(lua_State *L, int idx, const char *name,
                                const char *def, size_t *len)
{
    const char *s = def;
    lua_getfield(L, idx, name);
    if (lua_type(L, -1) == LUA_TSTRING)
        s = lua_tolstring(L, -1, len);   /* kept alive by the record */
    else if (len)
        *len = strlen(def);
    lua_pop(L, 1);
    return s;
}

/* encode_json(record) -> one JSON line, no trailing newline. */
static int l_encode_json(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    tamarco_log_buf *b = new_buf(L);
    tamarco_log_json_value(b, L, 1, 1);
    return push_buf(L, b);
}

/* ---- logstash layouts (python-logstash's formatter versions 0 and 1) ---- */

typedef struct logstash_ctx {
    tamarco_log_buf *b;
    int version;
} logstash_ctx;

static int is_reserved_logstash(int version, const char *key, size_t len)
{
    static const char *const v0[] = { "levelname", "stack_trace", NULL };
    static const char *const v1[] = {
        "@timestamp", "@version", "message", "host", "path", "tags", "type",
        "level", "logger_name", "stack_trace", NULL,
    };
    for (const char *const *r = version == 0 ? v0 : v1; *r; r++)
        if (strlen(*r) == len && memcmp(*r, key, len) == 0)
            return 1;
    return 0;
}

/* Every record field but the ones the layout places itself goes to the extra
 * fields (@fields in v0, the top level in v1); traceback is stack_trace. */
static void logstash_extra(void *ud, lua_State *L, const char *key, size_t len, int value_idx)
{
    logstash_ctx *c = ud;
    static const char *const placed[] = { "@timestamp", "level", "logger", "message", NULL };
    for (const char *const *p = placed; *p; p++)
        if (strlen(*p) == len && memcmp(*p, key, len) == 0)
            return;
    tamarco_log_buf_addc(c->b, ',');
    if (len == 9 && memcmp(key, "traceback", 9) == 0) {
        tamarco_log_buf_adds(c->b, "\"stack_trace\"");
    } else if (is_reserved_logstash(c->version, key, len)) {
        tamarco_log_buf prefixed;
        tamarco_log_buf_init(&prefixed);
        tamarco_log_buf_add(&prefixed, "extra_", 6);
        tamarco_log_buf_add(&prefixed, key, len);
        tamarco_log_json_string(c->b, tamarco_log_buf_cstr(&prefixed), prefixed.len);
        tamarco_log_buf_free(&prefixed);
    } else {
        tamarco_log_json_string(c->b, key, len);
    }
    tamarco_log_buf_addc(c->b, ':');
    tamarco_log_json_value(c->b, L, value_idx, 0);
}

static void add_member(tamarco_log_buf *b, const char *key, const char *value, size_t len, int comma)
{
    if (comma)
        tamarco_log_buf_addc(b, ',');
    tamarco_log_json_string(b, key, strlen(key));
    tamarco_log_buf_addc(b, ':');
    tamarco_log_json_string(b, value, len);
}

/* encode_logstash(record, version, host[, message_type[, tags]]) -> JSON line.
 * version 0: @timestamp @message @source @source_host @source_path @tags @type
 *            @fields{levelname, logger, ...extra, stack_trace}
 * version 1: @timestamp @version message host path tags type level
 *            logger_name ...extra stack_trace
 * The source path is the logger name (a Lua record has no file pathname);
 * message_type defaults to "Logstash", tags to an empty array. */
static int l_encode_logstash(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    int version = luaL_checkint(L, 2);
    luaL_argcheck(L, version == 0 || version == 1, 2, "logstash version must be 0 or 1");
    size_t host_len, type_len, ts_len, msg_len, level_len, logger_len;
    const char *host = luaL_checklstring(L, 3, &host_len);
    const char *type = luaL_optlstring(L, 4, "Logstash", &type_len);
    if (!lua_isnoneornil(L, 5))
        luaL_checktype(L, 5, LUA_TTABLE);

    char now[40];
    {
        uv_timeval64_t tv;
        if (uv_gettimeofday(&tv) != 0 ||
            tamarco_log_iso8601(now, sizeof now, (double)tv.tv_sec + tv.tv_usec / 1e6) < 0)
            snprintf(now, sizeof now, "1970-01-01T00:00:00.000Z");
    }
    const char *ts = string_field(L, 1, "@timestamp", now, &ts_len);
    const char *message = string_field(L, 1, "message", "", &msg_len);
    const char *level = string_field(L, 1, "level", "INFO", &level_len);
    const char *logger = string_field(L, 1, "logger", "", &logger_len);

    tamarco_log_buf *b = new_buf(L);
    logstash_ctx ctx = { b, version };
    tamarco_log_buf_addc(b, '{');
    add_member(b, "@timestamp", ts, ts_len, 0);
    if (version == 0) {
        tamarco_log_buf source;
        tamarco_log_buf_init(&source);
        tamarco_log_buf_add(&source, type, type_len);
        tamarco_log_buf_add(&source, "://", 3);
        tamarco_log_buf_add(&source, host, host_len);
        tamarco_log_buf_addc(&source, '/');
        tamarco_log_buf_add(&source, logger, logger_len);
        add_member(b, "@message", message, msg_len, 1);
        add_member(b, "@source", source.data ? source.data : "", source.len, 1);
        tamarco_log_buf_free(&source);
        add_member(b, "@source_host", host, host_len, 1);
        add_member(b, "@source_path", logger, logger_len, 1);
        tamarco_log_buf_adds(b, ",\"@tags\":");
    } else {
        tamarco_log_buf_adds(b, ",\"@version\":\"1\"");
        add_member(b, "message", message, msg_len, 1);
        add_member(b, "host", host, host_len, 1);
        add_member(b, "path", logger, logger_len, 1);
        tamarco_log_buf_adds(b, ",\"tags\":");
    }
    if (lua_istable(L, 5) && lua_objlen(L, 5) > 0)
        tamarco_log_json_value(b, L, 5, 0);
    else
        tamarco_log_buf_add(b, "[]", 2);
    if (version == 0) {
        add_member(b, "@type", type, type_len, 1);
        tamarco_log_buf_adds(b, ",\"@fields\":{");
        add_member(b, "levelname", level, level_len, 0);
        add_member(b, "logger", logger, logger_len, 1);
        tamarco_log_each_field(L, 1, 1, logstash_extra, &ctx);
        tamarco_log_buf_addc(b, '}');
    } else {
        add_member(b, "type", type, type_len, 1);
        add_member(b, "level", level, level_len, 1);
        add_member(b, "logger_name", logger, logger_len, 1);
        tamarco_log_each_field(L, 1, 1, logstash_extra, &ctx);
    }
    tamarco_log_buf_addc(b, '}');
    return push_buf(L, b);
}

/* ---- human text for DEVELOP ---- */

static const char *level_color(const char *level)
{
    if (strcmp(level, "DEBUG") == 0) return "\x1b[36m";      /* cyan */
    if (strcmp(level, "INFO") == 0) return "\x1b[32m";       /* green */
    if (strcmp(level, "WARNING") == 0) return "\x1b[33m";    /* yellow */
    if (strcmp(level, "ERROR") == 0) return "\x1b[31m";      /* red */
    if (strcmp(level, "CRITICAL") == 0) return "\x1b[1;31m"; /* bold red */
    return "";
}

/* Raw text, but control characters other than newline and tab (terminal
 * escapes in a message, say) are shown as \xNN. */
static void add_text(tamarco_log_buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7F) {
            char esc[4] = { '\\', 'x', hex[c >> 4], hex[c & 0xF] };
            tamarco_log_buf_add(b, s + run, i - run);
            tamarco_log_buf_add(b, esc, 4);
            run = i + 1;
        }
    }
    tamarco_log_buf_add(b, s + run, len - run);
}

typedef struct text_ctx {
    tamarco_log_buf *b;
    int color;
} text_ctx;

static int needs_quotes(const char *s, size_t len)
{
    if (len == 0)
        return 1;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= 0x20 || c == '"' || c == '=' || c == '\\' || c == 0x7F)
            return 1;
    }
    return 0;
}

static void text_extra(void *ud, lua_State *L, const char *key, size_t len, int value_idx)
{
    text_ctx *c = ud;
    if (tamarco_log_is_standard_field(key, len) ||
        (len == 9 && memcmp(key, "traceback", 9) == 0))
        return;
    tamarco_log_buf_addc(c->b, ' ');
    if (c->color)
        tamarco_log_buf_adds(c->b, "\x1b[2m");
    add_text(c->b, key, len);
    tamarco_log_buf_addc(c->b, '=');
    if (c->color)
        tamarco_log_buf_adds(c->b, "\x1b[0m");
    if (lua_type(L, value_idx) == LUA_TSTRING) {
        size_t vlen;
        const char *v = lua_tolstring(L, value_idx, &vlen);
        if (needs_quotes(v, vlen))
            tamarco_log_json_string(c->b, v, vlen);
        else
            tamarco_log_buf_add(c->b, v, vlen);
    } else {
        tamarco_log_json_value(c->b, L, value_idx, 0);
    }
}

/* format_text(record, color) ->
 *   "2026-11-29 10:00:00.123 INFO    [logger] message key=value ..."
 * then the traceback, if any, on the following lines. */
static int l_format_text(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    int color = lua_toboolean(L, 2);
    size_t ts_len, level_len, logger_len, msg_len, tb_len;
    const char *ts = string_field(L, 1, "@timestamp", "", &ts_len);
    const char *level = string_field(L, 1, "level", "INFO", &level_len);
    const char *logger = string_field(L, 1, "logger", "", &logger_len);
    const char *message = string_field(L, 1, "message", "", &msg_len);
    const char *tb = string_field(L, 1, "traceback", "", &tb_len);

    tamarco_log_buf *b = new_buf(L);
    /* "2026-11-29T10:00:00.123Z" -> "2026-11-29 10:00:00.123" */
    if (ts_len == 24 && ts[10] == 'T' && ts[23] == 'Z') {
        tamarco_log_buf_add(b, ts, 10);
        tamarco_log_buf_addc(b, ' ');
        tamarco_log_buf_add(b, ts + 11, 12);
    } else {
        add_text(b, ts, ts_len);
    }
    tamarco_log_buf_addc(b, ' ');
    const char *on = color ? level_color(level) : "";
    if (*on)
        tamarco_log_buf_adds(b, on);
    add_text(b, level, level_len);
    if (*on)
        tamarco_log_buf_adds(b, "\x1b[0m");
    for (size_t i = level_len; i < 7; i++)
        tamarco_log_buf_addc(b, ' ');
    tamarco_log_buf_adds(b, " [");
    add_text(b, logger, logger_len);
    tamarco_log_buf_adds(b, "] ");
    add_text(b, message, msg_len);
    text_ctx ctx = { b, color };
    tamarco_log_each_field(L, 1, 1, text_extra, &ctx);
    if (tb_len > 0) {
        tamarco_log_buf_addc(b, '\n');
        if (color)
            tamarco_log_buf_adds(b, "\x1b[31m");
        add_text(b, tb, tb_len);
        if (color)
            tamarco_log_buf_adds(b, "\x1b[0m");
    }
    return push_buf(L, b);
}

/* timestamp(seconds) -> "2026-11-29T10:00:00.123Z" (UTC). */
static int l_timestamp(lua_State *L)
{
    char out[40];
    double seconds = luaL_checknumber(L, 1);
    int n = tamarco_log_iso8601(out, sizeof out, seconds);
    luaL_argcheck(L, n >= 0, 1, "time out of range");
    lua_pushlstring(L, out, (size_t)n);
    return 1;
}

/* ---- a rotating file ----
 *
 * Writes are synchronous write(2) calls on the loop thread, like nginx's
 * access log: a local append of one line lands in the page cache and does
 * not wait for the disk, so handing it to a thread would cost more than it
 * saves. Remote sinks are the ones that must never block (see DESIGN §6).
 *
 * The fd is O_APPEND, so each line (one writev) is appended atomically even
 * when several processes share the file (--workers N); rotation, though, is
 * done by whichever process sees the size pass max_bytes: with several
 * writers give each its own file. */

typedef struct log_file {
    int fd;
    int backup_count;
    long long max_bytes;   /* 0: never rotate */
    long long size;        /* our idea of the file's size */
    char path[];           /* kept in the userdata: nothing to free */
} log_file;

static int push_errno(lua_State *L, const char *what, const char *path, int err)
{
    lua_pushnil(L);
    lua_pushfstring(L, "%s %s: %s", what, path, strerror(err));
    return 2;
}

static int open_append(const char *path)
{
    int fd;
    do
        fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    while (fd < 0 && errno == EINTR);
    return fd;
}

static long long fd_size(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? (long long)st.st_size : 0;
}

/* open_file(path, max_bytes, backup_count) -> file | nil, message */
static int l_open_file(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_Number max_bytes = luaL_optnumber(L, 2, 10485760);
    lua_Number backups = luaL_optnumber(L, 3, 5);
    luaL_argcheck(L, max_bytes >= 0, 2, "max_bytes must be >= 0");
    luaL_argcheck(L, backups >= 0 && backups <= 1000 && backups == (int)backups, 3,
                  "backup_count must be an integer in 0..1000");

    size_t path_len = strlen(path);
    log_file *f = lua_newuserdata(L, sizeof *f + path_len + 1);
    f->fd = -1;
    memcpy(f->path, path, path_len + 1);
    luaL_getmetatable(L, FILE_MT);
    lua_setmetatable(L, -2);
    f->max_bytes = (long long)max_bytes;
    f->backup_count = (int)backups;
    f->fd = open_append(path);
    if (f->fd < 0)
        return push_errno(L, "cannot open", path, errno);
    f->size = fd_size(f->fd);
    return 1;
}

static log_file *check_file(lua_State *L)
{
    return luaL_checkudata(L, 1, FILE_MT);
}

/* path -> path.1 -> ... -> path.<backup_count>; with no backups, truncate.
 * The old fd stays valid until the new file is open. Returns 0 or errno. */
static int rotate(log_file *f)
{
    if (f->backup_count == 0) {
        if (ftruncate(f->fd, 0) != 0)
            return errno;
        f->size = 0;
        return 0;
    }
    size_t n = strlen(f->path) + 16;
    char *from = malloc(n), *to = malloc(n);
    int err = 0;
    if (!from || !to) {
        err = ENOMEM;
        goto done;
    }
    for (int i = f->backup_count - 1; i >= 1; i--) {
        snprintf(from, n, "%s.%d", f->path, i);
        snprintf(to, n, "%s.%d", f->path, i + 1);
        if (rename(from, to) != 0 && errno != ENOENT) {
            err = errno;
            goto done;
        }
    }
    snprintf(to, n, "%s.1", f->path);
    if (rename(f->path, to) != 0 && errno != ENOENT) {
        err = errno;
        goto done;
    }
    int fd = open_append(f->path);
    if (fd < 0) {
        err = errno;
        goto done;
    }
    close(f->fd);
    f->fd = fd;
    f->size = fd_size(fd);
done:
    free(from);
    free(to);
    return err;
}

/* Writes all of iov (advancing it on short writes). Returns 0 or errno. */
static int write_all(int fd, struct iovec *iov, int cnt)
{
    while (cnt > 0) {
        ssize_t w = writev(fd, iov, cnt);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        while (cnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* file:write(line) -> true | nil, message. Appends line .. "\n". */
static int l_file_write(lua_State *L)
{
    log_file *f = check_file(L);
    size_t len;
    const char *line = luaL_checklstring(L, 2, &len);
    if (f->fd < 0) {
        lua_pushnil(L);
        lua_pushstring(L, "file is closed");
        return 2;
    }
    long long need = (long long)len + 1;
    if (f->max_bytes > 0 && f->size > 0 && f->size + need > f->max_bytes) {
        f->size = fd_size(f->fd);   /* someone may have truncated it */
        if (f->size > 0 && f->size + need > f->max_bytes) {
            int err = rotate(f);
            if (err)
                return push_errno(L, "cannot rotate", f->path, err);
        }
    }
    struct iovec iov[2] = {
        { (void *)line, len },
        { (void *)"\n", 1 },
    };
    int err = write_all(f->fd, iov, 2);
    if (err)
        return push_errno(L, "cannot write", f->path, err);
    f->size += need;
    lua_pushboolean(L, 1);
    return 1;
}

/* file:reopen() -> true | nil, message: after an outside rotation (logrotate). */
static int l_file_reopen(lua_State *L)
{
    log_file *f = check_file(L);
    int fd = open_append(f->path);
    if (fd < 0)
        return push_errno(L, "cannot open", f->path, errno);
    if (f->fd >= 0)
        close(f->fd);
    f->fd = fd;
    f->size = fd_size(fd);
    lua_pushboolean(L, 1);
    return 1;
}

/* file:size() -> bytes written to the current file, as we count them. */
static int l_file_size(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)check_file(L)->size);
    return 1;
}

static int l_file_close(lua_State *L)
{
    log_file *f = check_file(L);
    if (f->fd >= 0) {
        close(f->fd);
        f->fd = -1;
    }
    return 0;
}

static int l_file_tostring(lua_State *L)
{
    log_file *f = check_file(L);
    lua_pushfstring(L, "tamarco.log.file (%s%s)", f->path, f->fd < 0 ? ", closed" : "");
    return 1;
}

int luaopen_tamarco_c_log(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"encode_json", l_encode_json},
        {"encode_logstash", l_encode_logstash},
        {"format_text", l_format_text},
        {"timestamp", l_timestamp},
        {"open_file", l_open_file},
        {NULL, NULL},
    };
    static const luaL_Reg file_methods[] = {
        {"write", l_file_write},
        {"reopen", l_file_reopen},
        {"size", l_file_size},
        {"close", l_file_close},
        {NULL, NULL},
    };

    luaL_newmetatable(L, BUF_MT);
    lua_pushcfunction(L, buf_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    luaL_newmetatable(L, FILE_MT);
    lua_newtable(L);
    luaL_register(L, NULL, file_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_file_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_file_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);

    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
