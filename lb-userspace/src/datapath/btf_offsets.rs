//! Byte offsets of kernel struct members, read from the kernel's own type information
//! (`/sys/kernel/btf/vmlinux`), for the socket iterator programs that read `struct tcp_sock`:
//! the layout differs between kernel versions and configurations, so it cannot be compiled in.
//!
//! aya parses BTF but keeps struct members private, and the BTF crate that exposes them is
//! LGPL, so this reads the few parts it needs itself: the header, the type records, the
//! strings. The format is the kernel's `Documentation/bpf/btf.rst`.

use anyhow::{bail, ensure, Context, Result};

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Member {
    name: u32,
    ty: u32,
    /// In bits.
    offset: u32,
}

/// One type record's fixed part, decoded when asked for.
struct Type {
    name: u32,
    kind: u32,
    /// The type it refers to (typedefs and qualifiers), or a struct's size in bytes.
    refers: u32,
    vlen: usize,
    bitfields: bool,
    /// Where the record's members start in the file.
    members_at: usize,
}

/// The kernel's types, enough to find a member of a struct by its path. Only the file and
/// where each type record starts are kept, and records are decoded when asked for: a table
/// of every type and member would take about five times the file (28 MB for this kernel's),
/// which the agent would carry as peak memory for the few structs it reads.
pub struct KernelTypes {
    data: Vec<u8>,
    /// Index = type id - 1: where its record starts in `data`.
    records: Vec<u32>,
    /// The string section's bounds in `data`.
    strings: std::ops::Range<usize>,
}

