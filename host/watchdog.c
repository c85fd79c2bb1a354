/*
 * The shutdown watchdog: a plain OS thread that ends the process with exit
 * code 1 after a delay unless the process exits before. A thread, not a
 * loop timer, so that a stuck loop cannot stop it.
 */
#include "host.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct watchdog {
    double seconds;
    char message[512];
} watchdog;

static void *watchdog_main(void *arg)
{
    watchdog *dog = arg;
    struct timespec ts;
    ts.tv_sec = (time_t)dog->seconds;
    ts.tv_nsec = (long)((dog->seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0)
        ;
    /* write(2) is async-signal-safe and does not take stdio's locks, which
     * the stuck loop thread may hold. */
    ssize_t ignored = write(STDERR_FILENO, dog->message, strlen(dog->message));
    (void)ignored;
    _exit(1);
    return NULL;
}

int tamarco_watchdog_start(double seconds, const char *message)
{
    watchdog *dog = malloc(sizeof *dog);
    if (!dog)
        return ENOMEM;
    dog->seconds = seconds;
    snprintf(dog->message, sizeof dog->message, "%s", message);
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&thread, &attr, watchdog_main, dog);
    pthread_attr_destroy(&attr);
    if (rc != 0)
        free(dog);
    return rc;
}
