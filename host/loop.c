/*
 * Running and stopping the host's loop. The host owns its one libuv loop;
 * bindings (tamarco.c.process) only expose these calls to the run command
 * and the test runner.
 */
#include "host.h"

int tamarco_loop_run(tamarco_host *host, uv_run_mode mode)
{
    return uv_run(host->loop, mode);
}

void tamarco_loop_stop(tamarco_host *host)
{
    uv_stop(host->loop);
}
