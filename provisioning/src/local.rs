//! The `local` provider: an "instance" is a `stagely-agent` process on this machine.
//!
//! It boots from the same rendered user-data a cloud VM gets: the `agent.toml` that the
//! user-data would write is read back out of it and written into the instance's directory,
//! with the instance's own work directory (so each instance has its own builder storage, as a
//! VM has its own disk). The agent runs in its own session (`setsid`), so terminating the
//! instance kills every process of that session, builder children included, the way powering
//! off a VM would.
//!
//! An instance is made as separate as a VM can be made on one host: the agent starts with a
//! minimal environment (nothing of the core's: no registry password, no API token), and,
//! where the host allows it (root and util-linux `unshare`), as PID 1 of its own PID and mount
//! namespaces with a private `/proc`, so neither it nor anything it starts sees or signals
//! the core or another instance. Builds add their own container per `RUN` step on top.
//!
//! State is kept on disk (`<base_dir>/<id>/instance.json`), so a core that restarts after a
//! crash can still list and terminate instances it started before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use stagely_protocol::Arch;

use crate::{Instance, InstanceState, MachineSpec, Provider, ProviderError};

/// `PATH` of a local agent: what a builder VM's init gives it, not the core's.
const AGENT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Run inside the new namespaces before the agent: a fresh `/proc` has no binfmt_misc mount,
/// and the agent reads it to know which architectures QEMU emulates. Then the agent replaces
/// the shell and is PID 1 of the namespace: when it dies, the kernel kills everything left
/// inside.
const NAMESPACE_INIT: &str = "if [ -d /proc/sys/fs/binfmt_misc ]; then mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null; fi; exec \"$0\" \"$@\"";

/// Whether agents can be started in their own PID and mount namespaces here (probed once:
/// it needs CAP_SYS_ADMIN and util-linux `unshare`).
pub fn namespaces_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::process::Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "--",
                "true",
            ])
            .env_clear()
            .env("PATH", AGENT_PATH)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

/// Puts the shell in the cgroup whose `cgroup.procs` is `$0`, then becomes the command.
const JOIN_CGROUP: &str = "echo $$ > \"$0\" && exec \"$@\"";

/// The cgroup (under each hierarchy's root) holding one child cgroup per local instance.
const CGROUP_NAME: &str = "stagely";

/// The pids hierarchy's `stagely` cgroup, made ready for instance cgroups (once): cgroup v1's
/// `pids` hierarchy, or the unified v2 one with the pids controller enabled down to it.
/// `None`: no writable pids controller here (not root, or none mounted).
fn pids_root() -> Option<&'static Path> {
    static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let v2 = Path::new("/sys/fs/cgroup");
        let root = if v1.join("cgroup.procs").exists() {
            let root = v1.join(CGROUP_NAME);
            std::fs::create_dir_all(&root).ok()?;
            root
        } else {
            let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).ok()?;
            if !controllers.split_whitespace().any(|c| c == "pids") {
                return None;
            }
            std::fs::write(v2.join("cgroup.subtree_control"), "+pids").ok()?;
            let root = v2.join(CGROUP_NAME);
            std::fs::create_dir_all(&root).ok()?;
            std::fs::write(root.join("cgroup.subtree_control"), "+pids").ok()?;
            root
        };
        // Probe: an instance cgroup can be made here.
        let probe = root.join(format!("probe-{}", std::process::id()));
        std::fs::create_dir(&probe).ok()?;
        let writable = probe.join("pids.max").exists();
        let _ = std::fs::remove_dir(&probe);
        writable.then_some(root)
    })
    .as_deref()
}

/// Whether loop-mounted work directories can be made here (root, `mkfs.ext4`, loop
/// devices), probed once.
fn disk_limits_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        nix::unistd::geteuid().is_root()
            && Path::new("/dev/loop-control").exists()
            && std::process::Command::new("mkfs.ext4")
                .arg("-V")
                .env_clear()
                .env("PATH", AGENT_PATH)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
    })
}

/// Runs a set-up command (mkfs, mount, umount); its stderr names what failed.
async fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    // Nothing of the core's environment (its secrets) reaches a child.
    let output = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", AGENT_PATH)
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "{program} failed ({}): {}",
        output.status,
        stderr.trim()
    ))
}

/// Every process in `dir` and the cgroups below it.
fn cgroup_members(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(
                text.lines()
                    .filter_map(|line| line.trim().parse::<i32>().ok()),
            );
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    out
}

