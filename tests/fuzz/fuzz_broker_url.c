/*
 * Fuzz harness of the broker URL parser (engine/broker/url.c): any text must give a URL or an
 * error message, never a crash or an out-of-bounds read. A parsed URL must hold a TCP host and a
 * port in range or an absolute socket path, and a refused one must say why with the
 * "broker URL: " prefix, also into buffers too small for the message. Built as a libFuzzer
 * binary with -DMS_FUZZ=ON (clang), else linked with replay.c so ctest runs the corpus
 * (tests/fuzz/corpus/broker_url) through it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "broker/broker.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *url = malloc(size + 1);
    if (!url)
        return 0;
    memcpy(url, data, size);
    url[size] = '\0';
    ms_broker_url_t u;
    char err[256];
    if (ms_broker_parse_url(url, &u, err, sizeof err) == 0) {
        int tcp = u.host[0] != '\0', unix_sock = u.path[0] == '/';
        if (tcp == unix_sock || (tcp && (u.port < 1 || u.port > 65535)) || u.db < 0 ||
            (u.user[0] && !u.password[0]))
            abort();
    } else if (!memchr(err, '\0', sizeof err) || strncmp(err, "broker URL: ", 12) != 0) {
        abort(); /* every refusal must say why */
    }
    char tiny[4];
    if (ms_broker_parse_url(url, &u, tiny, sizeof tiny) < 0 && !memchr(tiny, '\0', sizeof tiny))
        abort();
    ms_broker_parse_url(url, &u, tiny, 0);
    free(url);
    return 0;
}
