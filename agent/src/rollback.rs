//! The dead-man rollback: armed before a node is switched, confirmed by the
//! coordinator over a fresh connection once the switched node is verified,
//! and otherwise fired by the agent itself at the deadline.
//!
//! deploy-rs's "magic rollback" is the model; its users' reports are what
//! this does better:
//! - **It survives a restart and a reboot.** The state is a file written
//!   atomically ([`crate::state`]) before any RPC answers. Within one boot the
//!   countdown is measured on `CLOCK_BOOTTIME`, never the wall clock (a
//!   Raspberry Pi 4 has no RTC: after a reboot its wall clock is wrong until
//!   NTP syncs). An agent started in a *new* boot (the boot id changed)
//!   restarts the countdown with the whole timeout and says so
//!   (`rebooted_while_armed`); it never fires at once because a clock jumped.
//! - **A rollback that failed is reported failed** — in the state, over gRPC,
//!   in the report and at error level in the log — never as success.
//! - **No loops.** `fired` is recorded before the action starts; an agent that
//!   died during the action runs it at most once more, then holds the failure
//!   for a person.
//!
//! The action is fixed on the agent (`--rollback-command`, or on NixOS the
//! module's `cnishift-rollback@<generation>` unit), rendered into an argv when
//! armed and stored with the state, so the caller never chooses what runs.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;
use crate::state;

/// The state file inside the state directory.
pub const STATE_FILE: &str = "rollback.json";
/// The boot id the kernel gives each boot (a new random UUID per boot).
pub const BOOT_ID: &str = "proc/sys/kernel/random/boot_id";
/// NixOS's system profile: a symlink to `system-N-link`.
pub const NIXOS_PROFILE: &str = "nix/var/nix/profiles/system";
/// The action on NixOS when no command is configured: the module's template
/// unit, which runs outside the agent's sandboxed unit (see module.nix).
pub const NIXOS_DEFAULT_COMMAND: &str =
    "systemctl start --wait cnishift-rollback@{generation}.service";
/// The placeholders a rollback command may use.
pub const PLACEHOLDERS: &[&str] = &["{node}", "{generation}"];
/// Shortest and longest countdown a caller may ask for.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How often the dead-man task re-reads the clock while armed, at most. Tokio
/// sleeps on CLOCK_MONOTONIC, which stops during a suspend; re-reading
/// CLOCK_BOOTTIME this often keeps the deadline honest either way.
const TICK: Duration = Duration::from_millis(200);
/// How much of the action's output the state reports.
const TAIL_BYTES: u64 = 2048;

/// Nanoseconds since boot, suspend included.
pub fn boottime_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME exists on every Linux the agent supports (2.6.39+)");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Where the state of one armed switch is, as recorded on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The countdown runs.
    Armed,
    /// The coordinator confirmed in time; nothing will run.
    Confirmed,
    /// The coordinator disarmed (or a person acknowledged a failure).
    Disarmed,
    /// `fired` was recorded and the action started; no outcome yet. Found on
    /// start-up, this means the agent died during the action.
    Firing,
    Succeeded,
    Failed,
    /// The agent died during the action twice: held for a person.
    Interrupted,
}

/// What the rollback goes back to, resolved when armed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The NixOS system generation current when armed (`system-N-link`).
    pub generation: Option<u64>,
    /// Its store path, e.g. `/nix/store/...-nixos-system-opi01-25.05`.
    pub store_path: Option<String>,
    /// The action, rendered.
    pub argv: Vec<String>,
}

impl Target {
    pub fn describe(&self) -> String {
        let cmd = self.argv.join(" ");
        match (self.generation, &self.store_path) {
            (Some(g), Some(p)) => format!("NixOS generation {g} ({p}) via `{cmd}`"),
            _ => format!("`{cmd}`"),
        }
    }
}

