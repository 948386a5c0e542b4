//! plfs (`tests/tools/plfs`) mounted for one test: a FUSE file system that
//! loses unsynced data at a power cut and, on command, fails fsync.
//!
//! ```ignore
//! let Some(mut fs) = Plfs::mount(false) else { return }; // skipped, reason printed
//! let server = Binary::start(&fs.data_dir(), &[]);       // declare `fs` first:
//! // ... write ...                                       // the server must be
//! fs.cut();                                              // dropped before the mount
//! drop(server);
//! fs.remount();                                          // power on
//! ```
//!
//! Needs root, `/dev/fuse`, libfuse2 and python3 (the wrapper script makes its
//! own venv with fusepy on first use, which needs pip to reach its index).
//! Without them the test is skipped with the reason printed, except under
//! `CI=true`, where a missing prerequisite fails it: CI must not pass by
//! running nothing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{is_root, poll_until, send_signal, wait_child};

/// The wrapper that runs plfs in its own Python environment.
const PLFS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/plfs/plfs");
/// The first mount may create the venv and install fusepy.
const MOUNT_DEADLINE: Duration = Duration::from_secs(180);
/// plfs is asked to exit on SIGTERM; past this it is unmounted by force.
const UNMOUNT_DEADLINE: Duration = Duration::from_secs(30);
/// One control command (a cut walks the backing tree in strict mode).
const CTL_DEADLINE: Duration = Duration::from_secs(60);

/// A plfs mount over a backing directory, both in a temporary directory of
/// their own; unmounted when dropped, also when the test fails.
pub struct Plfs {
    root: TempDir,
    strict: bool,
    child: Option<Child>,
}

impl Plfs {
    /// Mounts a fresh plfs (`strict`: files and directories created since
    /// their parent directory's last fsync vanish at a cut). `None`, after
    /// printing why, when this machine cannot run it (see the module notes).
    pub fn mount(strict: bool) -> Option<Plfs> {
        if let Some(why) = missing_prerequisite() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "plfs test cannot run under CI: {why}"
            );
            eprintln!("skipped: {why}");
            return None;
        }
        let root = tempfile::tempdir().expect("plfs temp dir");
        for dir in ["backing", "mnt"] {
            std::fs::create_dir(root.path().join(dir)).expect("plfs dirs");
        }
        // Made before the mount, so it is durable in both modes, as a data
        // directory set up ahead of the server would be.
        std::fs::create_dir(root.path().join("backing/data")).expect("plfs data dir");
        let mut plfs = Plfs {
            root,
            strict,
            child: None,
        };
        plfs.start();
        Some(plfs)
    }

    /// A directory inside the mount for the server's data.
    pub fn data_dir(&self) -> PathBuf {
        self.mountpoint().join("data")
    }

    /// The backing directory: what plfs made durable.
    pub fn backing_dir(&self) -> PathBuf {
        self.root.path().join("backing")
    }

    pub fn mountpoint(&self) -> PathBuf {
        self.root.path().join("mnt")
    }

    fn socket(&self) -> PathBuf {
        self.root.path().join("control.sock")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("plfs.log")
    }

    /// Sends a control command (`cut`, `status`, `ping`, `fail-fsync on`,
    /// `fail-fsync off`; see the tool's README) and returns plfs's answer,
    /// which must start with `ok`.
    pub fn ctl(&self, command: &str) -> String {
        let reply = self
            .try_ctl(command)
            .unwrap_or_else(|err| panic!("plfs ctl {command}: {err}"));
        assert!(reply.starts_with("ok"), "plfs ctl {command}: {reply}");
        reply
    }

    /// The power cut: drops everything not durable and freezes the mount.
    /// What it dropped (the files created but never made durable among
    /// them) goes to the test's output, beside any failure after it.
    pub fn cut(&self) {
        let reply = self.ctl("cut");
        eprintln!("plfs {reply}");
    }

    /// One number of `ctl status` (`dirty_bytes`, `fsyncs`, `failed_fsyncs`, ...).
    pub fn status(&self, name: &str) -> u64 {
        let status = self.ctl("status");
        status
            .split_whitespace()
            .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in plfs status: {status}"))
    }

    fn try_ctl(&self, command: &str) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(self.socket())?;
        stream.set_read_timeout(Some(CTL_DEADLINE))?;
        stream.set_write_timeout(Some(CTL_DEADLINE))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(reply.trim().to_owned())
    }

    /// Ends the mount (everything not durable is lost, as at a cut) and
    /// mounts the same backing directory again: the machine's power on.
    /// Every process using the mount must have exited first.
    pub fn remount(&mut self) {
        self.unmount();
        self.start();
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.log_path()).expect("plfs log");
        let mut command = Command::new(PLFS);
        command
            .arg("mount")
            .arg(self.backing_dir())
            .arg(self.mountpoint())
            .arg("--control")
            .arg(self.socket())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("plfs log"))
            .stderr(log);
        if self.strict {
            command.arg("--strict");
        }
        // The wrapper execs python: the child's pid is plfs's own.
        let child = command.spawn().expect("start plfs");
        self.child = Some(child);
        let mountpoint = self.mountpoint();
        poll_until(MOUNT_DEADLINE, "plfs mounted", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("plfs exited with {status} before mounting: {}", self.log());
            }
            self.try_ctl("ping").is_ok_and(|r| r.starts_with("ok")) && is_mounted(&mountpoint)
        });
    }

    /// plfs's own output, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn unmount(&mut self) {
        let mountpoint = self.mountpoint();
        if let Some(mut child) = self.child.take() {
            // SIGTERM makes plfs unmount and exit.
            let _ = send_signal(child.id(), libc::SIGTERM);
            if wait_child(&mut child, UNMOUNT_DEADLINE).is_none() {
                eprintln!("plfs did not exit on SIGTERM; killing it");
                let _ = child.kill();
                let _ = wait_child(&mut child, UNMOUNT_DEADLINE);
            }
        }
        // A mount whose process is gone (or that was busy) is detached lazily.
        if is_mounted(&mountpoint) {
            let detached = Command::new("umount")
                .arg("-l")
                .arg(&mountpoint)
                .status()
                .is_ok_and(|s| s.success())
                || Command::new("fusermount")
                    .args(["-u", "-z"])
                    .arg(&mountpoint)
                    .status()
                    .is_ok_and(|s| s.success());
            if !detached {
                eprintln!("could not unmount {}", mountpoint.display());
            }
        }
    }
}

impl Drop for Plfs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Why plfs cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !is_root() {
        return Some("plfs needs root (FUSE mounts with allow_other)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("plfs needs /dev/fuse".into());
    }
    let libfuse2 = Command::new("ldconfig")
        .arg("-p")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("libfuse.so.2"));
    if !libfuse2 {
        return Some("plfs needs libfuse2 (apt-get install -y libfuse2)".into());
    }
    let python = ["python3.11", "python3"].iter().any(|python| {
        Command::new(python)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !python {
        return Some("plfs needs python3 (with venv and pip)".into());
    }
    None
}

/// Whether a file system is mounted exactly at `path`.
fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let path = path.to_string_lossy();
    // The kernel writes a space in a mount point as \040.
    let escaped = path.replace(' ', "\\040");
    mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(escaped.as_str()))
}
