//! The `local` provider: an "instance" is a `stagely-agent` process on this machine.
//!
//! It boots from the same rendered user-data a cloud VM gets: the `agent.toml` that the
//! user-data would write is read back out of it and written into the instance's directory,
//! with the instance's own work directory (so each instance has its own builder storage, as a
//! VM has its own disk). The agent runs in its own session (`setsid`), so terminating the
//! instance kills every process of that session, builder children included, the way powering
//! off a VM would.
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

use crate::{Instance, MachineSpec, Provider, ProviderError};

/// How long a terminated agent gets to stop its build before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// Runs builder instances as local agent processes.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    agent_binary: PathBuf,
    base_dir: PathBuf,
    host_arch: Arch,
}

#[derive(Debug, Serialize, Deserialize)]
struct InstanceRecord {
    id: String,
    pid: i32,
    host_arch: Arch,
    requested_arch: Arch,
    tags: BTreeMap<String, String>,
}

impl LocalProvider {
    /// `agent_binary`: path of `stagely-agent`; `base_dir`: where instance directories go.
    pub fn new(agent_binary: PathBuf, base_dir: PathBuf) -> Result<LocalProvider, ProviderError> {
        std::fs::create_dir_all(&base_dir).map_err(|source| ProviderError::Io {
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
        })
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

    fn read_record(&self, id: &str) -> Option<InstanceRecord> {
        let text = std::fs::read_to_string(self.instance_dir(id).join("instance.json")).ok()?;
        serde_json::from_str(&text).ok()
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

fn valid_instance_id(id: &str) -> bool {
    id.starts_with("local-")
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Every live process whose session id is `session`.
fn session_members(session: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut members = Vec::new();
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
        // character: state ppid pgrp session ...
        let Some(after_comm) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // A zombie has exited already; it only waits to be reaped by its parent.
        if fields.first() == Some(&"Z") {
            continue;
        }
        if fields.get(3).and_then(|s| s.parse::<i32>().ok()) == Some(session) {
            members.push(pid);
        }
    }
    members
}

fn signal_session(session: i32, signal: Signal) -> usize {
    let members = session_members(session);
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
        tokio::fs::create_dir_all(&work_dir)
            .await
            .map_err(Self::io_error(&dir))?;

        let mut agent = bootstrap.agent;
        agent.work_dir = Some(work_dir);
        agent.instance_id = Some(id.clone());
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
        let log = std::fs::File::create(&log_path).map_err(Self::io_error(&log_path))?;
        let log_err = log.try_clone().map_err(Self::io_error(&log_path))?;

        let mut command = std::process::Command::new(&self.agent_binary);
        command
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

        let record = InstanceRecord {
            id: id.clone(),
            pid,
            host_arch: self.host_arch,
            requested_arch: spec.arch,
            tags: spec.tags.clone(),
        };
        let record_path = dir.join("instance.json");
        let record_text =
            serde_json::to_vec_pretty(&record).map_err(|error| ProviderError::Instance {
                id: id.clone(),
                detail: error.to_string(),
            })?;
        tokio::fs::write(&record_path, record_text)
            .await
            .map_err(Self::io_error(&record_path))?;

        tracing::info!(instance_id = %id, pid, arch = %spec.arch, emulated, "local instance started");
        Ok(Instance {
            id,
            instance_type: format!("local-{}", spec.size.as_str()),
            host_arch: self.host_arch,
            emulated,
            tags: spec.tags.clone(),
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
        let session = record.pid;
        if signal_session(session, Signal::SIGTERM) > 0 {
            let deadline = tokio::time::Instant::now() + TERMINATE_GRACE;
            while !session_members(session).is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            while signal_session(session, Signal::SIGKILL) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let dir = self.instance_dir(instance_id);
        // Drop the instance's disk but keep its agent.log for post-mortems.
        let work = dir.join("work");
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
                agent: AgentConfig {
                    core_url: "http://127.0.0.1:9".into(),
                    token: "secret-token".into(),
                    ca_file: None,
                    builder: None,
                    work_dir: None,
                    instance_id: None,
                },
                ca_pem: None,
            })
            .unwrap(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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
            if session_members(record.pid).len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let members = session_members(record.pid);
        assert!(members.len() >= 2, "agent and grandchild run: {members:?}");

        let only = BTreeMap::from([("stagely-core".to_string(), "t1".to_string())]);
        let listed = provider.list_instances(&only).await.unwrap();
        assert_eq!(listed.len(), 1);
        let other = BTreeMap::from([("stagely-core".to_string(), "t2".to_string())]);
        assert!(provider.list_instances(&other).await.unwrap().is_empty());

        provider.terminate_instance(&instance.id).await.unwrap();
        assert!(session_members(record.pid).is_empty());
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
        let first = LocalProvider::new(fake_agent(dir.path()), base.clone()).unwrap();
        let instance = first.create_instance(&spec(&[("k", "v")])).await.unwrap();
        drop(first);
        // A restarted core builds a fresh provider over the same directory.
        let second = LocalProvider::new(fake_agent(dir.path()), base).unwrap();
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
