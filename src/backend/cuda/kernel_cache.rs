//! On-disk cache of the compiled kernel images (CUBINs), so that a process does not spend
//! NVRTC's few seconds on every start when the sources, the architecture, the options and
//! the NVRTC version are those of an earlier compilation.
//!
//! One file per (kernel file, architecture, key), named `<file>.<arch>.<key prefix>.cubin`;
//! the key is the SHA-256 of everything that determines the image (a format tag, NVRTC's
//! version, the architecture, the options and the full source with its prelude), so a
//! changed source or option is a new entry and never a stale hit. An entry holds a header
//! (magic, format version, the whole key, the SHA-256 of the image, its length) before the
//! image: a truncated, altered or misnamed entry is refused with the reason and compiled
//! again, never loaded. Entries are written to a temporary file in the same directory and
//! renamed into place, so a reader (another rank starting at the same moment) sees a whole
//! entry or none. Entries of older sources are left in place; removing the directory is
//! always safe.
//!
//! Where: `MGKD_KERNEL_CACHE` (a directory, or `off`), else `$XDG_CACHE_HOME/mgkd/kernels`,
//! else `$HOME/.cache/mgkd/kernels`; none of them set, no cache.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::nvrtc::{full_source, KernelSource};

/// Environment variable choosing the cache directory; `off` (or empty) turns the cache off.
pub const CACHE_ENV: &str = "MGKD_KERNEL_CACHE";

/// First bytes of every entry.
const MAGIC: &[u8; 10] = b"MGKDCUBIN\0";
/// Entry layout version (bump when the layout or the key's contents change).
const FORMAT: u32 = 1;
/// Header bytes: magic, format, key, image digest, image length.
const HEADER: usize = MAGIC.len() + 4 + 32 + 32 + 8;

/// A directory of cached kernel images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCache {
    dir: PathBuf,
}

/// The SHA-256 key of one compilation: what NVRTC would produce from these inputs.
pub type CacheKey = [u8; 32];

impl KernelCache {
    /// A cache in `dir` (created on the first store).
    pub fn new(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache { dir: dir.into() }
    }