/// Removes a cgroup and the cgroups below it (children first). Only empty ones go.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// How long a terminated agent gets to stop its build before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// Kernel-enforced limits of each local instance (`[provider.local]`), as a VM's size would
/// bound it. 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalLimits {
    /// Most processes and threads at once in the instance, agent, builder and `RUN`
    /// containers included: a pids cgroup (`pids.max`).
    pub max_pids: u32,
    /// Size of the instance's work directory (checkout, builder storage, spool): a
    /// loop-mounted ext4 file system of this many MiB, sparse (it takes only what is written).
    pub max_disk_mib: u64,
}

impl Default for LocalLimits {
    fn default() -> LocalLimits {
        LocalLimits {
            max_pids: 2048,
            max_disk_mib: 20480,
        }
    }
}

/// Runs builder instances as local agent processes.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    agent_binary: PathBuf,
    base_dir: PathBuf,
    host_arch: Arch,
    limits: LocalLimits,
}

#[derive(Debug, Serialize, Deserialize)]
struct InstanceRecord {
    id: String,
    host_arch: Arch,
    requested_arch: Arch,
    tags: BTreeMap<String, String>,
    /// The agent runs in its own PID and mount namespaces.
    #[serde(default)]
    namespaced: bool,
    /// Set once the agent is started. The record itself is written before the start, so a
    /// crash in between still leaves an instance the reaper can find.
    #[serde(default)]
    agent: Option<AgentProcess>,
    /// The instance's pids cgroup (removed at termination).
    #[serde(default)]
    cgroup: Option<PathBuf>,
    /// The work directory is a loop-mounted file system (`disk.img`), unmounted at
    /// termination.
    #[serde(default)]
    disk: bool,
}

/// Identifies the agent process beyond its PID, which the kernel reuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AgentProcess {
    pid: i32,
    /// Field 22 of /proc/PID/stat: start time in clock ticks after boot.
    start_time: u64,
    /// /proc/sys/kernel/random/boot_id at start.
    boot_id: String,
}

impl LocalProvider {
    /// `agent_binary`: path of `stagely-agent`; `base_dir`: where instance directories go.
    pub fn new(agent_binary: PathBuf, base_dir: PathBuf) -> Result<LocalProvider, ProviderError> {
        crate::private_dir(&base_dir).map_err(|source| ProviderError::Io {
            path: base_dir.display().to_string(),
            source,
        })?;
        let host_arch =
            Arch::from_rust_arch(std::env::consts::ARCH).ok_or(ProviderError::UnsupportedArch {
                requested: Arch::Amd64,
                reason: format!("unsupported host architecture {}", std::env::consts::ARCH),
            })?;
        Ok(LocalProvider {
            agent_binary,
            base_dir,
            host_arch,
            limits: LocalLimits::default(),
        })
    }

    /// The same provider with `limits` for the instances it starts.
    pub fn with_limits(self, limits: LocalLimits) -> LocalProvider {
        LocalProvider { limits, ..self }
    }

