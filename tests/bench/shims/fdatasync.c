/* LD_PRELOAD shim: fdatasync before closing any file opened for writing, so that dcmtk storescp gets the
 * same durability per instance as passerelled (tests/bench). Built by the benchmark with gcc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static void sync_if_written(int fd) {
    int fl = fcntl(fd, F_GETFL);
    struct stat st;
    if (fl < 0 || (fl & O_ACCMODE) == O_RDONLY) return;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    (void)fdatasync(fd);
}

int close(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "close");
    sync_if_written(fd);
    return real(fd);
}

int fclose(FILE *f) {
    static int (*real)(FILE *);
    if (!real) real = dlsym(RTLD_NEXT, "fclose");
    if (f) {
        fflush(f);
        sync_if_written(fileno(f));
    }
    return real(f);
}
