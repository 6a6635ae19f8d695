//! What a dynamically linked executable needs in the jail to start: its program interpreter
//! (the dynamic loader) and every shared library it and they name (DT_NEEDED), resolved the
//! way the loader resolves them (RUNPATH/RPATH with $ORIGIN, then the system directories).
//! Read from the files, never by running anything. A static executable needs nothing.

use std::path::{Path, PathBuf};

/// Where the glibc loader looks after RUNPATH (its built-in system directories on Debian's
/// x86-64, multiarch first). The jail gets every library at the path it was found at here, so
/// the loader inside finds it the same way without an ld.so.cache.
const SYSTEM_DIRS: [&str; 6] =
    ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// An executable or library whose dependencies cannot be worked out.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} is not a 64-bit little-endian ELF file, or is truncated or malformed ({what})")]
    Malformed { path: PathBuf, what: &'static str },
    #[error("{needed:?} (needed by {by:?}) is in none of {dirs:?}: give --exec-file a static build")]
    NotFound { needed: String, by: PathBuf, dirs: Vec<PathBuf> },
}

/// A program header: type, file offset, virtual address, size in the file.
struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// An ELF file's bytes, read with checked offsets.
struct Elf<'a> {
    path: &'a Path,
    data: &'a [u8],
}

impl Elf<'_> {
    fn bad(&self, what: &'static str) -> ElfError {
        ElfError::Malformed { path: self.path.to_path_buf(), what }
    }

    fn bytes(&self, offset: u64, len: u64) -> Result<&[u8], ElfError> {
        let start = usize::try_from(offset).map_err(|_| self.bad("offset"))?;
        let end = start
            .checked_add(usize::try_from(len).map_err(|_| self.bad("length"))?)
            .ok_or_else(|| self.bad("length"))?;
        self.data.get(start..end).ok_or_else(|| self.bad("range past the end"))
    }

    fn u64_at(&self, offset: u64) -> Result<u64, ElfError> {
        Ok(u64::from_le_bytes(self.bytes(offset, 8)?.try_into().expect("8 bytes")))
    }

    fn u32_at(&self, offset: u64) -> Result<u32, ElfError> {
        Ok(u32::from_le_bytes(self.bytes(offset, 4)?.try_into().expect("4 bytes")))
    }

    fn u16_at(&self, offset: u64) -> Result<u16, ElfError> {
        Ok(u16::from_le_bytes(self.bytes(offset, 2)?.try_into().expect("2 bytes")))
    }

    fn segments(&self) -> Result<Vec<Segment>, ElfError> {
        if self.bytes(0, 6)? != b"\x7fELF\x02\x01" {
            return Err(self.bad("header"));
        }
        let (phoff, phentsize, phnum) =
            (self.u64_at(0x20)?, u64::from(self.u16_at(0x36)?), u64::from(self.u16_at(0x38)?));
        if phentsize < 56 {
            return Err(self.bad("program header size"));
        }
        (0..phnum)
            .map(|i| {
                let at = phoff.checked_add(i * phentsize).ok_or_else(|| self.bad("program header offset"))?;
                Ok(Segment {
                    kind: self.u32_at(at)?,
                    offset: self.u64_at(at + 8)?,
                    vaddr: self.u64_at(at + 16)?,
                    filesz: self.u64_at(at + 32)?,
                })
            })
            .collect()
    }

    /// The NUL-terminated string at file offset `offset`.
    fn string(&self, offset: u64) -> Result<String, ElfError> {
        let start =
            usize::try_from(offset).ok().filter(|&s| s <= self.data.len()).ok_or_else(|| self.bad("string offset"))?;
        let rest = &self.data[start..];
        let len = rest.iter().position(|&b| b == 0).ok_or_else(|| self.bad("unterminated string"))?;
        String::from_utf8(rest[..len].to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }

    /// The file offset of virtual address `vaddr` (through the PT_LOAD segment holding it).
    fn file_offset(segments: &[Segment], vaddr: u64) -> Option<u64> {
        segments
            .iter()
            .filter(|s| s.kind == PT_LOAD && s.vaddr <= vaddr && vaddr - s.vaddr < s.filesz)
            .find_map(|s| s.offset.checked_add(vaddr - s.vaddr))
    }
}

/// What one ELF file asks of the loader.
#[derive(Debug, Default, PartialEq, Eq)]
struct Needs {
    interpreter: Option<PathBuf>,
    needed: Vec<String>,
    search: Vec<String>,
}