    /// Where an instance's files live (its `agent.log` stays after termination).
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.base_dir.join(id)
    }

    fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ProviderError + '_ {
        move |source| ProviderError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    async fn write_record(&self, record: &InstanceRecord) -> Result<(), ProviderError> {
        let path = self.instance_dir(&record.id).join("instance.json");
        let text = serde_json::to_vec_pretty(record).map_err(|error| ProviderError::Instance {
            id: record.id.clone(),
            detail: error.to_string(),
        })?;
        tokio::fs::write(&path, text)
            .await
            .map_err(Self::io_error(&path))
    }

    fn read_record(&self, id: &str) -> Option<InstanceRecord> {
        let text = std::fs::read_to_string(self.instance_dir(id).join("instance.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Makes the instance's pids cgroup and its work directory's file system, as far as this
    /// host allows (root, a pids controller, loop devices); where it does not, says so once
    /// per instance and goes on without (as without namespaces).
    async fn apply_limits(
        &self,
        record: &mut InstanceRecord,
        work_dir: &Path,
    ) -> Result<(), ProviderError> {
        let id = record.id.clone();
        let failed = |detail: String| ProviderError::Instance {
            id: id.clone(),
            detail,
        };
        if self.limits.max_pids > 0 {
            match pids_root() {
                Some(root) => {
                    let dir = root.join(&id);
                    let made = std::fs::create_dir(&dir)
                        .and_then(|()| {
                            std::fs::write(dir.join("pids.max"), self.limits.max_pids.to_string())
                        })
                        .and_then(|()| std::fs::create_dir(dir.join("agent")));
                    record.cgroup = Some(dir.clone());
                    made.map_err(|error| {
                        failed(format!("cannot make its cgroup {}: {error}", dir.display()))
                    })?;
                }
                None => tracing::warn!(
                    instance_id = %id,
                    "this host has no writable pids cgroup (needs root): max_pids is not enforced"
                ),
            }
        }
        if self.limits.max_disk_mib > 0 {
            if disk_limits_available() {
                let image = self.instance_dir(&id).join("disk.img");
                let bytes = self.limits.max_disk_mib.saturating_mul(1024 * 1024);
                let file = std::fs::File::create(&image)
                    .and_then(|file| file.set_len(bytes))
                    .map_err(|error| failed(format!("cannot make {}: {error}", image.display())));
                file?;
                run_tool(
                    "mkfs.ext4",
                    &[
                        "-q",
                        "-F",
                        "-m",
                        "0",
                        "-O",
                        "^has_journal",
                        "-E",
                        "lazy_itable_init=1,nodiscard",
                    ]
                    .map(std::ffi::OsStr::new)
                    .into_iter()
                    .chain([image.as_os_str()])
                    .collect::<Vec<_>>(),
                )
                .await
                .map_err(failed)?;
                run_tool(
                    "mount",
                    &[
                        std::ffi::OsStr::new("-o"),
                        std::ffi::OsStr::new("loop"),
                        image.as_os_str(),
                        work_dir.as_os_str(),
                    ],
                )
                .await
                .map_err(failed)?;
                record.disk = true;
                // The new file system's root is 0755: the instance's work dir stays private.
                crate::private_dir(work_dir).map_err(Self::io_error(work_dir))?;
            } else {
                tracing::warn!(
                    instance_id = %id,
                    "this host cannot loop-mount work directories (needs root, mkfs.ext4 and loop devices): max_disk_mib is not enforced"
                );
            }
        }
        Ok(())
    }
}

/// Whether this kernel can run binaries of `arch` through binfmt_misc (QEMU user emulation).
pub fn emulation_available(arch: Arch) -> bool {
    let name = match arch {
        Arch::Arm64 => "qemu-aarch64",
        Arch::Amd64 => "qemu-x86_64",
    };
    std::fs::read_to_string(Path::new("/proc/sys/fs/binfmt_misc").join(name))
        .is_ok_and(|text| text.lines().next() == Some("enabled"))
}

/// Whether `path` is where a file system is mounted (a line of /proc/self/mountinfo).
fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.display().to_string();
    // Field 5 is the mount point, with spaces and other specials octal-escaped.
    info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|point| point.replace("\\040", " ") == wanted)
    })
}

fn valid_instance_id(id: &str) -> bool {
    id.starts_with("local-")
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// How long terminate keeps sending SIGKILL before it reports failure.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// One process as /proc shows it.
struct ProcessInfo {
    pid: i32,
    session: i32,
    start_time: u64,
    cmdline: String,
}

/// Every live (non-zombie) process.
fn processes() -> Vec<ProcessInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which is wrapped in parentheses and may contain any
        // character: state(3) ppid(4) pgrp(5) session(6) ... starttime(22).
        let Some(after_comm) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // A zombie has exited already; it only waits to be reaped by its parent.
        if fields.first() == Some(&"Z") {
            continue;
        }
        let (Some(session), Some(start_time)) = (
            fields.get(3).and_then(|s| s.parse().ok()),
            fields.get(19).and_then(|s| s.parse().ok()),
        ) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
            .unwrap_or_default();
        out.push(ProcessInfo {
            pid,
            session,
            start_time,
            cmdline,
        });
    }
    out
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|text| text.trim().to_string())
        .unwrap_or_default()
}

fn agent_process(pid: i32) -> Option<AgentProcess> {
    let start_time = processes()
        .into_iter()
        .find(|process| process.pid == pid)?
        .start_time;
    Some(AgentProcess {
        pid,
        start_time,
        boot_id: boot_id(),
    })
}

