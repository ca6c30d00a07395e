/* TensorBoard event files in C (bnn_probe/runlog/tbevents.py calls these through ctypes; its numpy functions give
 * the same bytes where the extension is not built):
 *   bnnp_tb_scalars  serialized Event protobufs (tensorboard's event.proto) of per-step scalar summaries;
 *   bnnp_tf_frame    TFRecord framing: per record the uint64 length (little-endian), the masked CRC-32C of those
 *                    8 bytes, the record, the masked CRC-32C of the record.
 * CRC-32C is Castagnoli's CRC (reflected polynomial 0x82F63B78), table-driven eight bytes at a time; the mask is
 * TFRecord's ((c >> 15) | (c << 17)) + 0xA282EAD8. Included by _pass.c. */

static uint32_t crc32c_tab[8][256];

__attribute__((constructor)) static void crc32c_init(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_tab[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int t = 1; t < 8; t++)
            crc32c_tab[t][b] = (crc32c_tab[t - 1][b] >> 8) ^ crc32c_tab[0][crc32c_tab[t - 1][b] & 0xFF];
}

static uint32_t crc32c(const uint8_t *p, int64_t n) {
    uint32_t c = 0xFFFFFFFFu;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= c;
        c = crc32c_tab[7][v & 0xFF] ^ crc32c_tab[6][(v >> 8) & 0xFF] ^ crc32c_tab[5][(v >> 16) & 0xFF] ^
            crc32c_tab[4][(v >> 24) & 0xFF] ^ crc32c_tab[3][(v >> 32) & 0xFF] ^ crc32c_tab[2][(v >> 40) & 0xFF] ^
            crc32c_tab[1][(v >> 48) & 0xFF] ^ crc32c_tab[0][v >> 56];
    }
#endif
    for (; n > 0; p++, n--) c = (c >> 8) ^ crc32c_tab[0][(c ^ *p) & 0xFF];
    return c ^ 0xFFFFFFFFu;
}

static inline uint32_t crc32c_masked(const uint8_t *p, int64_t n) {
    const uint32_t c = crc32c(p, n);
    return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

static inline uint8_t *put_le(uint8_t *o, uint64_t v, int bytes) {
    for (int k = 0; k < bytes; k++) o[k] = (uint8_t)(v >> (8 * k));
    return o + bytes;
}

static inline uint8_t *put_varint(uint8_t *o, uint64_t v) {
    do {
        const uint8_t b = v & 0x7F;
        v >>= 7;
        *o++ = b | (v ? 0x80 : 0);
    } while (v);
    return o;
}

/* masked CRC-32C of each of n segments buf[starts[i] .. starts[i] + lengths[i]) */
__attribute__((visibility("default"))) void bnnp_crc32c_masked(const uint8_t *buf, const int64_t *starts,
                                                               const int64_t *lengths, int64_t n, uint32_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = crc32c_masked(buf + starts[i], lengths[i]);
}

/* The n records of payload (back to back, lengths[i] bytes each) framed into out (sum of lengths + 16 n bytes). */
__attribute__((visibility("default"))) void bnnp_tf_frame(const uint8_t *payload, const int64_t *lengths, int64_t n,
                                                          uint8_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t len = lengths[i];
        uint8_t *head = out;
        out = put_le(out, (uint64_t)len, 8);
        out = put_le(out, crc32c_masked(head, 8), 4);
        memcpy(out, payload, (size_t)len);
        out = put_le(out + len, crc32c_masked(payload, len), 4);
        payload += len;
    }
}

/* S serialized Events into out, back to back; ev_len[s] their sizes; returns the bytes written. Event s: wall_time
 * = wall[s] (field 1, fixed64), step = steps[s] (field 2, varint; a negative step as its 10-byte two's complement)
 * and a summary (field 5) holding, for each v with keep[s V + v], the bytes pre[pre_off[v] .. pre_off[v + 1])
 * (Value's tag field and simple_value's key, made by the caller) and vals[s V + v] (float, little-endian).
 * out must hold S (1 + 8 + 1 + 10 + 1 + 10) + the kept values' bytes. */
__attribute__((visibility("default"))) int64_t bnnp_tb_scalars(int64_t S, int64_t V, const int64_t *steps,
                                                               const double *wall, const float *vals,
                                                               const uint8_t *keep, const uint8_t *pre,
                                                               const int64_t *pre_off, uint8_t *out,
                                                               int64_t *ev_len) {
    uint8_t *o = out;
    for (int64_t s = 0; s < S; s++) {
        const uint8_t *k = keep + s * V;
        uint64_t summ = 0;
        for (int64_t v = 0; v < V; v++)
            if (k[v]) summ += (uint64_t)(pre_off[v + 1] - pre_off[v]) + 4;
        uint8_t *e = o;
        uint64_t bits;
        memcpy(&bits, &wall[s], 8);
        *o++ = 0x09;
        o = put_le(o, bits, 8);
        *o++ = 0x10;
        o = put_varint(o, (uint64_t)steps[s]);
        *o++ = 0x2A;
        o = put_varint(o, summ);
        for (int64_t v = 0; v < V; v++) {
            if (!k[v]) continue;
            const int64_t n = pre_off[v + 1] - pre_off[v];
            memcpy(o, pre + pre_off[v], (size_t)n);
            o += n;
            uint32_t fb;
            memcpy(&fb, &vals[s * V + v], 4);
            o = put_le(o, fb, 4);
        }
        ev_len[s] = o - e;
    }
    return o - out;
}
