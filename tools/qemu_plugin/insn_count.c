/*
 * Counts guest instructions executed under qemu-user (TCG plugin, QEMU plugin API v1, as in
 * Debian 12's qemu 7.2). Used by tools/arm_insn_count.sh to estimate the encoder's cost on the
 * boards: instructions per frame = count(N2 frames) - count(N1 frames), divided by N2 - N1.
 *
 * Build: gcc -shared -fPIC -O2 -o libinsn_count.so insn_count.c
 * Run:   qemu-aarch64 -plugin ./libinsn_count.so,outfile=/tmp/n.txt -L /usr/aarch64-linux-gnu PROG
 *
 * The declarations below are the few functions of <qemu/qemu-plugin.h> (v1) this plugin uses;
 * Debian ships no plugin headers.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef struct qemu_info_t qemu_info_t;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
struct qemu_plugin_insn;
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
char *qemu_plugin_insn_disas(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn,
                                                enum qemu_plugin_op op, void *ptr, uint64_t imm);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* One counter for all threads: inline adds race across vCPUs, so run the guest on one
 * thread (the encoder's default). */
static uint64_t insn_count;
static char outfile[4096];

/* Multiply-accumulate instructions by kind (from the disassembly, at translation time):
 * each kind counts instructions executed; MACs per instruction are in the report. */
enum kind { F32_FMA, F16_FMA, I8_DOT, I16_MLAL, I32_MLA, F32_OTHER_VEC, N_KINDS };
static const char *kind_name[N_KINDS] = {"fmla_4s", "fmla_8h", "sdot", "smlal", "mla_4s",
                                         "other_fp_vec"};
static uint64_t kind_count[N_KINDS];

static int classify(const char *d)
{
    while (*d == ' ' || *d == '\t')
        d++;
    int fma = !strncmp(d, "fmla ", 5) || !strncmp(d, "fmls ", 5);
    if (fma && strstr(d, ".4s"))
        return F32_FMA;
    if (fma && strstr(d, ".8h"))
        return F16_FMA;
    if (!strncmp(d, "sdot ", 5) || !strncmp(d, "udot ", 5))
        return I8_DOT;
    if (!strncmp(d, "smlal", 5) || !strncmp(d, "umlal", 5))
        return I16_MLAL;
    if (!strncmp(d, "mla ", 4) && strstr(d, ".4s"))
        return I32_MLA;
    if (d[0] == 'f' && (strstr(d, ".4s") || strstr(d, ".8h")))
        return F32_OTHER_VEC;
    return -1;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count, n);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        char *d = qemu_plugin_insn_disas(insn);
        int k = d ? classify(d) : -1;
        free(d);
        if (k >= 0)
            qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64,
                                                       &kind_count[k], 1);
    }
}

static void at_exit(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    FILE *f = outfile[0] ? fopen(outfile, "w") : stderr;
    if (!f)
        f = stderr;
    fprintf(f, "insns %llu\n", (unsigned long long)insn_count);
    for (int k = 0; k < N_KINDS; k++)
        fprintf(f, "%s %llu\n", kind_name[k], (unsigned long long)kind_count[k]);
    if (f != stderr)
        fclose(f);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const qemu_info_t *info, int argc,
                                                               char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "outfile=", 8) == 0) {
            strncpy(outfile, argv[i] + 8, sizeof outfile - 1);
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