impl KernelTypes {
    pub fn from_sys_fs() -> Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = crate::private_files::read_bounded(
            std::path::Path::new(path),
            crate::private_files::KERNEL_BTF_LIMIT,
            "the kernel's type information",
        )
        .map_err(anyhow::Error::msg)?;
        Self::parse(data).with_context(|| format!("parsing {path}"))
    }

    /// Checks the header and that every record lies inside the type section, so that a
    /// record decoded later is whole.
    pub fn parse(data: Vec<u8>) -> Result<Self> {
        ensure!(data.len() >= 24, "shorter than a BTF header");
        let magic = u16::from_le_bytes([data[0], data[1]]);
        ensure!(magic == MAGIC, "not little-endian BTF (magic {magic:#x})");
        let header = u32_at(&data, 4)? as usize;
        let (type_off, type_len) = (u32_at(&data, 8)? as usize, u32_at(&data, 12)? as usize);
        let (str_off, str_len) = (u32_at(&data, 16)? as usize, u32_at(&data, 20)? as usize);
        let strings = header + str_off..header + str_off + str_len;
        ensure!(
            strings.end <= data.len(),
            "the string section lies outside the file"
        );
        let start = header + type_off;
        let end = start + type_len;
        ensure!(end <= data.len(), "the type section lies outside the file");
        ensure!(end <= u32::MAX as usize, "a type section beyond 4 GiB");
        let mut records = Vec::new();
        let mut at = start;
        while at < end {
            records.push(at as u32);
            let info = u32_at(&data, at + 4)?;
            let vlen = (info & 0xffff) as usize;
            at += 12
                + match (info >> 24) & 0x1f {
                    KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                    KIND_ARRAY => 12,
                    KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                    KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                    _ => 0,
                };
        }
        ensure!(at == end, "the last type record runs past the type section");
        Ok(Self {
            data,
            records,
            strings,
        })
    }

    fn string(&self, offset: u32) -> &str {
        let section = &self.data[self.strings.clone()];
        let rest = section.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    fn get(&self, id: u32) -> Option<Type> {
        let at = *self.records.get((id as usize).checked_sub(1)?)? as usize;
        let info = u32_at(&self.data, at + 4).ok()?;
        Some(Type {
            name: u32_at(&self.data, at).ok()?,
            kind: (info >> 24) & 0x1f,
            refers: u32_at(&self.data, at + 8).ok()?,
            vlen: (info & 0xffff) as usize,
            bitfields: info >> 31 == 1,
            members_at: at + 12,
        })
    }

    fn members(&self, ty: &Type) -> impl Iterator<Item = Member> + '_ {
        let (at, bitfields) = (ty.members_at, ty.bitfields);
        let count = if matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            ty.vlen
        } else {
            0
        };
        (0..count).filter_map(move |i| {
            let m = at + 12 * i;
            let offset = u32_at(&self.data, m + 8).ok()?;
            Some(Member {
                name: u32_at(&self.data, m).ok()?,
                ty: u32_at(&self.data, m + 4).ok()?,
                // With bitfields, the size sits in the top byte.
                offset: if bitfields {
                    offset & 0xff_ffff
                } else {
                    offset
                },
            })
        })
    }

    /// The first struct of that name.
    fn struct_named(&self, name: &str) -> Result<Type> {
        (1..=self.records.len() as u32)
            .filter_map(|id| self.get(id))
            .find(|t| t.kind == KIND_STRUCT && t.name != 0 && self.string(t.name) == name)
            .with_context(|| format!("the kernel has no struct {name}"))
    }

    /// Follows typedefs and qualifiers to the type itself.
    fn resolve(&self, mut id: u32) -> Option<Type> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.refers
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The size in bytes of struct `name`.
    pub fn size_of(&self, name: &str) -> Result<u32> {
        Ok(self.struct_named(name)?.refers)
    }

    /// The byte offset of `path` (member names, one per nesting level) in struct `name`.
    /// Members of anonymous structs and unions are found as if they were the parent's own.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32> {
        let mut ty = self.struct_named(name)?;
        let mut bits = 0;
        for (depth, member) in path.iter().enumerate() {
            let Some((offset, member_ty)) = self.find(&ty, member, 0) else {
                bail!("struct {name} has no member {}", path[..=depth].join("."));
            };
            bits += offset;
            ty = self.resolve(member_ty).context("a member of no type")?;
        }
        ensure!(bits % 8 == 0, "{name}.{} is a bitfield", path.join("."));
        Ok(bits / 8)
    }

    /// `member` of `ty` (bit offset, type id), looking into anonymous members.
    fn find(&self, ty: &Type, member: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 || !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        if let Some(m) = self
            .members(ty)
            .find(|m| m.name != 0 && self.string(m.name) == member)
        {
            return Some((m.offset, m.ty));
        }
        self.members(ty).filter(|m| m.name == 0).find_map(|m| {
            let inner = self.resolve(m.ty)?;
            let (offset, found) = self.find(&inner, member, depth + 1)?;
            Some((m.offset + offset, found))
        })
    }
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data.get(at..at + 4).context("truncated")?;
    Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BTF of `struct outer { int a; union { int b; struct inner in; }; };` with
    /// `struct inner { char pad[3]; int c; }` laid out by hand: (kind, name, vlen, members).
    fn sample() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0inner\0in\0c\0int\0".to_vec();
        let name = |s: &str| {
            let at = strings
                .windows(s.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=s.len()] == s.as_bytes() && w[s.len() + 1] == 0);
            at.unwrap() as u32 + 1
        };
        let mut types = Vec::new();
        let mut push = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                types.extend_from_slice(&v.to_le_bytes());
            }
        };
        // 1: int
        push(name("int"), KIND_INT, 0, 4, &[32]);
        // 2: struct inner { c at byte 4 }
        push(name("inner"), KIND_STRUCT, 1, 8, &[name("c"), 1, 32]);
        // 3: anonymous union { b; in }
        push(0, KIND_UNION, 2, 8, &[name("b"), 1, 0, name("in"), 2, 0]);
        // 4: struct outer { a at 0; anonymous union at byte 8 }
        push(
            name("outer"),
            KIND_STRUCT,
            2,
            16,
            &[name("a"), 1, 0, 0, 3, 64],
        );
        let mut out = Vec::new();
        for v in [0xeb9f_u16 as u32 | (1 << 16), 24, 0, types.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [types.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_nested_structs() {
        let t = KernelTypes::parse(sample()).unwrap();
        assert_eq!(t.offset_of("outer", &["a"]).unwrap(), 0);
        assert_eq!(t.offset_of("outer", &["b"]).unwrap(), 8);
        assert_eq!(t.offset_of("outer", &["in", "c"]).unwrap(), 12);
        assert_eq!(t.size_of("outer").unwrap(), 16);
        assert_eq!(t.size_of("inner").unwrap(), 8);
        assert!(t.size_of("nothing").is_err());
        let missing = t.offset_of("outer", &["in", "d"]).unwrap_err().to_string();
        assert!(missing.contains("in.d"), "{missing}");
        assert!(t.offset_of("nothing", &["a"]).is_err());
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(KernelTypes::parse(vec![0; 10]).is_err());
        let mut bad = sample();
        bad[0] = 0;
        assert!(KernelTypes::parse(bad).is_err());
        let mut short = sample();
        short.truncate(40);
        assert!(KernelTypes::parse(short).is_err());
        // A type section that ends inside its last record.
        let mut cut = sample();
        let type_len = u32::from_le_bytes(cut[12..16].try_into().unwrap());
        cut[12..16].copy_from_slice(&(type_len - 4).to_le_bytes());
        let err = KernelTypes::parse(cut).err().expect("refused").to_string();
        assert!(err.contains("runs past"), "{err}");
    }

    #[test]
    fn reads_tcp_sock_of_this_kernel() {
        let Ok(t) = KernelTypes::from_sys_fs() else {
            eprintln!("skipped: this kernel has no /sys/kernel/btf/vmlinux");
            return;
        };
        let lrcvtime = t.offset_of("tcp_sock", &["inet_conn", "icsk_ack", "lrcvtime"]);
        let write_seq = t.offset_of("tcp_sock", &["write_seq"]).unwrap();
        assert!(lrcvtime.unwrap() < write_seq, "inet_conn comes first");
    }
}