/// The persisted state (`<state-dir>/rollback.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub run_id: String,
    pub timeout_ms: u64,
    /// The boot the countdown runs in.
    pub boot_id: String,
    /// CLOCK_BOOTTIME at the start of the countdown (in `boot_id`'s boot).
    pub armed_at_boottime_ns: u64,
    /// Seconds since the epoch when armed: for people only, never for timing.
    pub armed_at_unix: u64,
    pub target: Target,
    pub phase: Phase,
    pub rebooted_while_armed: bool,
    /// How often the action was started.
    pub attempts: u32,
    /// What happened, in words.
    pub message: String,
    /// The action's output file.
    pub output_file: Option<String>,
}

/// The state as the RPCs and the CLI show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub armed: bool,
    pub run_id: String,
    pub remaining_ms: u64,
    pub rebooted_while_armed: bool,
    pub fired: bool,
    /// "", "confirmed", "disarmed", "running", "succeeded", "failed", "interrupted".
    pub outcome: String,
    pub output_tail: String,
    pub message: String,
    pub target: String,
    pub timeout_ms: u64,
    pub attempts: u32,
}

impl Record {
    /// Milliseconds left, measured on CLOCK_BOOTTIME.
    pub fn remaining_ms(&self, now_ns: u64) -> u64 {
        let deadline = self.armed_at_boottime_ns + self.timeout_ms * 1_000_000;
        deadline.saturating_sub(now_ns) / 1_000_000
    }

    pub fn view(&self, now_ns: u64) -> View {
        let outcome = match self.phase {
            Phase::Armed => "",
            Phase::Confirmed => "confirmed",
            Phase::Disarmed => "disarmed",
            Phase::Firing => "running",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Interrupted => "interrupted",
        };
        View {
            armed: self.phase == Phase::Armed,
            run_id: self.run_id.clone(),
            remaining_ms: if self.phase == Phase::Armed {
                self.remaining_ms(now_ns)
            } else {
                0
            },
            rebooted_while_armed: self.rebooted_while_armed,
            fired: self.attempts > 0,
            outcome: outcome.into(),
            output_tail: self
                .output_file
                .as_deref()
                .map(|p| tail(Path::new(p)))
                .unwrap_or_default(),
            message: self.message.clone(),
            target: self.target.describe(),
            timeout_ms: self.timeout_ms,
            attempts: self.attempts,
        }
    }
}

fn tail(path: &Path) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Why a call was refused; each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The request itself is wrong (bad run id, timeout out of range).
    #[error("{0}")]
    Invalid(String),
    /// The switch is in a state that does not allow it (another run holds it,
    /// confirm on the arming connection, too late).
    #[error("{0}")]
    State(String),
    /// The agent cannot do it (no action configured, state not writable).
    #[error("{0}")]
    Unavailable(String),
}

/// The agent's rollback configuration (from `serve`'s flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub host: HostPaths,
    pub node: String,
    /// `--rollback-command` / `CNISHIFT_ROLLBACK_COMMAND`, a template.
    pub command: Option<String>,
    /// How long one run of the action may take.
    pub action_timeout: Duration,
}

/// Checks a command template: shell words, only known placeholders. The
/// agent refuses to start with a bad one, rather than fail at the deadline.
pub fn parse_template(template: &str) -> Result<Vec<String>, String> {
    let words = shlex::split(template)
        .ok_or_else(|| format!("rollback command {template:?}: unbalanced quotes"))?;
    if words.is_empty() {
        return Err("the rollback command is empty".into());
    }
    for w in &words {
        let mut rest = w.as_str();
        while let Some(start) = rest.find('{') {
            let Some(len) = rest[start..].find('}') else {
                return Err(format!(
                    "rollback command {template:?}: unclosed '{{' in {w:?}"
                ));
            };
            let ph = &rest[start..start + len + 1];
            if !PLACEHOLDERS.contains(&ph) {
                return Err(format!(
                    "rollback command {template:?}: unknown placeholder {ph}; known: {}",
                    PLACEHOLDERS.join(", ")
                ));
            }
            rest = &rest[start + len + 1..];
        }
    }
    Ok(words)
}

