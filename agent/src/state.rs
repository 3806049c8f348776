//! The agent's on-disk state: files that must survive a crash, a `kill -9`
//! and a power cut whole or not at all.
//!
//! [`write_atomic`] is the one way such a file is written: a temporary file
//! in the same directory, fsync, rename over the old one, fsync of the
//! directory (without that last step the rename itself may be lost on a
//! power cut, leaving the old file — or none — after the reboot).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` atomically (mode 0600: the state may name run ids
/// and commands, which are nobody else's business).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", path.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// Creates the state directory (0700) if it is missing; a path that exists
/// but is not a directory is an error that names it.
pub fn ensure_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "the state directory {} exists but is not a directory",
            dir.display()
        )),
        Err(_) => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_that_names_it() {
        let e = write_atomic(Path::new("/nonexistent-cnishift/x/state.json"), b"x").unwrap_err();
        assert!(
            e.starts_with("cannot write /nonexistent-cnishift/x/state.json: "),
            "{e}"
        );
    }

    #[test]
    fn a_file_in_place_of_the_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, "").unwrap();
        assert_eq!(
            ensure_dir(&f).unwrap_err(),
            format!(
                "the state directory {} exists but is not a directory",
                f.display()
            )
        );
    }
}
