/* The C tests' assertion: CHECK(cond) reports the failed condition with its
 * place and counts it; check_report(name) ends main with 0 or 1. */
#ifndef TAMARCO_SPEC_CHECK_H
#define TAMARCO_SPEC_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond)                                                     \
    do {                                                                \
        if (!(cond)) {                                                  \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                 \
        }                                                               \
    } while (0)

static inline int check_report(const char *name)
{
    if (failures) {
        fprintf(stderr, "%s: %d failure(s)\n", name, failures);
        return 1;
    }
    printf("%s: ok\n", name);
    return 0;
}

#endif