/// A run id is a name, never a path or a shell word with meaning.
pub fn check_run_id(run_id: &str) -> Result<(), Refused> {
    let ok = !run_id.is_empty()
        && run_id.len() <= 64
        && run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !run_id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Refused::Invalid(format!(
            "run id {run_id:?} is not valid: 1 to 64 characters of A-Z a-z 0-9 . _ -, not starting with '.'"
        )))
    }
}

/// The NixOS system generation current now: (N, store path), from
/// `/nix/var/nix/profiles/system -> system-N-link -> /nix/store/...`.
pub fn nixos_generation(host: &HostPaths) -> Result<Option<(u64, String)>, String> {
    let profile = host.path(NIXOS_PROFILE);
    let link = match fs::read_link(&profile) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("/{NIXOS_PROFILE}: {e}")),
    };
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let generation = name
        .strip_prefix("system-")
        .and_then(|r| r.strip_suffix("-link"))
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| {
            format!(
                "/{NIXOS_PROFILE} points to {}, not a system-N-link",
                link.display()
            )
        })?;
    let gen_rel = format!("nix/var/nix/profiles/{name}");
    let store = fs::read_link(host.path(&gen_rel))
        .map_err(|e| format!("/{gen_rel}: {e}"))?
        .display()
        .to_string();
    Ok(Some((generation, store)))
}

impl Config {
    fn state_file(&self) -> PathBuf {
        self.state_dir.join(STATE_FILE)
    }

    /// The boot id: under the host root when it has one (a lab node's or a
    /// test's own), else the kernel's own — the clock is the live kernel's,
    /// like the live probes.
    fn boot_id(&self) -> Result<String, String> {
        let read = |h: &HostPaths| {
            h.read_trimmed(BOOT_ID)
                .map_err(|e| format!("cannot read the boot id: {e}"))
                .and_then(|b| {
                    if b.is_empty() {
                        Err(format!("/{BOOT_ID} is empty"))
                    } else {
                        Ok(b)
                    }
                })
        };
        match read(&self.host) {
            Err(_) if !self.host.is_system_root() && !self.host.exists(BOOT_ID) => {
                read(&HostPaths::system())
            }
            r => r,
        }
    }

    /// What the rollback would run, resolved now.
    pub fn resolve_target(&self) -> Result<Target, String> {
        let nixos = nixos_generation(&self.host)?;
        let template = match (&self.command, &nixos) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => NIXOS_DEFAULT_COMMAND.into(),
            (None, None) => {
                return Err(
                    "no rollback action on this node: it is not NixOS (no /nix/var/nix/profiles/system) \
                     and no --rollback-command (CNISHIFT_ROLLBACK_COMMAND) is configured"
                        .into(),
                )
            }
        };
        let words = parse_template(&template)?;
        let needs_gen = words.iter().any(|w| w.contains("{generation}"));
        if needs_gen && nixos.is_none() {
            return Err(format!(
                "the rollback command {template:?} uses {{generation}}, but /{NIXOS_PROFILE} does not exist"
            ));
        }
        let generation = nixos
            .as_ref()
            .map(|(g, _)| g.to_string())
            .unwrap_or_default();
        Ok(Target {
            generation: nixos.as_ref().map(|(g, _)| *g),
            store_path: nixos.map(|(_, p)| p),
            argv: words
                .iter()
                .map(|w| {
                    w.replace("{node}", &self.node)
                        .replace("{generation}", &generation)
                })
                .collect(),
        })
    }
}

