/*
 * _dl_find_object() for static musl executables (elkeid-rs targets/setup.sh).
 *
 * Debian 12's cross libgcc_eh.a (gcc 12, built against glibc >= 2.35) looks
 * up the unwind tables of a PC with glibc's _dl_find_object(). musl has no
 * such function, and the MIPS and riscv64 agents link that libgcc_eh.a as
 * their unwinder (std's -lunwind). This answers the same question from
 * dl_iterate_phdr(), which musl implements for static executables: the
 * object whose PT_LOAD segments contain the PC, and its PT_GNU_EH_FRAME
 * (.eh_frame_hdr; rustc always links with --eh-frame-hdr).
 *
 * Compiled with the glibc cross headers, so `struct dl_find_object` has
 * exactly the layout libgcc_eh was built against; only dl_iterate_phdr()
 * is called, and its struct dl_phdr_info prefix is the same in musl.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stddef.h>
#include <stdint.h>

struct lookup {
    uintptr_t pc;
    struct dl_find_object *out;
    int found;
};

static int visit(struct dl_phdr_info *info, size_t size, void *data)
{
    struct lookup *l = data;
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    const ElfW(Phdr) *eh = NULL;
    int hit = 0;

    (void)size;
    for (ElfW(Half) i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *p = &info->dlpi_phdr[i];
        if (p->p_type == PT_LOAD) {
            uintptr_t start = info->dlpi_addr + p->p_vaddr;
            uintptr_t end = start + p->p_memsz;
            if (l->pc >= start && l->pc < end)
                hit = 1;
            if (start < lo)
                lo = start;
            if (end > hi)
                hi = end;
        } else if (p->p_type == PT_GNU_EH_FRAME) {
            eh = p;
        }
    }
    if (!hit)
        return 0;
    l->out->dlfo_flags = 0;
    l->out->dlfo_map_start = (void *)lo;
    l->out->dlfo_map_end = (void *)hi;
    l->out->dlfo_link_map = NULL;
    l->out->dlfo_eh_frame = eh ? (void *)(info->dlpi_addr + eh->p_vaddr) : NULL;
    l->found = 1;
    return 1;
}

int _dl_find_object(void *pc, struct dl_find_object *result)
{
    struct lookup l = { (uintptr_t)pc, result, 0 };
    dl_iterate_phdr(visit, &l);
    return l.found ? 0 : -1;
}