    /// The cache the environment chooses (module docs), or `None` when it is off or no
    /// directory is named by any of the variables.
    pub fn from_env() -> Option<KernelCache> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// [`KernelCache::from_env`] over a variable lookup (testable without touching the
    /// process environment). Relative `XDG_CACHE_HOME`/`HOME` values are ignored, as the
    /// XDG specification asks.
    pub fn from_vars(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<KernelCache> {
        if let Some(v) = var(CACHE_ENV) {
            let s = v.to_string_lossy();
            if s.is_empty() || s.eq_ignore_ascii_case("off") {
                return None;
            }
            return Some(KernelCache::new(PathBuf::from(v)));
        }
        let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
        if let Some(xdg) = absolute("XDG_CACHE_HOME") {
            return Some(KernelCache::new(xdg.join("mgkd").join("kernels")));
        }
        absolute("HOME")
            .map(|home| KernelCache::new(home.join(".cache").join("mgkd").join("kernels")))
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of compiling `k` for `arch` with `options` under NVRTC `version`.
    pub fn key(k: &KernelSource, arch: &str, options: &[String], version: (i32, i32)) -> CacheKey {
        let mut h = Sha256::new();
        h.update(b"mgkd kernel cache\0");
        h.update(FORMAT.to_le_bytes());
        h.update(version.0.to_le_bytes());
        h.update(version.1.to_le_bytes());
        for part in std::iter::once(arch).chain(options.iter().map(String::as_str)) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let src = full_source(k);
        h.update((src.len() as u64).to_le_bytes());
        h.update(src.as_bytes());
        h.finalize().into()
    }

    /// Path of the entry of `k` for `arch` under `key`.
    pub fn entry_path(&self, k: &KernelSource, arch: &str, key: &CacheKey) -> PathBuf {
        let prefix: String = key[..12].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{}.{arch}.{prefix}.cubin", k.file))
    }

    /// The cached image of `k` for `arch` under `key`: `Ok(None)` when there is no entry,
    /// `Err(reason)` when the entry exists but cannot be used (unreadable, truncated, another
    /// key, an image whose digest does not match).
    pub fn load(
        &self,
        k: &KernelSource,
        arch: &str,
        key: &CacheKey,
    ) -> Result<Option<Vec<u8>>, String> {
        let path = self.entry_path(k, arch, key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        decode(&bytes, key)
            .map(Some)
            .map_err(|why| format!("{}: {why}", path.display()))
    }

    /// Writes the entry of `k` for `arch` under `key` (temporary file, then rename), creating
    /// the directory when needed.
    pub fn store(
        &self,
        k: &KernelSource,
        arch: &str,
        key: &CacheKey,
        image: &[u8],
    ) -> Result<(), String> {
        let fail = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
        fs::create_dir_all(&self.dir).map_err(|e| fail(&self.dir, e))?;
        let path = self.entry_path(k, arch, key);
        let tmp = self.dir.join(format!(
            ".{}.tmp.{}.{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let written = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&encode(key, image)).and_then(|()| f.sync_all()))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(fail(&path, e));
        }
        Ok(())
    }
}

/// An entry's bytes: header, then the image.
fn encode(key: &CacheKey, image: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + image.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&Sha256::digest(image));
    out.extend_from_slice(&(image.len() as u64).to_le_bytes());
    out.extend_from_slice(image);
    out
}

/// The image of an entry's bytes, checked against `key` and its own digest.
fn decode(bytes: &[u8], key: &CacheKey) -> Result<Vec<u8>, String> {
    let short = || {
        format!(
            "{} bytes, shorter than the {HEADER}-byte header",
            bytes.len()
        )
    };
    let (magic, rest) = bytes.split_at_checked(MAGIC.len()).ok_or_else(short)?;
    if magic != MAGIC {
        return Err("not a kernel cache entry (wrong magic bytes)".into());
    }
    let (format, rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
    let format = u32::from_le_bytes(*format);
    if format != FORMAT {
        return Err(format!("entry format {format}, expected {FORMAT}"));
    }
    let (stored_key, rest) = rest.split_first_chunk::<32>().ok_or_else(short)?;
    if stored_key != key {
        return Err("entry made from other sources or options (key differs)".into());
    }
    let (digest, rest) = rest.split_first_chunk::<32>().ok_or_else(short)?;
    let (len, image) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    let len = u64::from_le_bytes(*len);
    if len != image.len() as u64 {
        return Err(format!(
            "image of {} bytes, the header says {len}",
            image.len()
        ));
    }
    if Sha256::digest(image).as_slice() != digest {
        return Err("image digest does not match (altered entry)".into());
    }
    Ok(image.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    const K: KernelSource = KernelSource {
        file: "t.cu",
        src: "extern \"C\" __global__ void k() {}",
    };

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mgkd-kcache-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn store_then_load_round_trips_and_leaves_no_temporary_file() {
        let cache = KernelCache::new(tmpdir("rt").join("nested"));
        let key = KernelCache::key(&K, "sm_90", &[], (13, 0));
        assert_eq!(cache.load(&K, "sm_90", &key), Ok(None));
        let image: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        cache.store(&K, "sm_90", &key, &image).unwrap();
        assert_eq!(cache.load(&K, "sm_90", &key), Ok(Some(image.clone())));
        let names: Vec<_> = fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("t.cu.sm_90.") && names[0].ends_with(".cubin"));
        // A second store of the same entry replaces it whole.
        cache.store(&K, "sm_90", &key, &image[..10]).unwrap();
        assert_eq!(
            cache.load(&K, "sm_90", &key),
            Ok(Some(image[..10].to_vec()))
        );
        fs::remove_dir_all(cache.dir().parent().unwrap()).unwrap();
    }

    #[test]
    fn the_key_changes_with_every_input() {
        let base = KernelCache::key(&K, "sm_90", &[], (13, 0));
        let other_src = KernelSource {
            file: "t.cu",
            src: "extern \"C\" __global__ void k() { }",
        };
        let variants = [
            KernelCache::key(&other_src, "sm_90", &[], (13, 0)),
            KernelCache::key(&K, "sm_80", &[], (13, 0)),
            KernelCache::key(&K, "sm_90", &["-lineinfo".into()], (13, 0)),
            KernelCache::key(&K, "sm_90", &[], (13, 1)),
            KernelCache::key(&K, "sm_90", &[], (12, 0)),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(&base, v, "variant {i} has the base key");
        }
        // Option boundaries count: ["ab"] and ["a", "b"] differ.
        assert_ne!(
            KernelCache::key(&K, "sm_90", &["ab".into()], (13, 0)),
            KernelCache::key(&K, "sm_90", &["a".into(), "b".into()], (13, 0))
        );
    }

    #[test]
    fn damaged_entries_are_refused_with_the_reason() {
        let cache = KernelCache::new(tmpdir("bad"));
        let key = KernelCache::key(&K, "sm_90", &[], (13, 0));
        let image = vec![0xABu8; 300];
        cache.store(&K, "sm_90", &key, &image).unwrap();
        let path = cache.entry_path(&K, "sm_90", &key);
        let good = fs::read(&path).unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("truncated header", good[..20].to_vec(), "shorter than"),
            (
                "truncated image",
                good[..good.len() - 1].to_vec(),
                "the header says",
            ),
            (
                "altered image",
                {
                    let mut b = good.clone();
                    *b.last_mut().unwrap() ^= 1;
                    b
                },
                "digest does not match",
            ),
            (
                "wrong magic",
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "wrong magic",
            ),
            (
                "other format",
                {
                    let mut b = good.clone();
                    b[MAGIC.len()] = 9;
                    b
                },
                "entry format 9",
            ),
            (
                "other key",
                {
                    let mut b = good.clone();
                    b[MAGIC.len() + 4] ^= 0xFF;
                    b
                },
                "key differs",
            ),
        ];
        for (what, bytes, want) in cases {
            fs::write(&path, &bytes).unwrap();
            let err = cache.load(&K, "sm_90", &key).unwrap_err();
            assert!(err.contains(want), "{what}: {err}");
            assert!(err.contains(&path.display().to_string()), "{what}: {err}");
        }
        fs::remove_dir_all(cache.dir()).unwrap();
    }

    #[test]
    fn a_store_that_cannot_write_says_where() {
        let blocker = tmpdir("ro");
        fs::write(&blocker, b"a file where the directory should be").unwrap();
        let cache = KernelCache::new(&blocker);
        let key = KernelCache::key(&K, "sm_90", &[], (13, 0));
        let err = cache.store(&K, "sm_90", &key, b"img").unwrap_err();
        assert!(err.contains(&blocker.display().to_string()), "{err}");
        fs::remove_file(&blocker).unwrap();
    }

    #[test]
    fn the_directory_comes_from_the_environment() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let dir = |c: Option<KernelCache>| c.map(|c| c.dir().to_path_buf());
        assert_eq!(
            dir(KernelCache::from_vars(vars(&[
                (CACHE_ENV, "/x/k"),
                ("HOME", "/h")
            ]))),
            Some(PathBuf::from("/x/k"))
        );
        assert_eq!(
            dir(KernelCache::from_vars(vars(&[
                (CACHE_ENV, "OFF"),
                ("HOME", "/h")
            ]))),
            None
        );
        assert_eq!(
            dir(KernelCache::from_vars(vars(&[
                (CACHE_ENV, ""),
                ("HOME", "/h")
            ]))),
            None
        );
        assert_eq!(
            dir(KernelCache::from_vars(vars(&[
                ("XDG_CACHE_HOME", "/c"),
                ("HOME", "/h")
            ]))),
            Some(PathBuf::from("/c/mgkd/kernels"))
        );
        assert_eq!(
            dir(KernelCache::from_vars(vars(&[
                ("XDG_CACHE_HOME", "relative"),
                ("HOME", "/h")
            ]))),
            Some(PathBuf::from("/h/.cache/mgkd/kernels"))
        );
        assert_eq!(dir(KernelCache::from_vars(vars(&[]))), None);
    }
}
