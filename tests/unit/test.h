/*
 * A tiny assertion kit for the C unit tests: each test binary is one ctest entry. Failures print
 * both operands with file and line and make the binary exit non-zero at the end.
 */
#ifndef MS_TEST_H
#define MS_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int ms_test_failures;
static int ms_test_checks;

#define ASSERT_TRUE(cond)                                                                          \
    do {                                                                                           \
        ms_test_checks++;                                                                          \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #cond);           \
            ms_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

#define ASSERT_INT_EQ(a, b)                                                                        \
    do {                                                                                           \
        long long _a = (long long)(a), _b = (long long)(b);                                        \
        ms_test_checks++;                                                                          \
        if (_a != _b) {                                                                            \
            fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__, #a, #b,  \
                    _a, _b);                                                                       \
            ms_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

#define ASSERT_STR_EQ(a, b)                                                                        \
    do {                                                                                           \
        const char *_a = (a), *_b = (b);                                                           \
        ms_test_checks++;                                                                          \
        if (!_a || !_b || strcmp(_a, _b) != 0) {                                                   \
            fprintf(stderr, "%s:%d: %s == %s failed: \"%s\" != \"%s\"\n", __FILE__, __LINE__, #a,  \
                    #b, _a ? _a : "(null)", _b ? _b : "(null)");                                   \
            ms_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

#define ASSERT_CONTAINS(hay, needle)                                                               \
    do {                                                                                           \
        const char *_h = (hay), *_n = (needle);                                                    \
        ms_test_checks++;                                                                          \
        if (!_h || !strstr(_h, _n)) {                                                              \
            fprintf(stderr, "%s:%d: \"%s\" does not contain \"%s\"\n", __FILE__, __LINE__,         \
                    _h ? _h : "(null)", _n);                                                       \
            ms_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

/* Ends main(): prints a summary line and returns the exit status. */
#define TEST_DONE()                                                                                \
    (printf("%d checks, %d failed\n", ms_test_checks, ms_test_failures),                           \
     ms_test_checks > 0 && ms_test_failures == 0 ? 0 : 1)

#endif
