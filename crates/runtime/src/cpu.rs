//! CPU features a migrated process may rely on.
//!
//! A program picks its code paths once, from `cpuid` (glibc's string functions, a JIT, a
//! database's checksum code): moved to a CPU that lacks an instruction set it uses, it dies with
//! SIGILL after the commit. The preflight compares the instruction-set flags of the two hosts'
//! CPUs (the kernel's `flags` in `/proc/cpuinfo`) and refuses a destination that lacks any the
//! source has, naming them, unless the request says to ignore them.

use std::collections::BTreeSet;

/// Flags that name instructions a user program can execute (other flags describe the CPU's
/// behaviour, its bugs or the hypervisor, and may differ between hosts harmlessly).
const ISA_PREFIXES: [&str; 4] = ["sse", "avx", "amx", "ssse"];
const ISA_FLAGS: [&str; 40] = [
    "mmx",
    "fxsr",
    "cmov",
    "cx8",
    "cx16",
    "pni",
    "pclmulqdq",
    "fma",
    "fma4",
    "f16c",
    "popcnt",
    "aes",
    "vaes",
    "vpclmulqdq",
    "gfni",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "movbe",
    "bmi1",
    "bmi2",
    "adx",
    "abm",
    "lzcnt",
    "sha_ni",
    "rdrand",
    "rdseed",
    "rdpid",
    "erms",
    "fsrm",
    "clflushopt",
    "clwb",
    "lahf_lm",
    "xop",
    "tbm",
    "movdiri",
    "movdir64b",
    "serialize",
    "pku",
];

/// Whether `flag` names an instruction set.
pub fn is_isa(flag: &str) -> bool {
    ISA_PREFIXES.iter().any(|p| flag.starts_with(p)) || ISA_FLAGS.contains(&flag)
}

/// The instruction-set flags of the first processor in `cpuinfo` (`/proc/cpuinfo`'s text).
pub fn isa_flags(cpuinfo: &str) -> BTreeSet<String> {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "flags").then_some(v)
        })
        .map(|v| {
            v.split_whitespace()
                .filter(|f| is_isa(f))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// This host's instruction-set flags, less `hidden` (an agent's `hide_cpu_flags`: a host can be
/// made to offer only a cluster's common baseline).
pub fn host_isa_flags(hidden: &[String]) -> BTreeSet<String> {
    let mut f = isa_flags(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    for h in hidden {
        f.remove(h);
    }
    f
}

/// The flags of `source` that `destination` lacks.
pub fn missing(source: &BTreeSet<String>, destination: &BTreeSet<String>) -> Vec<String> {
    source.difference(destination).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse \
        tsc msr mmx fxsr sse sse2 ss ht syscall nx constant_tsc pni pclmulqdq ssse3 fma cx16 \
        sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm avx2 bmi1 \
        bmi2 avx512f avx512dq avx512_vnni sha_ni\nbugs\t\t: spectre_v1\n\nprocessor\t: 1\nflags\t\t: fpu\n";

    #[test]
    fn only_instruction_set_flags_of_the_first_processor_count() {
        let f = isa_flags(CPUINFO);
        for want in [
            "sse",
            "sse4_2",
            "ssse3",
            "avx2",
            "avx512f",
            "avx512_vnni",
            "bmi2",
            "sha_ni",
            "aes",
            "mmx",
        ] {
            assert!(f.contains(want), "{want} in {f:?}");
        }
        for not in [
            "fpu",
            "tsc",
            "hypervisor",
            "constant_tsc",
            "ht",
            "nx",
            "spectre_v1",
            "syscall",
        ] {
            assert!(!f.contains(not), "{not} in {f:?}");
        }
    }

    #[test]
    fn a_destination_lacking_flags_is_told_which() {
        let src = isa_flags(CPUINFO);
        let mut dst = src.clone();
        dst.remove("avx2");
        dst.remove("avx512f");
        dst.insert("avx512_fp16".into());
        assert_eq!(
            missing(&src, &dst),
            vec!["avx2".to_string(), "avx512f".to_string()]
        );
        assert!(missing(&dst, &dst).is_empty());
        assert!(isa_flags("no flags here").is_empty());
    }
}