/// The sessions that belong to an instance: the recorded agent's (only if that PID still
/// is our agent, or its session still exists: the kernel does not reuse a PID that is a
/// live session id), and the session of every process whose command line names the
/// instance's directory (agent, git, builder).
fn instance_sessions(agent: Option<&AgentProcess>, dir: &Path, all: &[ProcessInfo]) -> Vec<i32> {
    let mut sessions = std::collections::BTreeSet::new();
    if let Some(agent) = agent
        && agent.boot_id == boot_id()
    {
        let leader = all.iter().find(|p| p.pid == agent.pid);
        let ours = match leader {
            Some(process) => process.start_time == agent.start_time,
            None => all.iter().any(|p| p.session == agent.pid),
        };
        if ours {
            sessions.insert(agent.pid);
        }
    }
    let needle = format!("{}/", dir.display());
    for process in all {
        if process.cmdline.contains(&needle) {
            sessions.insert(process.session);
        }
    }
    // Never our own session (nor init's): the core's own children name the instance's
    // directory too (mkfs, mount, umount of its disk), and signalling their session would
    // signal the core and everything that shares its session (a CI run's whole tree).
    let own = nix::unistd::getsid(None).map(|sid| sid.as_raw()).ok();
    sessions.retain(|&session| session > 1 && Some(session) != own);
    sessions.into_iter().collect()
}

/// Live processes in any of `sessions`.
fn session_members(sessions: &[i32]) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|p| sessions.contains(&p.session))
        .map(|p| p.pid)
        .collect()
}

