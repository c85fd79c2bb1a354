/*
 * systemd's notification protocol (sd_notify(3)) without libsystemd: one
 * datagram to $NOTIFY_SOCKET. Part of the public C API (tamarco.h); the
 * Lua side (tamarco.c.native.sd_notify) is what lua/tamarco/ops/systemd.lua
 * uses for READY=1 and STOPPING=1.
 */
#include "host.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

TAMARCO_API int tamarco_sd_notify(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path)
        return 0;
    if (!state)
        return -EINVAL;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    size_t path_len = strlen(path);
    if (path_len >= sizeof addr.sun_path || (path[0] != '/' && path[0] != '@'))
        return -EINVAL;
    memcpy(addr.sun_path, path, path_len);
    if (path[0] == '@')   /* abstract namespace */
        addr.sun_path[0] = '\0';
    socklen_t addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    ssize_t sent = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&addr, addr_len);
    int err = errno;
    close(fd);
    return sent < 0 ? -err : 1;
}
