//! The checks every command's output path goes through ([`OutputPath::prepare`]), and the
//! advisory lock that keeps two runs from writing the same output.
//!
//! Rules (the error names the flag, the path and what to do instead):
//! - A **file** output (checkpoint, CSV, log, JSON) is written to a temporary sibling and
//!   renamed over the path, so the path must be absent or a regular file: a directory, a
//!   device (`/dev/full`), a FIFO or a socket is refused.
//! - A **directory** output (dataset, report, work directory) must be absent or a directory.
//! - A **symbolic link** as a file output is refused, never written through: the rename
//!   would replace the link by a plain file, and writing to its target silently changes a
//!   file the command line does not name. (A link to a directory as a directory output is
//!   followed: files are created inside the target, and the link stays.)
//! - No output may lie inside a dataset directory (a directory holding `dataset.json`), in
//!   particular not inside an input dataset, nor be one of the command's input files.
//! - The output is locked: an exclusive advisory lock (`flock`) on `<output>.mgkd-lock`,
//!   created next to it, held until the command ends, then removed. A second run that finds
//!   the lock held stops with a message naming the process that holds it; a lock file left
//!   by a killed run holds no lock and is taken over.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

use crate::data::manifest::MANIFEST_FILE;
use crate::io::cleanup::{self, Registration, Removal};
use crate::{Error, Result};

/// Suffix of the lock file next to an output.
pub const LOCK_SUFFIX: &str = ".mgkd-lock";

/// What is written at an output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// One file, written atomically (temporary sibling, then rename).
    File,
    /// A directory the command creates (if needed) and writes files into.
    Dir,
}

/// An input of the command that an output must not overwrite or lie inside.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The flag that names it (`--data`, `--model`, …), for messages.
    pub flag: &'a str,
    /// Its path.
    pub path: &'a Path,
    /// Whether it is a dataset directory (else a file).
    pub dataset: bool,
}

impl<'a> Input<'a> {
    /// An input dataset directory given by `flag`.
    pub fn dataset(flag: &'a str, path: &'a Path) -> Input<'a> {
        Input {
            flag,
            path,
            dataset: true,
        }
    }

    /// An input file given by `flag`.
    pub fn file(flag: &'a str, path: &'a Path) -> Input<'a> {
        Input {
            flag,
            path,
            dataset: false,
        }
    }
}

/// A checked and locked output path; the lock is held until this is dropped.
#[derive(Debug)]
pub struct OutputPath {
    path: PathBuf,
    _lock: OutputLock,
}