/// Signals every member of `sessions`; returns how many there were.
fn signal_sessions(sessions: &[i32], signal: Signal) -> usize {
    let members = session_members(sessions);
    for pid in &members {
        // The process may have exited between the scan and the signal: that is fine.
        let _ = kill(Pid::from_raw(*pid), signal);
    }
    members.len()
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create_instance(&self, spec: &MachineSpec) -> Result<Instance, ProviderError> {
        let bootstrap = stagely_cloud_init::read_user_data(&spec.user_data)?;
        let emulated = spec.arch != self.host_arch;
        if emulated && !emulation_available(spec.arch) {
            return Err(ProviderError::UnsupportedArch {
                requested: spec.arch,
                reason: format!(
                    "this {} host has no binfmt_misc handler for {} (install qemu-user-static and run scripts/setup.sh)",
                    self.host_arch, spec.arch
                ),
            });
        }

        let id = format!("local-{}", uuid::Uuid::new_v4().simple());
        let dir = self.instance_dir(&id);
        let work_dir = dir.join("work");
        crate::private_dir(&dir).map_err(Self::io_error(&dir))?;
        crate::private_dir(&work_dir).map_err(Self::io_error(&work_dir))?;

        // The record exists before the disk and cgroup do: a failure (or crash) from here on
        // leaves an instance the reaper finds and terminate tidies up.
        let mut record = InstanceRecord {
            id: id.clone(),
            host_arch: self.host_arch,
            requested_arch: spec.arch,
            tags: spec.tags.clone(),
            namespaced: namespaces_available(),
            agent: None,
            cgroup: None,
            disk: false,
        };
        self.write_record(&record).await?;
        if let Err(error) = self.apply_limits(&mut record, &work_dir).await {
            let _ = self.terminate_instance(&id).await;
            return Err(error);
        }
        self.write_record(&record).await?;

        let mut agent = bootstrap.agent;
        agent.work_dir = Some(work_dir);
        agent.instance_id = Some(id.clone());
        if record.cgroup.is_some() {
            agent.cgroup_parent = Some(format!("/{CGROUP_NAME}/{id}/build"));
        }
        if let Some(pem) = &bootstrap.ca_pem {
            let ca_path = dir.join("ca.pem");
            tokio::fs::write(&ca_path, pem)
                .await
                .map_err(Self::io_error(&ca_path))?;
            agent.ca_file = Some(ca_path);
        }
        let config_text = toml::to_string(&agent).map_err(|error| ProviderError::Instance {
            id: id.clone(),
            detail: format!("cannot write agent.toml: {error}"),
        })?;
        let config_path = dir.join("agent.toml");
        write_private(&config_path, config_text.as_bytes())
            .await
            .map_err(Self::io_error(&config_path))?;

        let log_path = dir.join("agent.log");
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&log_path)
                .map_err(Self::io_error(&log_path))?
        };
        let log_err = log.try_clone().map_err(Self::io_error(&log_path))?;

        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(cgroup) = &record.cgroup {
            // Joins the instance's cgroup before anything else starts: every process of the
            // instance is born in it.
            argv.extend(["/bin/sh".into(), "-c".into(), JOIN_CGROUP.into()]);
            argv.push(cgroup.join("agent/cgroup.procs").into());
        }
        if record.namespaced {
            argv.extend(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount-proc",
                    "--kill-child",
                    "--",
                ]
                .map(Into::into),
            );
            argv.extend(["/bin/sh", "-c", NAMESPACE_INIT].map(Into::into));
        } else {
            tracing::warn!(
                instance_id = %id,
                "this host does not allow PID and mount namespaces (needs root and util-linux unshare); the agent shares the host's"
            );
        }
        argv.push(self.agent_binary.clone().into());
        let mut command = std::process::Command::new(&argv[0]);
        command.args(&argv[1..]);
        // Nothing of the core's environment: an instance is a separate machine.
        command
            .env_clear()
            .env("PATH", AGENT_PATH)
            .env("HOME", &dir)
            .env("LANG", "C.UTF-8")
            .arg("--config")
            .arg(&config_path)
            .env("STAGELY_INSTANCE_ID", &id)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // The agent leads its own session, like the init of a VM: terminating the instance
        // signals the whole session, builder processes included.
        // SAFETY: `setsid` is async-signal-safe and touches no memory of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().map_err(|source| ProviderError::Spawn {
            path: self.agent_binary.display().to_string(),
            source,
        })?;
        let pid = child.id() as i32;
        // Reap the process when it exits so it never lingers as a zombie; termination works
        // through the session, not through this handle.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        record.agent = agent_process(pid);
        if let Err(error) = self.write_record(&record).await {
            // Without a record nobody could terminate it later: stop it now.
            let _ = self.terminate_instance(&id).await;
            return Err(error);
        }

        tracing::info!(instance_id = %id, pid, arch = %spec.arch, emulated, "local instance started");
        Ok(Instance {
            id,
            instance_type: format!("local-{}", spec.size.as_str()),
            host_arch: self.host_arch,
            emulated,
            tags: spec.tags.clone(),
            market: None,
            notice: None,
        })
    }

    async fn terminate_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        if !valid_instance_id(instance_id) {
            return Err(ProviderError::Instance {
                id: instance_id.to_string(),
                detail: "not a local instance id".into(),
            });
        }
        let Some(record) = self.read_record(instance_id) else {
            // Never created, or already terminated: idempotent success.
            return Ok(());
        };
        let dir = self.instance_dir(instance_id);
        let all = processes();
        let sessions = instance_sessions(record.agent.as_ref(), &dir, &all);
        // Which processes a termination stops (by name, never arguments): a post-mortem of
        // an instance stopped early starts here.
        let stopping: Vec<String> = all
            .iter()
            .filter(|process| sessions.contains(&process.session))
            .map(|process| {
                // Read only here: the scans that follow (every 50 ms) need no names.
                let name = std::fs::read_to_string(format!("/proc/{}/comm", process.pid))
                    .unwrap_or_default();
                format!("{} {}", process.pid, name.trim_end())
            })
            .collect();
        if !stopping.is_empty() {
            tracing::info!(instance_id, ?sessions, processes = ?stopping, "stopping the instance's processes");
        }
        if signal_sessions(&sessions, Signal::SIGTERM) > 0 {
            let grace = tokio::time::Instant::now() + TERMINATE_GRACE;
            // An agent that is done exits within milliseconds of SIGTERM: look again soon,
            // then less and less often (2, 4, ... 50 ms).
            let mut pause = Duration::from_millis(2);
            while !session_members(&sessions).is_empty() && tokio::time::Instant::now() < grace {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            let deadline = tokio::time::Instant::now() + KILL_DEADLINE;
            while signal_sessions(&sessions, Signal::SIGKILL) > 0 {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ProviderError::Instance {
                        id: instance_id.to_string(),
                        detail: format!(
                            "processes of sessions {sessions:?} survived SIGKILL for {}s",
                            KILL_DEADLINE.as_secs()
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Whatever runs in the instance's cgroup went too (RUN containers are in other
        // sessions); then the cgroup itself, and what the container runtime made beside it
        // in the other hierarchies (cgroup v1).
        if let Some(cgroup) = &record.cgroup {
            let deadline = tokio::time::Instant::now() + KILL_DEADLINE;
            loop {
                let members = cgroup_members(cgroup);
                if members.is_empty() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ProviderError::Instance {
                        id: instance_id.to_string(),
                        detail: format!(
                            "processes {members:?} of its cgroup survived SIGKILL for {}s",
                            KILL_DEADLINE.as_secs()
                        ),
                    });
                }
                for pid in members {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            remove_cgroup_tree(cgroup);
            if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
                for hierarchy in hierarchies.flatten() {
                    remove_cgroup_tree(&hierarchy.path().join(CGROUP_NAME).join(instance_id));
                }
            }
        }
        let work = dir.join("work");
        if record.disk {
            // Busy for a moment after its last process (the kernel lets go of open files
            // lazily): tried again, then detached (it goes once nothing holds it).
            let mut unmounted = false;
            for _ in 0..10 {
                if !is_mount_point(&work) {
                    unmounted = true;
                    break;
                }
                if run_tool("umount", &[work.as_os_str()]).await.is_ok() {
                    unmounted = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !unmounted {
                run_tool("umount", &[std::ffi::OsStr::new("-l"), work.as_os_str()])
                    .await
                    .map_err(|detail| ProviderError::Instance {
                        id: instance_id.to_string(),
                        detail,
                    })?;
            }
            let image = dir.join("disk.img");
            match tokio::fs::remove_file(&image).await {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(Self::io_error(&image)(error)),
            }
        }
        // Drop the instance's disk but keep its agent.log for post-mortems.
        let removed = tokio::task::spawn_blocking(move || {
            if work.exists() {
                std::fs::remove_dir_all(&work)?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|error| ProviderError::Instance {
            id: instance_id.to_string(),
            detail: format!("cleanup task failed: {error}"),
        })?;
        removed.map_err(Self::io_error(&dir))?;
        for file in ["agent.toml", "ca.pem", "instance.json"] {
            let path = dir.join(file);
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(Self::io_error(&path)(error)),
            }
        }
        tracing::info!(instance_id, "local instance terminated");
        Ok(())
    }

    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError> {
        if !valid_instance_id(instance_id) {
            return Err(ProviderError::Instance {
                id: instance_id.to_string(),
                detail: "not a local instance id".into(),
            });
        }
        let Some(record) = self.read_record(instance_id) else {
            return Ok(InstanceState::Gone {
                detail: "no such local instance (terminated)".into(),
            });
        };
        let dir = self.instance_dir(instance_id);
        let state = tokio::task::spawn_blocking(move || {
            let all = processes();
            let sessions = instance_sessions(record.agent.as_ref(), &dir, &all);
            if all
                .iter()
                .any(|process| sessions.contains(&process.session))
            {
                InstanceState::Running
            } else {
                let detail = match record.agent {
                    Some(agent) => format!("its agent (process {}) has exited", agent.pid),
                    None => "its agent was never started".to_string(),
                };
                InstanceState::Gone { detail }
            }
        })
        .await
        .map_err(|error| ProviderError::Instance {
            id: instance_id.to_string(),
            detail: format!("process scan failed: {error}"),
        })?;
        Ok(state)
    }

    async fn list_instances(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.base_dir)
            .await
            .map_err(Self::io_error(&self.base_dir))?;
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(Self::io_error(&self.base_dir))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !valid_instance_id(&name) {
                continue;
            }
            let Some(record) = self.read_record(&name) else {
                continue;
            };
            if tags
                .iter()
                .all(|(key, value)| record.tags.get(key) == Some(value))
            {
                out.push(Instance {
                    id: record.id,
                    instance_type: "local".into(),
                    host_arch: record.host_arch,
                    emulated: record.host_arch != record.requested_arch,
                    tags: record.tags,
                    market: None,
                    notice: None,
                });
            }
        }
        Ok(out)
    }
}

async fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.to_path_buf();
    let bytes = bytes.to_vec();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(&bytes)
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MachineSize;
    use stagely_cloud_init::{AgentConfig, Bootstrap, render_user_data};

    fn spec(tags: &[(&str, &str)]) -> MachineSpec {
        MachineSpec {
            size: MachineSize::Small,
            arch: Arch::from_rust_arch(std::env::consts::ARCH).unwrap(),
            user_data: render_user_data(&Bootstrap {
                agent: AgentConfig::new("http://127.0.0.1:9", "secret-token"),
                ca_pem: None,
            })
            .unwrap(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            on_demand_only: false,
        }
    }

    /// A stand-in "agent" that checks its config carries the token, starts a grandchild in
    /// its own process group (`set -m`) and sleeps,
    /// to prove termination reaches every process of the instance.
    fn fake_agent(dir: &Path) -> PathBuf {
        let path = dir.join("fake-agent.sh");
        std::fs::write(
            &path,
            "#!/bin/sh\ngrep -q 'token = \"secret-token\"' \"$2\" || exit 9\nset -m\nsleep 300 &\nsleep 300\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    }

    #[test]
    fn the_core_s_own_session_is_never_an_instance_s() {
        // A child of the core naming the instance's directory (its disk's mkfs or umount)
        // shares the core's session; an orphan builder in a session of its own belongs to it.
        let dir = Path::new("/var/lib/stagely/instances/local-1");
        let own = nix::unistd::getsid(None).unwrap().as_raw();
        let process = |pid: i32, session: i32| ProcessInfo {
            pid,
            session,
            start_time: 1,
            cmdline: format!("umount {}/work", dir.display()),
        };
        let all = [process(100, own), process(200, 4242), process(300, 1)];
        assert_eq!(instance_sessions(None, dir, &all), vec![4242]);
    }

    #[tokio::test]
    async fn create_list_terminate_kills_the_whole_session() {
        let dir = tempfile::tempdir().unwrap();
        let provider =
            LocalProvider::new(fake_agent(dir.path()), dir.path().join("instances")).unwrap();
        let instance = provider
            .create_instance(&spec(&[("stagely-core", "t1"), ("job", "a")]))
            .await
            .unwrap();
        assert!(!instance.emulated);
        let record = provider.read_record(&instance.id).unwrap();
        // Wait for the fake agent to start its children.
        for _ in 0..100 {
            if session_members(&[record.agent.as_ref().unwrap().pid]).len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let members = session_members(&[record.agent.as_ref().unwrap().pid]);
        assert!(members.len() >= 2, "agent and grandchild run: {members:?}");

        let only = BTreeMap::from([("stagely-core".to_string(), "t1".to_string())]);
        let listed = provider.list_instances(&only).await.unwrap();
        assert_eq!(listed.len(), 1);
        let other = BTreeMap::from([("stagely-core".to_string(), "t2".to_string())]);
        assert!(provider.list_instances(&other).await.unwrap().is_empty());

        provider.terminate_instance(&instance.id).await.unwrap();
        assert!(session_members(&[record.agent.as_ref().unwrap().pid]).is_empty());
        assert!(provider.list_instances(&only).await.unwrap().is_empty());
        // Idempotent.
        provider.terminate_instance(&instance.id).await.unwrap();
        provider
            .terminate_instance("local-doesnotexist")
            .await
            .unwrap();
        assert!(provider.terminate_instance("../etc").await.is_err());
        // The token-bearing config is gone; the log stays.
        let idir = provider.instance_dir(&instance.id);
        assert!(!idir.join("agent.toml").exists());
        assert!(idir.join("agent.log").exists());
    }

    /// `[provider.local] max_pids` and `max_disk_mib`: the instance's processes are born in
    /// its pids cgroup and its work directory is a file system of that size, both gone once
    /// it is terminated.
    #[tokio::test]
    async fn an_instance_is_bounded_by_its_cgroup_and_its_own_disk() {
        if pids_root().is_none() || !disk_limits_available() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI: this host must allow pids cgroups and loop mounts (root)"
            );
            eprintln!("skipped: needs root, a pids cgroup and loop devices");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let provider = LocalProvider::new(fake_agent(dir.path()), dir.path().join("instances"))
            .unwrap()
            .with_limits(LocalLimits {
                max_pids: 16,
                max_disk_mib: 32,
            });
        let instance = provider.create_instance(&spec(&[])).await.unwrap();
        let record = provider.read_record(&instance.id).unwrap();
        let cgroup = record.cgroup.clone().unwrap();
        assert_eq!(
            std::fs::read_to_string(cgroup.join("pids.max"))
                .unwrap()
                .trim(),
            "16"
        );
        let agent = record.agent.as_ref().unwrap().pid;
        for _ in 0..100 {
            if cgroup_members(&cgroup).contains(&agent) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            cgroup_members(&cgroup).contains(&agent),
            "the agent runs in its instance's cgroup"
        );
        let work = provider.instance_dir(&instance.id).join("work");
        assert!(is_mount_point(&work));
        let stats = nix::sys::statvfs::statvfs(&work).unwrap();
        let size = stats.blocks() as u64 * stats.fragment_size() as u64;
        assert!(
            size <= 32 * 1024 * 1024 && size > 16 * 1024 * 1024,
            "{size}"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&work).unwrap().permissions().mode() & 0o777,
            0o700
        );
        provider.terminate_instance(&instance.id).await.unwrap();
        assert!(!cgroup.exists(), "its cgroup is removed");
        assert!(!is_mount_point(&work), "its disk is unmounted");
        assert!(
            !provider
                .instance_dir(&instance.id)
                .join("disk.img")
                .exists()
        );
    }

    #[tokio::test]
    async fn instance_state_follows_the_agent_process() {
        let dir = tempfile::tempdir().unwrap();
        let provider =
            LocalProvider::new(fake_agent(dir.path()), dir.path().join("instances")).unwrap();
        let instance = provider.create_instance(&spec(&[])).await.unwrap();
        assert_eq!(
            provider.instance_state(&instance.id).await.unwrap(),
            InstanceState::Running
        );
        // Killed from outside (what a service manager's restart does to the core's cgroup):
        // the instance's directory and record stay, its processes are gone.
        let pid = provider
            .read_record(&instance.id)
            .unwrap()
            .agent
            .unwrap()
            .pid;
        signal_sessions(&[pid], Signal::SIGKILL);
        let mut state = InstanceState::Running;
        // Up to 10 s: a loaded machine (CI runs 4 tests on 2 cores) reaps the killed process
        // late; the answer is checked as soon as it changes.
        for _ in 0..500 {
            state = provider.instance_state(&instance.id).await.unwrap();
            if state != InstanceState::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            state,
            InstanceState::Gone {
                detail: format!("its agent (process {pid}) has exited")
            }
        );
        provider.terminate_instance(&instance.id).await.unwrap();
        assert!(matches!(
            provider.instance_state(&instance.id).await.unwrap(),
            InstanceState::Gone { .. }
        ));
        assert!(provider.instance_state("../etc").await.is_err());
    }

    #[tokio::test]
    async fn a_stale_record_never_kills_a_process_that_reused_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let provider =
            LocalProvider::new(fake_agent(dir.path()), dir.path().join("instances")).unwrap();
        // An unrelated session leader, as if it got the PID after our agent died.
        let mut bystander = std::process::Command::new("setsid")
            .args(["sleep", "300"])
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pid = bystander.id() as i32;
        let id = "local-stale0000000000000000000000000";
        std::fs::create_dir_all(provider.instance_dir(id)).unwrap();
        let record = InstanceRecord {
            id: id.into(),
            host_arch: Arch::Amd64,
            requested_arch: Arch::Amd64,
            tags: BTreeMap::new(),
            namespaced: false,
            agent: Some(AgentProcess {
                pid,
                start_time: 1,
                boot_id: boot_id(),
            }),
            cgroup: None,
            disk: false,
        };
        provider.write_record(&record).await.unwrap();
        provider.terminate_instance(id).await.unwrap();
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "terminate killed a process that was not the instance's"
        );
        bystander.kill().unwrap();
        bystander.wait().unwrap();
    }

    #[tokio::test]
    async fn bad_user_data_is_refused_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let provider =
            LocalProvider::new(fake_agent(dir.path()), dir.path().join("instances")).unwrap();
        let mut bad = spec(&[]);
        bad.user_data = "#!/bin/sh\necho hi".into();
        let error = provider.create_instance(&bad).await.unwrap_err();
        assert!(error.to_string().contains("#cloud-config"), "{error}");
    }

    #[tokio::test]
    async fn a_new_provider_sees_instances_of_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("instances");
        // Written once: rewriting it while the first instance execs it fails (ETXTBSY).
        let agent = fake_agent(dir.path());
        let first = LocalProvider::new(agent.clone(), base.clone()).unwrap();
        let instance = first.create_instance(&spec(&[("k", "v")])).await.unwrap();
        drop(first);
        // A restarted core builds a fresh provider over the same directory.
        let second = LocalProvider::new(agent, base).unwrap();
        let listed = second.list_instances(&BTreeMap::new()).await.unwrap();
        assert_eq!(listed.len(), 1);
        second.terminate_instance(&instance.id).await.unwrap();
        assert!(
            second
                .list_instances(&BTreeMap::new())
                .await
                .unwrap()
                .is_empty()
        );
    }
}
