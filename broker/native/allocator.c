/* Allocator defaults of the ketenbus binary, set before main (the workspace forbids unsafe
 * Rust, and mimalloc reads these only from its own API or the environment).
 *
 * mimalloc 3's own defaults keep memory a broker does not want kept:
 * - purge_delay 1000 ms: freed pages go back to the system a second after they were freed,
 *   and only when the thread that freed them allocates again, so a burst (four 25 MiB
 *   messages) left 100-130 MB resident for good. 0 gives them back at once.
 * - allow_thp 1: mimalloc asks for transparent huge pages on its arenas, so each 2 MiB that
 *   is touched at all is resident whole (a 4 x 25 MiB run had 231 MB of huge pages) and
 *   cannot be given back in part. 0 turns THP off for this process (prctl), also on
 *   machines whose THP setting is "always".
 * And glibc's malloc, which SQLite (C) allocates its page caches from, makes an arena per
 * thread that calls it, up to 8 per core, each keeping what was freed in it: with SQLite
 * called from up to 32 blocking threads that was 43 MB in 5-6 arenas for 35 MB of caches.
 * M_ARENA_MAX 2 keeps them in two.
 * Each yields to its environment variable (MIMALLOC_PURGE_DELAY, MIMALLOC_ALLOW_THP,
 * MALLOC_ARENA_MAX), so an operator can set any back. Measured: README, "Memory". */
#include <malloc.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <mimalloc.h>

/* Weak: a binary without mimalloc linked in gets no defaults and no error. */
extern void mi_option_set(mi_option_t option, long value) __attribute__((weak));

__attribute__((constructor)) static void ketenbus_allocator_defaults(void) {
#ifdef M_ARENA_MAX
    if (getenv("MALLOC_ARENA_MAX") == NULL) {
        (void)mallopt(M_ARENA_MAX, 2);
    }
#endif
    if (mi_option_set == NULL) {
        return;
    }
    if (getenv("MIMALLOC_PURGE_DELAY") == NULL) {
        mi_option_set(mi_option_purge_delay, 0);
    }
    if (getenv("MIMALLOC_ALLOW_THP") == NULL) {
        mi_option_set(mi_option_allow_thp, 0);
#ifdef PR_SET_THP_DISABLE
        (void)prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
#endif
    }
}
