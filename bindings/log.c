/* tamarco.c.log: the bytes of logging. Record encodings (JSON line, logstash
 * v0/v1, human text), the ISO 8601 timestamp and a rotating file. Levels,
 * masking, sinks and every other policy live in lua/tamarco/core/logging.lua. */
#include "host.h"
#include "log_encode.h"
#include "lua_class.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define BUF_MT "tamarco.log.buf"
#define LAYOUT_MT "tamarco.log.layout"
#define FILE_MT "tamarco.log.file"

/* ---- the encoding buffer ----
 *
 * One per Lua state (an upvalue of the functions), reused by every call:
 * the encoders never call back into Lua, so a call cannot nest in another,
 * and a memory error that unwinds us leaves nothing to free. */

static int buf_gc(lua_State *L)
{
    tamarco_buf_free(lua_touserdata(L, 1));
    return 0;
}

static int layout_gc(lua_State *L)
{
    tamarco_logstash_layout_free(lua_touserdata(L, 1));
    return 0;
}

static tamarco_buf *scratch(lua_State *L)
{
    tamarco_buf *b = lua_touserdata(L, lua_upvalueindex(1));
    b->len = 0;
    b->oom = 0;
    return b;
}

/* Pushes the buffer's bytes as the result string. */
static int push_scratch(lua_State *L, tamarco_buf *b)
{
    if (b->oom) {
        tamarco_buf_free(b);
        return luaL_error(L, "tamarco.c.log: out of memory while encoding a record");
    }
    lua_pushlstring(L, b->data ? b->data : "", b->len);
    if (b->cap > 1 << 20)   /* one huge record: do not keep its buffer */
        tamarco_buf_free(b);
    return 1;
}

/* encode_json(record) -> one JSON line, no trailing newline. */
static int l_encode_json(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    tamarco_buf *b = scratch(L);
    tamarco_log_json_value(b, L, 1, 1);
    return push_scratch(L, b);
}

/* encode_logstash(record, version, host[, message_type[, tags]]) -> JSON line.
 * version 0: @timestamp @message @source @source_host @source_path @tags @type
 *            @fields{levelname, logger, ...extra, stack_trace}
 * version 1: @timestamp @version message host path tags type level
 *            logger_name ...extra stack_trace
 * path is the record's source_path (the file of the logging call), else the
 * logger name; tags are the given ones followed by the record's `tags`;
 * records with a traceback get Tamarco's debug fields (lineno, process,
 * thread_name). message_type defaults to "logstash". */
static int l_encode_logstash(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    int version = luaL_checkint(L, 2);
    luaL_argcheck(L, version == 0 || version == 1, 2, "logstash version must be 0 or 1");
    size_t host_len, type_len;
    const char *host = luaL_checklstring(L, 3, &host_len);
    const char *type = luaL_optlstring(L, 4, "logstash", &type_len);
    if (!lua_isnoneornil(L, 5))
        luaL_checktype(L, 5, LUA_TTABLE);

    /* the layout of this call, in the memory of the last one */
    tamarco_logstash_layout *layout = lua_touserdata(L, lua_upvalueindex(2));
    if (!tamarco_logstash_layout_set(layout, L, version, host, host_len, type, type_len,
                                     lua_istable(L, 5) ? 5 : 0))
        return luaL_error(L, "tamarco.c.log: out of memory while encoding a record");
    tamarco_buf *b = scratch(L);
    tamarco_log_logstash(b, L, 1, layout);
    return push_scratch(L, b);
}

/* encode_json_parts(timestamp, level, logger, message, extra, source_path,
 *                   source_line, service_name, deploy_name,
 *                   service_instance_id) -> JSON line | false
 * encode_json of the record with those fields, without its table (see
 * log_encode.h); false when the parts need the table. */
static int l_encode_json_parts(lua_State *L)
{
    lua_settop(L, 10);
    tamarco_buf *b = scratch(L);
    if (!tamarco_log_json_parts(b, L, 1)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    return push_scratch(L, b);
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
static void add_text(tamarco_buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7F) {
            char esc[4] = { '\\', 'x', hex[c >> 4], hex[c & 0xF] };
            tamarco_buf_add(b, s + run, i - run);
            tamarco_buf_add(b, esc, 4);
            run = i + 1;
        }
    }
    tamarco_buf_add(b, s + run, len - run);
}