/// Reads the state file; `Ok(None)` when there is none.
pub fn load(state_dir: &Path) -> Result<Option<Record>, String> {
    let p = state_dir.join(STATE_FILE);
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            format!(
                "{} is damaged ({e}); move it away to start afresh",
                p.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// The dead-man switch of one agent: the state, its file, and a task that
/// fires it.
pub struct Switch {
    cfg: Config,
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
}

struct Inner {
    record: Option<Record>,
    /// The connection that armed, in this process (a confirm must come over
    /// another one). After a restart the arming connection is gone, so any
    /// connection may confirm.
    armed_by: Option<u64>,
}

impl Switch {
    /// Loads the state and settles what start-up means for it: same boot →
    /// the countdown continues; new boot → it restarts whole; an action that
    /// was running → interrupted (run once more, or held).
    pub fn open(cfg: Config) -> Result<Arc<Switch>, String> {
        state::ensure_dir(&cfg.state_dir)?;
        let mut record = load(&cfg.state_dir)?;
        if let Some(r) = record.as_mut() {
            let boot = cfg.boot_id()?;
            let now = boottime_ns();
            let mut changed = false;
            if boot != r.boot_id && matches!(r.phase, Phase::Armed | Phase::Firing) {
                tracing::warn!(run = %r.run_id, "the node rebooted while armed: the countdown restarts with the whole timeout");
                r.boot_id = boot;
                r.armed_at_boottime_ns = now;
                r.rebooted_while_armed = true;
                r.message = format!(
                    "the node rebooted while armed; the countdown restarted at boot with the whole {}",
                    humantime::format_duration(Duration::from_millis(r.timeout_ms))
                );
                changed = true;
            }
            if r.phase == Phase::Firing {
                if r.attempts >= 2 {
                    r.phase = Phase::Interrupted;
                    r.message = format!(
                        "the rollback was interrupted {} times (the agent died while it ran); not running it again: a person must look at this node",
                        r.attempts
                    );
                    tracing::error!(run = %r.run_id, "{}", r.message);
                } else {
                    r.message =
                        "the agent died while the rollback ran; running it once more".into();
                    tracing::warn!(run = %r.run_id, "{}", r.message);
                }
                changed = true;
            }
            if changed {
                write(&cfg.state_file(), r)?;
            }
        }
        Ok(Arc::new(Switch {
            cfg,
            inner: Mutex::new(Inner {
                record,
                armed_by: None,
            }),
            wake: tokio::sync::Notify::new(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn view(&self) -> View {
        let inner = self.lock();
        match &inner.record {
            Some(r) => r.view(boottime_ns()),
            None => View {
                message: "never armed".into(),
                ..Default::default()
            },
        }
    }

    fn persist(&self, r: &Record) -> Result<(), Refused> {
        write(&self.cfg.state_file(), r).map_err(Refused::Unavailable)
    }

    /// Arms (or, with the run id already armed, answers the same state).
    pub fn arm(&self, run_id: &str, timeout: Duration, conn: u64) -> Result<View, Refused> {
        check_run_id(run_id)?;
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
            return Err(Refused::Invalid(format!(
                "timeout {} is out of range ({} to {})",
                humantime::format_duration(timeout),
                humantime::format_duration(MIN_TIMEOUT),
                humantime::format_duration(MAX_TIMEOUT)
            )));
        }
        let mut inner = self.lock();
        if let Some(r) = &inner.record {
            match r.phase {
                Phase::Armed if r.run_id == run_id => {
                    let view = r.view(boottime_ns());
                    inner.armed_by = Some(conn);
                    return Ok(view);
                }
                Phase::Armed | Phase::Firing => {
                    return Err(Refused::State(format!(
                        "already armed by run {} ({}); disarm it first",
                        r.run_id,
                        if r.phase == Phase::Firing {
                            "its rollback is running".to_string()
                        } else {
                            format!("{} ms left", r.remaining_ms(boottime_ns()))
                        }
                    )))
                }
                Phase::Failed | Phase::Interrupted => {
                    return Err(Refused::State(format!(
                        "the last rollback (run {}) {}: {}; a person must look at this node, then `cnishift node disarm NODE --run {}` acknowledges it",
                        r.run_id,
                        if r.phase == Phase::Failed { "failed" } else { "was interrupted" },
                        r.message,
                        r.run_id
                    )))
                }
                Phase::Confirmed | Phase::Disarmed | Phase::Succeeded => {}
            }
        }
        let target = self.cfg.resolve_target().map_err(Refused::Unavailable)?;
        let boot_id = self.cfg.boot_id().map_err(Refused::Unavailable)?;
        let record = Record {
            run_id: run_id.into(),
            timeout_ms: timeout.as_millis() as u64,
            boot_id,
            armed_at_boottime_ns: boottime_ns(),
            armed_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            message: format!(
                "armed: unless confirmed within {}, runs {}",
                humantime::format_duration(timeout),
                target.describe()
            ),
            target,
            phase: Phase::Armed,
            rebooted_while_armed: false,
            attempts: 0,
            output_file: None,
        };
        // On disk before the caller hears "armed".
        self.persist(&record)?;
        tracing::info!(run = run_id, timeout = ?timeout, "armed the dead-man rollback");
        let view = record.view(boottime_ns());
        inner.record = Some(record);
        inner.armed_by = Some(conn);
        drop(inner);
        self.wake.notify_one();
        Ok(view)
    }

    /// Confirms: only over another connection than the arming one.
    pub fn confirm(&self, run_id: &str, conn: u64) -> Result<View, Refused> {
        check_run_id(run_id)?;
        let mut inner = self.lock();
        let armed_by = inner.armed_by;
        let Some(r) = inner.record.as_mut() else {
            return Err(Refused::State(format!(
                "nothing is armed (run {run_id} never armed this agent)"
            )));
        };
        if r.run_id != run_id {
            return Err(Refused::State(format!(
                "armed by run {}, not {run_id}",
                r.run_id
            )));
        }
        match r.phase {
            Phase::Confirmed => return Ok(r.view(boottime_ns())),
            Phase::Armed => {}
            Phase::Disarmed => {
                return Err(Refused::State(format!(
                    "run {run_id} was disarmed; there is nothing to confirm"
                )))
            }
            Phase::Firing | Phase::Succeeded | Phase::Failed | Phase::Interrupted => {
                return Err(Refused::State(format!(
                    "too late: the countdown of run {run_id} ran out and the rollback fired ({})",
                    r.view(boottime_ns()).outcome
                )))
            }
        }
        if armed_by == Some(conn) {
            return Err(Refused::State(
                "Confirm came over the connection that armed; it must come over a new connection, \
                 which proves the coordinator can still reach this node after the switch"
                    .into(),
            ));
        }
        let now = boottime_ns();
        if r.remaining_ms(now) == 0 {
            return Err(Refused::State(format!(
                "too late: the countdown of run {run_id} ran out; the rollback is about to run"
            )));
        }
        let mut next = r.clone();
        next.phase = Phase::Confirmed;
        next.message = format!(
            "confirmed with {} ms left; nothing will run",
            r.remaining_ms(now)
        );
        self.persist(&next)?;
        tracing::info!(run = run_id, "confirmed: the rollback will not run");
        *r = next;
        let view = r.view(now);
        drop(inner);
        self.wake.notify_one();
        Ok(view)
    }

    /// Disarms a countdown, or acknowledges a failed rollback.
    pub fn disarm(&self, run_id: &str) -> Result<View, Refused> {
        check_run_id(run_id)?;
        let mut inner = self.lock();
        let Some(r) = inner.record.as_mut() else {
            return Err(Refused::State("nothing is armed".into()));
        };
        if r.run_id != run_id {
            return Err(Refused::State(format!(
                "armed by run {}, not {run_id}",
                r.run_id
            )));
        }
        let message = match r.phase {
            Phase::Disarmed | Phase::Confirmed | Phase::Succeeded => {
                return Ok(r.view(boottime_ns()))
            }
            Phase::Firing => {
                return Err(Refused::State(format!(
                    "the rollback of run {run_id} is running; it cannot be stopped half-way"
                )))
            }
            Phase::Armed => "disarmed; nothing will run".to_string(),
            Phase::Failed | Phase::Interrupted => {
                format!("failure acknowledged by the coordinator: {}", r.message)
            }
        };
        let mut next = r.clone();
        next.phase = Phase::Disarmed;
        next.message = message;
        self.persist(&next)?;
        tracing::info!(run = run_id, "disarmed");
        *r = next;
        let view = r.view(boottime_ns());
        drop(inner);
        self.wake.notify_one();
        Ok(view)
    }

    /// What the dead-man task should do now.
    fn due(&self) -> Due {
        let inner = self.lock();
        match &inner.record {
            Some(r) if r.phase == Phase::Armed => match r.remaining_ms(boottime_ns()) {
                0 => Due::Fire,
                ms => Due::In(Duration::from_millis(ms)),
            },
            Some(r) if r.phase == Phase::Firing => Due::Fire,
            _ => Due::Idle,
        }
    }

    /// The dead-man task: runs for the life of the server.
    pub async fn run(self: Arc<Self>) {
        loop {
            match self.due() {
                Due::Idle => self.wake.notified().await,
                Due::In(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d.min(TICK)) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                Due::Fire => self.fire().await,
            }
        }
    }

    async fn fire(&self) {
        let (argv, output, run_id) = {
            let mut inner = self.lock();
            let Some(r) = inner.record.as_mut() else {
                return;
            };
            let mut next = r.clone();
            next.phase = Phase::Firing;
            next.attempts += 1;
            let output = self
                .cfg
                .state_dir
                .join(format!("rollback-{}.log", next.run_id));
            next.output_file = Some(output.display().to_string());
            next.message = format!(
                "{}the countdown ran out unconfirmed; running {}",
                if next.attempts > 1 {
                    "again, after an interrupted attempt: "
                } else {
                    ""
                },
                next.target.describe()
            );
            // `fired` is on disk before the action starts.
            if let Err(e) = write(&self.cfg.state_file(), &next) {
                tracing::error!(run = %next.run_id, "cannot record that the rollback fires ({e}); not running it");
                next.phase = Phase::Failed;
                next.message = format!("not run: {e}");
                *r = next;
                return;
            }
            tracing::warn!(run = %next.run_id, attempt = next.attempts, "{}", next.message);
            *r = next.clone();
            (next.target.argv, output, next.run_id)
        };
        let result = run_action(&argv, &output, self.cfg.action_timeout).await;
        let mut inner = self.lock();
        let Some(r) = inner.record.as_mut() else {
            return;
        };
        if r.run_id != run_id {
            return;
        }
        let mut next = r.clone();
        match result {
            Ok(msg) => {
                next.phase = Phase::Succeeded;
                next.message = format!("rolled back: {msg}");
                tracing::warn!(run = %run_id, "{}", next.message);
            }
            Err(msg) => {
                next.phase = Phase::Failed;
                next.message = format!("the rollback FAILED: {msg}");
                tracing::error!(run = %run_id, "{}", next.message);
            }
        }
        if let Err(e) = write(&self.cfg.state_file(), &next) {
            tracing::error!(run = %run_id, "cannot record the rollback's outcome: {e}");
        }
        *r = next;
    }
}

enum Due {
    Idle,
    In(Duration),
    Fire,
}

fn write(path: &Path, r: &Record) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(r).map_err(|e| e.to_string())?;
    state::write_atomic(path, &bytes)
}

/// Runs the action in its own process group, output appended to `output`,
/// killed (the whole group) at `timeout`. `Ok` only on exit status 0.
pub async fn run_action(
    argv: &[String],
    output: &Path,
    timeout: Duration,
) -> Result<String, String> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| "the rollback command is empty".to_string())?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .map_err(|e| format!("cannot open {}: {e}", output.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", output.display()))?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {prog}: {e}"))?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(format!("`{}` exited 0", argv.join(" "))),
        Ok(Ok(status)) => Err(format!("`{}` {}", argv.join(" "), describe_exit(status))),
        Ok(Err(e)) => Err(format!("waiting for {prog}: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            Err(format!(
                "`{}` did not finish within {}; killed",
                argv.join(" "),
                humantime::format_duration(timeout)
            ))
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended abnormally".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dir: &Path, boot: &str) -> HostPaths {
        let p = dir.join(BOOT_ID);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("{boot}\n")).unwrap();
        HostPaths::new(dir).unwrap()
    }

    fn cfg(dir: &Path, command: &str) -> Config {
        Config {
            state_dir: dir.join("state"),
            host: host(dir, "boot-1"),
            node: "raccoon00".into(),
            command: Some(command.into()),
            action_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn templates_with_unknown_placeholders_or_bad_quotes_are_refused() {
        assert_eq!(
            parse_template("rollback {nodes}").unwrap_err(),
            "rollback command \"rollback {nodes}\": unknown placeholder {nodes}; known: {node}, {generation}"
        );
        assert!(parse_template("echo 'x")
            .unwrap_err()
            .contains("unbalanced quotes"));
        assert_eq!(
            parse_template("  ").unwrap_err(),
            "the rollback command is empty"
        );
        assert_eq!(
            parse_template("lab rollback --dir '/a b' {node}").unwrap(),
            vec!["lab", "rollback", "--dir", "/a b", "{node}"]
        );
    }

    #[test]
    fn run_ids_are_names() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(check_run_id(bad).is_err(), "{bad:?}");
        }
        check_run_id("run-2026.12.01_1").unwrap();
    }

    #[test]
    fn the_nixos_generation_is_read_from_the_profile_links() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path(), "b");
        assert_eq!(nixos_generation(&h).unwrap(), None);
        let profiles = d.path().join("nix/var/nix/profiles");
        fs::create_dir_all(&profiles).unwrap();
        std::os::unix::fs::symlink(
            "/nix/store/abc-nixos-system-opi01",
            profiles.join("system-42-link"),
        )
        .unwrap();
        std::os::unix::fs::symlink("system-42-link", profiles.join("system")).unwrap();
        assert_eq!(
            nixos_generation(&h).unwrap(),
            Some((42, "/nix/store/abc-nixos-system-opi01".into()))
        );
        let c = Config {
            command: None,
            ..cfg(d.path(), "x")
        };
        let t = c.resolve_target().unwrap();
        assert_eq!(
            t.argv,
            vec![
                "systemctl",
                "start",
                "--wait",
                "cnishift-rollback@42.service"
            ]
        );
        fs::remove_file(profiles.join("system")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", profiles.join("system")).unwrap();
        assert_eq!(
            nixos_generation(&h).unwrap_err(),
            "/nix/var/nix/profiles/system points to /etc/passwd, not a system-N-link"
        );
    }

    #[test]
    fn no_action_means_arming_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let c = Config {
            command: None,
            ..cfg(d.path(), "x")
        };
        let s = Switch::open(c).unwrap();
        let e = s.arm("r1", Duration::from_secs(5), 1).unwrap_err();
        assert!(
            matches!(&e, Refused::Unavailable(m) if m.starts_with("no rollback action on this node")),
            "{e:?}"
        );
        assert!(
            load(&d.path().join("state")).unwrap().is_none(),
            "nothing recorded"
        );
        let c = cfg(d.path(), "rollback {generation}");
        let e = Switch::open(c)
            .unwrap()
            .arm("r1", Duration::from_secs(5), 1)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("uses {generation}, but /nix/var/nix/profiles/system does not exist"),
            "{e}"
        );
    }

    #[test]
    fn one_run_at_a_time_same_run_is_idempotent_and_confirm_needs_a_new_connection() {
        let d = tempfile::tempdir().unwrap();
        let s = Switch::open(cfg(d.path(), "true {node}")).unwrap();
        let v = s.arm("r1", Duration::from_secs(60), 7).unwrap();
        assert!(v.armed && v.remaining_ms > 59_000, "{v:?}");
        let on_disk = load(&d.path().join("state")).unwrap().unwrap();
        assert_eq!(on_disk.phase, Phase::Armed);
        assert_eq!(on_disk.target.argv, vec!["true", "raccoon00"]);
        let again = s.arm("r1", Duration::from_secs(600), 7).unwrap();
        assert_eq!(
            again.timeout_ms, 60_000,
            "re-arming the same run keeps its deadline"
        );
        let e = s.arm("r2", Duration::from_secs(60), 8).unwrap_err();
        assert!(
            e.to_string().starts_with("already armed by run r1 ("),
            "{e}"
        );
        let e = s.confirm("r1", 7).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Confirm came over the connection that armed"),
            "{e}"
        );
        assert!(s
            .confirm("r2", 8)
            .unwrap_err()
            .to_string()
            .contains("armed by run r1, not r2"));
        let v = s.confirm("r1", 8).unwrap();
        assert_eq!((v.armed, v.outcome.as_str()), (false, "confirmed"));
        assert_eq!(
            load(&d.path().join("state")).unwrap().unwrap().phase,
            Phase::Confirmed
        );
        // Settled: a new run may arm.
        s.arm("r2", Duration::from_secs(60), 9).unwrap();
        assert_eq!(s.disarm("r2").unwrap().outcome, "disarmed");
    }

    #[test]
    fn timeouts_out_of_range_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = Switch::open(cfg(d.path(), "true")).unwrap();
        for t in [
            Duration::ZERO,
            Duration::from_millis(999),
            Duration::from_secs(24 * 3600 + 1),
        ] {
            assert!(
                matches!(s.arm("r", t, 1), Err(Refused::Invalid(_))),
                "{t:?}"
            );
        }
    }

    #[test]
    fn a_new_boot_restarts_the_countdown_and_an_interrupted_action_runs_once_more_then_holds() {
        let d = tempfile::tempdir().unwrap();
        let s = Switch::open(cfg(d.path(), "true")).unwrap();
        s.arm("r1", Duration::from_secs(30), 1).unwrap();
        drop(s);
        // Same boot: the deadline stays.
        let mut rec = load(&d.path().join("state")).unwrap().unwrap();
        let s = Switch::open(cfg(d.path(), "true")).unwrap();
        assert!(!s.view().rebooted_while_armed);
        drop(s);
        // New boot: whole timeout again, said so.
        let mut c = cfg(d.path(), "true");
        c.host = host(d.path(), "boot-2");
        let s = Switch::open(c.clone()).unwrap();
        let v = s.view();
        assert!(
            v.armed && v.rebooted_while_armed && v.remaining_ms > 29_000,
            "{v:?}"
        );
        drop(s);
        // Interrupted once: runs once more.
        rec = Record {
            phase: Phase::Firing,
            attempts: 1,
            boot_id: "boot-2".into(),
            ..rec
        };
        write(&d.path().join("state").join(STATE_FILE), &rec).unwrap();
        let s = Switch::open(c.clone()).unwrap();
        assert!(matches!(s.due(), Due::Fire));
        drop(s);
        // Interrupted twice: held.
        rec.attempts = 2;
        write(&d.path().join("state").join(STATE_FILE), &rec).unwrap();
        let s = Switch::open(c).unwrap();
        let v = s.view();
        assert_eq!(v.outcome, "interrupted");
        assert!(matches!(s.due(), Due::Idle));
        let e = s.arm("r9", Duration::from_secs(5), 1).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the last rollback (run r1) was interrupted"),
            "{e}"
        );
        assert_eq!(s.disarm("r1").unwrap().outcome, "disarmed");
        s.arm("r9", Duration::from_secs(5), 1).unwrap();
    }

    #[test]
    fn a_damaged_state_file_is_an_error_that_names_it() {
        let d = tempfile::tempdir().unwrap();
        let st = d.path().join("state");
        fs::create_dir_all(&st).unwrap();
        fs::write(st.join(STATE_FILE), "{\"run_id\": \"r1\", \"timeo").unwrap();
        let e = Switch::open(cfg(d.path(), "true")).err().unwrap();
        assert!(
            e.contains("rollback.json is damaged (") && e.ends_with("move it away to start afresh"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_action_is_bounded_and_its_group_killed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out.log");
        let argv: Vec<String> = ["sh", "-c", "echo starting; sleep 30 & sleep 30"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let t = std::time::Instant::now();
        let e = run_action(&argv, &out, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(e.ends_with("did not finish within 300ms; killed"), "{e}");
        assert_eq!(fs::read_to_string(&out).unwrap(), "starting\n");
        let argv: Vec<String> = ["sh", "-c", "echo no >&2; exit 3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            run_action(&argv, &out, Duration::from_secs(5))
                .await
                .unwrap_err(),
            "`sh -c echo no >&2; exit 3` exited 3"
        );
        assert!(tail(&out).ends_with("no\n"));
    }
}
