/* The attention-dropout keep-mask of prefix_attn.dropout for CPU tensors: the Triton kernels' bits
 * (csrc_triton/common.py, dropout_keep_tile), drawn in C. Built and loaded by prefix_attn/keep_mask_cpu.py.
 *
 * Score row (bh, i) of an op call draws Philox4x32-10 (Triton's randint4x: key = seed, counter words
 * (counter low, counter high, 0, 0)) at the counters offset + (bh * seqlen_q + i) * groups + g, g < groups.
 * Counter g gives the eight drawn columns 8g .. 8g + 7: the low 16 bits of words r0, r2, r1, r3, then their
 * high 16 bits; column c is kept when its 16 bits are >= threshold. Drawn columns below P8 (P rounded up to
 * 8) are prefix slots (P8 - P of them padding, never used), column P8 + j is key j.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 64 /* counters per pass: the rounds run lane by lane over arrays the compiler vectorises */

/* x86-64 ELF (GCC >= 6, clang >= 14): an AVX2 build of the draw beside the baseline one, picked when the library
 * loads (1.5x faster per counter than SSE2 measured); no -march=native, so a cached library stays valid on any
 * x86-64 machine that shares the cache folder. */
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14)
#define CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CPU_CLONES
#endif
#ifdef __GNUC__
#define INLINED static inline __attribute__((always_inline)) /* into each clone */
#else
#define INLINED static inline
#endif

INLINED void draw_counters(uint64_t first, int64_t n, uint32_t k0, uint32_t k1, uint32_t threshold, uint8_t *keep) {
    uint32_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
    for (int l = 0; l < LANES; l++) {
        uint64_t counter = first + (uint64_t)l;
        c0[l] = (uint32_t)counter;
        c1[l] = (uint32_t)(counter >> 32);
        c2[l] = 0;
        c3[l] = 0;
    }
    for (int round = 0; round < 10; round++) {
        for (int l = 0; l < LANES; l++) {
            uint64_t product_a = (uint64_t)c0[l] * 0xD2511F53u, product_b = (uint64_t)c2[l] * 0xCD9E8D57u;
            uint32_t next0 = (uint32_t)(product_b >> 32) ^ c1[l] ^ k0;
            uint32_t next2 = (uint32_t)(product_a >> 32) ^ c3[l] ^ k1;
            c1[l] = (uint32_t)product_b;
            c3[l] = (uint32_t)product_a;
            c0[l] = next0;
            c2[l] = next2;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    for (int64_t l = 0; l < n; l++) {
        const uint32_t words[4] = {c0[l], c2[l], c1[l], c3[l]};
        for (int w = 0; w < 4; w++) {
            keep[8 * l + w] = (words[w] & 0xFFFFu) >= threshold;
            keep[8 * l + 4 + w] = (words[w] >> 16) >= threshold;
        }
    }
}

/* out: (n_heads_total, row_stop - row_start, n_prefix + n_keys) bytes, 1 = kept, for query rows
 * row_start .. row_stop - 1 of every (batch, head). Returns 0, or 1 when out of memory. */
CPU_CLONES int prefix_attn_keep_mask_grid(uint64_t seed, uint64_t offset, int64_t n_heads_total, int64_t seqlen_q,
                               int64_t row_start, int64_t row_stop, int64_t n_prefix, int64_t n_keys,
                               uint32_t threshold, uint8_t *out) {
    const int64_t prefix8 = (n_prefix + 7) / 8 * 8, groups = prefix8 / 8 + (n_keys + 7) / 8;
    const int64_t rows = row_stop - row_start, counters = rows * groups;
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    /* One (batch, head)'s rows have consecutive counters: drawn in passes of LANES, then the padding dropped. */
    uint8_t *drawn = malloc((size_t)counters * 8); /* a pass writes only the counters it draws */
    if (drawn == NULL) {
        return 1;
    }
    for (int64_t bh = 0; bh < n_heads_total; bh++) {
        const uint64_t first = offset + (uint64_t)(bh * seqlen_q + row_start) * (uint64_t)groups;
        for (int64_t c = 0; c < counters; c += LANES) {
            draw_counters(first + (uint64_t)c, counters - c < LANES ? counters - c : LANES, k0, k1, threshold,
                          drawn + 8 * c);
        }
        for (int64_t i = 0; i < rows; i++) {
            memcpy(out, drawn + 8 * groups * i, (size_t)n_prefix);
            memcpy(out + n_prefix, drawn + 8 * groups * i + prefix8, (size_t)n_keys);
            out += n_prefix + n_keys;
        }
    }
    free(drawn);
    return 0;
}