typedef struct text_ctx {
    tamarco_buf *b;
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
    tamarco_buf_addc(c->b, ' ');
    if (c->color)
        tamarco_buf_adds(c->b, "\x1b[2m");
    add_text(c->b, key, len);
    tamarco_buf_addc(c->b, '=');
    if (c->color)
        tamarco_buf_adds(c->b, "\x1b[0m");
    if (lua_type(L, value_idx) == LUA_TSTRING) {
        size_t vlen;
        const char *v = lua_tolstring(L, value_idx, &vlen);
        if (needs_quotes(v, vlen))
            tamarco_log_json_string(c->b, v, vlen);
        else
            tamarco_buf_add(c->b, v, vlen);
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
    const char *ts = tamarco_log_string_field(L, 1, "@timestamp", "", &ts_len);
    const char *level = tamarco_log_string_field(L, 1, "level", "INFO", &level_len);
    const char *logger = tamarco_log_string_field(L, 1, "logger", "", &logger_len);
    const char *message = tamarco_log_string_field(L, 1, "message", "", &msg_len);
    const char *tb = tamarco_log_string_field(L, 1, "traceback", "", &tb_len);

    tamarco_buf *b = scratch(L);
    /* "2026-11-29T10:00:00.123Z" -> "2026-11-29 10:00:00.123" */
    if (ts_len == 24 && ts[10] == 'T' && ts[23] == 'Z') {
        tamarco_buf_add(b, ts, 10);
        tamarco_buf_addc(b, ' ');
        tamarco_buf_add(b, ts + 11, 12);
    } else {
        add_text(b, ts, ts_len);
    }
    tamarco_buf_addc(b, ' ');
    const char *on = color ? level_color(level) : "";
    if (*on)
        tamarco_buf_adds(b, on);
    add_text(b, level, level_len);
    if (*on)
        tamarco_buf_adds(b, "\x1b[0m");
    for (size_t i = level_len; i < 7; i++)
        tamarco_buf_addc(b, ' ');
    tamarco_buf_adds(b, " [");
    add_text(b, logger, logger_len);
    tamarco_buf_adds(b, "] ");
    add_text(b, message, msg_len);
    text_ctx ctx = { b, color };
    tamarco_log_each_field(L, 1, 1, text_extra, &ctx);
    if (tb_len > 0) {
        tamarco_buf_addc(b, '\n');
        if (color)
            tamarco_buf_adds(b, "\x1b[31m");
        add_text(b, tb, tb_len);
        if (color)
            tamarco_buf_adds(b, "\x1b[0m");
    }
    return push_scratch(L, b);
}

/* caller(level) -> source_path, line | nothing: where the function `level`
 * frames up the stack (1: the one calling caller) is: its file (the chunk
 * name without its '@', else the short source) and current line (nil when
 * unknown). What debug.getinfo(level, "Sl") says, without making its table:
 * logging asks for every record. */
static int l_caller(lua_State *L)
{
    lua_Debug ar;
    if (!lua_getstack(L, luaL_checkint(L, 1), &ar) || !lua_getinfo(L, "Sl", &ar))
        return 0;
    lua_pushstring(L, ar.source[0] == '@' ? ar.source + 1 : ar.short_src);
    if (ar.currentline > 0)
        lua_pushinteger(L, ar.currentline);
    else
        lua_pushnil(L);
    return 2;
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
 * access log: a local append lands in the page cache and does not wait for
 * the disk, so handing it to a thread would cost more than it saves.
 * Remote sinks are the ones that must never block (see DESIGN §6).
 *
 * Lines are gathered in a buffer and written when it passes buffer_bytes
 * (0: a write per line) and on flush(); the logging file sink flushes at
 * the end of every loop turn, so a record reaches the file within one turn
 * at the cost of one write(2) per 64 KiB instead of one per line.
 *
 * The fd is O_APPEND and every write holds whole lines, so lines are never
 * interleaved even when several processes share the file (--workers N);
 * rotation, though, is done by whichever process sees the size pass
 * max_bytes: with several writers give each its own file. */

typedef struct log_file {
    int fd;
    int backup_count;
    long long max_bytes;   /* 0: never rotate */
    long long size;        /* our idea of the file's size, buffered lines included */
    size_t buffer_bytes;   /* write when this much is buffered */
    tamarco_buf out;   /* whole lines not written yet */
    size_t committed;      /* out's length after the last complete line */
    size_t pending_lines;  /* complete lines in out */
    double dropped;        /* lines lost to failed writes since open */
    int torn;              /* a failed write left half a line in the file */
    char path[];           /* kept in the userdata */
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

/* open_file(path, max_bytes, backup_count[, buffer_bytes]) -> file | nil, message */
static int l_open_file(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_Number max_bytes = luaL_optnumber(L, 2, 10485760);
    lua_Number backups = luaL_optnumber(L, 3, 5);
    lua_Number buffer_bytes = luaL_optnumber(L, 4, 0);
    luaL_argcheck(L, max_bytes >= 0, 2, "max_bytes must be >= 0");
    luaL_argcheck(L, backups >= 0 && backups <= 1000 && backups == (int)backups, 3,
                  "backup_count must be an integer in 0..1000");
    luaL_argcheck(L, buffer_bytes >= 0 && buffer_bytes <= (1 << 24), 4,
                  "buffer_bytes must be in 0..16 MiB");

    size_t path_len = strlen(path);
    log_file *f = lua_newuserdata(L, sizeof *f + path_len + 1);
    f->fd = -1;
    tamarco_buf_init(&f->out);
    f->committed = 0;
    f->pending_lines = 0;
    f->dropped = 0;
    f->torn = 0;
    memcpy(f->path, path, path_len + 1);
    luaL_getmetatable(L, FILE_MT);
    lua_setmetatable(L, -2);
    f->max_bytes = (long long)max_bytes;
    f->backup_count = (int)backups;
    f->buffer_bytes = (size_t)buffer_bytes;
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

/* Writes all of data[0, len), after a newline that ends the line a failed
 * write tore (a full disk can take half a line). One writev(2): a loop
 * turn's lines go in one call. Returns 0 or errno. */
static int write_all(log_file *f, const char *data, size_t len)
{
    static char newline[] = "\n";
    size_t done = 0;   /* bytes of data in the file */
    while (done < len) {
        struct iovec iov[2];
        int n = 0;
        if (f->torn)
            iov[n++] = (struct iovec){ .iov_base = newline, .iov_len = 1 };
        iov[n++] = (struct iovec){ .iov_base = (char *)data + done, .iov_len = len - done };
        ssize_t w = writev(f->fd, iov, n);
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            int err = w < 0 ? errno : ENOSPC;
            if (done > 0 && data[done - 1] != '\n')
                f->torn = 1;
            return err;
        }
        if (f->torn) {
            f->torn = 0;
            w--;
        }
        done += (size_t)w;
    }
    return 0;
}

/* Writes the first `upto` buffered bytes (all complete lines) and keeps the
 * rest. On a failure those lines are dropped and counted all the same: a
 * full disk must not grow the buffer without end. Returns 0 or errno. */
static int write_out(log_file *f, size_t upto)
{
    int err = upto ? write_all(f, f->out.data, upto) : 0;
    if (err)
        f->dropped += (double)f->pending_lines;
    f->pending_lines = 0;
    size_t rest = f->out.len - upto;
    if (rest)
        memmove(f->out.data, f->out.data + upto, rest);
    f->out.len = rest;
    f->committed = rest;
    if (err)
        f->size = fd_size(f->fd) + (long long)rest;
    if (f->out.cap > (4u << 20) && rest == 0)   /* after a huge line */
        tamarco_buf_free(&f->out);
    return err;
}

/* The line (newline included) appended to out from `start`: rotate first
 * when it would take the file past max_bytes, then write when the buffer
 * is full. Returns 0 or errno (the line is dropped). */
static int commit_line(log_file *f, size_t start)
{
    if (f->out.oom) {
        f->out.oom = 0;
        f->out.len = f->committed;
        f->dropped++;
        return ENOMEM;
    }
    long long need = (long long)(f->out.len - start);
    if (f->max_bytes > 0 && f->size > 0 && f->size + need > f->max_bytes) {
        int err = write_out(f, start);   /* earlier lines go to this file */
        if (!err) {
            f->size = fd_size(f->fd);    /* someone may have truncated it */
            if (f->size > 0 && f->size + need > f->max_bytes)
                err = rotate(f);
        }
        if (err) {
            f->out.len = f->committed = 0;
            f->dropped++;
            return err;
        }
    }
    f->size += need;
    f->committed = f->out.len;
    f->pending_lines++;
    if (f->out.len >= f->buffer_bytes)
        return write_out(f, f->out.len);
    return 0;
}

static int push_write_result(lua_State *L, log_file *f, int err)
{
    if (err)
        return push_errno(L, "cannot write", f->path, err);
    lua_pushboolean(L, 1);
    return 1;
}

/* The open file at 1, its buffer holding complete lines only (a memory
 * error may have unwound a write halfway), or NULL with nil, message pushed. */
static log_file *writable(lua_State *L)
{
    log_file *f = check_file(L);
    if (f->fd < 0) {
        lua_pushnil(L);
        lua_pushstring(L, "file is closed");
        return NULL;
    }
    f->out.len = f->committed;
    return f;
}

/* file:write(line) -> true | nil, message. Appends line .. "\n". */
static int l_file_write(lua_State *L)
{
    size_t len;
    luaL_checklstring(L, 2, &len);
    log_file *f = writable(L);
    if (!f)
        return 2;
    const char *line = lua_tostring(L, 2);
    size_t start = f->out.len;
    tamarco_buf_add(&f->out, line, len);
    tamarco_buf_addc(&f->out, '\n');
    return push_write_result(L, f, commit_line(f, start));
}

/* file:write_json(record) -> true | nil, message. Appends encode_json(record)
 * .. "\n", encoded straight into the file's buffer. */
static int l_file_write_json(lua_State *L)
{
    luaL_checktype(L, 2, LUA_TTABLE);
    log_file *f = writable(L);
    if (!f)
        return 2;
    size_t start = f->out.len;
    tamarco_log_json_value(&f->out, L, 2, 1);
    tamarco_buf_addc(&f->out, '\n');
    return push_write_result(L, f, commit_line(f, start));
}

/* file:write_json_parts(timestamp, level, logger, message, extra,
 *     source_path, source_line, service_name, deploy_name,
 *     service_instance_id) -> true | nil, message | false
 * write_json of the record with those fields, without its table (see
 * log_encode.h); false, writing nothing, when the parts need the table. */
static int l_file_write_json_parts(lua_State *L)
{
    lua_settop(L, 11);
    log_file *f = writable(L);
    if (!f)
        return 2;
    size_t start = f->out.len;
    if (!tamarco_log_json_parts(&f->out, L, 2)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    tamarco_buf_addc(&f->out, '\n');
    return push_write_result(L, f, commit_line(f, start));
}

/* file:flush() -> true | nil, message: writes the buffered lines. */
static int l_file_flush(lua_State *L)
{
    log_file *f = check_file(L);
    if (f->fd < 0 || f->committed == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    f->out.len = f->committed;
    return push_write_result(L, f, write_out(f, f->committed));
}

/* file:reopen() -> true | nil, message: after an outside rotation (logrotate).
 * Buffered lines go to the old file first. */
static int l_file_reopen(lua_State *L)
{
    log_file *f = check_file(L);
    if (f->fd >= 0 && f->committed) {
        f->out.len = f->committed;
        write_out(f, f->committed);
    }
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

/* file:dropped() -> lines lost to failed writes since the file was opened. */
static int l_file_dropped(lua_State *L)
{
    lua_pushnumber(L, check_file(L)->dropped);
    return 1;
}

/* file:size() -> bytes in the current file, buffered lines included. */
static int l_file_size(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)check_file(L)->size);
    return 1;
}

/* file:close(), also the __gc: writes what is buffered, then closes. */
static int l_file_close(lua_State *L)
{
    log_file *f = check_file(L);
    if (f->fd >= 0) {
        f->out.len = f->committed;
        write_out(f, f->committed);
        close(f->fd);
        f->fd = -1;
    }
    tamarco_buf_free(&f->out);
    f->committed = 0;
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
        {"encode_json_parts", l_encode_json_parts},
        {"encode_logstash", l_encode_logstash},
        {"format_text", l_format_text},
        {"timestamp", l_timestamp},
        {"caller", l_caller},
        {"open_file", l_open_file},
        {NULL, NULL},
    };
    static const luaL_Reg file_methods[] = {
        {"write", l_file_write},
        {"write_json", l_file_write_json},
        {"write_json_parts", l_file_write_json_parts},
        {"flush", l_file_flush},
        {"reopen", l_file_reopen},
        {"size", l_file_size},
        {"dropped", l_file_dropped},
        {"close", l_file_close},
        {NULL, NULL},
    };

    tamarco_class_register(L, BUF_MT, NULL, buf_gc, NULL);
    tamarco_class_register(L, LAYOUT_MT, NULL, layout_gc, NULL);
    tamarco_class_register(L, FILE_MT, file_methods, l_file_close, l_file_tostring);

    /* the functions share one encoding buffer and one logstash layout,
     * their upvalues */
    lua_newtable(L);
    tamarco_buf *b = lua_newuserdata(L, sizeof *b);
    tamarco_buf_init(b);
    luaL_getmetatable(L, BUF_MT);
    lua_setmetatable(L, -2);
    tamarco_logstash_layout *layout = lua_newuserdata(L, sizeof *layout);
    tamarco_logstash_layout_init(layout);
    luaL_getmetatable(L, LAYOUT_MT);
    lua_setmetatable(L, -2);
    luaL_openlib(L, NULL, funcs, 2);
    return 1;
}
