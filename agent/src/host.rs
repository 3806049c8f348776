//! Where the node's files are.
//!
//! Every file the agent reads goes through [`HostPaths`], so the same probe code
//! reads a real node (`/`), a lab node (a directory per network namespace) or a
//! fixture tree in a test. Symlinks are resolved *inside* the host root, the way
//! a chroot would: on NixOS `/etc/systemd/system/k3s.service` points into
//! `/nix/store`, and under a lab root that must mean `<root>/nix/store`, never
//! the machine's own store.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// The largest file the agent will read whole. Real inputs (a kernel config,
/// `modules.dep`, a conflist) are far below this; the cap keeps a hostile or
/// corrupt file from eating a 4 GB node's memory.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// How many symlinks one lookup may follow before we call it a loop.
const MAX_SYMLINK_HOPS: usize = 32;

/// An error reading one file under the host root, with the host-relative path
/// so messages name the file a person would look at on the node.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("/{path} does not exist")]
    Missing { path: String },
    #[error("/{path} could not be read: {source}")]
    Io { path: String, source: io::Error },
    #[error("/{path} is larger than {limit} bytes; refusing to read it whole")]
    TooLarge { path: String, limit: u64 },
    #[error("/{path} escapes the host root through a symlink ({target})")]
    Escapes { path: String, target: String },
}

impl ReadError {
    pub fn is_missing(&self) -> bool {
        matches!(self, ReadError::Missing { .. })
    }
}

/// The host root, checked once at start-up.
#[derive(Debug, Clone)]
pub struct HostPaths {
    root: PathBuf,
}

impl HostPaths {
    /// `root` must be an existing directory; anything else is a mistake the
    /// operator has to fix, so it is an error rather than an empty report.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, String> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(Self { root }),
            Ok(_) => Err(format!("host root {} is not a directory", root.display())),
            Err(e) => Err(format!("host root {} cannot be used: {e}", root.display())),
        }
    }

    /// The real machine.
    pub fn system() -> Self {
        Self {
            root: PathBuf::from("/"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when the host root is this machine's `/`, so live (syscall,
    /// netlink) facts and file facts describe the same host.
    pub fn is_system_root(&self) -> bool {
        self.root == Path::new("/")
    }

    /// The plain joined path (no symlink resolution), for display and for
    /// operations that must not follow links (listing, statfs of a mountpoint).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// Resolves `rel` to a real path inside the root, following symlinks as if
    /// the root were `/`. Absolute link targets are re-rooted; `..` never climbs
    /// above the root. A link whose target leaves the root is reported, not
    /// followed, so a lab or fixture tree can never make us read the host's files.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, ReadError> {
        let display = rel.trim_start_matches('/').to_string();
        let mut pending: Vec<String> = components(rel);
        pending.reverse();
        let mut resolved: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                resolved.pop();
                continue;
            }
            let candidate = self.root.join(resolved.join("/")).join(&part);
            match fs::symlink_metadata(&candidate) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(ReadError::Io {
                            path: display,
                            source: io::Error::other("too many levels of symbolic links"),
                        });
                    }
                    let target = fs::read_link(&candidate).map_err(|source| ReadError::Io {
                        path: display.clone(),
                        source,
                    })?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    let mut next = components(&target.to_string_lossy());
                    next.reverse();
                    // Depth check: a relative target with more `..` than we
                    // have components would climb out; clamp and report.
                    let ups = next.iter().filter(|c| *c == "..").count();
                    if !target.is_absolute() && ups > resolved.len() && !self.is_system_root() {
                        return Err(ReadError::Escapes {
                            path: display,
                            target: target.display().to_string(),
                        });
                    }
                    pending.extend(next);
                }
                Ok(_) => resolved.push(part),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ReadError::Missing { path: display });
                }
                Err(source) => {
                    return Err(ReadError::Io {
                        path: display,
                        source,
                    })
                }
            }
        }
        Ok(self.root.join(resolved.join("/")))
    }

    /// Reads a whole file as bytes, capped at [`MAX_FILE_BYTES`].
    pub fn read_bytes(&self, rel: &str) -> Result<Vec<u8>, ReadError> {
        let display = rel.trim_start_matches('/').to_string();
        let path = self.resolve(rel)?;
        let io_err = |source| ReadError::Io {
            path: display.clone(),
            source,
        };
        let file = fs::File::open(&path).map_err(io_err)?;
        let mut buf = Vec::new();
        // Read one byte past the cap so we can tell "exactly at" from "over".
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(io_err)?;
        if buf.len() as u64 > MAX_FILE_BYTES {
            return Err(ReadError::TooLarge {
                path: display,
                limit: MAX_FILE_BYTES,
            });
        }
        Ok(buf)
    }

    /// Reads a whole file as text; invalid UTF-8 is replaced, not fatal,
    /// because the parsers report garbage lines themselves.
    pub fn read_string(&self, rel: &str) -> Result<String, ReadError> {
        self.read_bytes(rel)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// A trimmed one-line value such as a sysctl.
    pub fn read_trimmed(&self, rel: &str) -> Result<String, ReadError> {
        self.read_string(rel).map(|s| s.trim().to_string())
    }

    /// True when `rel` exists (after in-root symlink resolution).
    pub fn exists(&self, rel: &str) -> bool {
        self.resolve(rel).is_ok()
    }
}

/// Splits a path into its normal components, keeping `..` (resolved by the
/// caller against symlinks) and dropping `.` and the root.
fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn absolute_symlinks_are_rerooted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("nix/store/abc")).unwrap();
        fs::write(root.join("nix/store/abc/k3s.service"), "unit").unwrap();
        fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
        symlink(
            "/nix/store/abc/k3s.service",
            root.join("etc/systemd/system/k3s.service"),
        )
        .unwrap();
        let host = HostPaths::new(root).unwrap();
        assert_eq!(
            host.read_string("etc/systemd/system/k3s.service").unwrap(),
            "unit"
        );
    }

    #[test]
    fn dotdot_cannot_climb_out_of_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("root");
        fs::create_dir_all(inner.join("etc")).unwrap();
        fs::write(dir.path().join("secret"), "outside").unwrap();
        symlink("../../secret", inner.join("etc/link")).unwrap();
        let host = HostPaths::new(&inner).unwrap();
        let err = host.read_string("etc/link").unwrap_err();
        assert!(matches!(err, ReadError::Escapes { .. }), "{err}");
        // A plain `..` in the request is clamped at the root, too.
        assert!(host.read_string("../secret").unwrap_err().is_missing());
    }

    #[test]
    fn symlink_loops_are_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        symlink("b", dir.path().join("a")).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        let host = HostPaths::new(dir.path()).unwrap();
        let err = host.read_string("a").unwrap_err().to_string();
        assert!(err.contains("too many levels"), "{err}");
    }

    #[test]
    fn a_file_is_not_a_host_root() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = HostPaths::new(file.path()).unwrap_err();
        assert!(err.contains("is not a directory"), "{err}");
        assert!(HostPaths::new("/nonexistent/cnishift")
            .unwrap_err()
            .contains("cannot be used"));
    }

    #[test]
    fn oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = fs::File::create(dir.path().join("big")).unwrap();
        f.set_len(MAX_FILE_BYTES + 10).unwrap();
        let host = HostPaths::new(dir.path()).unwrap();
        assert!(matches!(
            host.read_bytes("big"),
            Err(ReadError::TooLarge { .. })
        ));
    }
}