fn needs(path: &Path, data: &[u8]) -> Result<Needs, ElfError> {
    let elf = Elf { path, data };
    let segments = elf.segments()?;
    let mut needs = Needs::default();
    if let Some(interp) = segments.iter().find(|s| s.kind == PT_INTERP) {
        needs.interpreter = Some(PathBuf::from(elf.string(interp.offset)?));
    }
    let Some(dynamic) = segments.iter().find(|s| s.kind == PT_DYNAMIC) else { return Ok(needs) };
    let mut entries = Vec::new();
    for i in 0..dynamic.filesz / 16 {
        let at = dynamic.offset.checked_add(16 * i).ok_or_else(|| elf.bad("dynamic entry offset"))?;
        let (tag, value) = (elf.u64_at(at)?, elf.u64_at(at + 8)?);
        if tag == DT_NULL {
            break;
        }
        entries.push((tag, value));
    }
    let strtab = entries.iter().find(|e| e.0 == DT_STRTAB).map(|e| e.1);
    let strtab = match strtab {
        Some(vaddr) => Elf::file_offset(&segments, vaddr).ok_or_else(|| elf.bad("string table address"))?,
        None if entries.iter().any(|e| matches!(e.0, DT_NEEDED | DT_RPATH | DT_RUNPATH)) => {
            return Err(elf.bad("no string table"))
        }
        None => return Ok(needs),
    };
    for (tag, value) in entries {
        let string = || elf.string(strtab.checked_add(value).ok_or_else(|| elf.bad("string offset"))?);
        match tag {
            DT_NEEDED => needs.needed.push(string()?),
            DT_RPATH | DT_RUNPATH => needs.search.extend(string()?.split(':').map(str::to_string)),
            _ => {}
        }
    }
    Ok(needs)
}

/// Finds library `name` for `by` (whose RUNPATH/RPATH entries are `search`).
fn resolve(name: &str, by: &Path, search: &[String]) -> Result<PathBuf, ElfError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let origin = by.parent().unwrap_or(Path::new("/")).to_string_lossy().into_owned();
    let dirs: Vec<PathBuf> = search
        .iter()
        .map(|d| PathBuf::from(d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin)))
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .collect();
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| ElfError::NotFound {
        needed: name.to_string(),
        by: by.to_path_buf(),
        dirs,
    })
}

/// Every file `exe` needs to start, as the absolute paths the loader will open: the
/// interpreter first, then the libraries (each once). Empty for a static executable.
pub fn runtime_files(exe: &Path) -> Result<Vec<PathBuf>, ElfError> {
    let read = |p: &Path| std::fs::read(p).map_err(|source| ElfError::Read { path: p.to_path_buf(), source });
    let top = needs(exe, &read(exe)?)?;
    let mut files: Vec<PathBuf> = top.interpreter.iter().cloned().collect();
    let mut queue: Vec<(PathBuf, Needs)> = vec![(exe.to_path_buf(), top)];
    while let Some((by, needs_of)) = queue.pop() {
        for name in &needs_of.needed {
            let lib = resolve(name, &by, &needs_of.search)?;
            if !files.contains(&lib) {
                let lib_needs = needs(&lib, &read(&lib)?)?;
                files.push(lib.clone());
                queue.push((lib, lib_needs));
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_needs_the_loader_and_libc() {
        let exe = std::env::current_exe().unwrap();
        let files = runtime_files(&exe).unwrap();
        assert!(files[0].to_string_lossy().contains("ld-linux"), "{files:?}");
        assert!(files.iter().any(|f| f.file_name().is_some_and(|n| n == "libc.so.6")), "{files:?}");
        assert!(files.iter().all(|f| f.is_absolute() && f.is_file()), "{files:?}");
        let mut unique = files.clone();
        unique.dedup();
        assert_eq!(unique.len(), files.len());
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let path = Path::new("x");
        assert!(needs(path, b"#!/bin/sh\n").is_err());
        for len in [0, 5, 0x3f, 0x40, 0x100] {
            assert!(needs(path, &exe[..len]).is_err(), "truncated to {len}");
        }
        let mut huge_phoff = exe.clone();
        huge_phoff[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(needs(path, &huge_phoff).is_err());
    }

    #[test]
    fn runpath_origin_and_system_dirs_resolve_in_order() {
        let libc = resolve("libc.so.6", Path::new("/nowhere/bin/exe"), &["$ORIGIN/../lib".to_string()]).unwrap();
        assert!(libc.starts_with("/lib") || libc.starts_with("/usr/lib"), "{libc:?}");
        let err = resolve("libzygote-absent.so.9", Path::new("/bin/x"), &[]).unwrap_err();
        assert!(err.to_string().contains("static build"), "{err}");
    }
}