impl OutputPath {
    /// Checks `path` (given by `flag`) as an output of `kind` against the rules of the module
    /// documentation and the command's `inputs`, then locks it. For a file output the parent
    /// directory must exist; a directory output's missing parents are created (as the
    /// dataset writers always did).
    pub fn prepare(
        flag: &str,
        path: &Path,
        kind: OutputKind,
        inputs: &[Input<'_>],
    ) -> Result<Self> {
        check(flag, path, kind, inputs)?;
        let lock = OutputLock::acquire(flag, path, kind)?;
        Ok(OutputPath {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The output path, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A description of a file type for messages, or `None` for a regular file.
pub fn special_kind(ft: &fs::FileType) -> Option<&'static str> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return Some("a character device");
        }
        if ft.is_block_device() {
            return Some("a block device");
        }
        if ft.is_fifo() {
            return Some("a FIFO (named pipe)");
        }
        if ft.is_socket() {
            return Some("a socket");
        }
    }
    if ft.is_symlink() {
        return Some("a symbolic link");
    }
    if ft.is_dir() {
        return Some("a directory");
    }
    if !ft.is_file() {
        return Some("not a regular file");
    }
    None
}

/// The rules of the module documentation, without the lock.
pub fn check(flag: &str, path: &Path, kind: OutputKind, inputs: &[Input<'_>]) -> Result<()> {
    let shown = path.display();
    let refuse = |msg: String| Err(Error::invalid(format!("{flag} {shown}: {msg}")));
    if path.as_os_str().is_empty() {
        return Err(Error::invalid(format!("{flag}: the path is empty")));
    }
    match (fs::symlink_metadata(path), kind) {
        (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => {}
        (Err(e), _) => return Err(Error::io(path, e)),
        (Ok(m), OutputKind::File) => {
            let ft = m.file_type();
            if ft.is_symlink() {
                let target = fs::read_link(path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                return refuse(format!(
                    "is a symbolic link (to {target}); outputs are never written through a \
                     link (the rename into place would replace it): give the target's path, \
                     or remove the link"
                ));
            }
            if let Some(what) = special_kind(&ft) {
                return refuse(format!(
                    "is {what}; this output is written as a regular file (to a temporary \
                     file first, then renamed into place): give the path of a file"
                ));
            }
        }
        (Ok(_), OutputKind::Dir) => match fs::metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                let what = special_kind(&m.file_type()).unwrap_or("a regular file");
                return refuse(format!(
                    "is {what}, not a directory; this output is a directory"
                ));
            }
            Err(e) => {
                return refuse(format!(
                    "is a symbolic link whose target cannot be used ({e})"
                ))
            }
        },
    }
    if kind == OutputKind::File {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent {
            if !dir.is_dir() {
                return refuse(format!("the directory {} does not exist", dir.display()));
            }
        }
    }
    let resolved = resolve(path)?;
    for input in inputs {
        let Ok(input_path) = fs::canonicalize(input.path) else {
            continue; // A missing input is reported by the command that reads it.
        };
        if input.dataset {
            if resolved.starts_with(&input_path) {
                return refuse(format!(
                    "lies inside the input dataset {} ({}); write outputs outside it",
                    input.path.display(),
                    input.flag
                ));
            }
        } else if resolved == input_path {
            return refuse(format!(
                "is the input {} {}: choose another output",
                input.flag,
                input.path.display()
            ));
        }
    }
    // Any dataset directory among the ancestors; a directory output must not be one either.
    if kind == OutputKind::Dir && resolved.join(MANIFEST_FILE).is_file() {
        return refuse(format!(
            "already holds a dataset ({MANIFEST_FILE}); choose a new or empty directory"
        ));
    }
    let mut dir = resolved.parent();
    while let Some(d) = dir {
        if d.join(MANIFEST_FILE).is_file() {
            return refuse(format!(
                "lies inside the dataset directory {} (it holds {MANIFEST_FILE}); write \
                 outputs outside datasets",
                d.display()
            ));
        }
        dir = d.parent();
    }
    Ok(())
}

/// The absolute path `path` stands for, with every existing part resolved (symbolic links,
/// `..`), and the missing tail appended (where `..` is taken lexically: a component that
/// does not exist cannot be a link).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(".", e))?
            .join(path)
    };
    let mut existing = abs.as_path();
    let mut tail: Vec<Component<'_>> = Vec::new();
    loop {
        // A dangling link is resolved no further: it is itself the output.
        if fs::symlink_metadata(existing).is_ok() {
            let is_link = fs::symlink_metadata(existing)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false);
            let base = if is_link && fs::metadata(existing).is_err() {
                match (existing.parent(), existing.file_name()) {
                    (Some(p), Some(n)) => fs::canonicalize(p).map_err(|e| Error::io(p, e))?.join(n),
                    _ => existing.to_path_buf(),
                }
            } else {
                fs::canonicalize(existing).map_err(|e| Error::io(existing, e))?
            };
            let mut out = base;
            for c in tail.iter().rev() {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return Ok(out);
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                tail.push(last);
                existing = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// The lock file of an output: `<path>.mgkd-lock` (for a directory given as `.` or `/`, the
/// lock of its resolved path).
fn lock_path(path: &Path) -> Result<PathBuf> {
    let named = path.file_name().is_some()
        && !matches!(path.components().next_back(), Some(Component::ParentDir));
    let base = if named {
        path.to_path_buf()
    } else {
        resolve(path)?
    };
    let mut s = base.into_os_string();
    s.push(LOCK_SUFFIX);
    Ok(PathBuf::from(s))
}

/// The advisory lock of one output (see the module documentation).
#[derive(Debug)]
struct OutputLock {
    path: PathBuf,
    file: fs::File,
    _registration: Registration,
}

impl OutputLock {
    fn acquire(flag: &str, output: &Path, kind: OutputKind) -> Result<OutputLock> {
        let path = lock_path(output)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if kind == OutputKind::Dir && !dir.exists() {
                fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
        }
        // Retried when the file was removed or replaced between open and lock (its holder
        // finished meanwhile): the lock must be on the file the path names now.
        for _ in 0..16 {
            if let Ok(m) = fs::symlink_metadata(&path) {
                if !m.file_type().is_file() {
                    return Err(Error::invalid(format!(
                        "{flag} {}: the lock file {} exists and is not a regular file; remove it",
                        output.display(),
                        path.display()
                    )));
                }
            }
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            if !try_lock(&file).map_err(|e| Error::io(&path, e))? {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::invalid(format!(
                    "{flag} {}: another run is writing this output ({}holds the lock {}); \
                     wait for it to finish, or choose another output",
                    output.display(),
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!("process {holder} ")
                    },
                    path.display()
                )));
            }
            if !same_file(&file, &path) {
                continue;
            }
            let registration = cleanup::register(&path, Removal::File);
            // The holder's process id, for the message of a refused second run.
            let _ = file.set_len(0);
            let _ = file.rewind();
            let _ = write!(file, "{}", std::process::id());
            let _ = file.flush();
            return Ok(OutputLock {
                path,
                file,
                _registration: registration,
            });
        }
        Err(Error::invalid(format!(
            "{flag} {}: could not take the lock {} (it keeps being replaced)",
            output.display(),
            path.display()
        )))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked; a run that opened it meanwhile sees that the path no
        // longer names its file and tries again.
        let _ = fs::remove_file(&self.path);
        let _ = &self.file;
    }
}

/// An exclusive, non-blocking advisory lock on `file`: `Ok(false)` when another holds it.
#[cfg(unix)]
fn try_lock(file: &fs::File) -> std::io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Without `flock` (not Unix) outputs are not locked.
#[cfg(not(unix))]
fn try_lock(_file: &fs::File) -> std::io::Result<bool> {
    Ok(true)
}

/// Whether `path` still names the open `file`.
#[cfg(unix)]
fn same_file(file: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Without inode numbers the path is taken to name the file.
#[cfg(not(unix))]
fn same_file(_file: &fs::File, path: &Path) -> bool {
    path.exists()
}
