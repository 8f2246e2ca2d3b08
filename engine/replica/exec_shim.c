/*
 * replica/exec_shim: `moonserve __exec PROGRAM ARGS...`, the first process of a process replica.
 *
 * libuv offers no hook between fork and exec, so this small process does what a process replica
 * needs before the user's command runs, and stays to keep the promise that no replica outlives
 * the engine, even one killed with SIGKILL:
 *   - it leads the replica's process group (the controller spawns it in a session of its own), so
 *     the controller can signal the command and everything it started at once;
 *   - it asks the kernel for SIGTERM when the controller dies (PR_SET_PDEATHSIG) and also watches
 *     fd 3, a pipe whose far end only the controller holds: either way it stops the group
 *     (SIGTERM, then SIGKILL after MOONSERVE_EXEC_GRACE_S);
 *   - the command itself gets PR_SET_PDEATHSIG SIGKILL, in case the shim is killed outright;
 *   - SIGTERM and SIGINT from the controller are passed to the command; when the command exits,
 *     what is left of the group is killed and the shim exits the same way the command did.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "replica/replica.h"

static volatile sig_atomic_t pending_signal;

static void on_signal(int sig)
{
    pending_signal = sig;
}

static void exec_child(char **argv, pid_t shim)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != shim)
        _exit(127); /* the shim died before the request took effect */
    close(3);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execvp(argv[0], argv);
    fprintf(stderr, "moonserve: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

/* The command's end, as the shim's own: the same exit status, or the same signal. */
static int exit_like(int status)
{
    if (WIFSIGNALED(status)) {
        signal(WTERMSIG(status), SIG_DFL);
        raise(WTERMSIG(status));
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

/* Kills the rest of the group (workers the command left behind); the shim ignores it. */
static void kill_rest_of_group(void)
{
    signal(SIGTERM, SIG_IGN);
    kill(0, SIGTERM);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int ms_replica_exec_main(int argc, char **argv)
{
    if (argc < 1) {
        fprintf(stderr, "usage: moonserve __exec PROGRAM [ARGS...]\n");
        return 2;
    }
    pid_t parent = getppid();
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent)
        return 1; /* the controller is already gone */
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    const char *grace_env = getenv("MOONSERVE_EXEC_GRACE_S");
    double grace = grace_env ? atof(grace_env) : 5.0;
    pid_t self = getpid();
    pid_t child = fork();
    if (child < 0) {
        fprintf(stderr, "moonserve: fork failed: %s\n", strerror(errno));
        return 1;
    }
    if (child == 0)
        exec_child(argv, self);

    /* Run by hand (no controller pipe): only PDEATHSIG watches the parent. */
    int watch_fd = fcntl(3, F_GETFD) >= 0 ? 3 : -1;
    double kill_at = 0; /* when the group gets SIGKILL, 0 = not stopping */
    for (;;) {
        int status;
        pid_t w = waitpid(child, &status, WNOHANG);
        if (w == child) {
            kill_rest_of_group();
            return exit_like(status);
        }
        int controller_gone = getppid() != parent;
        struct pollfd pfd = {.fd = controller_gone ? -1 : watch_fd, .events = POLLIN};
        if (poll(&pfd, 1, 100) > 0 && (pfd.revents & (POLLHUP | POLLIN | POLLERR))) {
            char b[64];
            controller_gone = read(3, b, sizeof b) <= 0;
            if (controller_gone)
                watch_fd = -1;
        }
        int sig = pending_signal;
        pending_signal = 0;
        if (sig || (controller_gone && !kill_at)) {
            kill(child, sig ? sig : SIGTERM);
            if (!kill_at)
                kill_at = controller_gone ? now_s() + grace : 0;
        }
        if (controller_gone && !kill_at)
            kill_at = now_s() + grace;
        if (kill_at && now_s() >= kill_at) {
            signal(SIGTERM, SIG_IGN);
            kill(0, SIGKILL); /* the whole group, the shim included */
        }
    }
}
