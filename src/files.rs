//! Files and directories made durable the way POSIX asks: a new file or
//! directory survives a power cut only once the directory that names it has
//! been fsynced after its creation, and its contents only once the file itself
//! has been fsynced. `close` makes nothing durable.
//!
//! docs/durability.md lists, file by file, which of these the server relies on.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Fsyncs a directory, making the creation, removal and renaming of the
/// entries in it durable.
///
/// # Errors
/// When the directory cannot be opened or the sync fails.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Creates `path` and any missing parents, fsyncing the parent of each
/// directory it creates, so that the whole chain survives a power cut.
///
/// # Errors
/// When a directory cannot be created or synced.
pub fn create_dir_all_durably(path: &Path) -> io::Result<()> {
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut next = Some(path);
    while let Some(dir) = next {
        if dir.as_os_str().is_empty() || dir.is_dir() {
            break;
        }
        missing.push(dir.to_path_buf());
        next = dir.parent();
    }
    for dir in missing.iter().rev() {
        match fs::create_dir(dir) {
            Ok(()) => {}
            // Made meanwhile by someone else, who owes its parent's sync; sync
            // it anyway below, as it costs one fsync at start-up.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(err) => return Err(err),
        }
        sync_dir(parent_of(dir))?;
    }
    Ok(())
}

/// Writes a small file whole or not at all: a temporary file in the same
/// directory, fsynced, renamed over `path`, then the directory fsynced. A
/// crash at any point leaves either no file or the complete new one (and at
/// worst a stray temporary file, which the next write replaces).
///
/// `mode` sets the permissions of the new file on Unix (e.g. `0o600` for a
/// secret).
///
/// # Errors
/// When any step fails; `path` is then unchanged.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut temporary = name.to_os_string();
    temporary.push(".tmp");
    let temporary = dir.join(temporary);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&temporary)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path)?;
    sync_dir(dir)
}

/// The directory that names `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_every_missing_parent() {
        let root = tempfile::tempdir().expect("temp dir");
        let deep = root.path().join("a/b/c");
        create_dir_all_durably(&deep).expect("create");
        assert!(deep.is_dir());
        // Existing directories are fine too.
        create_dir_all_durably(&deep).expect("create again");
    }

    #[test]
    fn an_atomic_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let root = tempfile::tempdir().expect("temp dir");
        let path = root.path().join("secret");
        write_atomically(&path, b"first", 0o600).expect("write");
        write_atomically(&path, b"second", 0o600).expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"second");
        let names: Vec<_> = fs::read_dir(root.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
