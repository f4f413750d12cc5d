//! The temporary files of the run, and the SIGINT/SIGTERM handler that removes them.
//!
//! Every temporary path is registered here *before* it is created, under the registry's
//! lock ([`create`], [`register`]); the registration ends when its [`Registration`] is
//! dropped (the owner then keeps or removes the path itself, as its own error paths
//! decide). [`install_signal_handler`] starts a thread that, on SIGINT or SIGTERM, takes the
//! lock, removes every registered path (newest first: files before the directories that hold
//! them) and exits with status 128 + the signal number (130 for SIGINT, 143 for SIGTERM)
//! while still holding the lock, so nothing new can be created after the clean-up.
//! SIGKILL cannot be caught: its leftovers are the `.tmp` files and shards of an unfinished
//! dataset, which are never taken for finished outputs (a dataset has a `dataset.json`).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::{Error, Result};

/// How a registered path is removed on a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// A file (`remove_file`).
    File,
    /// A directory that is removed only when empty (its files are registered on their own).
    EmptyDir,
    /// A directory and everything in it (a temporary working directory of the run).
    Tree,
}

struct Entry {
    id: u64,
    path: PathBuf,
    removal: Removal,
}

struct Registry {
    next: u64,
    entries: Vec<Entry>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    entries: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    // A panic elsewhere while holding the lock leaves the list itself intact.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered temporary path. Dropping it ends the registration (the path is left as it
/// is); a signal before that removes the path.
#[derive(Debug)]
#[must_use = "the registration ends when this is dropped"]
pub struct Registration {
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        registry().entries.retain(|e| e.id != self.id);
    }
}

fn push(reg: &mut Registry, path: &Path, removal: Removal) -> Registration {
    let id = reg.next;
    reg.next += 1;
    reg.entries.push(Entry {
        id,
        path: path.to_path_buf(),
        removal,
    });
    Registration { id }
}

/// Registers `path` (which the caller is about to create, or will create by a rename) for
/// removal on a signal.
pub fn register(path: &Path, removal: Removal) -> Registration {
    push(&mut registry(), path, removal)
}

/// Creates `path` with `create` and registers it, both under the registry's lock, so that a
/// signal either finds it registered or stops the process before it exists.
pub fn create<T>(
    path: &Path,
    removal: Removal,
    create: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<(T, Registration)> {
    let mut reg = registry();
    let value = create(path)?;
    Ok((value, push(&mut reg, path, removal)))
}

/// Ends several registrations at once, under one lock: a signal sees all of them or none
/// (a finished dataset is kept whole, or removed whole).
pub fn release_all(registrations: Vec<Registration>) {
    let mut reg = registry();
    for r in registrations {
        reg.entries.retain(|e| e.id != r.id);
        std::mem::forget(r);
    }
}

/// Paths registered now, oldest first (for tests and diagnostics).
pub fn registered() -> Vec<PathBuf> {
    registry().entries.iter().map(|e| e.path.clone()).collect()
}

/// Removes every registered path, newest first; returns how many existed.
fn remove_all(reg: &mut Registry) -> usize {
    let mut removed = 0;
    for e in reg.entries.drain(..).rev() {
        let done = match e.removal {
            Removal::File => fs::remove_file(&e.path),
            Removal::EmptyDir => fs::remove_dir(&e.path),
            Removal::Tree => fs::remove_dir_all(&e.path),
        };
        removed += usize::from(done.is_ok());
    }
    removed
}

/// Installs the SIGINT/SIGTERM handler (see the module documentation). Called once, at the
/// start of `mgkd-train`; a library user that wants the same behaviour calls it too.
pub fn install_signal_handler() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| Error::invalid(format!("installing the SIGINT/SIGTERM handler: {e}")))?;
    std::thread::Builder::new()
        .name("mgkd-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let mut reg = registry();
                let removed = remove_all(&mut reg);
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                let _ = writeln!(
                    std::io::stderr(),
                    "\nmgkd-train: stopped by {name}; removed {removed} temporary file(s)"
                );
                // Exits with the lock held: nothing registered can be created any more.
                std::process::exit(128 + sig);
            }
        })
        .map_err(|e| Error::invalid(format!("starting the signal thread: {e}")))?;
    Ok(())
}
