/* What the AMX kernels (linear_bf16.c, linear_w8a8.c, linear_fp8.c) share: Linux's permission to use the tile
 * registers and the one tile shape they all use. Include it only where __AMX_TILE__ is defined. */
#ifndef DSSERVE_AMX_H
#define DSSERVE_AMX_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out the tile registers' state only to processes that ask (once per process; each file that includes
 * this asks once: the second request is granted at once). */
static int amx_permitted(void) {
    static int state = 0; /* 0 unknown, 1 yes, -1 no; a benign race: every thread computes the same answer */
    if (state == 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Eight tiles of 16 rows x 64 bytes: the kernels use tmm0..3 for C (16 x 16 fp32 or int32), tmm4/5 for A and
 * tmm6/7 for B. Per thread (the configuration is thread state). */
static inline void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

#endif
